"""`shardkit clean` on the command line."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .common import DebugOpt, DryRunOpt, JsonOpt, QuietOpt
from .output import Output
from .render import print_clean_report

FolderArg = Annotated[
    Path, typer.Argument(help="The folder an interrupted merge or split was writing into.", show_default=False)
]


def clean_command(
    folder: FolderArg,
    dry_run: DryRunOpt = False,
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Remove the temporary files a killed merge or split left in FOLDER.

    Outputs are staged as .shardkit-tmp-<name>.<pid>.<random> and renamed into place
    when complete, so a killed run leaves only such entries, never a partial output.
    The next run on the same output removes them too; this command cleans a whole
    folder. Temporaries of a run that is still going are kept.

    Example: shardkit clean ./models/
    """
    from ..commands.clean import clean

    out = Output(json=json_output, quiet=quiet, debug=debug)
    report = out.run(lambda: clean(folder, dry_run=dry_run))
    out.result(report, print_clean_report)
