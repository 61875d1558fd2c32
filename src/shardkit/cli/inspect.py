"""`shardkit inspect` on the command line."""

from __future__ import annotations

from typing import Annotated

import typer

from .common import DebugOpt, EndpointOpt, JsonOpt, SourceArg, StrictOpt
from .output import Output
from .render import print_inspect_report

TensorsOpt = Annotated[
    bool,
    typer.Option("--tensors", "-t", help="One row per tensor: dtype, shape, parameters, bytes, shard, offset."),
]
FilterOpt = Annotated[
    str | None,
    typer.Option(
        "--filter", "-k",
        help="Only tensors whose name matches this glob, e.g. 'model.layers.0.*' or '*.mlp.*'.",
        show_default=False,
    ),
]


def inspect_command(
    path: SourceArg,
    tensors: TensorsOpt = False,
    filter_glob: FilterOpt = None,
    json_output: JsonOpt = False,
    strict: StrictOpt = False,
    endpoint_url: EndpointOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Show what a checkpoint holds, reading headers only: instant even for 70B.

    Prints files, tensor and parameter counts (in total and by dtype), bytes,
    metadata, whether the index agrees with the shards, and a compact layer view
    that folds model.layers.N so 28 layers read as one row per layer tensor.
    --tensors lists every tensor with its shard and byte offset instead.

    PATH is a .safetensors file, a checkpoint folder or an index .json: local,
    s3://bucket/prefix/, http(s)://… or hf://org/name (@revision optional).

    Example: shardkit inspect Qwen2.5-7B-Instruct/ --tensors --filter 'model.layers.0.*'
    """
    from ..commands.inspect import inspect

    out = Output(json=json_output, debug=debug)
    report = out.run(
        lambda: inspect(path, tensors=tensors, filter=filter_glob, strict=strict, endpoint_url=endpoint_url)
    )
    out.result(report, _print_inspect)


def _print_inspect(report: object) -> None:
    from .render_pipeline import is_pipeline_report, print_pipeline_report

    if is_pipeline_report(report):
        print_pipeline_report(report)
    else:
        print_inspect_report(report)  # type: ignore[arg-type]
