"""`shardkit checksum`: a manifest that lets anyone downstream prove they hold the same bytes.

Two kinds. The default is `sha256sum` text over every file a loader reads (the
weight files, the index, and every file a merge would copy: config, generation
config, tokenizer and chat-template files ...), names relative to the checkpoint
folder, so `cd model && sha256sum -c SHA256SUMS` checks it without shardkit.
`tensors=True` writes a JSON manifest of each tensor's dtype, shape and data
SHA-256, which survives merge and split because it never mentions files. The
checkpoint is validated (headers, index cross-checks) before anything is hashed:
a manifest must never bless a broken checkpoint.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .. import storage
from ..checkpoint.manifest import (
    TensorDigest,
    companions,
    format_file_manifest,
    format_tensor_manifest,
    read_manifest,
    tensor_manifest_document,
)
from ..checkpoint.pipeline import find_pipeline
from ..checkpoint.shards import Checkpoint, open_checkpoint
from ..engine import atomic, stream
from ..engine.destination import Sources, check_not_a_source, refuse_existing
from ..engine.hashing import Streamer
from ..errors import BadInputError, OutputError
from ..format.torch_checkpoint import byte_runs
from ..reports import JsonReport
from ..storage import Location
from .writing import ProgressCallback

if TYPE_CHECKING:
    from ..checkpoint.pipeline import Pipeline
    from ..checkpoint.variants import WeightSet


@dataclass(frozen=True)
class FileChecksum(JsonReport):
    name: str  # relative to the checkpoint folder, as written in the manifest
    size: int
    sha256: str


@dataclass(frozen=True)
class ChecksumReport(JsonReport):
    path: str
    kind: str  # "files" | "tensors"
    files: list[FileChecksum]
    tensors: dict[str, TensorDigest]
    bytes: int
    seconds: float
    output: str | None = None
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # e.g. which file loaders use

    def manifest(self) -> str:
        """The manifest text: `sha256sum` lines, or the tensor JSON."""
        if self.kind == "tensors":
            return format_tensor_manifest(self.tensors)
        return format_file_manifest((f.name, f.sha256) for f in self.files)

    def to_dict(self) -> dict[str, object]:
        data = super().to_dict()
        if self.kind == "tensors":
            # Same layout as the manifest file, so a saved --json report is accepted by verify.
            data.update(tensor_manifest_document(self.tensors))
        data["throughput_bytes_per_second"] = round(self.bytes / self.seconds) if self.seconds > 0 else 0
        return data


def checksum(
    path: str | os.PathLike[str],
    *,
    tensors: bool = False,
    output: str | os.PathLike[str] | None = None,
    force: bool = False,
    strict: bool = False,
    allow_unindexed: bool = False,
    endpoint_url: str | None = None,
    progress: ProgressCallback | None = None,
) -> ChecksumReport:
    """Hash the checkpoint at `path`; with `output`, also write the manifest there.

    The manifest lists the SHA-256 of every file a loader reads (weights, index, and
    what merge copies: config, tokenizer, chat template ...) in `sha256sum` format,
    names relative to the checkpoint folder; with `tensors`, one SHA-256 per tensor instead
    (JSON), which stays valid across merge and split. `output` is replaced only with
    `force`, and never if it is one of the checkpoint's weight files. `strict`,
    `allow_unindexed` and `endpoint_url` apply as for :func:`~shardkit.commands.merge.merge`;
    `progress(advance, total)` is called with the bytes just hashed.

    Example::

        shardkit.checksum("model", output="model/SHA256SUMS")
    """
    started = time.perf_counter()
    location = storage.as_path(path, endpoint_url=endpoint_url)
    shown = storage.display(path) if isinstance(path, str) and "://" in path else str(location)
    pipeline = find_pipeline(location)
    if pipeline is not None:  # a diffusers pipeline: one manifest for every component

        return checksum_pipeline(  # type: ignore[return-value]
            pipeline, shown, tensors=tensors, output=output, force=force, strict=strict, progress=progress
        )
    checkpoint = open_checkpoint(location, strict=strict, allow_unindexed=allow_unindexed)
    if output is not None:
        _check_output(Path(output), checkpoint, force)
    if tensors:
        digests = tensor_digests(checkpoint, progress)
        files: list[FileChecksum] = []
        total = checkpoint.total_bytes
    else:
        files = file_checksums(checkpoint, progress, exclude=Path(output) if output is not None else None)
        digests = {}
        total = sum(f.size for f in files)
    report = ChecksumReport(
        path=shown,
        kind="tensors" if tensors else "files",
        files=files,
        tensors=digests,
        bytes=total,
        seconds=0.0,
        output=str(output) if output is not None else None,
        warnings=list(checkpoint.warnings),
        notes=list(checkpoint.notes),
    )
    if output is not None:
        atomic.write_small_file(Path(output), report.manifest(), replace=force)
    return dataclasses.replace(report, seconds=round(time.perf_counter() - started, 6))


def file_checksums(
    checkpoint: Checkpoint, progress: ProgressCallback | None = None, *, exclude: Path | None = None
) -> list[FileChecksum]:
    """SHA-256 of every file a loader reads, named relative to the checkpoint folder
    and sorted by that name: the weight files, the index, and the files a merge
    copies (:func:`~shardkit.checkpoint.manifest.companions`; `exclude`, the manifest
    being written, is not among them)."""
    files: dict[str, storage.Location] = {
        manifest_name(storage.lookup(h.path), checkpoint.root): storage.lookup(h.path) for h in checkpoint.shards
    }
    if checkpoint.index_path is not None:
        files[manifest_name(checkpoint.index_path, checkpoint.root)] = checkpoint.index_path
    for path, relative in companions(checkpoint):
        if exclude is None or path.resolve() != exclude.resolve():
            files[relative] = path
    sizes = {name: storage.size(path) for name, path in files.items()}
    total = sum(sizes.values())
    on_bytes = (lambda step: progress(step, total)) if progress is not None else None
    result = []
    with Streamer() as streamer:
        for name, path in sorted(files.items()):
            digest = stream.digest_file(streamer, path, on_bytes=on_bytes).file
            assert digest is not None
            result.append(FileChecksum(name, sizes[name], digest))
    return result


def tensor_digests(checkpoint: Checkpoint, progress: ProgressCallback | None = None) -> dict[str, TensorDigest]:
    """dtype, shape and data SHA-256 of every tensor; each file is read once, in order."""
    total = checkpoint.total_bytes
    on_bytes = (lambda step: progress(step, total)) if progress is not None else None
    digests: dict[str, TensorDigest] = {}
    with Streamer() as streamer:
        for header in checkpoint.shards:
            runs = byte_runs(header)
            ranges = [(header.data_start + t.begin, header.data_start + t.end) for t in runs]
            hashes = stream.digest_file(streamer, header.path, whole=False, ranges=ranges, on_bytes=on_bytes).ranges
            for info, digest in zip(runs, hashes):
                digests[info.name] = TensorDigest(info.dtype, info.shape, digest)
            for info in header.tensors:
                if info.name not in digests:
                    from ..plan.tensor_bytes import view_sha256

                    view_digest = view_sha256(checkpoint.tensors[info.name])
                    digests[info.name] = TensorDigest(info.dtype, info.shape, view_digest)
    return dict(sorted(digests.items()))


def manifest_name(file: Location, root: Location) -> str:
    """How a manifest names `file`: relative to the checkpoint folder, '/'-separated
    (local or remote: both spell a path with '/')."""
    prefix = str(root).rstrip("/") + "/"
    text = str(file)
    return text[len(prefix) :] if text.startswith(prefix) else text


def _check_output(output: Path, checkpoint: Checkpoint, force: bool) -> None:
    resolved = output.resolve()
    if any(resolved == p.resolve() for p in checkpoint.weight_files) or output.name.endswith(".safetensors"):
        raise OutputError(f"{output}: refusing to write a checksum manifest over a weight file")
    if output.is_dir():
        raise OutputError(f"{output}: is a folder; give the manifest's file name (e.g. {output}/SHA256SUMS)")
    # The config, tokenizer and other files a loader reads, by identity (an alias of the
    # folder names them too); an earlier manifest among them may be replaced.
    read = tuple(path for path, _ in companions(checkpoint) if isinstance(path, Path) and not _is_manifest(path))
    check_not_a_source(output, Sources((*read, *(p for p in [checkpoint.index_path] if isinstance(p, Path)))))
    refuse_existing(output, force=force)
    if not output.parent.is_dir():
        raise OutputError(f"{output}: parent folder {output.parent} does not exist")


def _is_manifest(path: Path) -> bool:
    """Whether `path` is a checksum manifest (either kind) listing something."""
    try:
        manifest = read_manifest(path)
    except BadInputError:
        return False
    return bool(manifest.files or manifest.tensors)


def checksum_pipeline(
    pipeline: Pipeline, shown: str, *, tensors: bool, output: str | os.PathLike[str] | None, force: bool,
    strict: bool, progress: ProgressCallback | None,
) -> object:
    """One sha256sum manifest for the whole pipeline, names relative to its root: every
    weight file, and every other file a load reads (model_index.json, configs,
    scheduler and tokenizer files), so `cd pipeline && sha256sum -c SHA256SUMS` checks it."""
    import hashlib

    from ..checkpoint.shards import open_weight_set
    from .pipeline_runs import elapsed

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
        loader_read = tuple(p for p, _ in pipeline.copies if isinstance(p, Path) and not _is_manifest(p))
        check_not_a_source(Path(output), Sources(loader_read))  # model_index.json, scheduler/, tokenizer/
    entries: list[FileChecksum] = []
    listed: set[str] = set()  # a component's variants share its config and tokenizer files: listed once
    for weight_set, checkpoint in opened:
        for each in file_checksums(checkpoint, progress):
            name = f"{weight_set.component}/{each.name}"
            if name not in listed:
                entries.append(dataclasses.replace(each, name=name))
                listed.add(name)
    for file, name in _loader_files(pipeline, opened):
        if name in listed:
            continue
        with open(file, "rb") as handle:
            data = handle.read()
        entries.append(FileChecksum(name, len(data), hashlib.sha256(data).hexdigest()))
    entries.sort(key=lambda e: e.name)
    if output is not None:
        atomic.write_small_file(
            Path(output), format_file_manifest((e.name, e.sha256) for e in entries), replace=force
        )
    warnings = [*pipeline.warnings, *(f"{s.label}: {w}" for s, c in opened for w in c.warnings)]
    return ChecksumReport(
        shown, "files", entries, {}, sum(e.size for e in entries), elapsed(started),
        output=str(output) if output is not None else None, warnings=warnings,
    )


def _loader_files(pipeline: Pipeline, opened: list[tuple[WeightSet, Checkpoint]]) -> list[tuple[Path, str]]:
    """The pipeline's other files a load reads: its copies, each component's index and config files."""
    found = dict((name, path) for path, name in pipeline.copies)
    for weight_set, checkpoint in opened:
        if checkpoint.index_path is not None:
            found[f"{weight_set.component}/{checkpoint.index_path.name}"] = Path(str(checkpoint.index_path))
        for path, name in companions(checkpoint):
            found.setdefault(f"{weight_set.component}/{name}", Path(str(path)))
    return sorted((path, name) for name, path in found.items())
