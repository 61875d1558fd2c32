"""Every checkpoint cross-check (issue 2 §3) and every output-side refusal.

Each failing case builds a real Hugging Face-layout folder, breaks one thing, runs the
real CLI and asserts: one line naming the file and the rule, the exit code, no output
and no temporary file anywhere, every file under the test folder byte-identical.
The accepted cases (HF cache symlinks, variant indexes, a single file beside an index,
a wrong total_size) assert on the bytes of what was written.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import safetensors

from conftest import assert_clean_failure, run_cli, snapshot, temporaries
from shardkit.synthetic import ByteSource, SyntheticCheckpoint, SyntheticTensor, write_checkpoint, write_safetensors

INDEX = "model.safetensors.index.json"
SHARD_1 = "model-00001-of-00004.safetensors"
SHARD_2 = "model-00002-of-00004.safetensors"


def edit_index(folder: Path, change: Callable[[dict], None], name: str = INDEX) -> None:
    path = folder / name
    index = json.loads(path.read_text())
    change(index)
    path.write_text(json.dumps(index, indent=2))


def tensors_of(path: Path) -> dict[str, bytes]:
    return {name: bytes(entry["data"]) for name, entry in safetensors.deserialize(path.read_bytes())}


def expected_tensors(made: SyntheticCheckpoint) -> dict[str, bytes]:
    return {t.name: made.expected_bytes(t.name) for t in made.tensors}


def assert_refused(root: Path, args: list[object], code: int, *fragments: str, output: Path | None = None) -> str:
    """Run the CLI; it must fail with one line holding `fragments` and leave `root` untouched."""
    before = snapshot(root)
    result = run_cli(*args)
    assert_clean_failure(result, code, fragments[0])
    for fragment in fragments[1:]:
        assert fragment in result.stderr, result.stderr
    assert result.stdout == ""
    assert temporaries(root) == []
    assert snapshot(root) == before
    if output is not None:
        assert not output.exists() or output.is_dir() and any(output.iterdir())
    return result.stderr


# ----------------------------------------------------------------- the index's shards


def test_missing_shard(checkpoint: SyntheticCheckpoint, tmp_path: Path) -> None:
    (checkpoint.folder / SHARD_2).unlink()
    out = tmp_path / "out.safetensors"
    assert_refused(tmp_path, ["merge", checkpoint.folder, "-o", out], 2,
                   f"{checkpoint.folder / INDEX}: shard {SHARD_2} named in weight_map does not exist", output=out)


BAD_NAMES = [
    ("dotdot", "../outside.safetensors", "escapes the folder"),
    ("dotdot-inner", "sub/../../outside.safetensors", "escapes the folder"),
    ("absolute", "ABSOLUTE", "absolute path"),
    ("drive-letter", "C:model-00001-of-00004.safetensors", "Windows paths are refused"),
    ("drive-letter-backslash", "C:\\models\\model.safetensors", "Windows paths are refused"),
    ("backslash", "sub\\model-00001-of-00004.safetensors", "Windows paths are refused"),
    ("nul-byte", "model-00001-of-00004.safetensors\0.txt", "NUL byte"),
    ("not-safetensors", "config.json", "is not a .safetensors or torch .bin file"),
    ("gguf", "model.gguf", "is not a .safetensors or torch .bin file"),
    ("pickle-ckpt", "model.ckpt", "pickle-based file: refused, shardkit never unpickles"),
    ("pickle-pkl", "weights.pkl", "pickle-based file"),
    ("empty", "", "must be a file name"),
    ("not-a-string", 7, "must be a file name"),
]


@pytest.mark.parametrize("command", ["merge", "split"])
@pytest.mark.parametrize(("bad", "rule"), [(b, r) for _, b, r in BAD_NAMES], ids=[i for i, _, _ in BAD_NAMES])
def test_weight_map_names_outside_the_folder_are_refused(
    checkpoint: SyntheticCheckpoint, tmp_path: Path, command: str, bad: object, rule: str
) -> None:
    # every target exists and holds the tensor, so only the name check can stop it
    outside = tmp_path / "outside.safetensors"
    shutil.copy(checkpoint.folder / SHARD_1, outside)
    if bad == "ABSOLUTE":
        bad = str(outside)
    if isinstance(bad, str) and bad.endswith((".ckpt", ".pkl")):
        (checkpoint.folder / bad).write_bytes(b"\x80\x02}q\x00.")  # a pickle; must never be opened
    tensor = json.loads((checkpoint.folder / INDEX).read_text())["weight_map"]
    name = next(t for t, shard in tensor.items() if shard == SHARD_1)

    def point_elsewhere(index: dict) -> None:
        index["weight_map"][name] = bad

    edit_index(checkpoint.folder, point_elsewhere)
    out = tmp_path / ("out.safetensors" if command == "merge" else "out")
    assert_refused(tmp_path, [command, checkpoint.folder, "-o", out], 2,
                   f"{checkpoint.folder / INDEX}: weight_map entry {name!r}", rule, output=out)


def test_a_bare_pickle_named_bin_is_refused(tmp_path: Path) -> None:
    """A pytorch_model.bin that is not torch's zip format: shardkit names why it will not read it."""
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x02}q\x00.")
    out = tmp_path / "out.safetensors"
    assert_refused(tmp_path, ["merge", folder / "pytorch_model.bin", "-o", out], 2,
                   "not a zip-based torch checkpoint", output=out)


def test_tensor_listed_but_missing_from_its_shard(checkpoint: SyntheticCheckpoint, tmp_path: Path) -> None:
    edit_index(checkpoint.folder, lambda index: index["weight_map"].update({"ghost.weight": SHARD_1}))
    out = tmp_path / "out.safetensors"
    assert_refused(tmp_path, ["merge", checkpoint.folder, "-o", out], 2,
                   f"tensor 'ghost.weight' is listed in weight_map for {SHARD_1} but that shard lacks it", output=out)


def test_tensor_in_a_shard_but_not_in_weight_map(checkpoint: SyntheticCheckpoint, tmp_path: Path) -> None:
    removed = []

    def drop_one(index: dict) -> None:
        name = next(t for t, shard in index["weight_map"].items() if shard == SHARD_2)
        del index["weight_map"][name]
        removed.append(name)

    edit_index(checkpoint.folder, drop_one)
    out = tmp_path / "out.safetensors"
    assert_refused(tmp_path, ["merge", checkpoint.folder, "-o", out], 2,
                   f"tensor {removed[0]!r} is in {SHARD_2} but not in weight_map", output=out)


def _duplicate_into_shard_2(made: SyntheticCheckpoint) -> str:
    """Rewrite shard 2 so that it also holds a tensor of shard 1."""
    in_1 = [t for t in made.tensors if t.name in tensors_of(made.folder / SHARD_1)]
    in_2 = [t for t in made.tensors if t.name in tensors_of(made.folder / SHARD_2)]
    write_safetensors(made.folder / SHARD_2, in_2 + in_1[:1], made.source, {"format": "pt"})
    return in_1[0].name


def test_tensor_in_two_shards_with_index(checkpoint: SyntheticCheckpoint, tmp_path: Path) -> None:
    name = _duplicate_into_shard_2(checkpoint)
    out = tmp_path / "out.safetensors"
    assert_refused(tmp_path, ["merge", checkpoint.folder, "-o", out], 2,
                   f"tensor {name!r} is in {SHARD_2} and in {SHARD_1}", output=out)


def test_tensor_in_two_shards_without_index(checkpoint: SyntheticCheckpoint, tmp_path: Path) -> None:
    name = _duplicate_into_shard_2(checkpoint)
    (checkpoint.folder / INDEX).unlink()
    out = tmp_path / "out.safetensors"
    assert_refused(tmp_path, ["merge", checkpoint.folder, "-o", out], 2,
                   f"tensor {name!r} is in two shards: {SHARD_1} and {SHARD_2}", output=out)


# ----------------------------------------------------------------- files the index does not cover


def _stray(folder: Path) -> Path:
    stray = folder / "adapter_model.safetensors"
    tensors = [SyntheticTensor(f"lora.layers.{i}.A", "F32", (4, 4)) for i in range(5)]
    write_safetensors(stray, tensors, ByteSource(7), {"format": "pt"})
    return stray


@pytest.mark.parametrize("command", ["merge", "split"])
def test_stray_weight_file_is_an_error_naming_it_and_its_tensors(
    checkpoint: SyntheticCheckpoint, tmp_path: Path, command: str
) -> None:
    stray = _stray(checkpoint.folder)
    out = tmp_path / ("out.safetensors" if command == "merge" else "out")
    assert_refused(tmp_path, [command, checkpoint.folder, "-o", out], 2,
                   f"{stray}: this weight file is not part of the checkpoint (5 tensors: lora.layers.0.A",
                   "--allow-unindexed", output=out)


def test_allow_unindexed_turns_the_stray_file_into_a_warning(checkpoint: SyntheticCheckpoint, tmp_path: Path) -> None:
    stray = _stray(checkpoint.folder)
    out = tmp_path / "out.safetensors"
    result = run_cli("merge", checkpoint.folder, "-o", out, "--allow-unindexed")
    assert result.exit_code == 0, result.stderr
    assert f"shardkit: warning: {stray}: this weight file is not part of the checkpoint" in result.stderr
    assert tensors_of(out) == expected_tensors(checkpoint)  # the stray tensors are not in it


def test_single_model_file_beside_an_index_is_picked_and_said(
    checkpoint: SyntheticCheckpoint, tmp_path: Path
) -> None:
    single = checkpoint.folder / "model.safetensors"
    write_safetensors(single, [SyntheticTensor("only.weight", "F16", (8,))], ByteSource(3), {"format": "pt"})
    out = tmp_path / "out.safetensors"
    result = run_cli("merge", checkpoint.folder, "-o", out)
    assert result.exit_code == 0, result.stderr
    assert f"both model.safetensors and {INDEX} are present; using model.safetensors" in result.stderr
    assert list(tensors_of(out)) == ["only.weight"]


def test_total_size_mismatch_is_only_a_warning(checkpoint: SyntheticCheckpoint, tmp_path: Path) -> None:
    edit_index(checkpoint.folder, lambda index: index["metadata"].update({"total_size": 12345}))
    out = tmp_path / "out.safetensors"
    result = run_cli("merge", checkpoint.folder, "-o", out)
    assert result.exit_code == 0, result.stderr
    assert "warning:" in result.stderr and "metadata.total_size is 12345 but the tensors hold" in result.stderr
    assert tensors_of(out) == expected_tensors(checkpoint)


def test_unknown_index_metadata_keys_are_kept_by_split(checkpoint: SyntheticCheckpoint, tmp_path: Path) -> None:
    extra = {"quantization": {"bits": [4, 8], "method": "awq"}, "note": "ünïcode", "ratio": 0.5}
    edit_index(checkpoint.folder, lambda index: index["metadata"].update(extra))
    out = tmp_path / "resharded"
    result = run_cli("split", checkpoint.folder, "-o", out, "--max-shard-size", "500KB")
    assert result.exit_code == 0, result.stderr
    metadata = json.loads((out / INDEX).read_text())["metadata"]
    assert {k: metadata[k] for k in extra} == extra
    assert metadata["total_size"] == sum(len(b) for b in expected_tensors(checkpoint).values())


# ----------------------------------------------------------------- layouts that must be accepted


def test_variant_index(tmp_path: Path) -> None:
    """transformers' `variant="fp16"`: model.safetensors.index.fp16.json and model.fp16-*-of-* shards."""
    made = write_checkpoint(tmp_path / "variant", prefix="model.fp16")
    (made.folder / "model.fp16.safetensors.index.json").rename(made.folder / "model.safetensors.index.fp16.json")
    out = tmp_path / "merged"
    result = run_cli("merge", made.folder, "-o", out)
    assert result.exit_code == 0, result.stderr
    assert tensors_of(out / "model.fp16.safetensors") == expected_tensors(made)
    assert sorted(p.name for p in out.iterdir() if "safetensors" in p.name) == ["model.fp16.safetensors"]


def test_hf_cache_symlinked_shards(tmp_path: Path) -> None:
    """snapshots/<rev>/model-*.safetensors → ../../blobs/<hash>, as huggingface_hub lays out its cache."""
    made = write_checkpoint(tmp_path / "plain")
    repo = tmp_path / "models--org--tiny"
    snapshot_dir = repo / "snapshots" / "0123abcd"
    (repo / "blobs").mkdir(parents=True)
    snapshot_dir.mkdir(parents=True)
    for index, path in enumerate(sorted(made.folder.iterdir())):
        blob = repo / "blobs" / f"{index:040x}"
        shutil.move(path, blob)
        (snapshot_dir / path.name).symlink_to(Path("../../blobs") / blob.name)
    before = snapshot(repo)
    out = tmp_path / "merged.safetensors"
    result = run_cli("merge", snapshot_dir, "-o", out)
    assert result.exit_code == 0, result.stderr
    assert tensors_of(out) == expected_tensors(made)
    assert snapshot(repo) == before
    assert all(p.is_symlink() for p in snapshot_dir.iterdir())
    # the blob behind a symlinked shard is a source too: an output symlinked to it is refused
    blob = (snapshot_dir / SHARD_1).resolve()
    target = snapshot_dir / "linked.safetensors"
    target.symlink_to(blob)
    assert_refused(tmp_path, ["merge", snapshot_dir, "-o", target, "--force", "--allow-unindexed"], 2,
                   "output would overwrite the source")


def test_incomplete_shard_set_without_index(checkpoint: SyntheticCheckpoint, tmp_path: Path) -> None:
    (checkpoint.folder / INDEX).unlink()
    (checkpoint.folder / SHARD_2).unlink()
    out = tmp_path / "out.safetensors"
    assert_refused(tmp_path, ["merge", checkpoint.folder, "-o", out], 2,
                   "shard set model-*-of-00004 is incomplete: missing model-00002-of-00004.safetensors", output=out)


def test_complete_shard_set_without_index_merges(checkpoint: SyntheticCheckpoint, tmp_path: Path) -> None:
    (checkpoint.folder / INDEX).unlink()
    out = tmp_path / "out.safetensors"
    result = run_cli("merge", checkpoint.folder, "-o", out)
    assert result.exit_code == 0, result.stderr
    assert tensors_of(out) == expected_tensors(checkpoint)


def test_unrelated_safetensors_files_without_index(checkpoint: SyntheticCheckpoint, tmp_path: Path) -> None:
    (checkpoint.folder / INDEX).unlink()
    _stray(checkpoint.folder)
    out = tmp_path / "out.safetensors"
    assert_refused(tmp_path, ["merge", checkpoint.folder, "-o", out], 2,
                   "several .safetensors files and no index", output=out)


def test_several_indexes_are_refused_unless_one_is_chosen(tmp_path: Path) -> None:
    made = write_checkpoint(tmp_path / "two", prefix="model")
    other = write_checkpoint(tmp_path / "other", prefix="diffusion_pytorch_model", seed=5, companions=False)
    for path in other.folder.iterdir():
        shutil.move(path, made.folder / path.name)
    out = tmp_path / "out.safetensors"
    assert_refused(tmp_path, ["merge", made.folder, "-o", out], 2,
                   "several indexes (diffusion_pytorch_model.safetensors.index.json, model.safetensors.index.json); "
                   "pass the one to use as SOURCE", output=out)
    result = run_cli("merge", made.folder / INDEX, "-o", out)
    assert result.exit_code == 0, result.stderr
    assert tensors_of(out) == expected_tensors(made)


# ----------------------------------------------------------------- the output side


def test_existing_output_is_refused_without_force(checkpoint: SyntheticCheckpoint, tmp_path: Path) -> None:
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"precious")
    assert_refused(tmp_path, ["merge", checkpoint.folder, "-o", out], 2, f"{out}: already exists; pass --force")
    assert out.read_bytes() == b"precious"


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_force_replaces_the_output(checkpoint: SyntheticCheckpoint, tmp_path: Path, kind: str) -> None:
    out = tmp_path / ("out.safetensors" if kind == "file" else "out")
    if kind == "file":
        out.write_bytes(b"old")
    else:
        out.mkdir()
        (out / "model-00001-of-00009.safetensors").write_bytes(b"old shard")
    result = run_cli("merge", checkpoint.folder, "-o", out, "--force")
    assert result.exit_code == 0, result.stderr
    weights = out if kind == "file" else out / "model.safetensors"
    assert tensors_of(weights) == expected_tensors(checkpoint)
    if kind == "folder":  # nothing of the old folder survives beside the new one
        assert not (out / "model-00001-of-00009.safetensors").exists()
    assert temporaries(tmp_path) == []


@pytest.mark.parametrize("force", [[], ["--force"]], ids=["plain", "force"])
def test_output_that_is_a_source_is_refused(checkpoint: SyntheticCheckpoint, tmp_path: Path, force: list[str]) -> None:
    shard = checkpoint.folder / SHARD_1
    assert_refused(tmp_path, ["merge", checkpoint.folder, "-o", shard, *force], 2,
                   f"{shard}: output would overwrite the source")


@pytest.mark.parametrize("command", ["merge", "split"])
@pytest.mark.parametrize("where", ["source-folder", "parent-folder"])
def test_folder_output_containing_a_source_is_refused(
    checkpoint: SyntheticCheckpoint, tmp_path: Path, command: str, where: str
) -> None:
    out = checkpoint.folder if where == "source-folder" else tmp_path
    message = "output is the source folder" if where == "source-folder" else "output would overwrite the source"
    assert_refused(tmp_path, [command, checkpoint.folder, "-o", out, "--force"], 2, message)


def test_symlinked_output_pointing_at_a_source_is_refused(checkpoint: SyntheticCheckpoint, tmp_path: Path) -> None:
    link = tmp_path / "innocent.safetensors"
    link.symlink_to(checkpoint.folder / SHARD_1)
    assert_refused(tmp_path, ["merge", checkpoint.folder, "-o", link, "--force"], 2,
                   "output would overwrite the source")
    assert os.readlink(link) == str(checkpoint.folder / SHARD_1)
