# The two set-up commands of the README: `make demo` and `make test`.
# Each creates .venv on first use and installs the project into it.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
DEMO   := demo-output

.PHONY: demo test bench fuzz lint clean

$(VENV)/.core-installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install -e .
	touch $@

# torch is pinned to the CPU build that lies on this machine's disk; any other
# spec pulls a multi-GB CUDA build. It is only for the tests and the benchmark.
$(VENV)/.test-installed: $(VENV)/.core-installed
	$(PIP) install torch==2.13.0
	$(PIP) install -e '.[test,hf,s3,numeric]'
	touch $@

demo: $(VENV)/.core-installed
	rm -rf $(DEMO)
	$(PY) -m shardkit.synthetic $(DEMO)/qwen2-tiny --shape tiny --max-shard-size 1000000
	$(VENV)/bin/shardkit inspect $(DEMO)/qwen2-tiny 2>/dev/null || true
	$(VENV)/bin/shardkit merge $(DEMO)/qwen2-tiny -o $(DEMO)/qwen2-tiny-merged --sha256 --verify
	cd $(DEMO)/qwen2-tiny-merged && sha256sum -c model.safetensors.sha256
	ls -l $(DEMO)/qwen2-tiny-merged

test: $(VENV)/.test-installed
	$(PY) -m pytest -q -n 2  # two workers: most tests wait on disks and subprocesses

bench: $(VENV)/.test-installed
	$(PY) bench/bench.py
	$(PY) bench/bench_s3.py

fuzz: $(VENV)/.test-installed
	SHARDKIT_FUZZ_EXAMPLES=20000 $(PY) -m pytest -q tests/test_fuzz_header.py

lint: $(VENV)/.test-installed
	$(VENV)/bin/ruff check src tests bench

clean:
	rm -rf $(VENV) $(DEMO) bench-data .pytest_cache .hypothesis
