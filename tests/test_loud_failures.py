"""Failing loudly and clearly: hostile or broken input is one line naming the cause.

Each case runs the real CLI on real files and asserts the four things every refusal
owes the user: the one-line message (no traceback), the exit code, nothing left
behind, and sources byte-identical. Before these fixes they gave tracebacks (a
symlink loop, a 5,000-deep index, a deep manifest, a 400-digit size), a silent
success (a companion whose download never finished), or the wrong cause ("cannot
write there", "no .safetensors file") for a file or folder that cannot be read.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

import shardkit
from conftest import CliResult, assert_clean_failure, run_cli, snapshot, temporaries
from shardkit.synthetic import SyntheticCheckpoint, write_checkpoint
from test_faults import world_readable  # noqa: F401 - the fixture behind `shared`
from test_verify import hub_snapshot

DEEP = 5000


def assert_nothing_written(folder: Path, before: dict[str, str], source: Path, *, outputs: list[Path]) -> None:
    assert [p for p in outputs if p.exists() or p.is_symlink()] == []
    assert temporaries(folder) == []
    assert snapshot(source) == before


# --------------------------------------------------------------------------- no tracebacks


@pytest.mark.parametrize("command", ["merge", "split"])
def test_a_symlink_loop_among_companion_files(checkpoint: SyntheticCheckpoint, tmp_path: Path, command) -> None:
    (checkpoint.folder / "chat_template.jinja").symlink_to("template.jinja")
    (checkpoint.folder / "template.jinja").symlink_to("chat_template.jinja")
    before = snapshot(checkpoint.folder)
    out = tmp_path / "out"
    result = run_cli(command, checkpoint.folder, "-o", out)
    assert_clean_failure(result, 2, f"{checkpoint.folder / 'chat_template.jinja'}: the output needs this file, but it")
    assert "is a symlink loop (too many levels of symbolic links): fix or remove the link" in result.stderr
    assert f"(also unreadable: {checkpoint.folder / 'template.jinja'})" in result.stderr
    assert_nothing_written(tmp_path, before, checkpoint.folder, outputs=[out])


def test_verify_flags_a_symlink_loop_among_companion_files(checkpoint: SyntheticCheckpoint) -> None:
    (checkpoint.folder / "loop.json").symlink_to("loop.json")
    result = run_cli("verify", checkpoint.folder, "--no-architecture", "--json")
    assert result.exit_code == 1, result.stderr
    report = json.loads(result.stdout)
    assert "companions" in report["checks"]
    (problem,) = report["problems"]
    assert problem["check"] == "companions" and problem["file"] == str(checkpoint.folder / "loop.json")
    assert problem["message"].startswith("is a symlink loop")


@pytest.mark.parametrize("given", ["folder", "index"])
def test_a_5000_deep_index_given_to_verify(checkpoint: SyntheticCheckpoint, given: str) -> None:
    index = checkpoint.folder / "model.safetensors.index.json"
    index.write_text('{"metadata": ' + "[" * DEEP + "]" * DEEP + ', "weight_map": {}}')
    before = snapshot(checkpoint.folder)
    result = run_cli("verify", checkpoint.folder if given == "folder" else index)
    assert_clean_failure(result, 2, f"{index}: not an index: JSON nested deeper than 127 levels")
    assert result.stdout == "" and snapshot(checkpoint.folder) == before


@pytest.mark.parametrize("command", ["inspect", "merge", "diff"])
def test_a_5000_deep_index_given_to_the_other_commands(checkpoint: SyntheticCheckpoint, tmp_path: Path, command):
    index = checkpoint.folder / "model.safetensors.index.json"
    index.write_text("[" * DEEP + "]" * DEEP)
    before = snapshot(checkpoint.folder)
    args = {"inspect": [], "merge": ["-o", tmp_path / "m.safetensors"], "diff": [checkpoint.folder]}[command]
    result = run_cli(command, index, *args)
    assert_clean_failure(result, 2, f"{index}: not a valid JSON index: nested deeper than 127 levels")
    assert_nothing_written(tmp_path, before, checkpoint.folder, outputs=[tmp_path / "m.safetensors"])


@pytest.mark.parametrize(
    "text",
    [
        '{"format": "shardkit.tensor-sha256", "tensors": ' + "[" * DEEP + "]" * DEEP + "}",
        "{" + '"a":{' * DEEP + "}" * DEEP,
    ],
    ids=["deep-array", "deep-object"],
)
def test_a_deeply_nested_checksums_manifest(checkpoint: SyntheticCheckpoint, tmp_path: Path, text: str) -> None:
    manifest = tmp_path / "tensors.json"
    manifest.write_text(text)
    before = snapshot(checkpoint.folder)
    result = run_cli("verify", checkpoint.folder, "--checksums", manifest)
    assert_clean_failure(result, 2, f"{manifest}: not a checksum manifest: JSON nested too deeply to read")
    assert snapshot(checkpoint.folder) == before


@pytest.mark.parametrize("size", ["9" * 400, "9" * 400 + "GB", "1" + "0" * 5000, "9223372036854775808", "1e3GB"])
def test_an_absurd_max_shard_size(checkpoint: SyntheticCheckpoint, tmp_path: Path, size: str) -> None:
    before = snapshot(checkpoint.folder)
    out = tmp_path / "out"
    result = run_cli("split", checkpoint.folder, "-o", out, "--max-shard-size", size)
    if size == "1e3GB":
        assert_clean_failure(result, 2, "cannot read size '1e3GB': use bytes or a number with KB")
    else:
        assert_clean_failure(result, 2, "is larger than any file can be (at most 9,223,372,036,854,775,807 bytes)")
        assert len(result.stderr) < 200  # the 5,000 digits are not echoed back
    assert_nothing_written(tmp_path, before, checkpoint.folder, outputs=[out])


def test_sizes_are_exact_where_a_float_was_not() -> None:
    from shardkit.sizes import MAX_SIZE, parse_size

    assert parse_size(str(2**53 + 1)) == 2**53 + 1  # float() rounded it to 2**53
    assert parse_size("9007199.254740993GB") == 9007199254740993
    assert parse_size(str(MAX_SIZE)) == MAX_SIZE
    assert parse_size("2.5kB") == 2500 and parse_size("1.5KiB") == 1536


# --------------------------------------------------------------------------- dangling companions


@pytest.fixture
def unfinished_snapshot(checkpoint: SyntheticCheckpoint, tmp_path: Path) -> Path:
    """A Hugging Face cache snapshot whose tokenizer.json blob is still downloading:
    huggingface_hub writes blobs/<hash>.incomplete and renames it when done."""
    snap = hub_snapshot(tmp_path / "hub", checkpoint.folder)
    blob = (snap / "tokenizer.json").resolve()
    blob.rename(blob.with_name(blob.name + ".incomplete"))
    return snap


@pytest.mark.parametrize("command", ["merge", "split"])
def test_a_companion_whose_download_did_not_finish(unfinished_snapshot: Path, tmp_path: Path, command: str) -> None:
    cache = tmp_path / "hub"
    before = snapshot(cache)
    out = tmp_path / "ready-to-load"
    result = run_cli(command, unfinished_snapshot, "-o", out)
    link = unfinished_snapshot / "tokenizer.json"
    target = os.readlink(link)
    assert_clean_failure(
        result,
        2,
        f"{link}: the output needs this file, but it is a symlink to {target}, which does not exist: "
        f"its download did not finish ({Path(target).name}.incomplete is still there); "
        "download it again (`hf download org/name`), or remove the link",
    )
    assert_nothing_written(tmp_path, before, cache, outputs=[out])


def test_verify_flags_a_companion_whose_download_did_not_finish(unfinished_snapshot: Path) -> None:
    result = run_cli("verify", unfinished_snapshot, "--no-architecture")
    assert result.exit_code == 1, result.stderr
    link = unfinished_snapshot / "tokenizer.json"
    assert result.stdout.startswith(f"✗ companions: {link}: is a symlink to ")
    assert "download it again (`hf download org/name`)" in result.stdout
    assert "checks: format, index, json, companions, hub" in result.stdout


def test_a_dangling_companion_outside_a_cache(checkpoint: SyntheticCheckpoint, tmp_path: Path) -> None:
    (checkpoint.folder / "tokenizer.json").unlink()
    (checkpoint.folder / "tokenizer.json").symlink_to(tmp_path / "elsewhere" / "tokenizer.json")
    before = snapshot(checkpoint.folder)
    result = run_cli("merge", checkpoint.folder, "-o", tmp_path / "out")
    assert_clean_failure(result, 2, "which does not exist: the file it points to is gone; download the model again")
    assert_nothing_written(tmp_path, before, checkpoint.folder, outputs=[tmp_path / "out"])


# --------------------------------------------------------------------------- unreadable input


@pytest.fixture
def shared(world_readable: Path) -> Path:  # noqa: F811 - pytest passes the imported fixture
    """A folder an unprivileged user can reach (pytest's tmp_path is private to root)."""
    return world_readable


@pytest.fixture(scope="module")
def world_readable_code() -> Iterator[Path]:
    """A copy of the shardkit under test that an unprivileged user can import: the
    checkout itself may sit in a folder only root can enter."""
    folder = Path(tempfile.mkdtemp(prefix="shardkit-code-", dir="/tmp"))
    shutil.copytree(Path(shardkit.__file__).parent, folder / "shardkit", ignore=shutil.ignore_patterns("__pycache__"))
    for path in [folder, *folder.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    try:
        yield folder
    finally:
        shutil.rmtree(folder)


@pytest.fixture
def as_nobody(world_readable_code: Path):
    """Run the CLI as `nobody` (root would bypass every permission)."""
    setpriv = shutil.which("setpriv")
    if setpriv is None or os.geteuid() != 0:
        pytest.skip("needs root and setpriv to run the CLI as an unprivileged user (root bypasses permissions)")
    try:
        import pwd

        pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no 'nobody' user to run the CLI unprivileged")

    def run(*args: object) -> CliResult:
        command = [setpriv, "--reuid=nobody", "--regid=nogroup", "--clear-groups", sys.executable, "-m", "shardkit"]
        env = {**os.environ, "PYTHONPATH": str(world_readable_code), "COLUMNS": "200"}
        completed = subprocess.run(
            [*command, *map(str, args)], capture_output=True, text=True, cwd="/", env=env, timeout=120
        )
        return CliResult(completed.returncode, completed.stdout, completed.stderr)

    assert run("--version").exit_code == 0
    return run


def writable_output_folder(folder: Path) -> Path:
    out = folder / "out"
    out.mkdir()
    out.chmod(0o777)
    return out


@pytest.mark.parametrize("command", ["merge", "split"])
def test_an_unreadable_companion_file(shared: Path, as_nobody, command: str) -> None:
    made = write_checkpoint(shared / "model")
    (made.folder / "tokenizer.json").chmod(0o600)  # root's; nobody may not read it
    out = writable_output_folder(shared)
    before = snapshot(made.folder)
    result = as_nobody(command, made.folder, "-o", out / "ready")
    unreadable = made.folder / "tokenizer.json"
    message = f"{unreadable}: the output needs this file, but it cannot be read: Permission denied"
    assert_clean_failure(result, 2, message)
    assert "cannot write there" not in result.stderr
    assert list(out.iterdir()) == [] and snapshot(made.folder) == before


def test_verify_flags_an_unreadable_companion_file(shared: Path, as_nobody) -> None:
    made = write_checkpoint(shared / "model")
    (made.folder / "tokenizer_config.json").chmod(0o600)
    result = as_nobody("verify", made.folder, "--no-architecture")
    assert result.exit_code == 1, result.stderr
    unreadable = made.folder / "tokenizer_config.json"
    assert f"✗ companions: {unreadable}: cannot be read: Permission denied\n" in result.stdout


@pytest.mark.parametrize("mode", [0o700, 0o744], ids=["no-read", "no-enter"])
@pytest.mark.parametrize("command", ["merge", "inspect", "verify", "diff", "checksum"])
def test_an_unreadable_source_folder(shared: Path, as_nobody, mode: int, command: str) -> None:
    made = write_checkpoint(shared / "model")
    made.folder.chmod(mode)
    out = writable_output_folder(shared)
    before = snapshot(made.folder)
    args = {"merge": ["-o", out / "m.safetensors"], "diff": [made.folder]}.get(command, [])
    result = as_nobody(command, made.folder, *args)
    assert_clean_failure(result, 2, f"{made.folder}: Permission denied: cannot read this folder")
    assert list(out.iterdir()) == [] and snapshot(made.folder) == before


def test_an_unreadable_subfolder_is_left_alone(shared: Path, as_nobody) -> None:
    """Subfolders are not part of the checkpoint (another checkpoint, an earlier output):
    one that cannot be read is no reason to refuse."""
    made = write_checkpoint(shared / "model")
    private = made.folder / "private"
    private.mkdir(mode=0o700)
    (private / "notes.md").write_text("root's\n")
    out = writable_output_folder(shared)
    result = as_nobody("merge", made.folder, "-o", out / "ready")
    assert result.exit_code == 0, result.stderr
    assert not (out / "ready" / "private").exists()
