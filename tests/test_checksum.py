"""checksum: a manifest real `sha256sum -c` accepts, a tensor manifest that survives merge
and split, and the streaming hasher behind both."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest

import shardkit
from conftest import assert_clean_failure, run_cli, snapshot, temporaries
from shardkit.engine.hashing import Streamer, sha256_file
from shardkit.format.header import read_header
from shardkit.synthetic import SyntheticCheckpoint


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def loader_files(folder: Path) -> list[str]:
    """Every file of a synthetic model folder is one a loader reads: shards, index, config, tokenizer."""
    return sorted(p.name for p in folder.iterdir() if p.is_file())


def test_manifest_passes_real_sha256sum(checkpoint: SyntheticCheckpoint, tmp_path: Path) -> None:
    before = snapshot(checkpoint.folder)
    printed = run_cli("checksum", checkpoint.folder)
    assert printed.exit_code == 0, printed.stderr
    assert printed.stderr == ""
    names = loader_files(checkpoint.folder)
    assert len(names) == 11 and "tokenizer.json" in names and "model.safetensors.index.json" in names
    expected = "".join(f"{sha256(checkpoint.folder / n)}  {n}\n" for n in names)
    assert printed.stdout == expected

    written = run_cli("checksum", checkpoint.folder, "-o", checkpoint.folder / "SHA256SUMS")
    assert written.exit_code == 0
    assert written.stdout.startswith(f"checksum: wrote {checkpoint.folder / 'SHA256SUMS'}: 11 file(s), ")
    assert (checkpoint.folder / "SHA256SUMS").read_text() == expected
    check = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=checkpoint.folder, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert check.stdout.count(": OK\n") == 11
    assert temporaries(checkpoint.folder) == []
    after = snapshot(checkpoint.folder)
    after.pop("SHA256SUMS")
    assert after == before


def test_real_sha256sum_fails_on_the_flipped_file_as_verify_does(
    checkpoint: SyntheticCheckpoint, tmp_path: Path
) -> None:
    manifest = checkpoint.folder / "SHA256SUMS"
    shardkit.checksum(checkpoint.folder, output=manifest)
    victim = checkpoint.folder / checkpoint.shard_files[2]
    data = bytearray(victim.read_bytes())
    data[-5] ^= 1
    victim.write_bytes(data)
    check = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=checkpoint.folder, capture_output=True, text=True)
    assert check.returncode == 1
    assert f"{checkpoint.shard_files[2]}: FAILED" in check.stdout
    report = shardkit.verify(checkpoint.folder, checksums=manifest, architecture=False)
    assert [(p.check, p.file) for p in report.problems] == [("checksums", str(victim))]


def test_single_file_is_named_by_its_file_name(checkpoint: SyntheticCheckpoint, tmp_path: Path) -> None:
    merged = tmp_path / "out" / "merged.safetensors"
    merged.parent.mkdir()
    shardkit.merge(checkpoint.folder, merged)
    result = run_cli("checksum", merged)
    assert result.stdout == f"{sha256(merged)}  merged.safetensors\n"
    (tmp_path / "out" / "SUMS").write_text(result.stdout)
    check = subprocess.run(["sha256sum", "-c", "SUMS"], cwd=tmp_path / "out", capture_output=True, text=True)
    assert check.returncode == 0


def test_index_path_names_shards_relative_to_its_folder(checkpoint: SyntheticCheckpoint) -> None:
    report = shardkit.checksum(checkpoint.folder / "model.safetensors.index.json")
    assert [f.name for f in report.files] == loader_files(checkpoint.folder)
    assert report.bytes == sum((checkpoint.folder / n).stat().st_size for n in loader_files(checkpoint.folder))


def test_tensor_manifest_holds_each_tensors_bytes(checkpoint: SyntheticCheckpoint, tmp_path: Path) -> None:
    result = run_cli("checksum", checkpoint.folder, "--tensors")
    assert result.exit_code == 0, result.stderr
    manifest = json.loads(result.stdout)
    assert manifest["format"] == "shardkit.tensor-sha256" and manifest["version"] == 1
    assert list(manifest["tensors"]) == sorted(t.name for t in checkpoint.tensors)
    for tensor in checkpoint.tensors:
        entry = manifest["tensors"][tensor.name]
        assert entry == {
            "dtype": tensor.dtype,
            "shape": list(tensor.shape),
            "sha256": hashlib.sha256(checkpoint.expected_bytes(tensor.name)).hexdigest(),
        }, tensor.name


def test_tensor_manifest_stays_valid_across_merge_and_split(checkpoint: SyntheticCheckpoint, tmp_path: Path) -> None:
    tensors = tmp_path / "tensors.json"
    files = tmp_path / "SHA256SUMS"
    assert run_cli("checksum", checkpoint.folder, "--tensors", "-o", tensors).exit_code == 0
    shardkit.checksum(checkpoint.folder, output=files)
    merged = tmp_path / "merged"
    shardkit.merge(checkpoint.folder, merged)
    split = tmp_path / "split"
    shardkit.split(merged, split, max_shard_size="700KB")
    assert len(list(split.glob("*.safetensors"))) > 4
    for target in (checkpoint.folder, merged, split):
        result = run_cli("verify", target, "--checksums", tensors, "--no-architecture", "--json")
        assert result.exit_code == 0, result.stdout
        report = json.loads(result.stdout)
        folder = ["companions"] if target.is_dir() else []
        assert report["checks"] == ["format", "index", "json", *folder, "tensor-checksums"]
        assert report["bytes_read"] == sum(t.nbytes for t in checkpoint.tensors)
    # The file manifest, by contrast, is tied to one sharding.
    assert run_cli("verify", merged, "--checksums", files, "--no-architecture").exit_code == 1

    flipped = "model.layers.3.self_attn.o_proj.weight"
    weight = merged / "model.safetensors"
    header = read_header(weight)
    data = bytearray(weight.read_bytes())
    data[header.data_start + header.by_name[flipped].begin + 17] ^= 0x40
    weight.write_bytes(data)
    result = run_cli("verify", merged, "--checksums", tensors, "--no-architecture")
    assert result.exit_code == 1
    assert result.stdout.splitlines()[0] == (
        f"✗ tensor-checksums: {weight}: tensor {flipped!r}: data SHA-256 differs from {tensors}"
    )


def test_tensor_manifest_names_missing_unlisted_and_reshaped_tensors(
    checkpoint: SyntheticCheckpoint, tmp_path: Path
) -> None:
    manifest_path = tmp_path / "tensors.json"
    shardkit.checksum(checkpoint.folder, tensors=True, output=manifest_path)
    manifest = json.loads(manifest_path.read_text())
    manifest["tensors"]["model.ghost"] = manifest["tensors"].pop("model.norm.weight")
    manifest["tensors"]["extra.step"]["shape"] = [2]
    manifest_path.write_text(json.dumps(manifest))
    report = shardkit.verify(checkpoint.folder, checksums=manifest_path, architecture=False)
    found = sorted((p.tensor, p.message.split(" ")[0]) for p in report.problems)
    assert found == [("extra.step", "shape"), ("model.ghost", "listed"), ("model.norm.weight", "not")]


def test_json_report_is_itself_a_manifest(checkpoint: SyntheticCheckpoint, tmp_path: Path) -> None:
    for flags in ([], ["--tensors"]):
        result = run_cli("checksum", checkpoint.folder, "--json", *flags)
        assert result.exit_code == 0
        report = json.loads(result.stdout)
        assert report["kind"] == ("tensors" if flags else "files")
        assert report["bytes"] > 0 and report["seconds"] >= 0
        saved = tmp_path / f"report{len(flags)}.json"
        saved.write_text(result.stdout)
        assert run_cli("verify", checkpoint.folder, "--checksums", saved, "--no-architecture").exit_code == 0
    assert [f["name"] for f in json.loads(run_cli("checksum", checkpoint.folder, "--json").stdout)["files"]] == (
        loader_files(checkpoint.folder)
    )


def test_existing_output_needs_force_and_weight_files_are_refused(
    checkpoint: SyntheticCheckpoint, tmp_path: Path
) -> None:
    target = tmp_path / "SHA256SUMS"
    target.write_text("keep me\n")
    before = snapshot(checkpoint.folder)
    assert_clean_failure(run_cli("checksum", checkpoint.folder, "-o", target), 2, "already exists; pass --force")
    assert target.read_text() == "keep me\n"
    assert run_cli("checksum", checkpoint.folder, "-o", target, "--force").exit_code == 0
    assert target.read_text().count("\n") == 11
    shard = checkpoint.folder / checkpoint.shard_files[0]
    result = run_cli("checksum", checkpoint.folder, "-o", shard, "--force")
    assert_clean_failure(result, 2, "refusing to write a checksum manifest over a weight file")
    assert snapshot(checkpoint.folder) == before
    assert temporaries(checkpoint.folder) == [] and temporaries(tmp_path) == []


def test_a_manifest_written_meanwhile_is_not_replaced_without_force(
    checkpoint: SyntheticCheckpoint, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The manifest is committed as merge commits its output: a file that appears at -o
    after the check (another run) is kept, not silently replaced."""
    from shardkit.commands import checksum as checksum_module
    from shardkit.errors import OutputExistsError

    target = tmp_path / "SHA256SUMS"
    checked = checksum_module._check_output

    def check_then_another_run_writes(*args: object) -> None:
        checked(*args)  # type: ignore[arg-type]
        target.write_text("another run's\n")

    monkeypatch.setattr(checksum_module, "_check_output", check_then_another_run_writes)
    with pytest.raises(OutputExistsError, match="already exists; pass force=True"):
        shardkit.checksum(checkpoint.folder, output=target)
    assert target.read_text() == "another run's\n"
    assert temporaries(tmp_path) == []


def test_broken_checkpoint_is_never_checksummed(checkpoint: SyntheticCheckpoint, tmp_path: Path) -> None:
    shard = checkpoint.folder / checkpoint.shard_files[1]
    with open(shard, "ab") as handle:
        handle.write(b"x")
    before = snapshot(checkpoint.folder)
    result = run_cli("checksum", checkpoint.folder, "-o", tmp_path / "SUMS")
    assert_clean_failure(result, 2, f"{shard}: tensors cover")
    assert not (tmp_path / "SUMS").exists()
    assert temporaries(tmp_path) == []
    assert snapshot(checkpoint.folder) == before


@pytest.mark.parametrize("chunk", [4096, 65536, 1 << 24])
def test_streamer_ranges_cross_chunk_boundaries(checkpoint: SyntheticCheckpoint, chunk: int) -> None:
    shard = checkpoint.folder / checkpoint.shard_files[0]
    header = read_header(shard)
    data = shard.read_bytes()
    ranges = [(header.data_start + t.begin, header.data_start + t.end) for t in header.tensors]
    with Streamer(chunk) as streamer:
        both = streamer.digest(shard, ranges=ranges)
        only = streamer.digest(shard, whole=False, ranges=ranges[1:-1])
    assert both.file == hashlib.sha256(data).hexdigest() == sha256_file(shard)
    assert both.ranges == [hashlib.sha256(data[b:e]).hexdigest() for b, e in ranges]
    assert only.ranges == both.ranges[1:-1]
    assert only.file is None
    assert only.bytes_read == ranges[-2][1] - ranges[1][0]


def test_help_teaches_with_examples() -> None:
    for command in ("checksum", "verify"):
        result = run_cli(command, "--help")
        assert result.exit_code == 0
        assert "Example: shardkit " + command in result.stdout


@pytest.mark.parametrize("name", ["config.json", "tokenizer.json", "generation_config.json", "alias/config.json"])
def test_a_manifest_never_replaces_a_file_of_the_checkpoint(
    checkpoint: SyntheticCheckpoint, tmp_path: Path, name: str
) -> None:
    """`-o model/config.json --force` replaced the config a loader reads (a file the
    manifest itself lists) with the manifest; also through an alias of the folder."""
    (tmp_path / "alias").symlink_to(checkpoint.folder)
    output = tmp_path / name if name.startswith("alias/") else checkpoint.folder / name
    before = snapshot(checkpoint.folder)
    for kind in ([], ["--tensors"]):
        result = run_cli("checksum", checkpoint.folder, "-o", output, "--force", *kind)
        assert_clean_failure(result, 2, f"{output}: output would overwrite the source ")
        assert snapshot(checkpoint.folder) == before and temporaries(checkpoint.folder) == []


def test_an_earlier_manifest_in_the_folder_is_replaced_with_force(checkpoint: SyntheticCheckpoint) -> None:
    for kind, name in (([], "SHA256SUMS"), (["--tensors"], "tensors.json")):
        output = checkpoint.folder / name
        assert run_cli("checksum", checkpoint.folder, "-o", output, *kind).exit_code == 0
        first = output.read_bytes()
        assert_clean_failure(run_cli("checksum", checkpoint.folder, "-o", output, *kind), 2, "already exists")
        replaced = run_cli("checksum", checkpoint.folder, "-o", output, "--force", *kind)
        assert replaced.exit_code == 0, replaced.stderr
        assert output.read_bytes() == first and temporaries(checkpoint.folder) == []
