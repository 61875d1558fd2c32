"""The Typer application: one command per module of this package, imported on demand.

Start-up is part of every measured run (`shardkit inspect` on a 7B checkpoint should
take well under 0.3 s), so only the command being run is imported and registered;
`shardkit --help` and unknown commands register them all.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

import typer

#: command name -> (module in this package, function, extra options of app.command)
COMMANDS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "merge": ("merge", "merge_command", {}),
    "split": ("split", "split_command", {}),
    "reshard": (
        "split",
        "split_command",
        {
            "help": "Alias of split, for a checkpoint that is already sharded: cut it into shards of another "
            "size.\n\nExample: shardkit reshard Qwen2.5-7B-Instruct/ -o qwen-2gb/ --max-shard-size 2GB"
        },
    ),
    "convert": ("convert", "convert_command", {}),
    "inspect": ("inspect", "inspect_command", {}),
    "diff": ("diff", "diff_command", {}),
    "verify": ("verify", "verify_command", {}),
    "checksum": ("checksum", "checksum_command", {}),
    "clean": ("clean", "clean_command", {}),
}

app = typer.Typer(
    name="shardkit",
    help="Merge, split, verify, inspect and diff safetensors checkpoints at disk speed, without torch.",
    no_args_is_help=True,
    # click suggests a close command name itself; typer's own suggestion would repeat it.
    suggest_commands=False,
    pretty_exceptions_enable=False,
    # Help is printed as written: rich markup would eat `[numeric]` from
    # `pip install 'shardkit[numeric]'` and `[@revision]` from `hf://org/name[@revision]`.
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback(invoke_without_command=True)
def _root(
    ctx: typer.Context,
    version: bool = typer.Option(False, "--version", "-V", help="Print the version and exit.", is_eager=True),
) -> None:
    """Merge, split, verify, inspect and diff safetensors checkpoints at disk speed, without torch."""
    if version:
        from ..version import __version__

        print(f"shardkit {__version__}")
        raise typer.Exit()
    if ctx.invoked_subcommand is None:
        print(ctx.get_help())
        raise typer.Exit()


def register(names: list[str]) -> None:
    for name in names:
        module, function, options = COMMANDS[name]
        command = getattr(importlib.import_module(f"{__package__}.{module}"), function)
        app.command(name, **options)(command)


def invoked_command(argv: list[str]) -> str | None:
    """The command named on the command line, if it is the first argument that is not an option."""
    words = [a for a in argv if not a.startswith("-")]
    return words[0] if words and words[0] in COMMANDS else None


def main() -> None:
    # numpy's OpenBLAS starts a thread per core that spins after the import (0.12 s of
    # CPU measured here); no command does linear algebra, and a conversion wants those
    # cores. A user's own setting wins.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    name = invoked_command(sys.argv[1:])
    register([name] if name else list(COMMANDS))
    app()
