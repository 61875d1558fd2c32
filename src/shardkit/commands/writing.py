"""What merge, split and reshard share: run a plan to a destination and report it."""

from __future__ import annotations

import dataclasses
import functools
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

from .. import storage
from ..checkpoint.manifest import companions
from ..checkpoint.shards import Checkpoint, open_checkpoint, open_file
from ..checks.compare import compare_checkpoints
from ..engine.destination import Sources, check_name_fits, refuse_existing
from ..engine.execute import execute, write_checksum_beside
from ..engine.options import ProgressCallback, WriteOptions
from ..errors import BadInputError, VerificationError, option, option_name
from ..format.dtype_cast import CastStats
from ..format.gc_pause import gc_paused
from ..plan.conversion import DtypeChoice, choose_dtypes, read_config
from ..plan.files import FileCopy, Plan
from ..plan.fill import CastLog
from ..plan.recipe import Recipe, apply_recipe
from ..plan.selection import Selected, Selection, apply_selection
from ..reports import DtypeReport, OutputFile, TensorLoss, Transfer, WriteReport
from ..storage import Location


def run_plan(
    report_type: type[WriteReport],
    command: str,
    checkpoint: Checkpoint,
    source: Location,
    plan: Plan,
    output: Location,
    options: WriteOptions,
    *,
    as_folder: bool,
    dtypes: DtypeChoice | None = None,
    renamed: Sequence[tuple[str, str]] = (),
) -> WriteReport:
    """Execute `plan` (unless `options.dry_run`) and report; with `options.verify`,
    compare the staged output (a temporary file or folder, or in S3 objects under a
    staging prefix) with the source tensor by tensor before it is committed, and
    discard it if they differ (an earlier output at `output` stays as it was).
    `dtypes` is the conversion the plan was made with: its losses are reported, and
    `verify` recomputes it. `renamed` is (old, new) per tensor a selection renamed (the
    checkpoint already holds the new names), shown in the report."""
    force, sha256, dry_run, verify = options.force, options.sha256, options.dry_run, options.verify
    progress, verify_progress = options.progress, options.verify_progress
    started = time.perf_counter()
    timings: dict[str, float] = {}
    traffic_before = storage.traffic()
    checksum_file: Location | None = None
    if sha256 and not as_folder:
        checksum_file = output.with_name(output.name + ".sha256")
        if isinstance(checksum_file, Path) and not dry_run:
            check_name_fits(checksum_file, f"checksum file ({option('sha256')})")
        if not dry_run:
            refuse_existing(checksum_file, force=force)
    log = CastLog()
    if dry_run:
        files = [OutputFile(str(output / f.name if as_folder else output), f.size, len(f.tensors)) for f in plan.files]
        checksum_file = None
    else:
        total = plan.total_bytes
        on_bytes = (lambda advance: progress(advance, total)) if progress is not None else None
        copy_started = time.perf_counter()
        written = execute(
            plan, output, as_folder=as_folder, force=force, sha256=sha256, progress=on_bytes, log=log,
            protect=protected_sources(checkpoint, source),
            before_commit=_staged_verifier(checkpoint, output, as_folder, dtypes, verify_progress, timings,
                                           copy_started) if verify else None,
        )
        timings.setdefault("copy", time.perf_counter() - copy_started)
        files = [
            OutputFile(str(output / w.name if as_folder else output), w.size, w.tensors, w.sha256) for w in written
        ]
        if checksum_file is not None:
            write_checksum_beside(output, written[0], force=force)
        elif sha256:
            from ..engine.written import checksum_file_name

            checksum_file = output / checksum_file_name(plan)
    converted = None
    if dtypes is not None:
        converted = dtype_report(checkpoint, dtypes, None if dry_run else log.by_tensor)
    return report_type(
        command=command,
        source=str(source),
        output=str(output),
        files=files,
        tensors=plan.tensor_count,
        parameters=checkpoint.parameters,
        bytes=plan.total_bytes,
        seconds=round(time.perf_counter() - started, 6),
        dry_run=dry_run,
        index=str(output / plan.index_name) if plan.index_name else None,
        checksum_file=str(checksum_file) if checksum_file else None,
        copied_files=[c.name for c in plan.copies],
        source_files=[h.path for h in checkpoint.shards],
        copy_ranges=sum(len(f.copies) for f in plan.files),
        header_bytes=sum(f.header_size for f in plan.files),
        warnings=list(plan.warnings) + (converted.warnings() if converted is not None else []),
        verified=True if verify and not dry_run else None,
        transfer=_transfer(traffic_before, plan, output) if not dry_run else None,
        plan=plan.to_dict() if dry_run else None,
        dtype=converted,
        copy_seconds=_rounded(timings.get("copy")),
        verify_seconds=_rounded(timings.get("verify")),
        renamed=[list(pair) for pair in renamed],
    )


def _rounded(seconds: float | None) -> float | None:
    return round(seconds, 6) if seconds is not None else None


def protected_sources(checkpoint: Checkpoint, source: Location) -> Sources:
    """The index and the source folder: never overwritten, written into or replaced.

    A folder (or an index) given as the source makes its folder a source folder; a
    single file does not (its neighbours are not part of it), though the companion
    files copied from beside it are protected one by one by the executor.
    """
    index = (checkpoint.index_path,) if checkpoint.index_path is not None else ()
    is_folder = checkpoint.index_path is not None or checkpoint.root == source
    return Sources(index, checkpoint.root if is_folder else None)


def _staged_verifier(
    checkpoint: Checkpoint,
    output: Location,
    as_folder: bool,
    dtypes: DtypeChoice | None,
    progress: ProgressCallback | None,
    timings: dict[str, float],
    copy_started: float,
) -> Callable[[Location], None]:
    """Verification of the staged output, run by the executor before the commit."""

    def verify_staged(staged: Location) -> None:
        verify_started = time.perf_counter()
        timings["copy"] = verify_started - copy_started
        written = open_checkpoint(staged) if as_folder else open_file(staged)
        comparison = compare_checkpoints(
            checkpoint, written, on_bytes=_on_bytes(progress, checkpoint.total_bytes),
            converted=dtypes.dtypes if dtypes else None, scales=dtypes.scales if dtypes else None,
        )
        timings["verify"] = time.perf_counter() - verify_started
        if not comparison.identical:
            raise VerificationError(
                f"{output}: verification failed, nothing was committed (an earlier output there is left as it "
                f"was): {_problems(comparison.problems())}"
            )

    return verify_staged


def _on_bytes(progress: ProgressCallback | None, total: int) -> Callable[[int], None] | None:
    return (lambda advance: progress(advance, total)) if progress is not None else None


def _problems(problems: list[str]) -> str:
    return problems[0] + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")


def _transfer(before: object, plan: Plan, output: Location) -> Transfer | None:
    """The store traffic of this run, when an s3:// location took part."""
    spent = storage.traffic() - before  # type: ignore[operator]
    if spent.requests == 0:
        return None
    from ..engine.execute_s3 import is_server_side

    return Transfer(
        spent.requests, spent.bytes_sent, spent.bytes_received, spent.bytes_copied,
        server_side=is_server_side(plan.sources, output),
    )


def refuse_selection_of_pipeline(location: Location, selection: Selection, recipe: Recipe | None = None) -> None:
    """Tensor names differ from component to component: a selection or recipe names one."""
    if selection or recipe is not None:
        raise BadInputError(
            f"{location}: a diffusers pipeline's components have tensors of their own; {option_name('select')}, "
            f"{option_name('drop')}, {option_name('rename')} and {option_name('recipe')} apply to one component "
            f"(e.g. {location}/transformer)"
        )


def dtype_choice(
    checkpoint: Checkpoint, dtype: str | None, keep: Sequence[str], block_size: str | None = None
) -> DtypeChoice | None:
    """The conversion of a `dtype=` run, or None for a plain copy."""
    if dtype is None:
        if keep:
            raise BadInputError(
                f"{option_name('keep')} leaves tensors in their source dtype during a conversion; "
                f"pass {option_name('dtype')} too"
            )
        if block_size is not None:
            raise BadInputError(
                f"{option_name('block_size')} is the block of an FP8 quantisation; pass {option('dtype', 'fp8')} too"
            )
        return None
    return choose_dtypes(checkpoint, dtype, keep, read_config(checkpoint), block_size)


def reshape(
    opened: Checkpoint,
    selection: Selection,
    recipe: Recipe | None,
    dtype: str | None,
    keep: Sequence[str],
    block_size: str | None = None,
) -> tuple[Selected, DtypeChoice | None]:
    """What a writing command makes of the tensors it opened, in the documented order:
    the selection (select, drop, rename), then the recipe, then the dtype choice, which
    matches `keep` against the names the first two produced."""
    selected = apply_selection(opened, selection)
    if recipe is not None:
        selected = dataclasses.replace(selected, checkpoint=apply_recipe(selected.checkpoint, recipe))
    return selected, dtype_choice(selected.checkpoint, dtype, keep, block_size)


def companion_copies(checkpoint: Checkpoint, output: Location, dtypes: DtypeChoice | None) -> list[FileCopy]:
    """The source folder's non-weight files for a folder output; with a conversion,
    config.json names the new dtype (every other file is copied unchanged)."""
    copies = []
    for path, name in companions(checkpoint, exclude=output):
        data = None
        if dtypes is not None and name == "config.json":
            data = dtypes.rewrite_config(storage.read_bytes(path), path)
        copies.append(FileCopy(path, name, data))  # type: ignore[arg-type]
    return copies


@gc_paused()
def dtype_report(
    checkpoint: Checkpoint, choice: DtypeChoice, stats: Mapping[str, CastStats] | None
) -> DtypeReport:
    """The report of a run; `stats` (tensor -> CastStats) is None for a dry run."""
    converted = choice.converted(checkpoint)
    if choice.block is not None:  # a quantisation: nothing is lost beyond what E4M3 is
        return DtypeReport(
            choice.target, len(converted), 0, list(choice.kept), {}, [], None, list(choice.block),
            len(checkpoint.tensors) - len(converted),
        )
    scales = choice.fp8.scale_names if choice.fp8 is not None else frozenset()
    left = scales.union(choice.kept, choice.not_float)  # sets: the choice's tuples would be scanned per tensor
    already = sum(1 for n, t in checkpoint.tensors.items() if t.info.dtype == choice.target and n not in left)
    not_float = Counter(checkpoint.tensors[n].info.dtype for n in choice.not_float)
    losses = []
    for name, counted in sorted((stats or {}).items()):
        if counted.overflow or counted.underflow:
            source = checkpoint.tensors[name].info.dtype
            losses.append(TensorLoss(name, source, counted.overflow, counted.underflow))
    return DtypeReport(
        choice.target, len(converted), already, list(choice.kept), dict(sorted(not_float.items())), losses,
        None if stats is None else not losses,
    )


def whole_run_seconds(command: Callable[..., R]) -> Callable[..., R]:
    """Make the report's `seconds` cover the whole call: reading and checking the
    headers (seconds for a 100 MB one) and planning, not only the writing."""

    @functools.wraps(command)
    def timed(*args: object, **kwargs: object) -> R:
        started = time.perf_counter()
        report = command(*args, **kwargs)
        if dataclasses.is_dataclass(report) and hasattr(report, "seconds"):
            return dataclasses.replace(report, seconds=round(time.perf_counter() - started, 6))  # type: ignore[type-var]
        return report

    return timed


R = TypeVar("R")
