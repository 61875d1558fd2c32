"""Where an output may go: never onto, into or around a source, and `--force` deletes
only an earlier output. Every case runs the real CLI on real files laid out as people
keep models: a Hugging Face cache (`blobs/` plus `snapshots/<rev>/` symlinks), a model
folder of symlinks with the user's own files beside them (`optimizer.pt`,
`adapter_model.bin`, `.git/`), another model next to it. A refusal must say why in one
line, exit 2, leave no temporary and leave every file, symlink and folder as it was.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import assert_clean_failure, run_cli, temporaries
from shardkit.engine.atomic import TEMP_MARK
from shardkit.synthetic import SyntheticCheckpoint, write_checkpoint

SHARD_1 = "model-00001-of-00004.safetensors"
USER_FILES = {"optimizer.pt": b"optimizer state", "adapter_model.bin": b"adapter weights", "notes.md": b"my notes"}


def tree(root: Path) -> dict[str, str]:
    """Every entry under `root`, without following symlinks: files by content, links by
    target, folders by name. Equal trees mean nothing was deleted, replaced or added."""
    entries = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            relative = path.relative_to(root).as_posix()
            if path.is_symlink():
                entries[relative] = "-> " + os.readlink(path)
            elif path.is_dir():
                entries[relative] = "dir"
            else:
                entries[relative] = hashlib.sha256(path.read_bytes()).hexdigest()
    return entries


@dataclass
class Models:
    root: Path
    blobs: Path  # cache/blobs: the bytes of every file of llama
    llama: Path  # models/llama: symlinks to the blobs, plus the user's own files
    other: Path  # models/other-model: a second checkpoint beside it
    made: SyntheticCheckpoint


@pytest.fixture
def models(tmp_path: Path) -> Models:
    made = write_checkpoint(tmp_path / "build")
    blobs = tmp_path / "cache" / "blobs"
    llama = tmp_path / "models" / "llama"
    blobs.mkdir(parents=True)
    llama.mkdir(parents=True)
    for path in sorted(made.folder.iterdir()):
        blob = blobs / hashlib.sha256(path.read_bytes()).hexdigest()
        shutil.move(path, blob)
        (llama / path.name).symlink_to(os.path.relpath(blob, llama))
    made.folder.rmdir()
    for name, data in USER_FILES.items():
        (llama / name).write_bytes(data)
    (llama / ".git").mkdir()
    (llama / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    other = write_checkpoint(tmp_path / "models" / "other-model", seed=7).folder
    return Models(tmp_path, blobs, llama, other, made)


def assert_refused(root: Path, args: list[object], message: str) -> None:
    before = tree(root)
    result = run_cli(*args)
    assert_clean_failure(result, 2, message)
    assert result.stdout == ""
    assert temporaries(root) == []
    assert tree(root) == before


def merged_reference(models: Models) -> bytes:
    reference = models.root / "reference.safetensors"
    assert run_cli("merge", models.llama, "-o", reference).exit_code == 0
    data = reference.read_bytes()
    reference.unlink()
    return data


# ----------------------------------------------------------------- the source folder, whatever the shards resolve to


@pytest.mark.parametrize("command", ["merge", "split"])
def test_output_holding_the_source_folder_is_refused_even_with_force(models: Models, command: str) -> None:
    """`-o models --force` deleted all of models/: the source folder and the model beside it."""
    out = models.root / "models"
    assert_refused(models.root, [command, models.llama, "-o", out, "--force"],
                   f"{out}: output would overwrite the source: it contains {models.llama}")


@pytest.mark.parametrize("command", ["merge", "split"])
def test_output_that_is_the_source_folder_is_refused_even_with_force(models: Models, command: str) -> None:
    """The shards are symlinks to blobs elsewhere, so comparing resolved shard paths let this through."""
    assert_refused(models.root, [command, models.llama, "-o", models.llama, "--force"],
                   f"{models.llama}: output is the source folder {models.llama}")


def test_reshard_onto_its_own_folder_says_the_output_is_the_source(models: Models) -> None:
    plain = models.other
    assert_refused(models.root, ["reshard", f"{plain}/", "-o", f"{plain}/", "--force"],
                   f"{plain}: output is the source folder {plain}; it would overwrite the source")


@pytest.mark.parametrize(("command", "name", "force"), [
    ("merge", "merged.safetensors", []), ("merge", "merged", ["--force"]), ("split", "resharded", []),
])
def test_output_inside_the_source_folder_is_refused(models: Models, command: str, name: str, force: list[str]) -> None:
    out = models.llama / name
    assert_refused(models.root, [command, models.llama, "-o", out, *force],
                   f"{out}: output lies inside the source folder {models.llama}; write it outside that folder")


def test_output_inside_the_folder_of_an_index_source_is_refused(models: Models) -> None:
    index = models.other / "model.safetensors.index.json"
    out = models.other / "merged.safetensors"
    assert_refused(models.root, ["merge", index, "-o", out],
                   f"{out}: output lies inside the source folder {models.other}")


@pytest.mark.parametrize("command", ["merge", "split"])
def test_output_holding_the_blobs_the_shards_link_to_is_refused(models: Models, command: str) -> None:
    out = models.root / "cache"
    assert_refused(models.root, [command, models.llama, "-o", out, "--force"],
                   f"{out}: output would overwrite the source: it contains")


def test_output_holding_only_a_companion_file_is_refused(models: Models) -> None:
    """config.json links into shared/; the shards do not: `-o shared --force` would delete it."""
    shared = models.root / "shared"
    shared.mkdir()
    config = models.llama / "config.json"
    moved = shared / "config.json"
    shutil.move(config.resolve(), moved)
    config.unlink()
    config.symlink_to(moved)
    assert_refused(models.root, ["merge", models.llama, "-o", shared, "--force"],
                   f"{shared}: output would overwrite the source: it contains {config}")


def test_a_single_files_own_folder_is_not_a_source_folder(tmp_path: Path) -> None:
    """`split model.safetensors -o sharded/` beside the file stays fine; the folder itself does not."""
    made = write_checkpoint(tmp_path / "downloads", max_shard_size=None, companions=False)
    single = made.folder / "model.safetensors"
    (made.folder / "unrelated.txt").write_text("keep me")
    before = tree(made.folder)
    result = run_cli("split", single, "-o", made.folder / "sharded", "-s", "1MB")
    assert result.exit_code == 0, result.stderr
    assert len(list((made.folder / "sharded").glob("model-*.safetensors"))) > 1
    shutil.rmtree(made.folder / "sharded")
    assert tree(made.folder) == before
    assert_refused(made.folder, ["split", single, "-o", made.folder, "--force"],
                   f"{made.folder}: output would overwrite the source: it contains {single}")


# ----------------------------------------------------------------- identity, not path


@pytest.fixture
def bind_mount(tmp_path: Path):
    mounts: list[Path] = []

    def mount(source: Path, where: Path) -> Path:
        where.mkdir()
        result = subprocess.run(["mount", "--bind", str(source), str(where)], capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot bind-mount here (needs root on Linux): {result.stderr.strip()}")
        mounts.append(where)
        return where

    yield mount
    for where in mounts:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_a_bind_mount_of_the_source_folder_is_the_source_folder(models: Models, bind_mount) -> None:
    alias = bind_mount(models.other, models.root / "alias")
    shard = alias / SHARD_1
    assert_refused(models.root / "models", ["merge", models.other, "-o", shard, "--force"],
                   f"{shard}: output would overwrite the source {models.other / SHARD_1}")
    assert_refused(models.root / "models", ["split", models.other, "-o", alias, "--force"],
                   f"{alias}: output is the source folder {models.other}")


def test_a_symlinked_alias_of_the_source_folder_is_the_source_folder(models: Models) -> None:
    alias = models.root / "alias"
    alias.symlink_to(models.llama)
    shard = alias / SHARD_1
    assert_refused(models.root, ["merge", models.llama, "-o", shard, "--force"],
                   f"{shard}: output would overwrite the source")
    assert_refused(models.root, ["split", alias, "-o", models.llama / "x", "--force"],
                   f"{models.llama / 'x'}: output lies inside the source folder {alias}")


def test_a_hard_link_to_a_shard_is_the_shard(models: Models) -> None:
    shard = models.other / SHARD_1
    link = models.root / "linked.safetensors"
    os.link(shard, link)
    assert_refused(models.root, ["merge", models.other, "-o", link, "--force"],
                   f"{link}: output would overwrite the source {shard}")


# ----------------------------------------------------------------- what --force may delete


def earlier_output(folder: Path, models: Models) -> None:
    """An earlier split of `models.other` with --sha256, as shardkit writes it."""
    result = run_cli("split", models.other, "-o", folder, "-s", "300KB", "--sha256")
    assert result.exit_code == 0, result.stderr


@pytest.mark.parametrize("extra", [".git/", "optimizer.pt", "adapter_model.bin", "todo.txt", "checkpoint-500/"])
def test_force_refuses_a_folder_holding_what_shardkit_did_not_write(models: Models, extra: str) -> None:
    out = models.root / "out"
    earlier_output(out, models)
    if extra.endswith("/"):
        (out / extra).mkdir()
        (out / extra / "HEAD").write_text("data")
    else:
        (out / extra).write_bytes(b"the user's")
    assert_refused(models.root, ["merge", models.llama, "-o", out, "--force"],
                   f"{out}: --force replaces only an earlier output (weight, index, config, tokenizer and checksum "
                   f"files), but the folder also holds {extra}; move those away or choose another output")


def test_force_names_every_unexpected_entry(models: Models) -> None:
    out = models.root / "out"
    earlier_output(out, models)
    for name in ("a.pt", "b.bin", "c.txt", "d.py", "e.yaml", "f.log"):
        (out / name).write_text("x")
    (out / ".cache").mkdir()
    assert_refused(models.root, ["split", models.llama, "-o", out, "--force"],
                   "the folder also holds .cache/, a.pt, b.bin, c.txt, d.py and 2 more; move those away")


@pytest.mark.parametrize("command", ["merge", "split"])
def test_force_replaces_an_earlier_output(models: Models, command: str) -> None:
    """Shards, index, config and tokenizer files, SHA256SUMS, a .sha256: all an earlier output."""
    out = models.root / "out"
    earlier_output(out, models)
    (out / "model.safetensors.sha256").write_text("0" * 64 + "  model.safetensors\n")
    assert len(list(out.glob("model-*.safetensors"))) > 4
    sources = tree(models.root / "models")
    result = run_cli(command, models.llama, "-o", out, "--force")
    assert result.exit_code == 0, result.stderr
    expected = {"config.json", "generation_config.json", "merges.txt", "tokenizer.json", "tokenizer_config.json",
                "vocab.json", "notes.md"}
    assert {p.name for p in out.iterdir()} == expected | {"model.safetensors"}  # 5GB shards: one file
    assert tree(models.root / "models") == sources
    assert temporaries(models.root) == []


def test_force_replaces_a_file_output(models: Models) -> None:
    out = models.root / "merged.safetensors"
    out.write_bytes(b"an older merge")
    result = run_cli("merge", models.llama, "-o", out, "--force")
    assert result.exit_code == 0, result.stderr
    assert out.read_bytes() == merged_reference(models)


def test_help_says_what_force_may_delete() -> None:
    for command in ("merge", "split"):
        result = run_cli(command, "--help")
        text = " ".join(result.stdout.replace("│", " ").split())
        assert "a folder holding only an earlier output" in text, result.stdout
        assert "Never a source or its folder" in text


# ----------------------------------------------------------------- two writers, one output


def test_two_concurrent_merges_to_one_path_never_both_succeed(tmp_path: Path) -> None:
    """Both pass the existence check at start; only one may commit, the other fails cleanly."""
    a = write_checkpoint(tmp_path / "a", max_shard_size=None, companions=False).folder
    b = write_checkpoint(tmp_path / "b", max_shard_size=None, companions=False, seed=3).folder
    references = {}
    for name, folder in (("a", a), ("b", b)):
        assert run_cli("merge", folder, "-o", tmp_path / f"{name}.safetensors").exit_code == 0
        references[name] = (tmp_path / f"{name}.safetensors").read_bytes()
    race = tmp_path / "race"
    race.mkdir()
    for pair in range(int(os.environ.get("SHARDKIT_RACE_PAIRS", "40"))):
        dest = race / f"out{pair}.safetensors"
        runs = {name: subprocess.Popen([sys.executable, "-m", "shardkit", "merge", folder, "-o", dest],
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for name, folder in (("a", a), ("b", b))}
        results = {name: (*p.communicate(timeout=120), p.returncode) for name, p in runs.items()}
        winners = [name for name, (_, _, code) in results.items() if code == 0]
        assert len(winners) == 1, (pair, results)
        (loser,) = set(results) - set(winners)
        _, stderr, code = results[loser]
        assert code == 2 and stderr.count("\n") == 1 and "Traceback" not in stderr, stderr
        assert f"{dest}: already exists" in stderr, stderr
        assert dest.read_bytes() == references[winners[0]], pair
    assert temporaries(race) == []


def test_a_folder_output_never_replaces_another_runs_folder(tmp_path: Path) -> None:
    a = write_checkpoint(tmp_path / "a", companions=False).folder
    b = write_checkpoint(tmp_path / "b", companions=False, seed=3).folder
    dest = tmp_path / "out"
    for _ in range(10):
        runs = [subprocess.Popen([sys.executable, "-m", "shardkit", "split", src, "-o", dest, "-s", "300KB"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for src in (a, b)]
        results = [(*p.communicate(timeout=120), p.returncode) for p in runs]
        assert sorted(code for *_, code in results) == [0, 2], results
        loser = next(stderr for _, stderr, code in results if code)
        assert f"{dest}: already exists" in loser and loser.count("\n") == 1, loser
        winner = a if results[0][2] == 0 else b  # same tensors, other bytes: diff tells them apart
        assert run_cli("diff", dest, winner, "--quiet").exit_code == 0
        shutil.rmtree(dest)
    assert temporaries(tmp_path) == []


# ----------------------------------------------------------------- names up to the filesystem's limit


def long_name(suffix: str) -> str:
    """A name of exactly 255 bytes, the limit of ext4, xfs, btrfs and tmpfs."""
    return "m" * (255 - len(suffix.encode())) + suffix


def test_merge_to_a_255_byte_file_name(tmp_path: Path) -> None:
    made = write_checkpoint(tmp_path / "src")
    dest = tmp_path / long_name(".safetensors")
    result = run_cli("merge", made.folder, "-o", dest)
    assert result.exit_code == 0, result.stderr
    reference = tmp_path / "reference.safetensors"
    assert run_cli("merge", made.folder, "-o", reference).exit_code == 0
    assert dest.read_bytes() == reference.read_bytes()
    assert temporaries(tmp_path) == []


def test_split_to_a_255_byte_folder_name(tmp_path: Path) -> None:
    made = write_checkpoint(tmp_path / "src")
    dest = tmp_path / long_name("-shards")
    result = run_cli("split", made.folder, "-o", dest, "-s", "1MB", "--verify")
    assert result.exit_code == 0, result.stderr
    assert run_cli("diff", made.folder, dest, "--quiet").exit_code == 0
    result = run_cli("split", made.folder, "-o", dest, "-s", "2MB", "--force")
    assert result.exit_code == 0, result.stderr
    assert temporaries(tmp_path) == []


def leftover_of_a_killed_run(dest: Path) -> Path:
    """The temporary a writer of `dest` creates, left by a process that is gone."""
    code = (
        "import sys; from pathlib import Path; from shardkit.engine import atomic; "
        "p = atomic.temp_name(Path(sys.argv[1])); p.write_bytes(b'partial'); print(p)"
    )
    made = subprocess.run([sys.executable, "-c", code, str(dest)], capture_output=True, text=True, check=True)
    return Path(made.stdout.strip())


def test_clean_recognises_the_leftovers_of_255_byte_names(tmp_path: Path) -> None:
    made = write_checkpoint(tmp_path / "src", max_shard_size=None, companions=False)
    out = tmp_path / "out"
    out.mkdir()
    names = [long_name(".safetensors"), long_name("é.safetensors"), "short.safetensors"]
    leftovers = [leftover_of_a_killed_run(out / name) for name in names]
    assert all(p.name.startswith(TEMP_MARK) and len(os.fsencode(p.name)) <= 255 for p in leftovers)
    assert len({p.name for p in leftovers}) == 3
    result = run_cli("clean", out, "--json")
    assert result.exit_code == 0, result.stderr
    assert sorted(json.loads(result.stdout)["removed"]) == sorted(p.name for p in leftovers)
    assert list(out.iterdir()) == []
    # and the next run on the same output removes its own leftover, not another one's
    first, second = (leftover_of_a_killed_run(out / name) for name in names[:2])
    result = run_cli("merge", made.folder, "-o", out / names[0])
    assert result.exit_code == 0, result.stderr
    assert not first.exists() and second.exists()


@pytest.mark.parametrize(("args", "name", "what"), [
    (["merge"], "m" + long_name(".safetensors"), "output"),  # 256 bytes
    (["split"], "m" + long_name("-sharded"), "output"),
    (["merge", "--sha256"], long_name(".safetensors"), "checksum file (--sha256)"),  # the .sha256 beside: 262
])
def test_a_name_longer_than_the_filesystem_allows_is_refused_up_front(
    tmp_path: Path, args: list[str], name: str, what: str
) -> None:
    made = write_checkpoint(tmp_path / "src")
    command, *options = args
    path = tmp_path / (name + ".sha256" if "--sha256" in options else name)
    length = len(os.fsencode(path.name))
    assert_refused(tmp_path, [command, made.folder, "-o", tmp_path / name, *options],
                   f"{path}: the {what} name is {length} bytes, longer than the filesystem allows (255)")
