"""`shardkit convert` on the command line."""

from __future__ import annotations

from typing import Annotated

import typer

from .common import (
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
    VerifyOpt,
    chosen_output,
    rename_pairs,
)
from .output import Output
from .render import print_write_report

OutputOpt = Annotated[
    str | None,
    typer.Option(
        "--output", "-o",
        help="A folder laid out as the Hub converter lays it out (one .safetensors per .bin, an index for "
        "several, config and tokenizer copied), or a path ending in .safetensors for one file.",
        show_default=False,
    ),
]


def convert_command(
    source: SourceArg,
    output_arg: OutputArg = None,
    output: OutputOpt = None,
    force: ForceOpt = False,
    sha256: Sha256Opt = False,
    dry_run: DryRunOpt = False,
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
    verify: VerifyOpt = False,
    dtype: DtypeOpt = None,
    keep: KeepOpt = None,
    select: SelectOpt = None,
    drop: DropOpt = None,
    rename: RenameOpt = None,
    recipe: RecipeOpt = None,
    endpoint_url: EndpointOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Convert a PyTorch .bin/.pt/.pth checkpoint to safetensors, without torch and without unpickling.

    The pickle inside the torch zip is read as data by an interpreter that executes
    nothing: any function a state dict does not need is refused before a byte is
    written. Tensors are byte ranges of the file, copied at disk speed in constant
    memory; tied duplicates are written once (as the Hub's converter does) and views
    are made contiguous.

    SOURCE is a .bin/.pt/.pth file, a folder with pytorch_model.bin or
    pytorch_model.bin.index.json, or that index: local, s3://…, http(s)://… or hf://org/name.

    Example: shardkit convert gpt2/ -o gpt2-safetensors/
    """
    from ..commands.convert import convert

    output = chosen_output(output_arg, output, "convert")

    out = Output(json=json_output, quiet=quiet, debug=debug)
    report = out.call(
        lambda bar: convert(
            source, output, force=force, sha256=sha256, dry_run=dry_run, verify=verify, dtype=dtype,
            keep=keep or (), select=select or (), drop=drop or (), rename=rename_pairs(rename), recipe=recipe,
            endpoint_url=endpoint_url, progress=bar("converting"),
        )
    )
    out.result(report, print_write_report)
