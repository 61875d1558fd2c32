"""verify: format rules per file, index cross-checks, checksums, --against, HF cache blobs,
the architecture; every problem named by file and tensor, exit 0 / 1 / 2."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import shardkit
from conftest import assert_clean_failure, run_cli, snapshot, temporaries
from shardkit.commands.verify import hf_installed
from shardkit.format.header import read_header
from shardkit.synthetic import (
    SHAPES,
    ByteSource,
    Qwen2Shape,
    SyntheticCheckpoint,
    qwen2_config,
    qwen2_tensors,
    write_checkpoint,
    write_safetensors,
)

FLIPPED = "model.layers.1.mlp.up_proj.weight"
NO_ARCH = "--no-architecture"  # the fixture's edge-case tensors are not part of Qwen2


def flip_byte(path: Path, tensor: str, at: int = 1000) -> None:
    """Invert one data byte of `tensor` in place: the header stays valid."""
    header = read_header(path)
    offset = header.data_start + header.by_name[tensor].begin + at
    with open(path, "r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([byte[0] ^ 0xFF]))


def shard_holding(made: SyntheticCheckpoint, tensor: str) -> Path:
    index = json.loads((made.folder / "model.safetensors.index.json").read_text())
    return made.folder / index["weight_map"][tensor]


def verify_json(*args: object) -> tuple[int, dict]:
    result = run_cli("verify", *args, "--json")
    assert "Traceback" not in result.stderr
    return result.exit_code, json.loads(result.stdout)


# --------------------------------------------------------------------------- structure


def test_clean_checkpoint_passes_reading_headers_only(checkpoint: SyntheticCheckpoint) -> None:
    result = run_cli("verify", checkpoint.folder, NO_ARCH)
    assert result.exit_code == 0, result.stdout + result.stderr
    tensors = len(checkpoint.tensors)
    checks = "checks: format, index, json, companions;"
    assert result.stdout.startswith(f"verify: OK: 4 file(s), {tensors} tensors; {checks}")
    assert result.stderr == ""
    code, report = verify_json(checkpoint.folder, NO_ARCH)
    assert code == 0
    assert report["ok"] is True and report["problems"] == []
    assert report["checks"] == ["format", "index", "json", "companions"]
    assert report["bytes_read"] == 0  # no reference, so no data read
    assert [Path(f).name for f in report["files"]] == checkpoint.shard_files


def test_truncated_shard_is_named_with_the_rule(checkpoint: SyntheticCheckpoint) -> None:
    shard = checkpoint.folder / checkpoint.shard_files[2]
    os.truncate(shard, shard.stat().st_size - 10)
    before = snapshot(checkpoint.folder)
    code, report = verify_json(checkpoint.folder, NO_ARCH)
    assert code == 1
    format_problems = [p for p in report["problems"] if p["check"] == "format"]
    assert len(format_problems) == 1
    problem = format_problems[0]
    assert problem["file"] == str(shard)
    size = shard.stat().st_size
    assert problem["message"] == f"truncated: {size} of {size + 10} bytes present — download it again"
    result = run_cli("verify", checkpoint.folder, NO_ARCH)
    assert result.exit_code == 1
    assert f"✗ format: {shard}: truncated: {size} of {size + 10} bytes present" in result.stdout
    assert "FAILED" in result.stdout
    assert snapshot(checkpoint.folder) == before
    assert temporaries(checkpoint.folder) == []


def test_every_broken_shard_is_reported_not_just_the_first(checkpoint: SyntheticCheckpoint) -> None:
    first, last = (checkpoint.folder / checkpoint.shard_files[i] for i in (0, 3))
    os.truncate(first, first.stat().st_size - 1)
    with open(last, "ab") as handle:
        handle.write(b"\0" * 3)
    code, report = verify_json(checkpoint.folder, NO_ARCH)
    assert code == 1
    named = {p["file"]: p["message"] for p in report["problems"] if p["check"] == "format"}
    assert set(named) == {str(first), str(last)}
    assert "truncated" in named[str(first)]
    assert "trailing bytes" in named[str(last)]
    assert "index cross-checks stopped: a weight file is unreadable" in report["notes"]


def test_header_rule_names_the_tensor(tmp_path: Path) -> None:
    path = tmp_path / "bad.safetensors"
    header = b'{"w":{"dtype":"F32","shape":[2,2],"data_offsets":[0,12]}}'
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 12)
    code, report = verify_json(path)
    assert code == 1
    (problem,) = report["problems"]
    assert problem["tensor"] == "w"
    assert problem["file"] == str(path)
    assert problem["message"] == "F32[2, 2] needs 16 bytes but data_offsets span 12"


def test_index_cross_check_problem_exits_1(checkpoint: SyntheticCheckpoint) -> None:
    index_path = checkpoint.folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.ghost.weight"] = checkpoint.shard_files[0]
    index_path.write_text(json.dumps(index))
    code, report = verify_json(checkpoint.folder, NO_ARCH)
    assert code == 1
    (problem,) = report["problems"]
    assert problem["check"] == "index"
    assert "'model.ghost.weight' is listed in weight_map" in problem["message"]


def test_total_size_mismatch_is_a_warning_and_strict_makes_it_a_problem(checkpoint: SyntheticCheckpoint) -> None:
    index_path = checkpoint.folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["metadata"]["total_size"] += 1
    index_path.write_text(json.dumps(index))
    result = run_cli("verify", checkpoint.folder, NO_ARCH)
    assert result.exit_code == 0
    assert "shardkit: warning:" in result.stderr and "total_size" in result.stderr
    code, report = verify_json(checkpoint.folder, NO_ARCH, "--strict")
    assert code == 1
    assert report["problems"][0]["message"].startswith("strict: ")


def test_quiet_prints_problems_only_on_stderr(checkpoint: SyntheticCheckpoint) -> None:
    shard = checkpoint.folder / checkpoint.shard_files[1]
    os.truncate(shard, shard.stat().st_size - 2)
    result = run_cli("verify", checkpoint.folder, NO_ARCH, "--quiet")
    assert result.exit_code == 1
    assert result.stdout == ""
    assert f"shardkit: format: {shard}: truncated: " in result.stderr  # the check's name is kept
    assert run_cli("verify", checkpoint.folder / checkpoint.shard_files[0], "-q").stdout == ""


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["{missing}"], "no such file or folder"),
        (["{folder}", "--against", "{missing}"], "no such file or folder"),
        (["{folder}", "--checksums", "{missing}"], "checksum manifest not found"),
        (["{folder}", "--checksums", "{folder}/config.json"], "not a shardkit checksum manifest"),
        (["{folder}", "--checksums", "{folder}/merges.txt"], "not a sha256sum line"),
        (["{empty}"], "nothing to verify"),
        (["{folder}", "--config", "{missing}"], "config file not found"),
    ],
)
def test_unusable_input_exits_2(checkpoint: SyntheticCheckpoint, tmp_path: Path, args: list[str], message: str) -> None:
    (tmp_path / "empty").mkdir()
    names = {"missing": tmp_path / "nope", "folder": checkpoint.folder, "empty": tmp_path / "empty"}
    before = snapshot(checkpoint.folder)
    skip = [] if "--config" in args else [NO_ARCH]
    result = run_cli("verify", *(a.format(**names) for a in args), *skip)
    assert_clean_failure(result, 2, message)
    assert result.stdout == ""
    assert snapshot(checkpoint.folder) == before


# --------------------------------------------------------------------------- bytes


def test_flipped_byte_is_named_by_against_and_by_the_checksums(
    checkpoint: SyntheticCheckpoint, tmp_path: Path
) -> None:
    merged = tmp_path / "merged.safetensors"
    shardkit.merge(checkpoint.folder, merged)
    manifest = tmp_path / "SHA256SUMS"
    assert run_cli("checksum", merged, "-o", manifest).exit_code == 0
    assert run_cli("verify", merged, "--against", checkpoint.folder, "--checksums", manifest).exit_code == 0

    flip_byte(merged, FLIPPED)
    before = snapshot(checkpoint.folder)
    code, report = verify_json(merged, "--against", checkpoint.folder)
    assert code == 1
    assert report["checks"] == ["format", "index", "against"]
    (problem,) = report["problems"]
    assert (problem["check"], problem["tensor"], problem["file"]) == ("against", FLIPPED, str(merged))
    assert problem["message"].startswith("holds different bytes than in ")
    assert report["bytes_read"] == 2 * sum(t.nbytes for t in checkpoint.tensors)

    result = run_cli("verify", merged, "--checksums", manifest)
    assert result.exit_code == 1
    assert f"✗ checksums: {merged}: SHA-256 is " in result.stdout
    assert f"but {manifest} says " in result.stdout
    assert snapshot(checkpoint.folder) == before


def test_progress_counts_every_byte_read(checkpoint: SyntheticCheckpoint, tmp_path: Path) -> None:
    merged = tmp_path / "merged.safetensors"
    shardkit.merge(checkpoint.folder, merged)
    manifest = tmp_path / "tensors.json"
    shardkit.checksum(checkpoint.folder, tensors=True, output=manifest)
    events: list[tuple[int, int]] = []
    report = shardkit.verify(
        merged, checksums=manifest, against=checkpoint.folder, progress=lambda step, total: events.append((step, total))
    )
    assert report.ok and report.checks == ["format", "index", "tensor-checksums", "against"]
    assert sum(step for step, _ in events) == events[-1][1] == report.bytes_read
    assert report.bytes_read == 3 * sum(t.nbytes for t in checkpoint.tensors)


def test_against_reports_missing_extra_and_reshaped_tensors(checkpoint: SyntheticCheckpoint, tmp_path: Path) -> None:
    other = tmp_path / "other.safetensors"
    kept = [t for t in checkpoint.tensors if t.name != "model.norm.weight"]
    kept = [t if t.name != "extra.mask" else type(t)(t.name, t.dtype, (1, 5)) for t in kept]
    extra = type(kept[0])("model.added.bias", "F32", (3,))
    write_safetensors(other, [*kept, extra], checkpoint.source)
    code, report = verify_json(other, "--against", checkpoint.folder)
    assert code == 1
    found = {(p["tensor"], p["message"].split(":")[0].split(" ")[0]) for p in report["problems"]}
    assert found == {("model.added.bias", "not"), ("model.norm.weight", "missing"), ("extra.mask", "shape")}


def test_file_manifest_names_missing_and_unlisted_files(checkpoint: SyntheticCheckpoint, tmp_path: Path) -> None:
    manifest = tmp_path / "SHA256SUMS"
    shardkit.checksum(checkpoint.folder, output=manifest)
    lines = [line for line in manifest.read_text().splitlines() if not line.endswith(checkpoint.shard_files[0])]
    manifest.write_text("\n".join([*lines, f"{'0' * 64}  model-00009-of-00009.safetensors"]) + "\n")
    code, report = verify_json(checkpoint.folder, "--checksums", manifest, NO_ARCH)
    assert code == 1
    messages = {Path(p["file"]).name: p["message"] for p in report["problems"]}
    assert messages["model-00009-of-00009.safetensors"] == f"listed in {manifest} but missing"
    assert messages[checkpoint.shard_files[0]].startswith(f"not listed in {manifest}")
    assert len(messages) == 2


def test_sha256sum_tag_and_binary_formats_are_accepted(checkpoint: SyntheticCheckpoint, tmp_path: Path) -> None:
    shards = checkpoint.shard_files
    for flag in ("--tag", "--binary"):
        manifest = tmp_path / f"sums{flag}"
        made = subprocess.run(["sha256sum", flag, *shards], cwd=checkpoint.folder, capture_output=True, check=True)
        manifest.write_bytes(made.stdout)
        assert run_cli("verify", checkpoint.folder, "--checksums", manifest, NO_ARCH).exit_code == 0
    flip_byte(checkpoint.folder / shards[0], checkpoint.tensors[0].name, at=7)
    code, report = verify_json(checkpoint.folder, "--checksums", manifest, NO_ARCH)
    assert code == 1
    assert [p["file"] for p in report["problems"]] == [str(checkpoint.folder / shards[0])]


def test_sha1_manifest_is_refused(checkpoint: SyntheticCheckpoint, tmp_path: Path) -> None:
    manifest = tmp_path / "SHA1SUMS"
    made = subprocess.run(["sha1sum", *checkpoint.shard_files], cwd=checkpoint.folder, capture_output=True, check=True)
    manifest.write_bytes(made.stdout)
    result = run_cli("verify", checkpoint.folder, "--checksums", manifest)
    assert_clean_failure(result, 2, f"{manifest}:1: a 160-bit hash, not SHA-256")


# --------------------------------------------------------------------------- Hugging Face cache


def hub_snapshot(cache: Path, source: Path) -> Path:
    """`models--org--name` as huggingface_hub lays it out: blobs named by hash, relative
    symlinks from snapshots/<rev>/. LFS files (weights) by SHA-256, git files by blob sha1."""
    repo = cache / "models--org--name"
    revision = "4f3c2b1a" * 5
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / revision
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    for file in sorted(source.iterdir()):
        data = file.read_bytes()
        if file.name.endswith(".safetensors"):
            blob = hashlib.sha256(data).hexdigest()
        else:
            blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        (repo / "blobs" / blob).write_bytes(data)
        (snap / file.name).symlink_to(Path("..", "..", "blobs", blob))
    return snap


def test_hub_cache_snapshot_blobs_are_checked(checkpoint: SyntheticCheckpoint, tmp_path: Path) -> None:
    snap = hub_snapshot(tmp_path / "hub", checkpoint.folder)
    code, report = verify_json(snap, NO_ARCH)
    assert code == 0, report["problems"]
    assert report["checks"] == ["format", "index", "json", "companions", "hub"]
    assert report["bytes_read"] == sum((checkpoint.folder / s).stat().st_size for s in checkpoint.shard_files)


def test_hub_cache_corrupted_blob_is_named(checkpoint: SyntheticCheckpoint, tmp_path: Path) -> None:
    snap = hub_snapshot(tmp_path / "hub", checkpoint.folder)
    victim = snap / checkpoint.shard_files[1]
    flip_byte(victim.resolve(), read_header(victim).tensors[0].name, at=3)
    code, report = verify_json(snap, NO_ARCH)
    assert code == 1
    (problem,) = report["problems"]
    assert problem["check"] == "hub"
    assert problem["file"] == str(victim)
    assert "the download is truncated or corrupted" in problem["message"]
    assert victim.resolve().name in problem["message"]


def test_hub_cache_truncated_blob_fails_both_checks(checkpoint: SyntheticCheckpoint, tmp_path: Path) -> None:
    snap = hub_snapshot(tmp_path / "hub", checkpoint.folder)
    victim = snap / checkpoint.shard_files[0]
    os.truncate(victim.resolve(), victim.stat().st_size // 2)
    code, report = verify_json(snap, NO_ARCH)
    assert code == 1
    assert {(p["check"], p["file"]) for p in report["problems"]} == {("format", str(victim)), ("hub", str(victim))}


def test_hub_cache_wrong_blob_name_is_caught(checkpoint: SyntheticCheckpoint, tmp_path: Path) -> None:
    snap = hub_snapshot(tmp_path / "hub", checkpoint.folder)
    victim = snap / checkpoint.shard_files[3]
    wrong = victim.resolve().with_name("ab" * 32)
    victim.resolve().rename(wrong)
    victim.unlink()
    victim.symlink_to(Path("..", "..", "blobs", wrong.name))
    code, report = verify_json(snap, NO_ARCH)
    assert code == 1
    (problem,) = report["problems"]
    assert (problem["check"], problem["file"]) == ("hub", str(victim))
    assert f"blob is named {'ab' * 32}" in problem["message"]


# --------------------------------------------------------------------------- split / merge --verify


def test_split_and_merge_verify_flags_hold(checkpoint: SyntheticCheckpoint, tmp_path: Path) -> None:
    split = run_cli("split", checkpoint.folder, "-o", tmp_path / "resharded", "--max-shard-size", "2MB", "--verify")
    assert split.exit_code == 0, split.stderr
    merged = run_cli("merge", tmp_path / "resharded", "-o", tmp_path / "merged.safetensors", "--verify")
    assert merged.exit_code == 0, merged.stderr
    result = run_cli("verify", tmp_path / "merged.safetensors", "--against", checkpoint.folder)
    assert result.exit_code == 0, result.stdout


# --------------------------------------------------------------------------- architecture (shardkit[hf])


def model_folder(folder: Path, shape: Qwen2Shape, *, drop: str | None = None, reshape: dict | None = None) -> Path:
    """config.json plus one model.safetensors with the shape's tensors, one dropped or reshaped."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(qwen2_config(shape)))
    tensors = [t for t in qwen2_tensors(shape) if t.name != drop]
    tensors = [type(t)(t.name, t.dtype, (reshape or {}).get(t.name, t.shape)) for t in tensors]
    write_safetensors(folder / "model.safetensors", tensors, ByteSource(0), {"format": "pt"})
    return folder


def run_without_transformers(*args: object) -> subprocess.CompletedProcess[str]:
    """The CLI in a Python where `import transformers` fails, as without shardkit[hf]."""
    code = "import sys; sys.modules['transformers'] = None; from shardkit.cli import main; main()"
    return subprocess.run(
        [sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, timeout=300,
        env={**os.environ, "COLUMNS": "200"},
    )


def test_without_transformers_the_check_is_skipped_with_a_note(tmp_path: Path) -> None:
    folder = model_folder(tmp_path / "m", SHAPES["tiny"], drop="model.norm.weight")
    result = run_without_transformers("verify", folder)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("\n") == 1
    assert "shardkit: note: architecture check skipped:" in result.stderr
    assert "pip install 'shardkit[hf]'" in result.stderr
    explicit = run_without_transformers("verify", folder / "model.safetensors", "--config", folder / "config.json")
    assert explicit.returncode == 2
    assert explicit.stderr == (
        "shardkit: error: the architecture check (--config PATH) needs the optional extra: pip install 'shardkit[hf]'\n"
    )


hf = pytest.mark.hf
needs_hf = pytest.mark.skipif(not hf_installed(), reason="needs shardkit[hf] (torch and transformers)")


@hf
@needs_hf
def test_architecture_names_a_removed_tensor(tmp_path: Path) -> None:
    folder = model_folder(tmp_path / "m", SHAPES["tiny"], drop="model.layers.2.mlp.up_proj.weight")
    report = shardkit.verify(folder)
    assert not report.ok
    assert "architecture" in report.checks
    (problem,) = report.problems
    assert (problem.check, problem.tensor, problem.file) == (
        "architecture", "model.layers.2.mlp.up_proj.weight", str(folder / "config.json")
    )
    assert problem.message.startswith("missing: the architecture expects [704, 128]")  # the name is in .tensor


@hf
@needs_hf
def test_architecture_names_a_changed_shape(tmp_path: Path) -> None:
    name = "model.layers.0.self_attn.k_proj.weight"
    folder = model_folder(tmp_path / "m", SHAPES["tiny"], reshape={name: (32, 128)})
    report = shardkit.verify(folder)
    (problem,) = report.problems
    assert (problem.check, problem.tensor, problem.file) == ("architecture", name, str(folder / "model.safetensors"))
    assert problem.message == "shape [32, 128], the architecture expects [64, 128]"


@hf
@needs_hf
def test_tied_embeddings_check_clean_without_lm_head(tmp_path: Path) -> None:
    tied = Qwen2Shape(128, 704, 2, 4, 2, 2048, True)
    folder = model_folder(tmp_path / "tied", tied)
    assert "lm_head.weight" not in read_header(folder / "model.safetensors").by_name
    report = shardkit.verify(folder)
    assert report.ok, [str(p) for p in report.problems]
    assert report.checks == ["format", "index", "json", "companions", "architecture"]
    assert report.config == str(folder / "config.json")


@hf
@needs_hf
def test_explicit_config_checks_a_lone_file_and_the_cli_reports_it(tmp_path: Path) -> None:
    folder = model_folder(tmp_path / "m", SHAPES["tiny"], drop="lm_head.weight")
    lone = folder / "model.safetensors"
    assert "architecture" not in shardkit.verify(lone).checks  # a lone file never picks up a config by itself
    code, report = verify_json(lone, "--config", folder / "config.json")
    assert code == 1
    assert [(p["check"], p["tensor"]) for p in report["problems"]] == [("architecture", "lm_head.weight")]
    assert run_cli("verify", folder, "--no-architecture").exit_code == 0


@hf
@needs_hf
def test_a_config_transformers_cannot_build_is_a_note_unless_explicit(tmp_path: Path) -> None:
    made = write_checkpoint(tmp_path / "m", companions=True)
    (made.folder / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    report = shardkit.verify(made.folder)
    assert report.ok
    assert report.notes == [f"architecture check skipped: {made.folder / 'config.json'}: no 'model_type' field"]
    result = run_cli("verify", made.folder, "--config", made.folder / "config.json")
    assert_clean_failure(result, 2, "architecture check: ")


@hf
@needs_hf
def test_synthetic_checkpoint_with_its_config_checks_clean(tmp_path: Path) -> None:
    made = write_checkpoint(tmp_path / "m")
    code, report = verify_json(made.folder)
    assert code == 0, report["problems"]
    assert report["checks"] == ["format", "index", "json", "companions", "architecture"]


def test_an_index_the_cross_checks_refuse_names_no_file_to_verify(tmp_path: Path) -> None:
    """The index is read by one strict reader: one that Python's json accepts (NaN) but the
    format's grammar does not is a problem, and its weight_map is not trusted either."""
    made = write_checkpoint(tmp_path / "ckpt", companions=False)
    index_path = made.folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index_path.write_text(json.dumps({"metadata": {"total_size": float("nan")}, "weight_map": index["weight_map"]}))
    before = snapshot(made.folder)
    result = run_cli("verify", index_path, "--json")
    assert result.exit_code == 1, result.stderr
    report = json.loads(result.stdout)
    expected = f"{index_path}: not a valid JSON index: NaN is not a JSON value"
    assert [p["message"] for p in report["problems"]] == [expected]
    assert report["files"] == []
    assert snapshot(made.folder) == before
