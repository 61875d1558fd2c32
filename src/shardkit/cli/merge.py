"""`shardkit merge` on the command line."""

from __future__ import annotations

from typing import Annotated

import typer

from .common import (
    AllowUnindexedOpt,
    BlockSizeOpt,
    DebugOpt,
    DropOpt,
    DryRunOpt,
    DtypeOpt,
    EndpointOpt,
    ForceOpt,
    JsonOpt,
    KeepOpt,
    OutputArg,
    QuietOpt,
    RecipeOpt,
    RenameOpt,
    SelectOpt,
    Sha256Opt,
    SourceArg,
    StrictOpt,
    VerifyOpt,
    chosen_output,
    rename_pairs,
)
from .output import Output
from .render_pipeline import print_written

OutputOpt = Annotated[
    str | None,
    typer.Option(
        "--output", "-o",
        help="A path ending in .safetensors for one file; anything else is a model folder. "
        "May be a name template: {name}, {slug}, {date} (UTC YYYYMMDD), {dtype}, e.g. '{slug}_v{date}.safetensors'. "
        "May be s3://bucket/key: written as a multipart upload, server-side from an S3 source in the same store.",
        show_default=False,
    ),
]


def merge_command(
    source: SourceArg,
    output_arg: OutputArg = None,
    output: OutputOpt = None,
    force: ForceOpt = False,
    sha256: Sha256Opt = False,
    dry_run: DryRunOpt = False,
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
    strict: StrictOpt = False,
    allow_unindexed: AllowUnindexedOpt = False,
    verify: VerifyOpt = False,
    dtype: DtypeOpt = None,
    keep: KeepOpt = None,
    block_size: BlockSizeOpt = None,
    select: SelectOpt = None,
    drop: DropOpt = None,
    rename: RenameOpt = None,
    recipe: RecipeOpt = None,
    endpoint_url: EndpointOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Merge a sharded checkpoint into one .safetensors file or a ready-to-load folder.

    Reads headers only, checks every shard against the index, then copies byte ranges
    at disk speed in constant memory. The output appears atomically; the sources are
    never modified.

    SOURCE is a .safetensors file, a checkpoint folder or an index .json: local,
    s3://bucket/prefix/, http(s)://… or hf://org/name (@revision optional). A
    diffusers pipeline folder (model_index.json) is merged component by component.

    Example: shardkit merge Qwen2.5-7B-Instruct/ -o '{slug}_v{date}.safetensors'"""
    from ..commands.merge import merge

    output = chosen_output(output_arg, output, "merge")

    out = Output(json=json_output, quiet=quiet, debug=debug)
    report = out.call(
        lambda bar: merge(
            source, output, force=force, sha256=sha256, dry_run=dry_run, strict=strict,
            allow_unindexed=allow_unindexed, verify=verify, dtype=dtype, keep=keep or (), block_size=block_size,
            select=select or (), drop=drop or (), rename=rename_pairs(rename), recipe=recipe,
            endpoint_url=endpoint_url, progress=bar("merging"), verify_progress=bar("verifying") if verify else None,
        )
    )
    out.result(report, print_written)
