"""Every command on a whole diffusers pipeline: one component at a time, one report.

Each weight set of the pipeline (:mod:`shardkit.pipeline`: a component in one variant)
goes through the command's ordinary code as a checkpoint of its own, so a pipeline
gets exactly the checks and the bytes a lone component would. What is added here is
what only a pipeline has: an output laid out as the source (`unet/` stays `unet/`, each
weight file under the name its loader expects), `model_index.json`, the scheduler and
tokenizer folders copied, the whole output staged and committed as one folder, and one
report with a row per component.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .. import atomic, output_path, storage
from ..checkpoint import Checkpoint
from ..errors import BadInputError, OutputError, ShardkitError
from ..execute import check_destination
from ..manifest import Manifest, format_file_manifest, read_manifest
from ..pipeline import Pipeline, WeightSet, find_pipeline, open_weight_set
from ..reports import JsonReport, WriteReport
from .writing import ProgressCallback

CHECKSUM_FILE = "SHA256SUMS"


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
    report: dict[str, object] = field(default_factory=dict)  # the command's own report, as JSON

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


# --------------------------------------------------------------------------- reading


def inspect_pipeline(
    pipeline: Pipeline, shown: str, *, tensors: bool, filter: str | None, strict: bool
) -> PipelineReport:
    from .inspect import _no_match_hint, inspect

    started = time.perf_counter()
    rows = []
    # A filter is meant for the whole pipeline: that it matches nothing in one component is no news.
    hint = _no_match_hint(filter) if filter is not None else None
    for weight_set in pipeline.weight_sets:
        report = inspect(str(weight_set.entry), tensors=tensors, filter=filter, strict=strict)
        warnings = [w for w in _own(report.warnings, weight_set) if w != hint]
        report = dataclasses.replace(report, warnings=warnings)
        rows.append(_row(weight_set, str(weight_set.entry), len(report.files), report.tensors,
                         report.parameters, report.bytes, None, report.to_dict()))
    warnings = [*pipeline.warnings, *(w for r in rows for w in _labelled(r, r.report["warnings"]))]
    if hint is not None and not any(r.report["matched_tensors"] for r in rows):
        warnings.append(hint)
    return PipelineReport(
        "inspect", shown, rows, _since(started), copied_files=[name for _, name in pipeline.copies],
        warnings=warnings,
    )


def verify_pipeline(
    pipeline: Pipeline,
    shown: str,
    *,
    checksums: str | os.PathLike[str] | None,
    against: str | os.PathLike[str] | None,
    config: object,
    architecture: bool | None,
    strict: bool,
    progress: ProgressCallback | None,
) -> PipelineReport:
    """Each weight set verified on its own; a file manifest's lines are dealt out to the
    components they name, and the lines for other files (model_index.json, scheduler
    and tokenizer files, configs) are checked here."""
    from .verify import verify

    if config is not None:
        raise BadInputError(f"{shown}: --config applies to one component; name it as PATH (e.g. {shown}/unet)")
    started = time.perf_counter()
    manifest = read_manifest(checksums) if checksums is not None else None
    if manifest is not None and manifest.kind != "files":
        raise BadInputError(
            f"{manifest.path}: a tensor manifest covers one checkpoint; verify each component against its own"
        )
    reference = _other_pipeline(against, "--against") if against is not None else None
    problems: list[str] = []
    rows = []
    claimed: set[str] = set()
    for weight_set in pipeline.weight_sets:
        part = _manifest_part(manifest, weight_set, claimed) if manifest is not None else None
        other = None
        if reference is not None:
            match = reference.find(weight_set.component, weight_set.variant)
            if match is None:
                problems.append(f"{weight_set.label}: not in {against}")
                continue
            other = str(match.entry)
        report = verify(
            weight_set.entry, checksums=part, against=other, architecture=architecture, strict=strict,
            allow_unindexed=True, progress=progress,
        )
        report = dataclasses.replace(report, warnings=_own(report.warnings, weight_set))
        parameters, size = _sizes(weight_set, strict)
        rows.append(_row(weight_set, str(weight_set.entry), len(report.files), report.tensors, parameters, size,
                         report.ok, report.to_dict()))
    if reference is not None:
        problems += [
            f"{s.label}: only in {against}, missing here"
            for s in reference.weight_sets
            if pipeline.find(s.component, s.variant) is None
        ]
    if manifest is not None:
        problems += _check_other_lines(manifest, pipeline.root, claimed)
    return PipelineReport(
        "verify", shown, rows, _since(started), problems=problems,
        notes=[f"{r.label}: {n}" for r in rows for n in r.report["notes"]],  # type: ignore[union-attr]
        checksum_file=manifest.path if manifest is not None else None,
        warnings=[*pipeline.warnings, *(w for r in rows for w in _labelled(r, r.report["warnings"]))],
    )


def _manifest_part(manifest: Manifest, weight_set: WeightSet, claimed: set[str]) -> Manifest:
    """The manifest lines for this weight set's files, named relative to its folder."""
    own = {f.name for f in weight_set.files}
    prefix = weight_set.component + "/"
    files = {}
    for name, digest in manifest.files.items():
        relative = name.removeprefix("./")
        if relative.startswith(prefix) and relative[len(prefix) :] in own:
            files[relative[len(prefix) :]] = digest
            claimed.add(name)
    return Manifest(manifest.path, "files", files=files)


def _check_other_lines(manifest: Manifest, root: Path, claimed: set[str]) -> list[str]:
    """The manifest's lines no weight set claimed, each hashed and compared here."""
    problems = []
    for name, digest in sorted(manifest.files.items()):
        if name in claimed:
            continue
        file = root / name
        if not file.is_file():
            problems.append(f"{file}: listed in {manifest.path} but missing")
            continue
        with open(file, "rb") as handle:
            actual = hashlib.file_digest(handle, "sha256").hexdigest() if hasattr(hashlib, "file_digest") else (
                hashlib.sha256(handle.read()).hexdigest()
            )
        if actual != digest:
            problems.append(f"{file}: SHA-256 is {actual} but {manifest.path} says {digest}")
    return problems


def checksum_pipeline(
    pipeline: Pipeline, shown: str, *, tensors: bool, output: str | os.PathLike[str] | None, force: bool,
    strict: bool, progress: ProgressCallback | None,
) -> object:
    """One sha256sum manifest for the whole pipeline, names relative to its root: every
    weight file, and every other file a load reads (model_index.json, configs,
    scheduler and tokenizer files), so `cd pipeline && sha256sum -c SHA256SUMS` checks it."""
    from .checksum import ChecksumReport, FileChecksum, _check_output, _write_atomically, file_checksums

    if tensors:
        raise BadInputError(
            f"{shown}: a tensor manifest covers one checkpoint, and a pipeline's components share tensor names; "
            f"run it on a component (e.g. {shown}/unet)"
        )
    started = time.perf_counter()
    opened = [(s, open_weight_set(s, strict=strict)) for s in pipeline.weight_sets]
    if output is not None:
        for _, checkpoint in opened:
            _check_output(Path(output), checkpoint, force)
    entries: list[FileChecksum] = []
    for weight_set, checkpoint in opened:
        for each in file_checksums(checkpoint, progress):
            entries.append(dataclasses.replace(each, name=f"{weight_set.component}/{each.name}"))
    for file, name in _loader_files(pipeline, opened):
        with open(file, "rb") as handle:
            data = handle.read()
        entries.append(FileChecksum(name, len(data), hashlib.sha256(data).hexdigest()))
    entries.sort(key=lambda e: e.name)
    if output is not None:
        _write_atomically(Path(output), format_file_manifest((e.name, e.sha256) for e in entries))
    warnings = [*pipeline.warnings, *(f"{s.label}: {w}" for s, c in opened for w in c.warnings)]
    return ChecksumReport(
        shown, "files", entries, {}, sum(e.size for e in entries), _since(started),
        output=str(output) if output is not None else None, warnings=warnings,
    )


def _loader_files(pipeline: Pipeline, opened: list[tuple[WeightSet, Checkpoint]]) -> list[tuple[Path, str]]:
    """The pipeline's other files a load reads: its copies, each component's index and config files."""
    from ..checkpoint import companion_files

    found = dict((name, path) for path, name in pipeline.copies)
    for weight_set, checkpoint in opened:
        if checkpoint.index_path is not None:
            found[f"{weight_set.component}/{checkpoint.index_path.name}"] = checkpoint.index_path
        for path, name in companion_files(checkpoint):
            found.setdefault(f"{weight_set.component}/{name}", path)
    return sorted((path, name) for name, path in found.items())


def diff_pipelines(
    a: str, b: str, *, data: bool, max_abs_diff: bool, strict: bool, progress: Callable[[int, int], None] | None
) -> PipelineReport:
    """Weight sets matched by component and variant, each pair diffed; the copied files
    (model_index.json, scheduler, tokenizer) compared byte for byte."""
    from .diff import diff

    started = time.perf_counter()
    left, right = _other_pipeline(a, "A"), _other_pipeline(b, "B")
    rows, problems = [], []
    for weight_set in left.weight_sets:
        match = right.find(weight_set.component, weight_set.variant)
        if match is None:
            problems.append(f"{weight_set.label}: only in A")
            continue
        report = diff(
            str(weight_set.entry), str(match.entry), data=data, max_abs_diff=max_abs_diff, strict=strict,
            allow_unindexed=True, progress=progress,
        )
        warnings = [f"A: {w}" for w in _own([w.removeprefix("A: ") for w in report.warnings if w.startswith("A: ")],
                                            weight_set)]
        warnings += [f"B: {w}" for w in _own([w.removeprefix("B: ") for w in report.warnings if w.startswith("B: ")],
                                            match)]
        report = dataclasses.replace(report, warnings=warnings)
        files = sum(1 for f in weight_set.files if f.name.endswith(".safetensors"))
        parameters, size = _sizes(weight_set, strict)
        rows.append(_row(weight_set, f"{weight_set.entry} ↔ {match.entry}", files, report.tensors_a, parameters,
                         size, report.identical, report.to_dict()))
    problems += [f"{s.label}: only in B" for s in right.weight_sets if left.find(s.component, s.variant) is None]
    copies_a = {name: path for path, name in left.copies}
    copies_b = {name: path for path, name in right.copies}
    for name in sorted(copies_a.keys() | copies_b.keys()):
        if name not in copies_b:
            problems.append(f"{name}: only in A")
        elif name not in copies_a:
            problems.append(f"{name}: only in B")
        elif copies_a[name].read_bytes() != copies_b[name].read_bytes():
            problems.append(f"{name}: differs")
    return PipelineReport(
        "diff", f"{a} ↔ {b}", rows, _since(started), problems=problems,
        warnings=[*left.warnings, *right.warnings, *(w for r in rows for w in _labelled(r, r.report["warnings"]))],
    )


def _other_pipeline(path: str | os.PathLike[str], what: str) -> Pipeline:
    location = storage.as_path(path)
    found = find_pipeline(location, allow_unindexed=True)
    if found is None:
        raise BadInputError(
            f"{path}: {what} is not a diffusers pipeline (no model_index.json), but the other side is one; "
            "compare a component with a component (e.g. pipeline/unet)"
        )
    return found


# --------------------------------------------------------------------------- writing


def merge_pipeline(
    pipeline: Pipeline, source: str | os.PathLike[str], output: str | os.PathLike[str], *, force: bool,
    sha256: bool, dry_run: bool, strict: bool, verify: bool, progress: ProgressCallback | None,
) -> PipelineReport:
    """Each weight set into one file under its loader-given name, in its component's
    folder: `unet/diffusion_pytorch_model.safetensors`, `unet/diffusion_pytorch_model.fp16.safetensors`."""
    from .merge import _weight_file_name, merge_checkpoint

    def write(weight_set: WeightSet, checkpoint: Checkpoint, folder: Path, first: bool, on: ProgressCallback | None):
        target = folder if first else folder / _weight_file_name(checkpoint.index_path, checkpoint.shards[0].path)
        return merge_checkpoint(
            checkpoint, weight_set.entry, target, force=False, sha256=sha256, dry_run=dry_run, verify=verify,
            progress=on,
        ), target

    return _write_pipeline("merge", pipeline, source, output, write, force=force, sha256=sha256,
                           dry_run=dry_run, strict=strict, progress=progress)


def split_pipeline(
    pipeline: Pipeline, source: str | os.PathLike[str], output: str | os.PathLike[str], *, max_shard_size: int,
    force: bool, sha256: bool, dry_run: bool, strict: bool, verify: bool, progress: ProgressCallback | None,
) -> PipelineReport:
    """Each weight set resharded in its component's folder, with the component's own
    prefix and the variant's names (`diffusion_pytorch_model.fp16-00001-of-00002.safetensors`)."""
    from .split import split_checkpoint

    def write(weight_set: WeightSet, checkpoint: Checkpoint, folder: Path, first: bool, on: ProgressCallback | None):
        # A folder is written whole: a second variant goes to a folder of its own in the
        # staging area, and its files are moved beside the first's afterwards.
        target = folder if first or dry_run else folder.parent / f".{folder.name}.{weight_set.variant}"
        report = split_checkpoint(
            checkpoint, weight_set.entry, target, max_shard_size=max_shard_size, prefix=weight_set.prefix,
            variant=weight_set.variant, sha256=sha256, dry_run=dry_run, verify=verify, progress=on,
        )
        if target != folder:
            written = [Path(f.path).name for f in report.files] + ([Path(report.index).name] if report.index else [])
            for name in written:
                os.replace(target / name, folder / name)
            atomic.remove(target)
            report = _relocated(report, target, folder)
        return report, folder

    return _write_pipeline("split", pipeline, source, output, write, force=force, sha256=sha256,
                           dry_run=dry_run, strict=strict, progress=progress)


def _write_pipeline(
    command: str, pipeline: Pipeline, source: str | os.PathLike[str], output: str | os.PathLike[str],
    write: Callable[..., tuple[WriteReport, Path]], *, force: bool, sha256: bool, dry_run: bool, strict: bool,
    progress: ProgressCallback | None,
) -> PipelineReport:
    """Stage the whole output folder, write each weight set into it, copy the rest,
    commit it as one: a pipeline appears complete or not at all."""
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
    sources = [Path(h.path) for _, c in opened for h in c.shards]
    with output_path.parents_created(dest, enabled=not dry_run):
        if not dry_run:
            check_destination(dest, sources, force=force, as_folder=True)
            atomic.clean(dest.parent, dest.name)
        staged = dest if dry_run else atomic.temp_name(dest)
        try:
            if not dry_run:
                staged.mkdir()
            rows, written = [], []
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
                atomic.commit(staged, dest, replace=force)
        except BaseException:
            if not dry_run:
                atomic.remove(staged)
            raise
    for weight_set, report in written:
        report = _relocated(report, staged, dest)
        if sha256:
            report = dataclasses.replace(report, checksum_file=str(checksum_file) if checksum_file else None)
        shown = report.files[0].path if command == "merge" else report.output
        rows.append(_row(weight_set, shown, len(report.files), report.tensors, report.parameters,
                         report.bytes, None, report.to_dict()))
    return PipelineReport(
        command, str(pipeline.root), rows, _since(started), output=str(dest), dry_run=dry_run,
        copied_files=[name for _, name in pipeline.copies], checksum_file=str(checksum_file) if checksum_file else None,
        warnings=[*pipeline.warnings, *(w for r in rows for w in _labelled(r, r.report["warnings"]))],
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
            entries.append((Path(f.path).relative_to(staged).as_posix(), f.sha256))
    with open(staged / CHECKSUM_FILE, "w", encoding="utf-8") as handle:
        handle.write(format_file_manifest(sorted(entries)))
        handle.flush()
        os.fsync(handle.fileno())


def _relocated(report: WriteReport, old: Path, new: Path) -> WriteReport:
    """The report with paths under `old` (the staging folder) shown under `new`."""

    def moved(text: str | None) -> str | None:
        if text is None or not text.startswith(str(old)):
            return text
        return str(new) + text[len(str(old)) :]

    return dataclasses.replace(
        report, output=moved(report.output), index=moved(report.index), checksum_file=moved(report.checksum_file),
        files=[dataclasses.replace(f, path=moved(f.path)) for f in report.files],
    )


# --------------------------------------------------------------------------- shared


def _row(
    weight_set: WeightSet, path: str, files: int, tensors: int, parameters: int | None, size: int | None,
    ok: bool | None, report: dict[str, object],
) -> ComponentResult:
    return ComponentResult(
        weight_set.component, weight_set.variant, path, files, tensors,
        int(parameters if parameters is not None else report.get("parameters", 0) or 0),
        int(size if size is not None else report.get("bytes", report.get("bytes_read", 0)) or 0), ok, report,
    )


def _sizes(weight_set: WeightSet, strict: bool) -> tuple[int, int]:
    """Parameters and tensor bytes of a weight set, from its headers (0, 0 if they are broken:
    the command's own report says why)."""
    try:
        checkpoint = open_weight_set(weight_set, strict=strict)
    except (ShardkitError, OSError):
        return 0, 0
    return checkpoint.parameters, checkpoint.total_bytes


def _own(warnings: list[str], weight_set: WeightSet) -> list[str]:
    """Warnings without those about the other variants in the same folder: siblings,
    not files this weight set is missing (the pipeline reports real strays itself)."""
    folder = weight_set.entry.parent
    others = tuple(f"{p}: " for p in folder.glob("*.safetensors") if p not in weight_set.files)
    return [w for w in warnings if not (others and w.startswith(others))]


def _labelled(row: ComponentResult, warnings: object) -> Iterator[str]:
    for warning in warnings or []:  # type: ignore[union-attr]
        yield f"{row.label}: {warning}"


def _since(started: float) -> float:
    return round(time.perf_counter() - started, 6)
