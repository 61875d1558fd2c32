"""Hostile inputs: a checkpoint from the internet may be built to hurt the tool.

Tensor names are data, never paths; sizes in a header are claims, never allocations;
pickles are never opened. Each test builds the hostile files for real and runs the
real CLI.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors

from conftest import assert_clean_failure, run_cli, snapshot, temporaries
from shardkit.synthetic import SHAPES, ByteSource, SyntheticTensor, write_companion_files, write_safetensors

COMPANIONS = {"config.json", "generation_config.json", "merges.txt", "tokenizer.json", "tokenizer_config.json",
              "vocab.json"}
HOSTILE_NAMES = [
    "model/../../../../tmp/pwned",
    "/etc/passwd",
    "..",
    "../model.safetensors",
    "C:\\Windows\\System32\\config",
    "with\0nul",
    "line\nbreak\r\nand\ttab",
    "rtl\u202eexe.txt",
    "zero\u200bwidth\ufeff",
    "combining e\u0301\u0301\u0301",
    "emoji 🤗🦙",
    "漢字.テンソル",
    "$(touch pwned)`id`;|&",
    "%s%n%x{0}{}",
    "model.safetensors.index.json",
    "config.json",
    "CON",
    " ",
    "",
    "x" * 5000,
]


def hostile_checkpoint(folder: Path) -> dict[str, bytes]:
    """Two shards and an index whose tensor names try to be paths, commands, escapes."""
    folder.mkdir(parents=True)
    tensors = [SyntheticTensor(name, "F16", (3, i + 1)) for i, name in enumerate(HOSTILE_NAMES)]
    halves = {
        "model-00001-of-00002.safetensors": tensors[::2],
        "model-00002-of-00002.safetensors": tensors[1::2],
    }
    source = ByteSource(11)
    for name, group in halves.items():
        write_safetensors(folder / name, group, source, {"format": "pt"})
    weight_map = {t.name: name for name, group in halves.items() for t in group}
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors)}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    write_companion_files(folder, SHAPES["tiny"])
    return {t.name: source.data(t.name, t.nbytes) for t in tensors}


def all_files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")}


def test_hostile_tensor_names_are_carried_as_data_by_merge(tmp_path: Path) -> None:
    expected = hostile_checkpoint(tmp_path / "source")
    before = snapshot(tmp_path / "source")
    result = run_cli("merge", tmp_path / "source", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.stderr
    merged = safetensors.deserialize((tmp_path / "out" / "model.safetensors").read_bytes())
    assert {name: bytes(entry["data"]) for name, entry in merged} == expected
    assert snapshot(tmp_path / "source") == before
    written = {"model.safetensors", *COMPANIONS}
    assert all_files(tmp_path) == {"source", "out", *(f"source/{n}" for n in before), *(f"out/{n}" for n in written)}
    assert not Path("/tmp/pwned").exists()


def test_hostile_tensor_names_are_carried_as_data_by_split(tmp_path: Path) -> None:
    expected = hostile_checkpoint(tmp_path / "source")
    result = run_cli("split", tmp_path / "source", "-o", tmp_path / "out", "--max-shard-size", "300", "--json")
    assert result.exit_code == 0, result.stderr
    out = tmp_path / "out"
    shards = sorted(p for p in out.iterdir() if p.name.endswith(".safetensors"))
    assert len(shards) > 2
    assert all(p.name.startswith("model-") and "-of-" in p.name for p in shards)
    found = {}
    for shard in shards:
        found.update({name: bytes(e["data"]) for name, e in safetensors.deserialize(shard.read_bytes())})
    assert found == expected
    weight_map = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(weight_map) == set(expected)
    written = {p.name for p in shards} | {"model.safetensors.index.json", *COMPANIONS}
    sources = {f"source/{n}" for n in snapshot(tmp_path / "source")}
    assert all_files(tmp_path) == {"source", "out", *sources, *(f"out/{n}" for n in written)}


def test_hostile_tensor_names_in_inspect_json(tmp_path: Path) -> None:
    expected = hostile_checkpoint(tmp_path / "source")
    result = run_cli("inspect", tmp_path / "source", "--tensors", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert {row["name"] for row in report["tensor_rows"]} == set(expected)
    # every hostile name stands alone in the layer view: none was folded or mangled
    assert {group["pattern"] for group in report["layers"]} == set(expected)


@pytest.mark.parametrize(
    "prefix", ["../escape", "/tmp/abs", "sub/dir", "back\\slash", ".hidden", "x.safetensors", ""]
)
def test_split_prefix_cannot_build_a_path_outside_the_output(tmp_path: Path, prefix: str) -> None:
    hostile_checkpoint(tmp_path / "source")
    before = snapshot(tmp_path)
    result = run_cli("split", tmp_path / "source", "-o", tmp_path / "out", "--prefix", prefix)
    assert_clean_failure(result, 2, f"prefix {prefix!r} must")
    assert snapshot(tmp_path) == before
    assert not (tmp_path / "out").exists() and temporaries(tmp_path) == []


# ----------------------------------------------------------------- resource bounds


def peak_rss_mb_of_cli(*args: object) -> tuple[float, subprocess.CompletedProcess[str]]:
    """Run the CLI as the only child of a fresh interpreter and report its peak RSS."""
    probe = (
        "import resource, subprocess, sys\n"
        "done = subprocess.run([sys.executable, '-m', 'shardkit', *sys.argv[1:]], capture_output=True, text=True)\n"
        "sys.stderr.write(done.stderr)\n"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
        "sys.exit(done.returncode)\n"
    )
    completed = subprocess.run([sys.executable, "-c", probe, *map(str, args)], capture_output=True, text=True)
    return int(completed.stdout.strip().splitlines()[-1]) / 1024, completed


def single_file(folder: Path, raw: bytes) -> Path:
    folder.mkdir()
    path = folder / "model.safetensors"
    path.write_bytes(raw)
    return path


def header(document: dict) -> bytes:
    body = json.dumps(document).encode()
    return struct.pack("<Q", len(body)) + body


CLAIMS = [
    # a length prefix at the 100 MB limit (or past it) on a tiny file: refused before reading
    ("length-at-limit", struct.pack("<Q", 100_000_000) + b"{}", "header length 100000000 runs past the end"),
    ("length-over-limit", struct.pack("<Q", 100_000_001) + b"{}", "exceeds the 100000000-byte limit"),
    ("length-2^64-1", b"\xff" * 8, "exceeds the 100000000-byte limit"),
    # a terabyte tensor in a 100-byte file: the claim is checked, nothing is allocated
    ("terabyte-tensor", header({"a": {"dtype": "U8", "shape": [2**40], "data_offsets": [0, 2**40]}}), "truncated"),
    ("exabyte-tensor", header({"a": {"dtype": "F64", "shape": [2**60], "data_offsets": [0, 2**63]}}),
     "overflows 64 bits"),
    ("overflowing-shape", header({"a": {"dtype": "U8", "shape": [2**63, 2**63, 2**63], "data_offsets": [0, 0]}}),
     "overflows 64 bits"),
    ("a-billion-tensors-claimed", header({"a": {"dtype": "U8", "shape": [10**9, 10**9], "data_offsets": [0, 10**18]}}),
     "truncated"),
]


@pytest.mark.parametrize(("raw", "message"), [(r, m) for _, r, m in CLAIMS], ids=[i for i, _, _ in CLAIMS])
def test_hostile_size_claims_are_refused_without_allocating(tmp_path: Path, raw: bytes, message: str) -> None:
    with pytest.raises(safetensors.SafetensorError):
        safetensors.deserialize(raw)
    path = single_file(tmp_path / "source", raw)
    rss, completed = peak_rss_mb_of_cli("merge", path, "-o", tmp_path / "out.safetensors")
    assert completed.returncode == 2, completed.stderr
    assert message in completed.stderr and completed.stderr.count("\n") == 1
    assert rss < 200, f"peak RSS {rss:.0f} MB for a refused header claim"
    assert not (tmp_path / "out.safetensors").exists() and temporaries(tmp_path) == []


def test_many_tensor_header_memory_grows_only_with_the_header(tmp_path: Path) -> None:
    """40,000 entries (≈ 2.5 MB of header) and one bad entry at the very end: the whole
    header is parsed before the refusal, and memory stays a small multiple of it."""
    entries = {f"t{i}": {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]} for i in range(40_000)}
    entries["zzz"] = {"dtype": "U8", "shape": [1], "data_offsets": [0, 2]}
    raw = header(entries)
    with pytest.raises(safetensors.SafetensorError):
        safetensors.deserialize(raw)
    path = single_file(tmp_path / "source", raw)
    rss, completed = peak_rss_mb_of_cli("merge", path, "-o", tmp_path / "out.safetensors")
    assert completed.returncode == 2, completed.stderr
    assert "tensor 'zzz': U8[1] needs 1 bytes but data_offsets span 2" in completed.stderr
    assert rss < 200, f"peak RSS {rss:.0f} MB for a {len(raw) / 1e6:.1f} MB header"


# ----------------------------------------------------------------- nothing is ever unpickled


def malicious_pickle(marker: Path) -> bytes:
    """A pickle that creates `marker` when loaded: proof of whether anything unpickled it."""
    import os
    import pickle

    class Exploit:
        def __reduce__(self):  # noqa: ANN204
            return (os.system, (f"touch {marker}",))

    return pickle.dumps({"weight": Exploit()})


REFUSED = "not a zip-based torch checkpoint"


@pytest.mark.parametrize("how", ["index", "source-file", "bin-index", "folder"])
def test_pickle_is_refused_and_never_loaded(tmp_path: Path, how: str) -> None:
    """A bare pickle named like a torch checkpoint, reached every way a source can name
    it: shardkit reads torch's zip format as data (tests/test_torch_hostile.py) and
    refuses anything else before a byte of it is interpreted."""
    marker = tmp_path / "unpickled"
    folder = tmp_path / "source"
    folder.mkdir()
    (folder / "pytorch_model.bin").write_bytes(malicious_pickle(marker))
    weight_map = {"weight": "pytorch_model.bin"}
    source = folder
    if how == "index":
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    elif how == "bin-index":
        (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
        source = folder / "pytorch_model.bin.index.json"
    elif how == "source-file":
        source = folder / "pytorch_model.bin"
    before = snapshot(tmp_path)
    result = run_cli("merge", source, "-o", tmp_path / "out.safetensors")
    assert_clean_failure(result, 2, REFUSED)
    assert not marker.exists()
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("suffix", [".ckpt", ".pkl", ".pickle"])
def test_other_pickles_are_refused_unread(tmp_path: Path, suffix: str) -> None:
    marker = tmp_path / "unpickled"
    path = tmp_path / f"weights{suffix}"
    path.write_bytes(malicious_pickle(marker))
    before = snapshot(tmp_path)
    result = run_cli("merge", path, "-o", tmp_path / "out.safetensors")
    assert_clean_failure(result, 2, "pickle-based weight files are refused; shardkit never unpickles")
    assert not marker.exists() and snapshot(tmp_path) == before
