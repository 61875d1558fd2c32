"""What every command shares on a whole diffusers pipeline: one component at a time, one report.

Each weight set of the pipeline (:mod:`shardkit.checkpoint.pipeline`: a component in one variant)
goes through the command's ordinary code as a checkpoint of its own, so a pipeline
gets exactly the checks and the bytes a lone component would. What is added here is
what only a pipeline has: an output laid out as the source (`unet/` stays `unet/`, each
weight file under the name its loader expects), `model_index.json`, the scheduler and
tokenizer folders copied, the whole output staged and committed as one folder, and one
report with a row per component. Each command's pipeline function lives beside the
command (`merge_pipeline` in merge.py, ...); this module imports none of them.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from .. import storage
from ..checkpoint.manifest import format_file_manifest
from ..checkpoint.pipeline import Pipeline, find_pipeline
from ..checkpoint.shards import open_weight_set
from ..checkpoint.variants import WeightSet
from ..engine import atomic
from ..engine.destination import Sources, check_destination
from ..engine.execute import commit_output
from ..engine.options import WriteOptions
from ..errors import BadInputError, OutputError, ShardkitError
from ..plan import output_path
from ..reports import JsonReport, WriteReport

CHECKSUM_FILE = "SHA256SUMS"
Written = TypeVar("Written", bound=WriteReport)


@dataclass(frozen=True)
class ComponentResult(JsonReport):
    """One weight set's row: what the command found or wrote for it."""

    component: str  # the folder: "unet"
    variant: str | None  # "fp16", or None for the default weights
    path: str  # the weight file or index read (or, for merge and split, written)
    files: int
    tensors: int
    parameters: int
    bytes: int
    ok: bool | None = None  # verify: passed; diff: identical; None for the other commands
    report: dict[str, Any] = field(default_factory=dict)  # the command's own report, as JSON

    @property
    def label(self) -> str:
        return self.component if self.variant is None else f"{self.component} ({self.variant})"


@dataclass(frozen=True)
class PipelineReport(JsonReport):
    """What a command did to a whole pipeline: a row per weight set, plus what only the
    pipeline has (copied files, problems outside any component)."""

    command: str
    path: str
    components: list[ComponentResult]
    seconds: float
    output: str | None = None
    dry_run: bool = False
    copied_files: list[str] = field(default_factory=list)
    checksum_file: str | None = None
    problems: list[str] = field(default_factory=list)  # verify and diff: beyond the components
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # verify: checks skipped, and why

    @property
    def ok(self) -> bool:
        """verify: every component passed; diff: the pipelines are identical."""
        return not self.problems and all(c.ok is not False for c in self.components)

    identical = ok

    def __bool__(self) -> bool:
        return self.ok

    @property
    def tensors(self) -> int:
        return sum(c.tensors for c in self.components)

    @property
    def bytes(self) -> int:
        return sum(c.bytes for c in self.components)

    def to_dict(self) -> dict[str, object]:
        data = super().to_dict()
        data["ok"] = data["identical"] = self.ok
        return data


def other_pipeline(path: str | os.PathLike[str], what: str) -> Pipeline:
    location = storage.as_path(path)
    found = find_pipeline(location, allow_unindexed=True)
    if found is None:
        raise BadInputError(
            f"{path}: {what} is not a diffusers pipeline (no model_index.json), but the other side is one; "
            "compare a component with a component (e.g. pipeline/unet)"
        )
    return found


# --------------------------------------------------------------------------- writing


def write_pipeline(
    command: str, pipeline: Pipeline, source: str | os.PathLike[str], output: str | os.PathLike[str],
    write: Callable[..., tuple[WriteReport, Path]], options: WriteOptions, *, strict: bool,
) -> PipelineReport:
    """Stage the whole output folder, write each weight set into it, copy the rest,
    commit it as one: a pipeline appears complete or not at all."""
    force, sha256, dry_run, progress = options.force, options.sha256, options.dry_run, options.progress
    started = time.perf_counter()
    opened = [(s, open_weight_set(s, strict=strict)) for s in pipeline.weight_sets]
    all_tensors = (each for _, c in opened for each in output_path.output_dtypes(c))
    dest = output_path.resolve(output, source=source, tensors=all_tensors)
    if not isinstance(dest, Path):
        raise OutputError(f"{dest}: a pipeline is written to a local folder")
    if dest.name.endswith(".safetensors"):
        raise OutputError(
            f"{dest}: a diffusers pipeline is written as a folder with one weight file per component; name a "
            f"folder, or pass one component (e.g. {pipeline.root}/unet) to get a single file"
        )
    total = sum(c.total_bytes for _, c in opened)
    on_bytes = (lambda step, _total: progress(step, total)) if progress is not None else None
    read: list[storage.Location] = [storage.lookup(h.path) for _, c in opened for h in c.shards]
    read += [c.index_path for _, c in opened if c.index_path is not None] + [p for p, _ in pipeline.copies]
    # what --force may replace: an earlier output's component folders and copied files
    writes = {name for _, name in pipeline.copies} | {f"{s.component}/" for s, _ in opened} | {CHECKSUM_FILE}
    with output_path.parents_created(dest, enabled=not dry_run):
        if not dry_run:
            check_destination(dest, Sources(tuple(read), pipeline.root), force=force, as_folder=True, writes=writes)
            atomic.clean(dest.parent, dest.name)
        staged = dest if dry_run else atomic.temp_name(dest)
        try:
            if not dry_run:
                staged.mkdir()
            rows: list[ComponentResult] = []
            written: list[tuple[WeightSet, WriteReport]] = []
            for weight_set, checkpoint in opened:
                folder = staged / weight_set.component
                first = not any(s.component == weight_set.component for s, _ in written)
                report, _ = write(weight_set, checkpoint, folder, first, on_bytes)
                written.append((weight_set, report))
            checksum_file = None
            if not dry_run:
                _copy_files(pipeline, staged)
                if sha256:
                    checksum_file = dest / CHECKSUM_FILE
                    _write_checksums(staged, [r for _, r in written])
                atomic.fsync_path(staged)
                commit_output(staged, dest, force, writes)
        except BaseException:
            if not dry_run:
                atomic.remove(staged)
            raise
    for weight_set, report in written:
        report = relocated(report, staged, dest)
        if sha256:
            report = dataclasses.replace(report, checksum_file=str(checksum_file) if checksum_file else None)
        shown = report.files[0].path if command == "merge" else report.output
        rows.append(component_row(weight_set, shown, len(report.files), report.tensors, report.parameters,
                         report.bytes, None, report.to_dict()))
    return PipelineReport(
        command, str(pipeline.root), rows, elapsed(started), output=str(dest), dry_run=dry_run,
        copied_files=[name for _, name in pipeline.copies], checksum_file=str(checksum_file) if checksum_file else None,
        warnings=[*pipeline.warnings, *row_warnings(rows)],
    )


def _copy_files(pipeline: Pipeline, staged: Path) -> None:
    for path, name in pipeline.copies:
        target = staged / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
        with open(target, "rb+") as handle:
            os.fsync(handle.fileno())


def _write_checksums(staged: Path, reports: list[WriteReport]) -> None:
    """One `SHA256SUMS` for the whole pipeline instead of one per component, names
    relative to its root, so `cd out && sha256sum -c SHA256SUMS` checks every weight file."""
    entries = []
    for report in reports:
        if report.checksum_file:
            Path(report.checksum_file).unlink(missing_ok=True)
        for f in report.files:
            if f.sha256 is not None:
                entries.append((Path(f.path).relative_to(staged).as_posix(), f.sha256))
    atomic.write_synced(staged / CHECKSUM_FILE, format_file_manifest(sorted(entries)))


def relocated(report: Written, old: Path, new: Path) -> Written:
    """The report with paths under `old` (the staging folder) shown under `new`."""

    def moved(text: str) -> str:
        return str(new) + text[len(str(old)) :] if text.startswith(str(old)) else text

    return dataclasses.replace(
        report, output=moved(report.output), index=report.index and moved(report.index),
        checksum_file=report.checksum_file and moved(report.checksum_file),
        files=[dataclasses.replace(f, path=moved(f.path)) for f in report.files],
    )


# --------------------------------------------------------------------------- shared


def component_row(
    weight_set: WeightSet, path: str, files: int, tensors: int, parameters: int, size: int, ok: bool | None,
    report: dict[str, Any],
) -> ComponentResult:
    return ComponentResult(weight_set.component, weight_set.variant, path, files, tensors, parameters, size, ok, report)


def weight_set_sizes(weight_set: WeightSet, strict: bool) -> tuple[int, int]:
    """Parameters and tensor bytes of a weight set, from its headers (0, 0 if they are broken:
    the command's own report says why)."""
    try:
        checkpoint = open_weight_set(weight_set, strict=strict)
    except (ShardkitError, OSError):
        return 0, 0
    return checkpoint.parameters, checkpoint.total_bytes


def own_warnings(warnings: list[str], weight_set: WeightSet) -> list[str]:
    """Warnings without those about the other variants in the same folder: siblings,
    not files this weight set is missing (the pipeline reports real strays itself)."""
    folder = weight_set.entry.parent
    others = tuple(f"{p}: " for p in folder.glob("*.safetensors") if p not in weight_set.files)
    return [w for w in warnings if not (others and w.startswith(others))]


def row_warnings(rows: list[ComponentResult]) -> list[str]:
    """Every component's warnings, each led by the component's label."""
    return [f"{r.label}: {w}" for r in rows for w in r.report.get("warnings", [])]


def side_warnings(warnings: list[str], side: str, weight_set: WeightSet) -> list[str]:
    """A diff's warnings of one side (`A: …`), without those about its sibling variants."""
    mine = [w.removeprefix(f"{side}: ") for w in warnings if w.startswith(f"{side}: ")]
    return [f"{side}: {w}" for w in own_warnings(mine, weight_set)]


def elapsed(started: float) -> float:
    return round(time.perf_counter() - started, 6)
