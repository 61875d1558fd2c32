"""What a new user runs first (issue 12): the README's CI recipe, one shard passed for a
model, the Mistral layout, companion files in the checks, and the messages that say
what to do next. Real checkpoints, the real CLI; every refusal is one line, the right
exit code, nothing left behind and the sources byte-identical.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import safetensors

import shardkit
from conftest import assert_clean_failure, run_cli, snapshot, temporaries
from shardkit.cli.render import FLOOD
from shardkit.format.header import read_header
from shardkit.synthetic import SyntheticCheckpoint, write_checkpoint

README = Path(__file__).resolve().parent.parent / "README.md"
INDEX = "model.safetensors.index.json"
NO_ARCH = "--no-architecture"


def tensors_of(path: Path) -> dict[str, bytes]:
    return {name: bytes(entry["data"]) for name, entry in safetensors.deserialize(path.read_bytes())}


def assert_refused(root: Path, args: list[object], code: int, message: str) -> str:
    """One line holding `message`, exit `code`, no stdout, no temporary, `root` untouched."""
    before = snapshot(root)
    result = run_cli(*args)
    assert_clean_failure(result, code, message)
    assert result.stdout == ""
    assert temporaries(root) == []
    assert snapshot(root) == before
    return result.stderr


def shardkit_on_path(tmp_path: Path) -> dict[str, str]:
    """An environment whose `shardkit` runs this tree's code with the test's interpreter."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "shardkit"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m shardkit "$@"\n')
    wrapper.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}


# ----------------------------------------------------------------- 1. the README's CI recipe


def readme_ci_recipe() -> list[str]:
    """The command lines of the code block after 'A CI recipe:' in README.md, as printed."""
    text = README.read_text(encoding="utf-8")
    block = re.search(r"A CI recipe:\n\n```sh\n(.*?)\n```", text, re.S)
    assert block is not None, "README.md lost its CI recipe"
    return [line for line in block.group(1).splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_readme_ci_recipe_runs_exactly_as_printed(tmp_path: Path) -> None:
    model = write_checkpoint(tmp_path / "Qwen2.5-7B-Instruct").folder
    env = shardkit_on_path(tmp_path)
    before = snapshot(model)
    lines = readme_ci_recipe()
    assert len(lines) >= 6 and "Qwen2.5-7B-Instruct/" in lines[0]
    # The alternative the recipe prints in a comment is run too.
    alternatives = [m.group(1) for line in lines for m in [re.search(r"# or: (.+)$", line)] if m]
    assert alternatives == ["cd model && sha256sum -c SHA256SUMS"]
    for line in [*lines, *alternatives]:
        done = subprocess.run(["bash", "-c", line], cwd=tmp_path, env=env, capture_output=True, text=True)
        assert done.returncode == 0, (line, done.stdout, done.stderr)
    report = json.loads((tmp_path / "verify-report.json").read_text())
    assert report["ok"] and "tensor-checksums" in report["checks"]
    # The file manifest covers what a loader reads, and the reshard carries no stale copy of it.
    listed = {line.split("  ", 1)[1] for line in (tmp_path / "model" / "SHA256SUMS").read_text().splitlines()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"} <= listed
    assert not (tmp_path / "resharded" / "SHA256SUMS").exists()
    assert snapshot(model) == before


def test_stale_checksum_manifests_are_never_copied(tmp_path: Path) -> None:
    """SHA256SUMS, `merge --sha256`'s `model.safetensors.sha256` and a `checksum --json`
    report name weight files a merge or split rewrites: they stay behind. A tensor
    manifest stays valid across both and is copied; --sha256 writes a fresh manifest."""
    source = tmp_path / "merged"
    made = write_checkpoint(tmp_path / "model")
    shardkit.merge(made.folder, source, sha256=True)
    assert (source / "model.safetensors.sha256").is_file()
    assert run_cli("checksum", source, "-o", source / "SHA256SUMS", "--force").exit_code == 0
    (source / "report.json").write_text(run_cli("checksum", source, "--json").stdout)
    assert run_cli("checksum", source, "--tensors", "-o", source / "tensors.json").exit_code == 0
    (source / "notes.sha256").write_text("not a manifest at all\n")  # unparseable: an ordinary file
    before = snapshot(source)
    stale = {"SHA256SUMS", "model.safetensors.sha256", "report.json"}

    for command, out, extra in (
        ("split", tmp_path / "resharded", ["--max-shard-size", "1MB"]),
        ("merge", tmp_path / "again", []),
        ("split", tmp_path / "resharded-sha", ["--max-shard-size", "1MB", "--sha256"]),
    ):
        result = run_cli(command, source, "-o", out, *extra)
        assert result.exit_code == 0, result.stderr
        names = {p.name for p in out.iterdir()}
        assert not names & (stale - ({"SHA256SUMS"} if "--sha256" in extra else set())), names
        assert {"tensors.json", "notes.sha256", "config.json"} <= names
        check = run_cli("verify", out, "--checksums", out / "tensors.json", NO_ARCH)
        assert check.exit_code == 0, check.stdout
    fresh = tmp_path / "resharded-sha"
    assert len(list(fresh.glob("model-*.safetensors"))) > 1
    sums = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=fresh, capture_output=True, text=True)
    assert sums.returncode == 0, sums.stdout + sums.stderr
    assert run_cli("verify", fresh, "--checksums", fresh / "SHA256SUMS", NO_ARCH).exit_code == 0
    assert snapshot(source) == before


# ----------------------------------------------------------------- 2. one shard given


def test_merge_and_split_of_one_shard_take_the_whole_checkpoint(
    checkpoint: SyntheticCheckpoint, tmp_path: Path
) -> None:
    whole = tmp_path / "whole.safetensors"
    shardkit.merge(checkpoint.folder, whole)
    before = snapshot(checkpoint.folder)
    for shard in (checkpoint.shard_files[0], checkpoint.shard_files[2]):
        out = tmp_path / f"from-{shard}"
        out.mkdir()
        result = run_cli("merge", checkpoint.folder / shard, "-o", out / "model.safetensors")
        assert result.exit_code == 0, result.stderr
        number = checkpoint.shard_files.index(shard) + 1
        assert result.stderr == (
            f"shardkit: warning: {checkpoint.folder / shard} is shard {number} of 4 of the checkpoint "
            f"{checkpoint.folder / INDEX}: using the whole checkpoint, as gguf-split does with a first shard\n"
        )
        assert (out / "model.safetensors").read_bytes() == whole.read_bytes()
    split = tmp_path / "split"
    result = run_cli("split", checkpoint.folder / checkpoint.shard_files[1], "-o", split, "-s", "100GB")
    assert result.exit_code == 0, result.stderr
    assert "is shard 2 of 4" in result.stderr
    assert tensors_of(split / "model.safetensors") == tensors_of(whole)
    assert (split / "config.json").is_file()
    assert snapshot(checkpoint.folder) == before


def test_one_shard_of_an_incomplete_set_is_refused_naming_every_missing_shard(tmp_path: Path) -> None:
    made = write_checkpoint(tmp_path / "m")
    (made.folder / INDEX).unlink()  # no index: the -of- names alone say it is a set
    for name in made.shard_files[1:3]:
        (made.folder / name).unlink()
    out = tmp_path / "out.safetensors"
    message = assert_refused(tmp_path, ["merge", made.folder / made.shard_files[0], "-o", out], 2, "is incomplete")
    assert f"missing {made.shard_files[1]}, {made.shard_files[2]}" in message
    assert not out.exists()


class RangeHandler(http.server.BaseHTTPRequestHandler):
    """Files of `self.server.folder` with Range requests, as a CDN answers them; no listing."""

    def do_GET(self) -> None:  # noqa: N802 - the http.server API
        path = self.server.folder / self.path.lstrip("/")  # type: ignore[attr-defined]
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        match = re.fullmatch(r"bytes=(\d+)-(\d+)", self.headers.get("Range", ""))
        if match:
            start, end = int(match.group(1)), min(int(match.group(2)), len(data) - 1)
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
            data = data[start : end + 1]
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def served(checkpoint: SyntheticCheckpoint) -> Iterator[str]:
    """The checkpoint folder on a web server at 127.0.0.1."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RangeHandler)
    server.folder = checkpoint.folder  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_one_shard_on_a_web_server(checkpoint: SyntheticCheckpoint, served: str, tmp_path: Path) -> None:
    """A web server cannot list a folder: the index named after the shard's prefix is looked up instead."""
    index = f"{served}/{INDEX}"
    inspected = run_cli("inspect", f"{served}/{checkpoint.shard_files[1]}")
    assert inspected.exit_code == 0, inspected.stderr
    assert inspected.stderr.startswith(
        f"shardkit: note: {checkpoint.shard_files[1]} is shard 2 of 4 of the checkpoint {index};"
    )
    out = tmp_path / "out.safetensors"
    merged = run_cli("merge", f"{served}/{checkpoint.shard_files[0]}", "-o", out)
    assert merged.exit_code == 0, merged.stderr
    assert f"is shard 1 of 4 of the checkpoint {index}: using the whole checkpoint" in merged.stderr
    local = shardkit.merge(checkpoint.folder, tmp_path / "local.safetensors")
    assert out.read_bytes() == Path(local.output).read_bytes()
    (checkpoint.folder / INDEX).rename(tmp_path / INDEX)
    refused = tmp_path / "refused.safetensors"
    assert_clean_failure(
        run_cli("merge", f"{served}/{checkpoint.shard_files[0]}", "-o", refused), 2,
        f"{served}/{checkpoint.shard_files[0]} is shard 1 of 4, and a web server cannot list its folder: "
        "pass the URL of its index .json",
    )
    assert not refused.exists() and temporaries(tmp_path) == []


def test_inspect_and_verify_of_one_shard_say_which_shard_it_is(checkpoint: SyntheticCheckpoint) -> None:
    shard = checkpoint.folder / checkpoint.shard_files[1]
    note = (
        f"shardkit: note: {shard.name} is shard 2 of 4 of the checkpoint {checkpoint.folder / INDEX}; "
        "pass that for the whole model\n"
    )
    inspected = run_cli("inspect", shard)
    assert inspected.exit_code == 0 and inspected.stderr == note
    assert json.loads(run_cli("inspect", shard, "--json").stdout)["notes"] == [note.split("note: ", 1)[1].strip()]
    verified = run_cli("verify", shard)
    assert verified.exit_code == 0 and verified.stderr == note
    assert verified.stdout.startswith("verify: OK: 1 file(s), ")


# ----------------------------------------------------------------- 3. source options, sibling layouts


def command_options(name: str) -> set[str]:
    import importlib

    import typer.main

    cli = importlib.import_module("shardkit.cli.app")
    cli.register([name])
    return {opt for param in typer.main.get_command(cli.app).commands[name].params for opt in param.opts}


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # typer imported in-process, for its option table
def test_verify_checksum_and_diff_take_every_source_option_of_merge(checkpoint: SyntheticCheckpoint) -> None:
    not_source = {"--output", "-o", "--force", "-f", "--sha256", "--dry-run", "--json", "--quiet", "-q", "--verify",
                  "--debug", "source", "output_arg", "--dtype", "--keep", "--block-size", "--select", "--drop",
                  "--rename", "--recipe"}
    merge_source = command_options("merge") - not_source
    assert merge_source == {"--strict", "--allow-unindexed", "--endpoint-url"}
    for name in ("verify", "checksum", "diff"):
        assert merge_source <= command_options(name), name
    given = ["--strict", "--allow-unindexed", "--endpoint-url", "http://127.0.0.1:9"]  # unused by a local path
    for args in (["verify", checkpoint.folder, NO_ARCH], ["checksum", checkpoint.folder],
                 ["diff", checkpoint.folder, checkpoint.folder / INDEX]):
        result = run_cli(*args, *given)
        assert result.exit_code == 0, (args, result.stdout, result.stderr)


def test_a_stray_weight_file_fails_verify_and_checksum_unless_allowed(checkpoint: SyntheticCheckpoint) -> None:
    stray = checkpoint.folder / "adapter.safetensors"
    shutil.copyfile(checkpoint.folder / checkpoint.shard_files[0], stray)
    before = snapshot(checkpoint.folder)
    refused = run_cli("verify", checkpoint.folder, NO_ARCH)
    assert refused.exit_code == 1 and "pass --allow-unindexed" in refused.stdout
    allowed = run_cli("verify", checkpoint.folder, NO_ARCH, "--allow-unindexed", "--strict")
    assert allowed.exit_code == 1  # --strict makes the warning a problem, as for merge's index warnings
    allowed = run_cli("verify", checkpoint.folder, NO_ARCH, "--allow-unindexed")
    assert allowed.exit_code == 0, allowed.stdout
    assert f"shardkit: warning: {stray}: this weight file is not part of the checkpoint" in allowed.stderr
    assert_clean_failure(run_cli("checksum", checkpoint.folder), 2, "pass --allow-unindexed")
    summed = run_cli("checksum", checkpoint.folder, "--allow-unindexed")
    assert summed.exit_code == 0 and "adapter.safetensors" not in summed.stdout
    assert snapshot(checkpoint.folder) == before


def test_mistral_layout_is_a_note_naming_what_loaders_use(checkpoint: SyntheticCheckpoint, tmp_path: Path) -> None:
    """Mistral publishes consolidated.safetensors (for mistral-inference) beside the
    Hugging Face shards; transformers loads the shards through the index."""
    whole = tmp_path / "whole.safetensors"
    shardkit.merge(checkpoint.folder, whole)
    consolidated = checkpoint.folder / "consolidated.safetensors"
    shutil.copyfile(whole, consolidated)
    note = (
        f"shardkit: note: {consolidated}: Mistral's own single-file format (for mistral-inference and vLLM's "
        f"mistral loader); transformers loads the 4 shards of {INDEX}, and so does shardkit\n"
    )
    for args in (["verify", checkpoint.folder, NO_ARCH], ["verify", checkpoint.folder, NO_ARCH, "--strict"]):
        result = run_cli(*args)
        assert result.exit_code == 0, result.stdout
        assert result.stderr == note
    summed = run_cli("checksum", checkpoint.folder)
    assert summed.exit_code == 0 and summed.stderr == note
    assert "consolidated.safetensors" not in summed.stdout and checkpoint.shard_files[0] in summed.stdout
    compared = run_cli("diff", checkpoint.folder, whole)
    assert compared.exit_code == 0 and compared.stderr == note.replace("note: ", "note: A: ")
    merged = tmp_path / "merged"
    assert run_cli("merge", checkpoint.folder, "-o", merged).exit_code == 0
    assert not (merged / "consolidated.safetensors").exists()
    assert (merged / "model.safetensors").read_bytes() == whole.read_bytes()


def test_single_file_beside_an_index_is_a_note_even_strict(checkpoint: SyntheticCheckpoint, tmp_path: Path) -> None:
    single = checkpoint.folder / "model.safetensors"
    shardkit.merge(checkpoint.folder, tmp_path / "whole.safetensors")
    shutil.copyfile(tmp_path / "whole.safetensors", single)
    for extra in ([], ["--strict"]):
        result = run_cli("verify", checkpoint.folder, NO_ARCH, *extra)
        assert result.exit_code == 0, result.stdout
        assert result.stderr == (
            f"shardkit: note: {checkpoint.folder}: both model.safetensors and {INDEX} are present; using "
            "model.safetensors as transformers does, the index and its shards are ignored\n"
        )


def test_transformers_loads_the_single_file_before_the_index() -> None:
    """The order the note states, read from the installed transformers' own source."""
    transformers = pytest.importorskip("transformers")
    source = (Path(transformers.__file__).parent / "modeling_utils.py").read_text()
    single = source.index("_add_variant(SAFE_WEIGHTS_NAME, variant))\n")
    sharded = source.index("_add_variant(SAFE_WEIGHTS_INDEX_NAME, variant))\n")
    assert single < sharded


# ----------------------------------------------------------------- 4. the checks cover every loader file


def test_checksum_covers_companion_files_and_verify_checks_every_line(
    checkpoint: SyntheticCheckpoint, tmp_path: Path
) -> None:
    manifest = checkpoint.folder / "SHA256SUMS"
    assert run_cli("checksum", checkpoint.folder, "-o", manifest).exit_code == 0
    # A manifest written by sha256sum itself, over a few files.
    (checkpoint.folder / "FEW").write_text(
        subprocess.run(["sha256sum", "config.json", "tokenizer.json", *checkpoint.shard_files],
                       cwd=checkpoint.folder, capture_output=True, text=True, check=True).stdout
    )
    tokenizer = checkpoint.folder / "tokenizer.json"
    tokenizer.write_text(tokenizer.read_text().replace("<|im_end|>", "<|im_xxx|>", 1))
    result = run_cli("verify", checkpoint.folder, "--checksums", manifest, NO_ARCH)
    assert result.exit_code == 1, result.stdout
    assert result.stdout.splitlines()[0].startswith(f"✗ checksums: {tokenizer}: SHA-256 is ")
    assert "FAILED: 1 problem(s)" in result.stdout
    sums = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=checkpoint.folder, capture_output=True, text=True)
    assert sums.returncode == 1 and "tokenizer.json: FAILED" in sums.stdout
    few = run_cli("verify", checkpoint.folder, "--checksums", checkpoint.folder / "FEW", NO_ARCH, "--json")
    report = json.loads(few.stdout)
    assert [(p["check"], Path(p["file"]).name) for p in report["problems"]] == [("checksums", "tokenizer.json")]


@pytest.mark.parametrize("name", ["config.json", "tokenizer_config.json", "generation_config.json", INDEX])
def test_unparseable_config_tokenizer_config_or_index_is_a_problem(checkpoint: SyntheticCheckpoint, name: str) -> None:
    broken = checkpoint.folder / name
    broken.write_text(broken.read_text()[:-5])
    before = snapshot(checkpoint.folder)
    result = run_cli("verify", checkpoint.folder, NO_ARCH, "--json")
    assert result.exit_code == 1, result.stdout
    (problem,) = json.loads(result.stdout)["problems"]
    if name == INDEX:
        assert problem["check"] == "index" and "not a valid JSON index" in problem["message"]
    else:
        assert (problem["check"], problem["file"]) == ("json", str(broken))
        assert problem["message"].startswith("not valid JSON (")
        assert problem["message"].endswith("loaders cannot read it; restore it from the source")
    assert snapshot(checkpoint.folder) == before
    assert temporaries(checkpoint.folder) == []


def test_diff_reports_companion_files_that_differ(checkpoint: SyntheticCheckpoint, tmp_path: Path) -> None:
    other = tmp_path / "other"
    shardkit.merge(checkpoint.folder, other, sha256=True)  # its .sha256 names weights: not compared
    assert run_cli("diff", checkpoint.folder, other).exit_code == 0
    config = json.loads((other / "config.json").read_text())
    config["rope_theta"] = 1.0
    (other / "config.json").write_text(json.dumps(config))
    (other / "chat_template.jinja").write_text("{{ messages }}")
    (other / "merges.txt").unlink()
    result = run_cli("diff", checkpoint.folder, other)
    assert result.exit_code == 1, result.stdout
    lines = result.stdout.splitlines()
    assert lines[:3] == ["- file merges.txt  (only in A)", "+ file chat_template.jinja  (only in B)",
                         "≠ file config.json  differs"]
    assert lines[-1].startswith("different: ")
    report = json.loads(run_cli("diff", checkpoint.folder, other, "--json", "--no-data").stdout)
    assert (report["files_only_a"], report["files_only_b"], report["files_different"]) == (
        ["merges.txt"], ["chat_template.jinja"], ["config.json"]
    )
    assert report["identical"] is False
    # A lone weight file has no companions to compare: shards against their merged file stay identical.
    assert run_cli("diff", checkpoint.folder, other / "model.safetensors").exit_code == 0


# ----------------------------------------------------------------- 5. every missing shard


def test_every_missing_shard_is_reported(checkpoint: SyntheticCheckpoint, tmp_path: Path) -> None:
    gone = [checkpoint.shard_files[1], checkpoint.shard_files[3]]
    for name in gone:
        (checkpoint.folder / name).unlink()
    out = tmp_path / "out.safetensors"
    message = assert_refused(checkpoint.folder, ["merge", checkpoint.folder, "-o", out], 2, "named in weight_map")
    assert f"shards {gone[0]}, {gone[1]} named in weight_map do not exist (2 of 4); download them again" in message
    assert not out.exists() and temporaries(tmp_path) == []
    result = run_cli("verify", checkpoint.folder, NO_ARCH, "--json")
    assert result.exit_code == 1
    problems = json.loads(result.stdout)["problems"]
    assert [(p["check"], p["file"]) for p in problems] == [("index", str(checkpoint.folder / n)) for n in gone]
    assert all(p["message"] == f"named in {checkpoint.folder / INDEX} but missing: download it again" for p in problems)


# ----------------------------------------------------------------- messages that say what to do next


def test_git_lfs_pointer_says_run_git_lfs_pull(checkpoint: SyntheticCheckpoint, tmp_path: Path) -> None:
    pointer = checkpoint.folder / checkpoint.shard_files[2]
    pointer.write_text(
        "version https://git-lfs.github.com/spec/v1\n"
        "oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\nsize 921880\n"
    )
    expected = f"{pointer}: is a Git LFS pointer, not the weights: run `git lfs pull` in its repository"
    out = tmp_path / "out.safetensors"
    assert_refused(checkpoint.folder, ["merge", checkpoint.folder, "-o", out], 2, expected)
    assert_refused(checkpoint.folder, ["inspect", pointer], 2, expected)
    assert not out.exists() and temporaries(tmp_path) == []
    result = run_cli("verify", checkpoint.folder, NO_ARCH)
    assert result.exit_code == 1 and f"✗ format: {expected}\n" in result.stdout


def test_truncated_file_says_how_many_bytes_are_present(checkpoint: SyntheticCheckpoint, tmp_path: Path) -> None:
    shard = checkpoint.folder / checkpoint.shard_files[1]
    size = shard.stat().st_size
    os.truncate(shard, size - 1000)
    out = tmp_path / "out.safetensors"
    assert_refused(checkpoint.folder, ["merge", checkpoint.folder, "-o", out], 2,
                   f"{shard}: truncated: {size - 1000} of {size} bytes present — download it again")
    os.truncate(shard, 20)  # the header itself is cut
    message = assert_refused(checkpoint.folder, ["inspect", shard], 2, "truncated: 20 of at least ")
    assert message.endswith("bytes present — download it again\n")
    assert not out.exists()


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        (["model.onnx"], "found model.onnx: an ONNX model: shardkit reads only safetensors"),
        (["qwen2.5-7b-q4_k_m.gguf"], "found qwen2.5-7b-q4_k_m.gguf: GGUF files (llama.cpp's format): merge or split "
         "them with llama.cpp's gguf-split"),
    ],
)
def test_folder_of_other_weight_formats_names_them(tmp_path: Path, files: list[str], expected: str) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    for name in files:
        (folder / name).write_bytes(b"\x80\x02}q\x00.")  # never read, let alone unpickled
    for command in (["inspect", folder], ["merge", folder, "-o", tmp_path / "x.safetensors"], ["verify", folder]):
        message = assert_refused(tmp_path, command, 2, f"{folder}: no .safetensors weights; {expected}")
        assert message.count(str(folder)) == 1
    assert not (tmp_path / "x.safetensors").exists()


def test_inspect_of_a_path_that_is_not_the_checkpoint_names_what_is_there(
    checkpoint: SyntheticCheckpoint, tmp_path: Path
) -> None:
    folder = checkpoint.folder
    holds = (
        f"its folder holds {INDEX}, 4 .safetensors files ({checkpoint.shard_files[0]} … {checkpoint.shard_files[-1]}), "
        f"config.json: pass the folder {folder}"
    )
    assert_refused(folder, ["inspect", folder / "model.safetensors"], 2,
                   f"{folder / 'model.safetensors'}: no such file or folder; {holds}")
    assert_refused(folder, ["inspect", folder / "config.json"], 2,
                   f"{folder / 'config.json'}: the model's config, not a checkpoint; {holds}")
    assert_refused(folder, ["verify", folder / "model.safetensors"], 2, f"no such file or folder; {holds}")
    # A diffusers pipeline's root is a checkpoint of its own now (tests/test_diffusers_pipeline.py).


def test_a_flood_is_one_line_per_file_with_a_few_names(checkpoint: SyntheticCheckpoint, tmp_path: Path) -> None:
    """Every tensor differs from the manifest: one line per shard, a few names each,
    every tensor in --json; -q keeps the check's name; no name twice in a line."""
    manifest = tmp_path / "tensors.json"
    shardkit.checksum(checkpoint.folder, tensors=True, output=manifest)
    document = json.loads(manifest.read_text())
    for entry in document["tensors"].values():
        entry["sha256"] = "0" * 64
    manifest.write_text(json.dumps(document))
    result = run_cli("verify", checkpoint.folder, "--checksums", manifest, NO_ARCH)
    assert result.exit_code == 1
    lines = result.stdout.splitlines()
    per_shard = [len(read_header(checkpoint.folder / name).tensors) for name in checkpoint.shard_files]
    assert min(per_shard) > FLOOD
    assert len(lines) == len(per_shard) + 1, result.stdout
    for line in lines[:-1]:
        assert re.match(
            rf"✗ tensor-checksums: {re.escape(str(checkpoint.folder))}/model-0000\d-of-00004\.safetensors: "
            rf"\d+ tensors: data SHA-256 differs from {re.escape(str(manifest))}: "
            r"'[^']+', '[^']+', '[^']+', … \d+ more$",
            line,
        ), line
        names = re.findall(r"'([^']+)'", line)
        assert len(names) == len(set(names)) == 3
    assert lines[-1].startswith(f"verify: FAILED: {len(checkpoint.tensors)} problem(s)")
    report = json.loads(run_cli("verify", checkpoint.folder, "--checksums", manifest, NO_ARCH, "--json").stdout)
    assert sorted(p["tensor"] for p in report["problems"]) == sorted(t.name for t in checkpoint.tensors)
    quiet = run_cli("verify", checkpoint.folder, "--checksums", manifest, NO_ARCH, "-q")
    assert quiet.stdout == ""
    assert quiet.stderr.splitlines() == ["shardkit: " + line[2:] for line in lines[:-1]]

    merged = tmp_path / "merged.safetensors"
    shardkit.merge(checkpoint.folder, merged)
    result = run_cli("verify", merged, "--checksums", manifest, NO_ARCH)
    first, verdict = result.stdout.splitlines()
    count = len(checkpoint.tensors)
    assert count >= 50 and first.startswith(f"✗ tensor-checksums: {merged}: {count} tensors: data SHA-256 differs")
    assert first.endswith(f", … {count - 3} more") and verdict.startswith(f"verify: FAILED: {count} problem(s)")
