# The two set-up commands of the README: `make demo` and `make test`.
# Each creates .venv on first use and installs the project into it.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
DEMO   := demo-output

.PHONY: demo test bench fuzz lint clean

# pip's own chatter goes to .venv/install.log and is shown only when an install fails.
INSTALL = sh -c '$(PIP) install "$$@" >>$(VENV)/install.log 2>&1 || { cat $(VENV)/install.log; exit 1; }' install

$(VENV)/.core-installed: pyproject.toml
	@echo "setting up $(VENV) (the project and its dependencies: typer, rich, numpy)..."
	@$(PYTHON) -m venv $(VENV)
	@$(INSTALL) --upgrade pip
	@$(INSTALL) -e .
	@touch $@

# The test and benchmark dependencies. torch is the tests' reference implementation (dtype
# conversions compared bit for bit, outputs loaded by transformers), so it is pinned to one
# release and installed before the extras, whose open `torch>=2.1` then keeps it: what the
# reference answers (NaN bits, loader internals) may change from one torch release to the
# next. torch and transformers are only for the tests' reference runs; shardkit never imports them.
$(VENV)/.test-installed: $(VENV)/.core-installed
	@echo "installing the test dependencies (torch 2.13 CPU, transformers, safetensors, boto3, SeaweedFS...)..."
	@$(INSTALL) torch==2.13.0
	@$(INSTALL) -e '.[test,hf,s3,numeric]'
	@touch $@

demo: $(VENV)/.core-installed
	@rm -rf $(DEMO)
	@echo "== a small sharded Qwen2-layout checkpoint (4 shards + index, config, tokenizer):"
	@$(PY) -m shardkit.synthetic $(DEMO)/qwen2-tiny --shape tiny --max-shard-size 1000000
	@echo "\n== shardkit inspect $(DEMO)/qwen2-tiny   (headers only)"
	@$(VENV)/bin/shardkit inspect $(DEMO)/qwen2-tiny
	@echo "\n== shardkit merge $(DEMO)/qwen2-tiny -o $(DEMO)/qwen2-tiny-merged --sha256 --verify"
	@$(VENV)/bin/shardkit merge $(DEMO)/qwen2-tiny -o $(DEMO)/qwen2-tiny-merged --sha256 --verify
	@echo "\n== sha256sum -c model.safetensors.sha256   (the manifest is plain sha256sum format)"
	@cd $(DEMO)/qwen2-tiny-merged && sha256sum -c model.safetensors.sha256
	@echo "\n== shardkit verify $(DEMO)/qwen2-tiny-merged --against $(DEMO)/qwen2-tiny"
	@$(VENV)/bin/shardkit verify $(DEMO)/qwen2-tiny-merged --against $(DEMO)/qwen2-tiny
	@echo "\nThe tool is installed in $(VENV): run $(VENV)/bin/shardkit --help (or source $(VENV)/bin/activate)."
	@echo "README.md shows every command; 'make test' runs the test suite."

test: $(VENV)/.test-installed
	$(PY) -m pytest -q -n 2  # two workers: most tests wait on disks and subprocesses

bench: $(VENV)/.test-installed
	$(PY) bench/bench.py
	$(PY) bench/bench_s3.py
	$(PY) bench/bench_headers.py
	$(PY) bench/fp8_scale.py
	$(PY) bench/bench_fp8.py

fuzz: $(VENV)/.test-installed
	SHARDKIT_FUZZ_EXAMPLES=20000 $(PY) -m pytest -q tests/test_fuzz_header.py

# Zero findings from each: ruff; mypy (config in pyproject.toml); no import circle and no
# import from a lower layer into a higher one (tools/import_graph.py prints the graph).
lint: $(VENV)/.test-installed
	$(VENV)/bin/ruff check src tests bench tools
	$(VENV)/bin/mypy
	$(PY) tools/import_graph.py --quiet

clean:
	rm -rf $(VENV) $(DEMO) bench-data .pytest_cache .hypothesis
