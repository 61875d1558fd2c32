"""`shardkit verify` on the command line."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from ..errors import EXIT_FAILURE, EXIT_OK
from .common import (
    AllowUnindexedOpt,
    BlockSizeOpt,
    DebugOpt,
    EndpointOpt,
    JsonOpt,
    KeepOpt,
    QuietOpt,
    SourceArg,
    StrictOpt,
)
from .output import Output
from .render import folded_problems, print_verify_report

ChecksumsOpt = Annotated[
    Path | None,
    typer.Option(
        "--checksums", "-c",
        help="A manifest from `shardkit checksum` (sha256sum text, or --tensors JSON) to check the bytes against; "
        "file names are relative to PATH's folder.",
        show_default=False,
    ),
]
AgainstOpt = Annotated[
    str | None,
    typer.Option(
        "--against",
        help="Another checkpoint that must hold the same tensors, byte for byte, whatever its sharding.",
        show_default=False,
    ),
]
ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config",
        help="A config.json to check tensor names, shapes and dtypes against (needs shardkit[hf]). "
        "Default: PATH's own config.json when transformers is installed.",
        show_default=False,
    ),
]
VerifyDtypeOpt = Annotated[
    str | None,
    typer.Option(
        "--dtype",
        help="With --against: PATH is SOURCE converted with --dtype (bf16, fp16, fp32, or fp8: quantised); each "
        "converted, dequantised or quantised tensor must equal what the conversion makes of the source's, "
        "recomputed while reading. Pass the same --keep globs (and --block-size).",
        show_default=False,
    ),
]
NoArchitectureOpt = Annotated[
    bool, typer.Option("--no-architecture", help="Skip the architecture check even if a config.json is found.")
]


def verify_command(
    path: SourceArg,
    checksums: ChecksumsOpt = None,
    against: AgainstOpt = None,
    config: ConfigOpt = None,
    no_architecture: NoArchitectureOpt = False,
    strict: StrictOpt = False,
    dtype: VerifyDtypeOpt = None,
    keep: KeepOpt = None,
    block_size: BlockSizeOpt = None,
    allow_unindexed: AllowUnindexedOpt = False,
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
    endpoint_url: EndpointOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Prove a checkpoint is complete and intact; exit 0 if so, 1 if not, 2 if PATH is unusable.

    Always checks every weight file against every format rule and every index
    cross-check (headers only: milliseconds). The bytes are checked against whatever
    reference there is, reading each file once in constant memory: a --checksums
    manifest, the blob names of a Hugging Face cache snapshot (automatic), or
    --against another checkpoint. With a config.json, tensor names, shapes and dtypes
    are checked against the model's architecture. Every problem is listed with its
    file and tensor.

    PATH is a .safetensors file, a checkpoint folder or an index .json: local,
    s3://bucket/prefix/, http(s)://… or hf://org/name (@revision optional).

    Example: shardkit verify model/ --checksums SHA256SUMS
    """
    from ..commands.verify import verify

    # Exit 1 means "a problem was found", so a failure to verify at all must not look like it (verdict).
    out = Output(json=json_output, quiet=quiet, debug=debug, verdict=True)
    report = out.call(
        lambda bar: verify(
            path, checksums=checksums, against=against, config=config,
            architecture=False if no_architecture else None, strict=strict, allow_unindexed=allow_unindexed,
            dtype=dtype, keep=keep or (), block_size=block_size, endpoint_url=endpoint_url,
            progress=bar("verifying"),
        )
    )
    out.result(report, _print_verify, quiet=_print_problems, exit_code=EXIT_OK if report.ok else EXIT_FAILURE)


def _print_verify(report: object) -> None:
    from .render_pipeline import is_pipeline_report, print_pipeline_report

    if is_pipeline_report(report):
        print_pipeline_report(report)
    else:
        print_verify_report(report)  # type: ignore[arg-type]


def _print_problems(report: object) -> None:
    """--quiet still says what is wrong: one line per problem on stderr."""
    from .render_pipeline import is_pipeline_report, problem_lines

    lines = problem_lines(report) if is_pipeline_report(report) else folded_problems(report)  # type: ignore[arg-type]
    for line in lines:
        print(f"shardkit: {line}", file=sys.stderr)
