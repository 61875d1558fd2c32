"""`--dtype`: precision conversion while merging or splitting, against torch.

Real checkpoints (saved by transformers and by safetensors), the real CLI; the
converted bytes are compared with torch's `.to()`, the converted model is loaded by
transformers, and the loss counts are compared with torch's own view of the values.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import shardkit
from conftest import assert_clean_failure, run_cli, sigint_as_in_a_terminal, snapshot, temporaries
from shardkit.checkpoint.shards import open_checkpoint
from shardkit.errors import BadInputError, VerificationError
from shardkit.synthetic import Qwen2Shape, write_checkpoint
from test_s3 import bucket, mid, store, work  # noqa: F401 - the S3 fixtures

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")

CRAFTED = {
    "a.big": torch.tensor([1e5, 7e4, 65504.0, 65520.0, 1.0, -1e6, float("inf"), float("nan"), 1e-8, 3e-8, 0.0, -0.0]),
    "b.tiny": torch.tensor([1e-30, 1e-40, 6e-8, 5.9e-8, -1e-12, 2.0], dtype=torch.float32),
    "c.half": torch.tensor([1.5, -2.25, 65504.0], dtype=torch.float16),
    "d.ids": torch.arange(10, dtype=torch.int64),
    "e.mask": torch.tensor([True, False, True]),
    "f.fp8": torch.tensor([0.5, -1.0, 2.0]).to(torch.float8_e4m3fn),
    "layer.norm.weight": torch.full((4,), 1e-9, dtype=torch.float32),
    "g.bf16": torch.tensor([1e38, 3e38, -1.0], dtype=torch.bfloat16),
}


def loss_of(source: torch.Tensor, converted: torch.Tensor) -> tuple[int, int]:
    """torch's own count: finite values that became ±inf, non-zero values that became zero."""
    a, b = source.double(), converted.double()
    return int((a.isfinite() & b.isinf()).sum()), int(((a != 0) & ~a.isnan() & (b == 0)).sum())


@pytest.fixture
def crafted(tmp_path: Path) -> Path:
    folder = tmp_path / "crafted"
    folder.mkdir()
    safetensors_torch.save_file(CRAFTED, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps({"model_type": "x", "torch_dtype": "float32", "dtype": "float32"}))
    return folder


def same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical, except that NaN only has to stay NaN (torch's NaN payloads vary)."""
    nan = a.isnan()
    if not torch.equal(nan, b.isnan()):
        return False
    return torch.equal(a[~nan].view(torch.int16 if a.element_size() == 2 else torch.int32),
                       b[~nan].view(torch.int16 if b.element_size() == 2 else torch.int32))


def test_fp16_conversion_is_torchs_and_counts_its_losses(crafted: Path, tmp_path: Path) -> None:
    before = snapshot(crafted)
    out = tmp_path / "out"
    result = run_cli("merge", crafted, "-o", out, "--dtype", "fp16", "--keep", "*norm*", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert snapshot(crafted) == before

    converted = safetensors_torch.load_file(out / "model.safetensors")
    for name in ("a.big", "b.tiny", "g.bf16"):
        assert converted[name].dtype == torch.float16, name
        assert same_values(converted[name], CRAFTED[name].to(torch.float16)), name
    for name in ("c.half", "d.ids", "e.mask", "f.fp8", "layer.norm.weight"):  # same dtype, not float, kept
        assert converted[name].dtype == CRAFTED[name].dtype
        assert converted[name].view(torch.uint8).tolist() == CRAFTED[name].view(torch.uint8).tolist(), name

    dtype = report["dtype"]
    assert dtype["target"] == "F16" and dtype["converted"] == 3 and dtype["already"] == 1
    assert dtype["kept"] == ["layer.norm.weight"]
    assert dtype["not_float"] == {"BOOL": 1, "F8_E4M3": 1, "I64": 1}
    assert dtype["lossless"] is False
    losses = {loss["tensor"]: (loss["overflow"], loss["underflow"]) for loss in dtype["losses"]}
    expected = {n: loss_of(CRAFTED[n], CRAFTED[n].to(torch.float16)) for n in ("a.big", "b.tiny", "g.bf16")}
    assert losses == {n: v for n, v in expected.items() if v != (0, 0)}
    assert losses["a.big"] == (4, 1) and losses["b.tiny"] == (0, 3) and losses["g.bf16"] == (2, 0)
    assert any("a.big: F32 → F16: 4 value(s) overflowed" in w for w in report["warnings"])

    config = json.loads((out / "config.json").read_text())
    assert config["torch_dtype"] == "float16" and config["dtype"] == "float16"


def test_losses_are_warnings_one_per_tensor_then_summed_and_the_exit_code_is_0(tmp_path: Path) -> None:
    folder = tmp_path / "many"
    folder.mkdir()
    tensors = {f"t{i}": torch.tensor([1e6, float(i)]) for i in range(8)}
    safetensors_torch.save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    result = run_cli("merge", folder / "model.safetensors", "-o", tmp_path / "half.safetensors", "--dtype", "float16")
    assert result.exit_code == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("shardkit: warning:")]
    assert len(lines) == 6, result.stderr
    assert lines[0] == "shardkit: warning: t0: F32 → F16: 1 value(s) overflowed to ±inf, 0 underflowed to zero"
    assert "… and 3 more tensor(s)" in lines[-1] and "3 overflowed" in lines[-1]


def test_a_lossless_conversion_says_so(checkpoint, tmp_path: Path) -> None:
    result = run_cli("merge", checkpoint.folder, "-o", tmp_path / "out.safetensors", "--dtype", "fp32")
    assert result.exit_code == 0, result.stderr
    assert "lossless range: no value overflowed to ±inf or underflowed to zero in F32" in result.stdout
    assert "warning" not in result.stderr
    reference = safetensors_torch.load_file(next(checkpoint.folder.glob("*00001*.safetensors")))
    converted = safetensors_torch.load_file(tmp_path / "out.safetensors")
    for name, tensor in reference.items():
        if tensor.dtype in (torch.bfloat16, torch.float16):
            assert same_values(converted[name], tensor.to(torch.float32)), name


@pytest.mark.hf
def test_a_transformers_fp32_model_converted_to_bf16_loads_with_the_logits_of_bf16_loading(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    from hf_models import tiny_qwen2

    original = tmp_path / "fp32"
    tiny_qwen2(False).save_pretrained(original, max_shard_size="60KB")
    assert len(list(original.glob("model-*.safetensors"))) >= 3
    out = tmp_path / "bf16"
    result = run_cli("merge", original, "-o", out, "--dtype", "bf16", "--verify", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["verified"] is True
    config = json.loads((out / "config.json").read_text())
    named = {config[k] for k in ("torch_dtype", "dtype") if k in config}
    assert named == {"bfloat16"}

    batch = torch.arange(16).reshape(2, 8)
    with torch.no_grad():
        expected = transformers.AutoModelForCausalLM.from_pretrained(original, dtype=torch.bfloat16).eval()(batch)
        model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).eval()
        got = model(batch)
    assert torch.equal(got.logits, expected.logits)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def test_split_packs_by_converted_sizes_and_the_index_follows(checkpoint, tmp_path: Path) -> None:
    out = tmp_path / "split"
    report = shardkit.split(checkpoint.folder, out, max_shard_size="600KB", dtype="fp32", keep=["*norm*"], sha256=True)
    sums = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=out, capture_output=True, text=True)
    assert sums.returncode == 0 and sums.stdout.count(": OK") == len(report.files), sums.stdout  # what was written
    index = json.loads((out / "model.safetensors.index.json").read_text())
    written = open_checkpoint(out)
    assert index["metadata"]["total_size"] == written.total_bytes == sum(f.size for f in report.files) - sum(
        8 + h.header_size for h in written.shards
    )
    assert all(sum(t.nbytes for t in h.tensors) <= 600_000 or len(h.tensors) == 1 for h in written.shards)
    source = open_checkpoint(checkpoint.folder)
    for name, tensor in written.tensors.items():
        was = source.tensors[name].info.dtype
        if "norm" in name or was not in ("F64", "F32", "F16", "BF16"):
            assert tensor.info.dtype == was, name
        else:
            assert tensor.info.dtype == "F32", name
    # the same conversion, checked afterwards from the outside
    result = run_cli("verify", out, "--against", checkpoint.folder, "--dtype", "float32", "--keep", "*norm*",
                     "--no-architecture")
    assert result.exit_code == 0, result.stdout + result.stderr


def test_verify_finds_a_flipped_byte_in_a_converted_tensor(crafted: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.safetensors"
    assert run_cli("merge", crafted, "-o", out, "--dtype", "bf16").exit_code == 0
    header = open_checkpoint(out).tensors["b.tiny"]
    data = bytearray(out.read_bytes())
    data[header.offset + 3] ^= 0x01
    out.write_bytes(data)
    result = run_cli("verify", out, "--against", crafted, "--dtype", "bf16", "--no-architecture")
    assert result.exit_code == 1
    assert "'b.tiny'" in result.stdout and "different bytes" in result.stdout, result.stdout


def test_merge_verify_removes_a_conversion_whose_bytes_are_wrong(crafted: Path, tmp_path: Path, monkeypatch) -> None:
    """A fault in the writer (one flipped bit in what a transform produced) is caught by
    --verify, which recomputes the conversion on its own, and the output is removed."""
    from shardkit.engine import execute

    real_fill = execute.fill

    def flipping_fill(planned, start, out, read, **kwargs):
        stats = real_fill(planned, start, out, read, **kwargs)
        for step in planned.transforms:
            if step.tensor == "a.big" and start <= step.offset < start + len(out):
                out[step.offset - start] ^= 0x01
        return stats

    monkeypatch.setattr(execute, "fill", flipping_fill)
    dest = tmp_path / "out"
    with pytest.raises(VerificationError, match="'a.big' holds different bytes"):
        shardkit.merge(crafted, dest, dtype="bf16", verify=True)
    assert not dest.exists() and temporaries(tmp_path) == []


def test_unusable_dtype_options_fail_cleanly(crafted: Path, tmp_path: Path) -> None:
    before = snapshot(crafted)
    for args, message in (
        (["--dtype", "int8"], "int8"),
        (["--keep", "*norm*"], "pass --dtype too"),
        (["--dtype", "bf16", "--keep", ""], "--keep ''"),
    ):
        result = run_cli("merge", crafted, "-o", tmp_path / "out", *args)
        assert_clean_failure(result, 2, message)
        assert not (tmp_path / "out").exists() and temporaries(tmp_path) == []
    assert snapshot(crafted) == before
    result = run_cli("verify", crafted, "--dtype", "bf16")
    assert_clean_failure(result, 2, "pass --against SOURCE too")


def test_unusable_dtype_options_name_the_keywords_for_python_callers(crafted: Path, tmp_path: Path) -> None:
    """The same mistakes made from Python are told in keyword arguments, not CLI flags."""
    with pytest.raises(BadInputError) as raised:
        shardkit.merge(crafted, tmp_path / "out", keep=["*norm*"])
    assert "keep=… leaves tensors in their source dtype" in str(raised.value)
    assert "pass dtype=… too" in str(raised.value) and "--" not in str(raised.value)
    with pytest.raises(BadInputError, match="pass against=… too"):
        shardkit.verify(crafted, dtype="bf16")
    assert not (tmp_path / "out").exists() and temporaries(tmp_path) == []


def test_dry_run_shows_the_transforms(crafted: Path, tmp_path: Path) -> None:
    result = run_cli("merge", crafted, "-o", tmp_path / "o.safetensors", "--dtype", "bf16", "--dry-run", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    steps = report["plan"]["files"][0]["steps"]
    transforms = {s["tensor"]: s for s in steps if s["kind"] == "transform"}
    assert set(transforms) == {"a.big", "b.tiny", "c.half", "layer.norm.weight"}
    assert transforms["a.big"]["src_dtype"] == "F32" and transforms["a.big"]["dst_dtype"] == "BF16"
    assert transforms["a.big"]["length"] * 2 == transforms["a.big"]["source_length"]
    assert report["dtype"]["lossless"] is None
    assert not (tmp_path / "o.safetensors").exists()


F32_MID = Qwen2Shape(
    hidden=512, intermediate=2816, layers=6, heads=8, kv_heads=2, vocab=8192, tie_word_embeddings=False, dtype="F32"
)


def test_a_conversion_killed_midway_leaves_nothing_at_the_destination(tmp_path: Path) -> None:
    source = write_checkpoint(tmp_path / "f32", F32_MID, max_shard_size=50_000_000).folder
    dest = tmp_path / "out" / "bf16"
    dest.parent.mkdir()
    process = subprocess.Popen(
        [sys.executable, "-m", "shardkit", "split", source, "-o", dest, "--dtype", "bf16", "-s", "40MB"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=sigint_as_in_a_terminal,
    )
    deadline = time.monotonic() + 60
    while not temporaries(dest.parent) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.0005)
    staged = temporaries(dest.parent)
    assert staged and process.poll() is None, "the conversion ended before it could be killed"
    time.sleep(0.05)  # well inside the conversion of ~150 MB
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert not dest.exists()
    # the next run removes what the killed one left and writes the whole output
    assert run_cli("split", source, "-o", dest, "--dtype", "bf16", "-s", "40MB").exit_code == 0
    assert temporaries(dest.parent) == []
    assert open_checkpoint(dest).total_bytes * 2 == open_checkpoint(source).total_bytes


@pytest.mark.s3
def test_s3_to_s3_conversion_writes_the_local_bytes_copying_unchanged_tensors_inside_the_store(
    store, bucket: str, mid, work: Path  # noqa: F811 - the S3 fixtures of test_s3
) -> None:
    from test_s3 import remote_folder_bytes, s3_env

    local = work / "mid-fp32-local"
    shardkit.split(mid.folder, local, max_shard_size="60MB", dtype="fp32", keep=["*mlp*"], sha256=True)
    result = run_cli(
        "split", f"s3://{bucket}/mid/", "-o", f"s3://{bucket}/mid-fp32/", "-s", "60MB", "--dtype", "fp32",
        "--keep", "*mlp*", "--sha256", "--json", env=s3_env(store),
    )
    assert result.exit_code == 0, result.stderr
    remote = remote_folder_bytes(store, bucket, "mid-fp32")
    assert remote == {p.relative_to(local).as_posix(): p.read_bytes() for p in local.rglob("*") if p.is_file()}
    report = json.loads(result.stdout)
    transfer = report["transfer"]
    assert transfer["server_side"] is True
    source = open_checkpoint(mid.folder)
    kept = sum(t.info.nbytes for n, t in source.tensors.items() if "mlp" in n)
    converted = report["bytes"] - kept
    # the kept (mlp) tensors were copied by the store; the converted ones made and sent by the client
    assert transfer["bytes_copied"] >= kept * 0.9
    assert converted <= transfer["bytes_sent"] < converted + 20 * 2**20 * len(report["files"])
    assert report["dtype"]["converted"] > 0 and report["dtype"]["lossless"] is True


@pytest.mark.parametrize("method", ["gptq", "awq", "bitsandbytes", "compressed-tensors", None])
def test_a_checkpoint_quantised_otherwise_than_fine_grained_fp8_is_refused(tmp_path: Path, method: str | None):
    """GPTQ-style: int32 qweight/qzeros beside fp16 scales. --dtype bf16 rounded the
    scales (every dequantised weight moved) and wrote torch_dtype bfloat16 under the
    unchanged quantization_config, exit 0, reporting no loss."""
    source = tmp_path / "llama-gptq"
    source.mkdir()
    prefix = "model.layers.0.mlp.down_proj"
    safetensors_torch.save_file({
        f"{prefix}.qweight": torch.randint(0, 2**31 - 1, (16, 64), dtype=torch.int32),
        f"{prefix}.qzeros": torch.randint(0, 2**31 - 1, (1, 8), dtype=torch.int32),
        f"{prefix}.scales": (torch.rand(1, 64) * 0.01 + 1e-3).half(),
        "model.embed_tokens.weight": torch.randn(32, 64).half(),
    }, source / "model.safetensors", metadata={"format": "pt"})
    section = {"bits": 4, "group_size": 128} | ({"quant_method": method} if method else {})
    (source / "config.json").write_text(json.dumps({"torch_dtype": "float16", "quantization_config": section}))
    before = snapshot(source)
    for command, out in (("merge", tmp_path / "merged"), ("split", tmp_path / "split")):
        result = run_cli(command, source, out, "--dtype", "bf16")
        assert_clean_failure(result, 2, f"config.json: the checkpoint is quantised (quantization_config.quant_method "
                                        f"{method!r}) and has no FP8 weights to dequantise; --dtype would round")
        assert not out.exists()
    assert snapshot(source) == before and temporaries(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama-gptq"]
