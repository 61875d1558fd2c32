"""What every command shares: option types and the output argument (results and errors go
through :class:`shardkit.cli.output.Output`)."""

from __future__ import annotations

from typing import Annotated, TypeVar, cast

import click
import typer

from ..errors import EXIT_BAD_INPUT
from .output import fail

T = TypeVar("T")

# A str, not a Path: Path would fold s3://bucket into s3:/bucket.
SourceArg = Annotated[
    str,
    typer.Argument(
        help="A .safetensors file, a checkpoint folder or an index .json; local, s3://bucket/prefix/, "
        "http(s)://… or hf://org/name[@revision].",
        show_default=False,
    ),
]
# `shardkit merge SRC OUT`, as with `cp`: the same as `-o OUT`.
OutputArg = Annotated[
    str | None,
    typer.Argument(help="The output, as with cp; the same as -o OUTPUT.", show_default=False),
]
EndpointOpt = Annotated[
    str | None,
    typer.Option(
        "--endpoint-url",
        help="S3-compatible endpoint for s3:// paths (MinIO, Ceph, R2, ...). Default: $AWS_ENDPOINT_URL, else AWS. "
        "Credentials come from the usual AWS chain (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, ~/.aws).",
        show_default=False,
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print a machine-readable JSON report on stdout.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors.")]
ForceOpt = Annotated[
    bool,
    typer.Option(
        "--force", "-f",
        help="Replace an existing output: a file, or a folder holding only an earlier output (weight, index, "
        "config, tokenizer and checksum files). Never a source or its folder; a folder holding anything else "
        "(subfolders, other files) is refused, naming them.",
    ),
]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="Print the plan and write nothing.")]
Sha256Opt = Annotated[
    bool, typer.Option("--sha256", help="Hash the output in the same pass; write a sha256sum -c file.")
]
StrictOpt = Annotated[
    bool,
    typer.Option(
        "--strict",
        help="Also reject what the format forbids but the reference reader tolerates "
        "(leading whitespace, repeated keys, unknown fields).",
    ),
]
AllowUnindexedOpt = Annotated[
    bool,
    typer.Option("--allow-unindexed", help="Ignore .safetensors files in the folder that no index covers."),
]
VerifyOpt = Annotated[
    bool,
    typer.Option(
        "--verify",
        help="Before the output replaces anything, compare every tensor with the source; discard it if any "
        "differs (an earlier output stays as it was).",
    ),
]
DtypeOpt = Annotated[
    str | None,
    typer.Option(
        "--dtype",
        help="Convert every floating-point tensor (F64, F32, F16, BF16) to bf16, fp16 or fp32 "
        "(or bfloat16, float16, float32) while writing, bit-identical to torch .to(). Integer, bool and "
        "FP8/FP6/FP4 tensors are copied unchanged, except in an FP8 checkpoint (weight_scale_inv "
        "tensors, quantization_config in config.json): its FP8 weights are dequantised, as transformers does, "
        "and the scales dropped. Values that overflow to ±inf or underflow to zero are "
        "reported per tensor. Keep norms or buffers in their dtype with --keep. "
        "fp8 quantises instead, as transformers' FP8 quantiser does: Linear weights that divide into "
        "blocks (not embeddings, lm_head or routers) to F8_E4M3, each with a F32 weight_scale_inv, and "
        "quantization_config written to config.json.",
        show_default=False,
    ),
]
BlockSizeOpt = Annotated[
    str | None,
    typer.Option(
        "--block-size",
        help="With --dtype fp8: the quantisation block, ROWSxCOLUMNS (default 128x128, transformers' "
        "weight_block_size); a weight whose shape does not divide into it stays as it is.",
        show_default=False,
    ),
]
KeepOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--keep",
        help="With --dtype: leave tensors whose name matches this glob in their source dtype "
        "(repeatable), e.g. --keep '*norm*' --keep '*inv_freq'; for DeepSeek-style FP8 models "
        "--keep '*e_score_correction_bias' keeps the router bias in F32, as transformers loads it. "
        "With --dtype fp8: weights left unquantised (listed in modules_to_not_convert).",
        show_default=False,
    ),
]
SelectOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--select",
        help="Write only the tensors whose name matches this glob (repeatable: any of them), e.g. "
        "--select 'model.visual.*'. Applied first, then --drop, then --rename.",
        show_default=False,
    ),
]
DropOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--drop",
        help="Leave out the tensors whose name matches this glob (repeatable), e.g. --drop lm_head.weight.",
        show_default=False,
    ),
]
RenameOpt = Annotated[
    list[str] | None,  # each a (FROM, TO) pair: typer takes no list of tuples, click does
    typer.Option(
        "--rename",
        click_type=click.Tuple([str, str]),
        metavar="FROM TO",
        help="FROM TO: rename every tensor whose whole name matches the regular expression FROM to TO "
        "(Python re replacement, \\1 for groups); repeatable, applied in order, e.g. "
        "--rename '^model\\.(.*)' '\\1'. Two tensors renamed to one name are refused.",
        show_default=False,
    ),
]
RecipeOpt = Annotated[
    str | None,
    typer.Option(
        "--recipe",
        help="Re-cut tensors by a recipe: a .json/.toml file (renames, dim-0 fuse, split and half swap; see "
        "the README) or a built-in: flux-bfl-to-diffusers, flux-diffusers-to-bfl. Applied after "
        "--select/--drop/--rename; every source tensor must be used once or dropped.",
        show_default=False,
    ),
]


def rename_pairs(values: list[str] | None) -> list[tuple[str, str]]:
    """--rename's values as the (FROM, TO) pairs click parsed them into (typer's
    annotation cannot say list of pairs)."""
    return cast("list[tuple[str, str]]", values or [])


DebugOpt = Annotated[bool, typer.Option("--debug", help="Show the traceback of an unexpected error.", hidden=True)]


def chosen_output(positional: str | None, option: str | None, command: str) -> str:
    """The output given either as the second argument or with -o; a one-line error otherwise."""
    if positional is not None and option is not None and positional != option:
        fail(f"two outputs given ({positional!r} and -o {option!r}); give one", EXIT_BAD_INPUT)
    output = positional if positional is not None else option
    if output is None:
        fail(f"no output given: shardkit {command} SOURCE -o OUTPUT (or SOURCE OUTPUT)", EXIT_BAD_INPUT)
    return output
