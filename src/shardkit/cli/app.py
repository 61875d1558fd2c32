"""The Typer application: registers one command per module of this package."""

from __future__ import annotations

import typer

from .checksum import checksum_command
from .clean import clean_command
from .diff import diff_command
from .inspect import inspect_command
from .merge import merge_command
from .split import split_command
from .verify import verify_command

app = typer.Typer(
    name="shardkit",
    help="Merge, split, verify, inspect and diff safetensors checkpoints at disk speed, without torch.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback(invoke_without_command=True)
def _root(
    ctx: typer.Context,
    version: bool = typer.Option(False, "--version", help="Print the version and exit.", is_eager=True),
) -> None:
    """Merge, split, verify, inspect and diff safetensors checkpoints at disk speed, without torch."""
    if version:
        from .. import __version__

        print(f"shardkit {__version__}")
        raise typer.Exit()
    if ctx.invoked_subcommand is None:
        print(ctx.get_help())
        raise typer.Exit()


app.command("merge")(merge_command)
app.command("split")(split_command)
app.command(
    "reshard",
    help="Alias of split, for a checkpoint that is already sharded: cut it into shards of another size.\n\n"
    "Example: shardkit reshard Qwen2.5-7B-Instruct/ -o qwen-2gb/ --max-shard-size 2GB",
)(split_command)
app.command("inspect")(inspect_command)
app.command("diff")(diff_command)
app.command("verify")(verify_command)
app.command("checksum")(checksum_command)
app.command("clean")(clean_command)


def main() -> None:
    app()
