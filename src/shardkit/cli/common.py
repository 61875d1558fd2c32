"""What every command shares: option types, error handling, progress, output."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated, NoReturn, TypeVar

import typer

from ..errors import EXIT_BAD_INPUT, EXIT_FAILURE, EXIT_INTERRUPTED, ShardkitError, use_cli_spelling

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
ForceOpt = Annotated[bool, typer.Option("--force", "-f", help="Replace an existing output.")]
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
        "--verify", help="After writing, compare every tensor with the source; remove the output if any differs."
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
        "reported per tensor. Keep norms or buffers in their dtype with --keep.",
        show_default=False,
    ),
]
KeepOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--keep",
        help="With --dtype: leave tensors whose name matches this glob in their source dtype "
        "(repeatable), e.g. --keep '*norm*' --keep '*inv_freq'; for DeepSeek-style FP8 models "
        "--keep '*e_score_correction_bias' keeps the router bias in F32, as transformers loads it.",
        show_default=False,
    ),
]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show the traceback of an unexpected error.", hidden=True)]


def _interrupt_on_sigterm() -> None:
    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def run(action: Callable[[], T], *, debug: bool = False) -> T:
    """Run an API call; turn every failure into one line on stderr and an exit code."""
    use_cli_spelling()
    _interrupt_on_sigterm()
    try:
        return action()
    except ShardkitError as exc:
        _fail(str(exc), exc.exit_code, debug)
    except KeyboardInterrupt:
        _fail("interrupted; temporary files removed", EXIT_INTERRUPTED, debug)
    except FileNotFoundError as exc:
        _fail(f"{exc.filename}: {exc.strerror}", EXIT_BAD_INPUT, debug)
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        _fail(f"{where}{exc.strerror or exc}", EXIT_FAILURE, debug)
    raise AssertionError("unreachable")


def _fail(message: str, code: int, debug: bool) -> NoReturn:
    if debug:
        import traceback

        traceback.print_exc()
    print(f"shardkit: error: {message}", file=sys.stderr)
    raise typer.Exit(code)


def chosen_output(positional: str | None, option: str | None, command: str) -> str:
    """The output given either as the second argument or with -o; a one-line error otherwise."""
    if positional is not None and option is not None and positional != option:
        _fail(f"two outputs given ({positional!r} and -o {option!r}); give one", EXIT_BAD_INPUT, False)
    output = positional if positional is not None else option
    if output is None:
        _fail(f"no output given: shardkit {command} SOURCE -o OUTPUT (or SOURCE OUTPUT)", EXIT_BAD_INPUT, False)
    return output


def stderr_is_tty() -> bool:
    return sys.stderr.isatty() and os.environ.get("TERM") != "dumb"


@contextmanager
def byte_progress(description: str, enabled: bool) -> Iterator[Callable[[int, int], None] | None]:
    """A rich progress bar (bytes, speed, ETA) on stderr when it is a terminal.

    Yields an API progress callback `(advance, total)`; the bar appears on the first call.
    """
    if not enabled or not stderr_is_tty():
        yield None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as bar:
        tasks: list[object] = []

        def advance(step: int, total: int) -> None:
            if not tasks:
                tasks.append(bar.add_task(description, total=total))
            bar.advance(tasks[0], step)  # type: ignore[arg-type]

        yield advance


def warn(messages: list[str], quiet: bool) -> None:
    if quiet:
        return
    for message in messages:
        print(f"shardkit: warning: {message}", file=sys.stderr)
