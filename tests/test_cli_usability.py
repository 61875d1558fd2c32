"""What a new user types first: `merge SRC OUT`, a typo, `-V`, completion, a filter word,
and the Python API's truthiness, exception types and help text."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import shardkit
from conftest import assert_clean_failure, run_cli, snapshot, temporaries
from shardkit.synthetic import write_checkpoint


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return write_checkpoint(tmp_path / "qwen-tiny").folder


def test_output_as_second_argument_is_the_same_as_dash_o(model: Path, tmp_path: Path) -> None:
    by_argument = run_cli("merge", model, tmp_path / "a.safetensors", "-q")
    by_option = run_cli("merge", model, "-o", tmp_path / "b.safetensors", "-q")
    assert by_argument.exit_code == by_option.exit_code == 0, (by_argument.stderr, by_option.stderr)
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    split = run_cli("split", model, tmp_path / "sharded", "-s", "1000000", "-q")
    assert split.exit_code == 0, split.stderr
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()


@pytest.mark.parametrize("command", ["merge", "split"])
def test_no_output_or_two_outputs_is_one_line(model: Path, tmp_path: Path, command: str) -> None:
    before = snapshot(model)
    missing = run_cli(command, model)
    assert_clean_failure(missing, 2, f"no output given: shardkit {command} SOURCE -o OUTPUT")
    both = run_cli(command, model, tmp_path / "a.safetensors", "-o", tmp_path / "b.safetensors")
    assert_clean_failure(both, 2, "two outputs given")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["qwen-tiny"]
    assert not temporaries(tmp_path)
    assert snapshot(model) == before


def test_a_mistyped_command_is_suggested_once() -> None:
    result = run_cli("mrge", "x")
    assert result.exit_code == 2
    assert result.stderr.count("Did you mean 'merge'?") == 1, result.stderr


@pytest.mark.parametrize("flag", ["-V", "--version"])
def test_version(flag: str) -> None:
    result = run_cli(flag)
    assert (result.exit_code, result.stdout) == (0, f"shardkit {shardkit.__version__}\n")


def test_shell_completion_completes_commands_and_options() -> None:
    help_text = run_cli("--help").stdout
    assert "--install-completion" in help_text
    complete = [sys.executable, "-c", "import sys; sys.argv = ['shardkit']; from shardkit.cli import main; main()"]

    def completions(words: str) -> list[str]:
        env = {**os.environ, "_SHARDKIT_COMPLETE": "complete_bash", "COMP_WORDS": words,
               "COMP_CWORD": str(len(words.split()) - 1)}
        done = subprocess.run(complete, capture_output=True, text=True, env=env, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout.split()

    assert completions("shardkit me") == ["merge"]
    assert "--sha256" in completions("shardkit merge --sh")


def test_a_filter_word_that_matches_nothing_says_it_is_a_glob(model: Path) -> None:
    result = run_cli("inspect", model, "-k", "layers.0")
    assert result.exit_code == 0
    assert "it is a glob matched against whole tensor names" in result.stderr
    assert "'*layers.0*'" in result.stderr
    assert "glob" not in run_cli("inspect", model, "-k", "*layers.0.*").stderr


def test_reports_are_true_exactly_when_their_verdict_is(model: Path, tmp_path: Path) -> None:
    assert shardkit.verify(model)
    assert shardkit.diff(model, model)
    other = write_checkpoint(tmp_path / "other", seed=1).folder
    assert not shardkit.diff(model, other)
    (tmp_path / "SUMS").write_text("0" * 64 + "  model-00001-of-00004.safetensors\n")
    assert not shardkit.verify(model, checksums=tmp_path / "SUMS")


def test_api_errors_name_the_keyword_and_are_os_errors_too(model: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.safetensors"
    shardkit.merge(model, out)
    with pytest.raises(FileExistsError, match=r"pass force=True to replace it"):
        shardkit.merge(model, out)
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        shardkit.inspect(tmp_path / "missing")
    with pytest.raises(shardkit.ShardkitError):
        shardkit.verify(tmp_path / "missing")
    cli = run_cli("merge", model, "-o", out)
    assert_clean_failure(cli, 2, "already exists; pass --force to replace it")


def test_help_shows_the_real_docstrings() -> None:
    """`help(shardkit.verify)` teaches: every parameter is explained, and an example given."""
    import inspect

    assert "Example" in shardkit.verify.__doc__
    for name in ("merge", "split", "inspect", "diff", "verify", "checksum", "clean"):
        function = getattr(shardkit, name)
        doc = function.__doc__ or ""
        assert "see the module docstring" not in doc, name
        undocumented = [p for p in inspect.signature(function).parameters if not re.search(rf"`{p}[`(=]", doc)]
        assert not undocumented, (name, undocumented)


def test_every_option_of_every_command_is_in_the_readme() -> None:
    """The README's option tables are the manual: a new flag must be documented there."""
    import importlib

    import click
    import typer

    app = importlib.import_module("shardkit.cli.app")
    app.register(list(app.COMMANDS))
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    missing = {
        f"{name} {option.opts[-1]}"
        for name, command in typer.main.get_command(app.app).commands.items()  # type: ignore[attr-defined]
        for option in command.params
        if isinstance(option, click.Option) and not option.hidden and "--help" not in option.opts
        if not any(f"`{flag}" in readme for flag in option.opts + option.secondary_opts if flag.startswith("--"))
    }
    assert not missing, sorted(missing)
