"""merge: the output holds exactly the sources' tensors, laid out as the reference writes."""

from __future__ import annotations

import ctypes
import json
import struct
import subprocess
from pathlib import Path

import pytest
from safetensors import TensorSpec, deserialize, safe_open, serialize

import shardkit
from conftest import run_cli, snapshot, temporaries
from shardkit.checkpoint.shards import open_checkpoint
from shardkit.format.header import read_header
from shardkit.plan.files import plan_merge
from shardkit.synthetic import SyntheticCheckpoint, write_checkpoint

# safetensors' TensorSpec takes torch-style dtype names
_REFERENCE_DTYPE = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "U16": "uint16", "F16": "float16",
    "BF16": "bfloat16", "I32": "int32", "U32": "uint32", "F32": "float32", "F64": "float64", "I64": "int64",
    "U64": "uint64", "C64": "complex64", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
    "F8_E8M0": "float8_e8m0fnu", "F8_E4M3FNUZ": "float8_e4m3fnuz", "F8_E5M2FNUZ": "float8_e5m2fnuz",
}


def reference_serialize(made: SyntheticCheckpoint, metadata: dict[str, str]) -> bytes:
    """What the reference Rust writer produces for the same tensors and metadata."""
    keep_alive = []
    specs = {}
    for tensor in made.tensors:
        data = made.expected_bytes(tensor.name)
        buffer = ctypes.create_string_buffer(data, max(len(data), 1))
        keep_alive.append(buffer)
        shape = list(tensor.shape)
        if tensor.dtype == "F4":  # the reference takes F4's packed storage shape
            dtype, shape[-1] = "float4_e2m1fn_x2", shape[-1] // 2
        else:
            dtype = _REFERENCE_DTYPE[tensor.dtype]
        specs[tensor.name] = TensorSpec(dtype=dtype, shape=shape, data_ptr=ctypes.addressof(buffer), data_len=len(data))
    return serialize(specs, metadata)


def test_merged_file_is_byte_identical_to_reference_writer(checkpoint: SyntheticCheckpoint, tmp_path: Path) -> None:
    out = tmp_path / "merged.safetensors"
    report = shardkit.merge(checkpoint.folder, out)
    assert out.read_bytes() == reference_serialize(checkpoint, {"format": "pt"})
    assert report.tensors == len(checkpoint.tensors) == 57
    assert report.bytes == out.stat().st_size


def test_every_tensor_reads_back_through_reference_reader(checkpoint: SyntheticCheckpoint, tmp_path: Path) -> None:
    out = tmp_path / "merged.safetensors"
    shardkit.merge(checkpoint.folder, out)
    loaded = dict(deserialize(out.read_bytes()))
    assert set(loaded) == {t.name for t in checkpoint.tensors}
    for tensor in checkpoint.tensors:
        entry = loaded[tensor.name]
        assert entry["dtype"] == tensor.dtype
        assert tuple(entry["shape"]) == tensor.shape
        assert bytes(entry["data"]) == checkpoint.expected_bytes(tensor.name)
    with safe_open(out, framework="numpy") as handle:
        assert handle.metadata() == {"format": "pt"}


def test_output_is_naturally_aligned(checkpoint: SyntheticCheckpoint, tmp_path: Path) -> None:
    out = tmp_path / "merged.safetensors"
    shardkit.merge(checkpoint.folder, out)
    header = read_header(out)
    assert header.data_start % 8 == 0
    for info in header.tensors:
        width = max(1, {"F32": 4, "I64": 8, "BF16": 2, "F16": 2}.get(info.dtype, 1))
        assert (header.data_start + info.begin) % width == 0, info.name
    # wider dtypes first, then by name: the reference writer's order
    assert [t.dtype for t in header.tensors][:1] == ["I64"]


def test_metadata_union_keeps_keys_and_reports_conflicts(tmp_path: Path) -> None:
    made = write_checkpoint(tmp_path / "src", companions=False)
    first, second = (made.folder / name for name in made.shard_files[:2])
    _rewrite_metadata(first, {"format": "pt", "quant": "none", "author": "a"})
    _rewrite_metadata(second, {"format": "pt", "author": "b"})
    report = shardkit.merge(made.folder, tmp_path / "out.safetensors")
    assert read_header(tmp_path / "out.safetensors").metadata == {"format": "pt", "quant": "none", "author": "a"}
    assert any("'author' differs between shards" in w for w in report.warnings)


def test_merge_writes_the_metadata_inspect_shows(tmp_path: Path) -> None:
    """Shards named without zero padding (part-2 sorts after part-10 as text): merge,
    split, inspect and diff all take the first value in natural order, shard 2's."""
    made = write_checkpoint(tmp_path / "src", companions=False)
    index_path = made.folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    renamed = {old: f"part-{n}.safetensors" for old, n in zip(made.shard_files, (2, 10, 11, 12, 13, 14, 15))}
    for old, new in renamed.items():
        (made.folder / old).rename(made.folder / new)
    index["weight_map"] = {tensor: renamed[shard] for tensor, shard in index["weight_map"].items()}
    index_path.write_text(json.dumps(index))
    _rewrite_metadata(made.folder / "part-2.safetensors", {"format": "pt", "author": "two"})
    _rewrite_metadata(made.folder / "part-10.safetensors", {"format": "pt", "author": "ten"})
    shown = shardkit.inspect(made.folder)
    merged = shardkit.merge(made.folder, tmp_path / "out.safetensors")
    split = shardkit.split(made.folder, tmp_path / "split", max_shard_size="1GB")
    assert shown.metadata["author"] == "two"
    assert read_header(tmp_path / "out.safetensors").metadata["author"] == "two"
    assert read_header(tmp_path / "split" / "model.safetensors").metadata["author"] == "two"
    assert [w for w in merged.warnings if "'author'" in w] == [w for w in shown.warnings if "'author'" in w]
    assert [w for w in split.warnings if "'author'" in w] == [w for w in shown.warnings if "'author'" in w]


def test_format_pt_is_added_when_missing(tmp_path: Path) -> None:
    made = write_checkpoint(tmp_path / "src", companions=False)
    for name in made.shard_files:
        _rewrite_metadata(made.folder / name, None)
    shardkit.merge(made.folder, tmp_path / "out.safetensors")
    assert read_header(tmp_path / "out.safetensors").metadata == {"format": "pt"}


def _rewrite_metadata(path: Path, metadata: dict[str, str] | None) -> None:
    """Rewrite a shard with the same tensors and new metadata, via the reference writer."""
    keep, specs = [], {}
    for name, entry in deserialize(path.read_bytes()):
        data = bytes(entry["data"])
        buffer = ctypes.create_string_buffer(data, max(len(data), 1))
        keep.append(buffer)
        specs[name] = TensorSpec(
            dtype=_REFERENCE_DTYPE[entry["dtype"]], shape=entry["shape"], data_ptr=ctypes.addressof(buffer),
            data_len=len(data),
        )
    path.write_bytes(serialize(specs, metadata))


def test_model_folder_output_has_companions_and_no_index(checkpoint: SyntheticCheckpoint, tmp_path: Path) -> None:
    out = tmp_path / "merged"
    report = shardkit.merge(checkpoint.folder, out)
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "config.json", "generation_config.json", "merges.txt", "model.safetensors",
        "tokenizer.json", "tokenizer_config.json", "vocab.json",
    ]
    for name in names:
        if name != "model.safetensors":
            assert (out / name).read_bytes() == (checkpoint.folder / name).read_bytes()
    assert report.copied_files == [n for n in names if n != "model.safetensors"]


def test_weights_of_other_formats_are_not_companions(tmp_path: Path) -> None:
    """bert-base-uncased ships rust_model.ot and flax_model.msgpack beside model.safetensors:
    weights in formats shardkit does not write are neither copied nor accepted as an output name."""
    made = write_checkpoint(tmp_path / "bert")
    for name in ("rust_model.ot", "flax_model.msgpack", "ggml-model.ggml", "weights.npz"):
        (made.folder / name).write_bytes(b"not safetensors")
    report = shardkit.merge(made.folder, tmp_path / "merged")
    assert not set(report.copied_files) & {"rust_model.ot", "flax_model.msgpack", "ggml-model.ggml", "weights.npz"}
    assert "config.json" in report.copied_files
    for name in ("rust_model.ot", "flax_model.msgpack", "ggml-model.ggml", "weights.npz"):
        assert not (tmp_path / "merged" / name).exists()


def test_diffusers_prefix_is_kept(tmp_path: Path) -> None:
    made = write_checkpoint(tmp_path / "unet", prefix="diffusion_pytorch_model", companions=False)
    shardkit.merge(made.folder, tmp_path / "merged")
    assert [p.name for p in (tmp_path / "merged").iterdir()] == ["diffusion_pytorch_model.safetensors"]


def test_sources_are_untouched_and_no_temporaries(checkpoint: SyntheticCheckpoint, tmp_path: Path) -> None:
    before = snapshot(checkpoint.folder)
    shardkit.merge(checkpoint.folder, tmp_path / "merged", sha256=True)
    assert snapshot(checkpoint.folder) == before
    assert temporaries(tmp_path) == []


def test_plan_coalesces_adjacent_ranges(checkpoint: SyntheticCheckpoint) -> None:
    plan = plan_merge(open_checkpoint(checkpoint.folder), "model.safetensors")
    (planned,) = plan.files
    non_empty = sum(1 for name in planned.tensors if open_checkpoint(checkpoint.folder).tensors[name].info.nbytes)
    assert len(planned.copies) < non_empty
    covered = sorted((r.offset, r.offset + r.length) for r in planned.copies)
    assert covered[0][0] == planned.header_size
    assert covered[-1][1] == planned.size
    assert all(a[1] == b[0] for a, b in zip(covered, covered[1:]))


# ------------------------------------------------------------------------- CLI


def test_cli_json_report(checkpoint: SyntheticCheckpoint, tmp_path: Path) -> None:
    out = tmp_path / "m.safetensors"
    result = run_cli("merge", checkpoint.folder, "-o", out, "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["command"] == "merge"
    assert report["tensors"] == 57
    assert report["bytes"] == out.stat().st_size
    assert report["parameters"] == sum(t.nbytes and _elements(t.shape) for t in checkpoint.tensors)
    assert len(report["source_files"]) == 4


def _elements(shape: tuple[int, ...]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def test_cli_dry_run_writes_nothing(checkpoint: SyntheticCheckpoint, tmp_path: Path) -> None:
    out = tmp_path / "m.safetensors"
    result = run_cli("merge", checkpoint.folder, "-o", out, "--dry-run", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["dry_run"] is True
    assert report["header_bytes"] > 0 and report["copy_ranges"] > 0
    assert not out.exists()
    assert list(tmp_path.iterdir()) == [checkpoint.folder]
    assert report["bytes"] == len(reference_serialize(checkpoint, {"format": "pt"}))


def test_cli_refuses_existing_output_unless_forced(checkpoint: SyntheticCheckpoint, tmp_path: Path) -> None:
    out = tmp_path / "m.safetensors"
    out.write_bytes(b"precious")
    result = run_cli("merge", checkpoint.folder, "-o", out)
    assert result.exit_code == 2
    assert "already exists; pass --force" in result.stderr
    assert out.read_bytes() == b"precious"
    result = run_cli("merge", checkpoint.folder, "-o", out, "--force")
    assert result.exit_code == 0, result.stderr
    assert out.read_bytes() == reference_serialize(checkpoint, {"format": "pt"})


def test_cli_sha256_file_passes_sha256sum(checkpoint: SyntheticCheckpoint, tmp_path: Path) -> None:
    out = tmp_path / "m.safetensors"
    result = run_cli("merge", checkpoint.folder, "-o", out, "--sha256", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    import hashlib

    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    assert report["sha256"] == digest
    assert (tmp_path / "m.safetensors.sha256").read_text() == f"{digest}  m.safetensors\n"
    check = subprocess.run(["sha256sum", "-c", "m.safetensors.sha256"], cwd=tmp_path, capture_output=True, text=True)
    assert check.returncode == 0 and "m.safetensors: OK" in check.stdout
    out.write_bytes(out.read_bytes()[:-1] + b"\x00")
    check = subprocess.run(["sha256sum", "-c", "m.safetensors.sha256"], cwd=tmp_path, capture_output=True, text=True)
    assert check.returncode != 0


def test_cli_sha256_in_folder_output(checkpoint: SyntheticCheckpoint, tmp_path: Path) -> None:
    out = tmp_path / "merged"
    result = run_cli("merge", checkpoint.folder, "-o", out, "--sha256")
    assert result.exit_code == 0, result.stderr
    check = subprocess.run(["sha256sum", "-c", "model.safetensors.sha256"], cwd=out, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def test_cli_human_output_is_quiet_without_tty(checkpoint: SyntheticCheckpoint, tmp_path: Path) -> None:
    result = run_cli("merge", checkpoint.folder, "-o", tmp_path / "m.safetensors")
    assert result.exit_code == 0
    assert result.stderr == ""  # no progress bar when not a terminal
    assert "merge: wrote 57 tensors" in result.stdout
    quiet = run_cli("merge", checkpoint.folder, "-o", tmp_path / "q.safetensors", "--quiet")
    assert quiet.exit_code == 0 and quiet.stdout == "" and quiet.stderr == ""


def test_cli_verify_flag(checkpoint: SyntheticCheckpoint, tmp_path: Path) -> None:
    result = run_cli("merge", checkpoint.folder, "-o", tmp_path / "m.safetensors", "--verify", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["verified"] is True


def test_help_teaches_with_an_example() -> None:
    result = run_cli("merge", "--help")
    assert result.exit_code == 0
    assert "Example: shardkit merge" in result.stdout
    assert "--sha256" in result.stdout and "--dry-run" in result.stdout


@pytest.mark.parametrize("flag", ["--sha256", None])
def test_single_file_and_folder_give_the_same_weights(checkpoint: SyntheticCheckpoint, tmp_path: Path, flag) -> None:
    args = [flag] if flag else []
    assert run_cli("merge", checkpoint.folder, "-o", tmp_path / "a.safetensors", *args).exit_code == 0
    assert run_cli("merge", checkpoint.folder, "-o", tmp_path / "folder", *args).exit_code == 0
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "folder" / "model.safetensors").read_bytes()


def test_header_length_prefix_matches(checkpoint: SyntheticCheckpoint, tmp_path: Path) -> None:
    out = tmp_path / "m.safetensors"
    shardkit.merge(checkpoint.folder, out)
    raw = out.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    assert length % 8 == 0
    assert raw[8 : 8 + length].rstrip(b" ").endswith(b"}")


def test_existing_empty_folder_is_a_valid_destination(checkpoint: SyntheticCheckpoint, tmp_path: Path) -> None:
    out = tmp_path / "made-by-user"
    out.mkdir()
    result = run_cli("merge", checkpoint.folder, "-o", out)
    assert result.exit_code == 0, result.stderr
    assert (out / "model.safetensors").read_bytes() == reference_serialize(checkpoint, {"format": "pt"})


def test_lone_file_does_not_drag_its_neighbours_along(tmp_path: Path) -> None:
    downloads = tmp_path / "Downloads"
    made = write_checkpoint(downloads, max_shard_size=None, companions=False)
    (downloads / "holiday.jpg").write_bytes(b"\xff\xd8")
    (downloads / "notes.txt").write_text("private")
    report = shardkit.merge(downloads / made.shard_files[0], tmp_path / "out")
    assert report.copied_files == []
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model.safetensors"]


@pytest.mark.parametrize("command", ["merge", "split"])
def test_report_seconds_count_the_header_phase(
    checkpoint: SyntheticCheckpoint, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: str
) -> None:
    """A 100 MB header takes seconds to read: the report's `seconds` (and so its
    throughput) must cover the whole run, not only the copy."""
    import time

    from shardkit.commands import merge as merge_module
    from shardkit.commands import split as split_module

    module = merge_module if command == "merge" else split_module
    real = module.open_checkpoint

    def slow_open(*args: object, **kwargs: object) -> object:
        time.sleep(0.5)  # stands for reading and checking a huge header
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "open_checkpoint", slow_open)
    if command == "merge":
        report = shardkit.merge(checkpoint.folder, tmp_path / "out.safetensors")
    else:
        report = shardkit.split(checkpoint.folder, tmp_path / "out", max_shard_size="1MB")
    assert report.seconds >= 0.5
