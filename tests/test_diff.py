"""diff: what differs between two checkpoints, whatever their sharding, with exit codes 0/1/2."""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

import shardkit
from conftest import assert_clean_failure, run_cli, snapshot
from shardkit.format.header import TensorSpec, serialize_header
from shardkit.synthetic import SyntheticCheckpoint, write_checkpoint

REPORT_KEYS = {
    "a", "b", "identical", "tensors_a", "tensors_b", "only_a", "only_b", "dtype_changed", "shape_changed",
    "metadata_changed", "data_compared", "data_equal", "data_different", "compared_bytes", "max_abs_diff", "renamed",
    "seconds", "warnings", "files_only_a", "files_only_b", "files_different", "notes",
}


def tensor_offset(path: Path, name: str) -> tuple[int, int]:
    """(absolute offset, length) of a tensor's data, from the raw header."""
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        entry = json.loads(handle.read(length))[name]
    begin, end = entry["data_offsets"]
    return 8 + length + begin, end - begin


def flip_byte(path: Path, name: str, at: int = 0) -> None:
    offset, length = tensor_offset(path, name)
    assert at < length
    with open(path, "r+b") as handle:
        handle.seek(offset + at)
        byte = handle.read(1)
        handle.seek(offset + at)
        handle.write(bytes([byte[0] ^ 0x01]))


def write_raw(path: Path, tensors: dict[str, tuple[str, tuple[int, ...], bytes]],
              metadata: dict[str, str] | None = None) -> None:
    specs = [TensorSpec(name, dtype, shape, len(data)) for name, (dtype, shape, data) in tensors.items()]
    header, placed = serialize_header(specs, metadata if metadata is not None else {"format": "pt"})
    path.write_bytes(header + b"".join(tensors[spec.name][2] for spec, _ in placed))


@pytest.fixture
def merged(checkpoint: SyntheticCheckpoint, tmp_path: Path) -> Path:
    out = tmp_path / "merged.safetensors"
    shardkit.merge(checkpoint.folder, out)
    return out


def test_shards_and_their_merge_are_identical(checkpoint: SyntheticCheckpoint, merged: Path) -> None:
    before = snapshot(checkpoint.folder)
    result = run_cli("diff", checkpoint.folder, merged)
    assert result.exit_code == 0, result.stdout + result.stderr
    total = sum(t.nbytes for t in checkpoint.tensors)
    compared = f"{total / 1e6:.2f} MB compared"
    assert result.stdout == f"identical: A has 57 tensors, B has 57; 57 tensors with equal data ({compared})\n"
    report = shardkit.diff(checkpoint.folder, merged)
    assert report.identical and report.data_equal == 57 and report.compared_bytes == total
    assert snapshot(checkpoint.folder) == before


def test_a_resharded_copy_is_identical(checkpoint: SyntheticCheckpoint, tmp_path: Path) -> None:
    shardkit.split(checkpoint.folder, tmp_path / "resharded", max_shard_size="600KB")
    assert run_cli("diff", tmp_path / "resharded", checkpoint.folder).exit_code == 0


def test_one_flipped_byte_names_exactly_that_tensor(checkpoint: SyntheticCheckpoint, merged: Path) -> None:
    name = "model.layers.2.mlp.up_proj.weight"
    flip_byte(merged, name, at=123_456)
    result = run_cli("diff", checkpoint.folder, merged)
    assert result.exit_code == 1, result.stderr
    assert result.stdout.splitlines() == [
        f"≠ {name}  data differs",
        "different: A has 57 tensors, B has 57; 56 tensors with equal data (3.61 MB compared)",
    ]
    as_json = json.loads(run_cli("diff", checkpoint.folder, merged, "--json").stdout)
    assert as_json["data_different"] == [name]
    assert as_json["identical"] is False and as_json["data_equal"] == 56
    # headers alone cannot see it
    headers = run_cli("diff", checkpoint.folder, merged, "--no-data", "--json")
    assert headers.exit_code == 0
    assert json.loads(headers.stdout)["data_compared"] is False


def test_removed_and_renamed_tensors(tmp_path: Path) -> None:
    data = {n: ("F32", (4,), np.arange(4, dtype="<f4").tobytes()) for n in ("keep", "old", "gone")}
    write_raw(tmp_path / "a.safetensors", data)
    renamed = {"keep": data["keep"], "new": data["old"]}
    write_raw(tmp_path / "b.safetensors", renamed)
    result = run_cli("diff", tmp_path / "a.safetensors", tmp_path / "b.safetensors")
    assert result.exit_code == 1
    # "gone" and "old" hold the same bytes: the first of them in name order is paired with "new"
    assert result.stdout.splitlines()[:2] == ["- old  (only in A)", "= gone ↔ new, same bytes"]
    report = shardkit.diff(tmp_path / "a.safetensors", tmp_path / "b.safetensors")
    assert (report.only_a, report.only_b, report.renamed) == (["old"], [], [["gone", "new"]])
    assert (report.data_equal, report.data_different) == (1, [])


def test_dtype_and_shape_changes(tmp_path: Path) -> None:
    payload = bytes(range(64))
    write_raw(tmp_path / "a.safetensors", {"w": ("F32", (4, 4), payload), "v": ("F32", (16,), payload)})
    write_raw(tmp_path / "b.safetensors", {"w": ("I32", (4, 4), payload), "v": ("F32", (2, 8), payload)})
    result = run_cli("diff", tmp_path / "a.safetensors", tmp_path / "b.safetensors", "--json")
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert report["dtype_changed"] == [{"name": "w", "a": "F32", "b": "I32"}]
    assert report["shape_changed"] == [{"name": "v", "a": "[16]", "b": "[2, 8]"}]
    assert report["data_equal"] == 0 and report["data_different"] == []
    text = run_cli("diff", tmp_path / "a.safetensors", tmp_path / "b.safetensors").stdout
    assert "~ w  dtype F32 → I32" in text and "~ v  shape [16] → [2, 8]" in text


def test_file_metadata_change(tmp_path: Path) -> None:
    tensors = {"w": ("F32", (2,), b"\0" * 8)}
    write_raw(tmp_path / "a.safetensors", tensors, {"format": "pt", "step": "100"})
    write_raw(tmp_path / "b.safetensors", tensors, {"format": "pt", "step": "200", "tag": "x"})
    result = run_cli("diff", tmp_path / "a.safetensors", tmp_path / "b.safetensors")
    assert result.exit_code == 1
    assert result.stdout.splitlines()[:2] == [
        "~ metadata 'step'  '100' → '200'",
        "~ metadata 'tag'  (absent) → 'x'",
    ]
    report = shardkit.diff(tmp_path / "a.safetensors", tmp_path / "b.safetensors")
    assert [m.to_dict() for m in report.metadata_changed] == [
        {"scope": "file", "key": "step", "a": "100", "b": "200"},
        {"scope": "file", "key": "tag", "a": None, "b": "x"},
    ]
    assert report.data_equal == 1 and not report.identical


def test_index_metadata_change_but_not_total_size(checkpoint: SyntheticCheckpoint, tmp_path: Path) -> None:
    other = tmp_path / "other"
    shutil.copytree(checkpoint.folder, other)
    index_path = other / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["metadata"]["quantization"] = "none"
    index_path.write_text(json.dumps(index))
    report = shardkit.diff(checkpoint.folder, other, data=False)
    assert [m.to_dict() for m in report.metadata_changed] == [
        {"scope": "index", "key": "quantization", "a": None, "b": "none"}
    ]
    # total_size only exists when sharded: shards against one file is no metadata change
    one = tmp_path / "one.safetensors"
    shardkit.merge(checkpoint.folder, one)
    assert shardkit.diff(other, one).metadata_changed == []


def test_two_fine_tunes_differ_everywhere(tmp_path: Path) -> None:
    a = write_checkpoint(tmp_path / "a", seed=1, companions=False)
    write_checkpoint(tmp_path / "b", seed=2, companions=False)
    report = shardkit.diff(a.folder, tmp_path / "b")
    assert report.data_different == sorted(t.name for t in a.tensors)
    assert report.data_equal == 0


def test_json_shape(checkpoint: SyntheticCheckpoint, merged: Path) -> None:
    result = run_cli("diff", checkpoint.folder, merged, "--json")
    assert result.exit_code == 0
    report = json.loads(result.stdout)
    assert set(report) == REPORT_KEYS
    assert report["identical"] is True and report["max_abs_diff"] is None
    assert (report["a"], report["b"]) == (str(checkpoint.folder), str(merged))
    assert (report["tensors_a"], report["tensors_b"], report["data_equal"]) == (57, 57, 57)


# --------------------------------------------------------------------------- max abs diff


def test_max_abs_diff_exact_on_crafted_f32(tmp_path: Path) -> None:
    save_file({"w": np.array([1.0, 2.0, 3.0, -4.0], "<f4"), "same": np.ones(3, "<f4")}, tmp_path / "a.safetensors")
    save_file({"w": np.array([1.0, 2.5, 3.0, -4.25], "<f4"), "same": np.ones(3, "<f4")}, tmp_path / "b.safetensors")
    result = run_cli("diff", tmp_path / "a.safetensors", tmp_path / "b.safetensors", "--max-abs-diff", "--json")
    assert result.exit_code == 1, result.stderr
    report = json.loads(result.stdout)
    assert report["data_different"] == ["w"] and report["max_abs_diff"] == {"w": 0.5}
    text = run_cli("diff", tmp_path / "a.safetensors", tmp_path / "b.safetensors", "--max-abs-diff").stdout
    assert "≠ w  data differs  max |a-b| = 0.5" in text


def test_max_abs_diff_across_chunks_and_dtypes(tmp_path: Path) -> None:
    big_a = np.zeros(700_000, "<f4")  # 2.8 MB: three decoding chunks
    big_b = big_a.copy()
    big_b[1] = 0.25
    big_b[400_000] = -3.0  # in the second chunk
    big_b[699_999] = 2.0
    bf_a = np.array([1.0, 2.0, 256.0], ml_dtypes.bfloat16)
    bf_b = np.array([1.0, 2.0, 258.0], ml_dtypes.bfloat16)
    f8_a = np.array([0.5, 448.0], ml_dtypes.float8_e4m3fn)
    f8_b = np.array([0.5, -448.0], ml_dtypes.float8_e4m3fn)
    nan_a, nan_b = np.array([np.nan, 1.0], "<f2"), np.array([np.nan, 1.5], "<f2")
    one_sided = np.array([np.nan, 1.0], "<f4"), np.array([0.0, 1.0], "<f4")
    write_raw(tmp_path / "a.safetensors", {
        "big": ("F32", big_a.shape, big_a.tobytes()), "bf16": ("BF16", (3,), bf_a.tobytes()),
        "f8": ("F8_E4M3", (2,), f8_a.tobytes()), "half_nan": ("F16", (2,), nan_a.tobytes()),
        "one_sided_nan": ("F32", (2,), one_sided[0].tobytes()), "ints": ("I32", (2,), struct.pack("<ii", 1, 2)),
    })
    write_raw(tmp_path / "b.safetensors", {
        "big": ("F32", big_b.shape, big_b.tobytes()), "bf16": ("BF16", (3,), bf_b.tobytes()),
        "f8": ("F8_E4M3", (2,), f8_b.tobytes()), "half_nan": ("F16", (2,), nan_b.tobytes()),
        "one_sided_nan": ("F32", (2,), one_sided[1].tobytes()), "ints": ("I32", (2,), struct.pack("<ii", 1, 5)),
    })
    report = shardkit.diff(tmp_path / "a.safetensors", tmp_path / "b.safetensors", max_abs_diff=True)
    values = report.max_abs_diff
    assert values is not None
    assert values["big"] == 3.0 and values["bf16"] == 2.0 and values["f8"] == 896.0 and values["half_nan"] == 0.5
    assert values["ints"] is None  # not a float
    assert np.isnan(values["one_sided_nan"])
    assert report.to_dict()["max_abs_diff"]["one_sided_nan"] == "nan"  # JSON has no NaN


def test_max_abs_diff_needs_the_numeric_extra(tmp_path: Path, merged: Path, checkpoint: SyntheticCheckpoint) -> None:
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "ml_dtypes.py").write_text("raise ImportError('ml_dtypes is not installed')\n")
    env = {"PYTHONPATH": os.pathsep.join([str(shadow), os.environ.get("PYTHONPATH", "")])}
    result = run_cli("diff", checkpoint.folder, merged, "--max-abs-diff", env=env)
    assert_clean_failure(result, 2, "--max-abs-diff needs the optional extra: pip install 'shardkit[numeric]'")
    assert run_cli("diff", checkpoint.folder, merged, env=env).exit_code == 0  # the rest works without it


def test_max_abs_diff_and_no_data_conflict(checkpoint: SyntheticCheckpoint, merged: Path) -> None:
    result = run_cli("diff", checkpoint.folder, merged, "--max-abs-diff", "--no-data")
    assert_clean_failure(result, 2, "cannot be combined with --no-data")


# --------------------------------------------------------------------------- bad input


def test_bad_input_exits_2(checkpoint: SyntheticCheckpoint, merged: Path, tmp_path: Path) -> None:
    assert_clean_failure(run_cli("diff", checkpoint.folder, tmp_path / "nope"), 2, "nope: no such file or folder")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(merged.read_bytes()[:-1])
    assert_clean_failure(run_cli("diff", truncated, merged), 2, "truncated: ")
    pickle = tmp_path / "pytorch_model.bin"
    pickle.write_bytes(b"\x80\x04")
    assert_clean_failure(run_cli("diff", pickle, merged), 2, "not a zip-based torch checkpoint")


def test_help_teaches_with_an_example() -> None:
    result = run_cli("diff", "--help")
    assert result.exit_code == 0 and "Example: shardkit diff" in result.stdout
