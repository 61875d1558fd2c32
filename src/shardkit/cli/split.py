"""`shardkit split` (and its alias `reshard`) on the command line."""

from __future__ import annotations

from typing import Annotated

import typer

from ..sizes import DEFAULT_MAX_SHARD_SIZE
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

OutputDirOpt = Annotated[
    str | None,
    typer.Option(
        "--output", "-o",
        help="The output folder: shards, index and the source's config/tokenizer files. "
        "May be a name template, as for merge: {name}, {slug}, {date}, {dtype}.",
        show_default=False,
    ),
]
MaxShardSizeOpt = Annotated[
    str,
    typer.Option(
        "--max-shard-size", "-s",
        help="Most tensor bytes per shard: 5GB = 5·10⁹, 4GiB = 4·2³⁰, or plain bytes. "
        "A bigger tensor gets a shard of its own.",
    ),
]
PrefixOpt = Annotated[
    str,
    typer.Option(
        "--prefix",
        help="Shard name prefix: PREFIX-00001-of-00004.safetensors (diffusers uses diffusion_pytorch_model).",
    ),
]


def split_command(
    source: SourceArg,
    output_arg: OutputArg = None,
    output: OutputDirOpt = None,
    max_shard_size: MaxShardSizeOpt = DEFAULT_MAX_SHARD_SIZE,
    prefix: PrefixOpt = "model",
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
    """Split a checkpoint into Hugging Face shards, or reshard it (4 shards into 8, or into 1).

    Tensors are packed in name order as huggingface_hub packs them; the folder gets
    model-0000i-of-0000n.safetensors plus model.safetensors.index.json (or a single
    model.safetensors when everything fits) and the source's config and tokenizer
    files. Byte ranges are copied at disk speed; the folder appears atomically, so no
    stale shard or index of a replaced output survives.

    SOURCE is a .safetensors file, a checkpoint folder or an index .json: local,
    s3://bucket/prefix/, http(s)://… or hf://org/name (@revision optional).

    Example: shardkit split qwen.safetensors -o qwen-sharded/ --max-shard-size 2GB
    """
    from ..commands.split import split

    output = chosen_output(output_arg, output, "split")

    out = Output(json=json_output, quiet=quiet, debug=debug)
    report = out.call(
        lambda bar: split(
            source, output, max_shard_size=max_shard_size, prefix=prefix, force=force, sha256=sha256,
            dry_run=dry_run, strict=strict, allow_unindexed=allow_unindexed, verify=verify,
            dtype=dtype, keep=keep or (), block_size=block_size, select=select or (), drop=drop or (),
            rename=rename_pairs(rename),
            recipe=recipe,
            endpoint_url=endpoint_url, progress=bar("splitting"),
            verify_progress=bar("verifying") if verify else None,
        )
    )
    out.result(report, print_written)
