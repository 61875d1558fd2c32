"""Names are printed and written as typed: no markup eaten, manifests escaped as sha256sum does.

File, folder and tensor names may hold `[v2]`, `[/x]`, `:smile:`, backslashes and even
newlines. The reports of every command must show them whole (rich markup once ate
`[v2]` and crashed on `[/` after the output was committed), help text must keep
`shardkit[numeric]`, and `--sha256` manifests must be what GNU `sha256sum` writes
for the same names, so `sha256sum -c` and `verify --checksums` both accept them.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import assert_clean_failure, run_cli, snapshot, temporaries
from shardkit.engine.atomic import TEMP_MARK
from shardkit.synthetic import ByteSource, SyntheticTensor, write_checkpoint, write_safetensors

MARKUP = "model [v2] [bold]x[/bold] :smile:"
#: Tensor names rich would read as a style, a closing tag and an emoji code.
TENSORS = [
    SyntheticTensor("layers[v2].weight", "F16", (4, 4)),
    SyntheticTensor("head[/].bias", "F32", (3,)),
    SyntheticTensor(":smile:[red].scale", "BF16", (2,)),
]


@pytest.fixture
def marked(tmp_path: Path) -> Path:
    """A model folder whose name, companion files and tensor names all look like markup."""
    folder = tmp_path / MARKUP
    made = write_checkpoint(folder)
    write_safetensors(folder / "extra [v2].safetensors", TENSORS, ByteSource(1))
    (folder / "chat [v2] template.jinja").write_text("{{ messages }}\n")
    (folder / "notes [red] :smile:.md").write_text("notes\n")
    assert len(made.shard_files) == 4
    return folder


def test_merge_report_shows_names_whole(marked: Path, tmp_path: Path) -> None:
    (tmp_path / "runs[").mkdir()
    out = tmp_path / "runs[" / "v2]"  # the report's paths hold '[/v2]', a closing tag to rich
    result = run_cli("merge", marked, "-o", out, "--sha256", "--allow-unindexed")
    assert result.exit_code == 0, result.stderr
    assert f"{out}/model.safetensors " in result.stdout
    copied = "chat [v2] template.jinja, config.json, generation_config.json, merges.txt, notes [red] :smile:.md,"
    assert "copied: " + copied in result.stdout
    assert f"checksums: {out}/model.safetensors.sha256" in result.stdout
    assert (out / "chat [v2] template.jinja").read_text() == "{{ messages }}\n"

    single = tmp_path / "model [v2].safetensors"
    result = run_cli("merge", marked / "extra [v2].safetensors", "-o", single)
    assert result.exit_code == 0, result.stderr
    assert result.stdout.splitlines()[1].startswith(f"{single} ")


@pytest.mark.parametrize("dry_run", [False, True])
def test_split_report_shows_names_whole(marked: Path, tmp_path: Path, dry_run: bool) -> None:
    out = tmp_path / "shards [red] :smile:"
    args = ["--dry-run"] if dry_run else []
    result = run_cli("split", marked, "-o", out, "--max-shard-size", "1MB", "--allow-unindexed", *args)
    assert result.exit_code == 0, result.stderr
    assert "notes [red] :smile:.md" in result.stdout and "chat [v2] template.jinja" in result.stdout
    assert str(out) in result.stdout
    assert out.exists() != dry_run


def test_inspect_diff_verify_checksum_show_names_whole(marked: Path, tmp_path: Path) -> None:
    weights = marked / "extra [v2].safetensors"
    inspect = run_cli("inspect", weights, "--tensors")
    assert inspect.exit_code == 0, inspect.stderr
    for tensor in TENSORS:
        assert tensor.name in inspect.stdout

    other = tmp_path / "other [v2].safetensors"
    shutil.copyfile(weights, other)
    data = bytearray(other.read_bytes())
    data[-1] ^= 1  # the last tensor in the file: the F16 one (the writer puts wider dtypes first)
    other.write_bytes(bytes(data))
    diff = run_cli("diff", weights, other)
    assert diff.exit_code == 1, diff.stderr
    assert "≠ layers[v2].weight  data differs" in diff.stdout

    verify = run_cli("verify", other, "--against", weights)
    assert verify.exit_code == 1, verify.stderr
    assert f"✗ against: {other}: tensor 'layers[v2].weight': holds different bytes than in {weights}" in verify.stdout

    manifest = tmp_path / "sums [v2].txt"
    checksum = run_cli("checksum", weights, "-o", manifest)
    assert checksum.exit_code == 0, checksum.stderr
    assert checksum.stdout.startswith(f"checksum: wrote {manifest}: ")


def test_clean_report_shows_names_whole(tmp_path: Path) -> None:
    folder = tmp_path / "out [v2]"
    folder.mkdir()
    stale = folder / f"{TEMP_MARK}model [red] :smile:.safetensors.999999999.abcd1234"
    stale.write_bytes(b"partial")
    result = run_cli("clean", folder)
    assert result.exit_code == 0, result.stderr
    assert result.stdout.startswith(f"removed {stale}\n")
    assert f"from {folder}" in result.stdout


def test_help_keeps_brackets() -> None:
    diff = run_cli("diff", "--help")
    assert "shardkit[numeric]" in " ".join(diff.stdout.split())
    verify = run_cli("verify", "--help")
    assert "(needs shardkit[hf])" in " ".join(verify.stdout.split())
    assert "\\[" not in verify.stdout


# --------------------------------------------------------------------------- sha256sum manifests

ODD_NAMES = ["we\\ird.safetensors", "new\nline.safetensors", "carriage\rreturn.safetensors"]


def gnu_sha256sum(folder: Path, name: str) -> str:
    return subprocess.run(["sha256sum", name], cwd=folder, capture_output=True, text=True, check=True).stdout


@pytest.mark.skipif(shutil.which("sha256sum") is None, reason="needs GNU sha256sum")
@pytest.mark.parametrize("name", ODD_NAMES, ids=["backslash", "newline", "carriage-return"])
def test_sha256_beside_a_single_file_is_what_sha256sum_writes(checkpoint, tmp_path: Path, name: str) -> None:
    out = tmp_path / "out"
    out.mkdir()
    result = run_cli("merge", checkpoint.folder, "-o", out / name, "--sha256")
    assert result.exit_code == 0, result.stderr
    manifest = out / (name + ".sha256")
    assert manifest.read_text() == gnu_sha256sum(out, name)
    assert manifest.read_text().startswith("\\")
    checked = subprocess.run(["sha256sum", "-c", manifest.name], cwd=out, capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    verify = run_cli("verify", out / name, "--checksums", manifest, "--json")
    assert verify.exit_code == 0, verify.stdout + verify.stderr


@pytest.mark.skipif(shutil.which("sha256sum") is None, reason="needs GNU sha256sum")
def test_verify_reads_the_escapes_and_line_ends_of_sha256sum(checkpoint, tmp_path: Path) -> None:
    """Companion files with every kind of odd name, listed by sha256sum itself: each is
    found and checked; a corrupted one is named. U+2028 and U+0085 are not line ends."""
    odd = ["notes\\v2.md", "two\nlines.md", "cr\r.md", "sep\u2028arated.md", "next\u0085line.md"]
    for number, name in enumerate(odd):
        (checkpoint.folder / name).write_text(f"file {number}\n")
    names = sorted(p.name for p in checkpoint.folder.iterdir())
    listed = subprocess.run(["sha256sum", *names], cwd=checkpoint.folder, capture_output=True, check=True).stdout
    manifest = tmp_path / "SHA256SUMS"
    manifest.write_bytes(listed)
    result = run_cli("verify", checkpoint.folder, "--checksums", manifest, "--no-architecture")
    assert result.exit_code == 0, result.stdout + result.stderr

    (checkpoint.folder / "two\nlines.md").write_text("changed\n")
    result = run_cli("verify", checkpoint.folder, "--checksums", manifest, "--no-architecture", "--json")
    assert result.exit_code == 1
    assert '"file": "' + str(checkpoint.folder / "two\\nlines.md") + '"' in result.stdout
    assert result.stdout.count('"check": "checksums"') == 1


def test_a_manifest_escape_sha256sum_never_writes_is_refused(checkpoint, tmp_path: Path) -> None:
    digest = hashlib.sha256((checkpoint.folder / "config.json").read_bytes()).hexdigest()
    manifest = tmp_path / "SHA256SUMS"
    manifest.write_text(f"\\{digest}  con\\tfig.json\n")
    result = run_cli("verify", checkpoint.folder, "--checksums", manifest)
    assert_clean_failure(result, 2, f"{manifest}:1: '\\\\t' in an escaped name: sha256sum writes only")


@pytest.mark.parametrize("prefix", ["a\nb", "esc\x1b[31m", "tab\tbed", "line\u2028sep", "del\x7f", "c1\x85"])
def test_prefix_refuses_control_characters(checkpoint, tmp_path: Path, prefix: str) -> None:
    before = snapshot(checkpoint.folder)
    out = tmp_path / "out"
    result = run_cli("split", checkpoint.folder, "-o", out, "--prefix", prefix)
    assert_clean_failure(result, 2, f"prefix {prefix!r} holds the control character")
    assert not out.exists() and temporaries(tmp_path) == [] and snapshot(checkpoint.folder) == before
    assert os.listdir(tmp_path) == [checkpoint.folder.name]
