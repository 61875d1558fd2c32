"""`shardkit checksum` on the command line."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from .common import (
    AllowUnindexedOpt,
    DebugOpt,
    EndpointOpt,
    ForceOpt,
    JsonOpt,
    QuietOpt,
    SourceArg,
    StrictOpt,
)
from .output import Output
from .render import print_checksum_report

if TYPE_CHECKING:
    from ..commands.checksum import ChecksumReport

ManifestOutputOpt = Annotated[
    Path | None,
    typer.Option(
        "--output", "-o",
        help="Write the manifest to this file (atomically) instead of stdout.",
        show_default=False,
    ),
]
TensorsOpt = Annotated[
    bool,
    typer.Option(
        "--tensors",
        help="A JSON manifest of every tensor's dtype, shape and data SHA-256: it stays valid across merge and split.",
    ),
]


def checksum_command(
    path: SourceArg,
    output: ManifestOutputOpt = None,
    tensors: TensorsOpt = False,
    force: ForceOpt = False,
    strict: StrictOpt = False,
    allow_unindexed: AllowUnindexedOpt = False,
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
    endpoint_url: EndpointOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Print a SHA-256 manifest of a checkpoint, for `shardkit verify --checksums`.

    The default output is exactly what sha256sum prints over every file a loader reads
    (weights, index, config, tokenizer and chat-template files: everything merge would
    copy), with names relative to the checkpoint folder, so
    `cd model && sha256sum -c SHA256SUMS` checks it too. With
    --tensors, a JSON manifest hashes each tensor's bytes instead of files, so it still
    holds after the checkpoint is merged or split. The checkpoint is validated first;
    files are read once, in constant memory, at sha256sum speed.

    PATH is a .safetensors file, a checkpoint folder or an index .json: local,
    s3://bucket/prefix/, http(s)://… or hf://org/name (@revision optional).

    Example: shardkit checksum model/ -o model/SHA256SUMS
    """
    from ..commands.checksum import checksum

    out = Output(json=json_output, quiet=quiet, debug=debug)
    report = out.call(
        lambda bar: checksum(
            path, tensors=tensors, output=output, force=force, strict=strict, allow_unindexed=allow_unindexed,
            endpoint_url=endpoint_url, progress=bar("hashing"),
        ),
        progress=output is not None,  # a manifest on stdout is the output: no bar beside it
    )
    if output is None:  # the manifest is the answer, quiet or not
        out.result(report, _print_manifest, quiet=_print_manifest)
    else:
        out.result(report, print_checksum_report)


def _print_manifest(report: ChecksumReport) -> None:
    sys.stdout.write(report.manifest())
