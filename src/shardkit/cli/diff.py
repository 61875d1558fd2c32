"""`shardkit diff` on the command line."""

from __future__ import annotations

from typing import Annotated

import typer

from ..errors import EXIT_FAILURE, EXIT_OK
from .common import (
    AllowUnindexedOpt,
    DebugOpt,
    EndpointOpt,
    JsonOpt,
    QuietOpt,
    RenameOpt,
    StrictOpt,
    rename_pairs,
)
from .output import Output
from .render import print_diff_report

SideArg = Annotated[
    str, typer.Argument(help="A .safetensors file, a checkpoint folder, or an index .json; local or remote.")
]
NoDataOpt = Annotated[
    bool, typer.Option("--no-data", help="Compare headers only (names, dtypes, shapes, metadata); read no tensor.")
]
MaxAbsDiffOpt = Annotated[
    bool,
    typer.Option(
        "--max-abs-diff",
        help="For float tensors that differ, also print the largest absolute difference "
        "(needs pip install 'shardkit[numeric]').",
    ),
]


def diff_command(
    a: SideArg,
    b: SideArg,
    no_data: NoDataOpt = False,
    max_abs_diff: MaxAbsDiffOpt = False,
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
    strict: StrictOpt = False,
    allow_unindexed: AllowUnindexedOpt = False,
    rename: RenameOpt = None,
    endpoint_url: EndpointOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Compare two checkpoints tensor by tensor, whatever their sharding.

    Lists tensors only in A or only in B, dtype and shape changes, metadata changes,
    and which tensors hold different bytes (streamed in constant memory). Exit code
    0 when identical, 1 when they differ, 2 when an input is unusable, as diff and
    cmp do.

    A and B are each a .safetensors file, a checkpoint folder or an index .json:
    local, s3://bucket/prefix/, http(s)://… or hf://org/name (@revision optional).

    Example: shardkit diff Qwen2.5-7B-Instruct/ qwen-merged/model.safetensors
    """
    from ..commands.diff import diff

    # Exit 1 means "they differ" here, so a failure to compare must not look like it (verdict).
    out = Output(json=json_output, quiet=quiet, debug=debug, verdict=True)
    report = out.call(
        lambda bar: diff(
            a, b, data=not no_data, max_abs_diff=max_abs_diff, strict=strict,
            allow_unindexed=allow_unindexed, rename=rename_pairs(rename), endpoint_url=endpoint_url,
            progress=bar("comparing"),
        ),
        progress=not no_data,
    )
    out.result(report, _print_diff, exit_code=EXIT_OK if report.identical else EXIT_FAILURE)


def _print_diff(report: object) -> None:
    from .render_pipeline import is_pipeline_report, print_pipeline_report

    if is_pipeline_report(report):
        print_pipeline_report(report)
    else:
        print_diff_report(report)  # type: ignore[arg-type]
