"""`shardkit checksum`: a manifest that lets anyone downstream prove they hold the same bytes.

Two kinds. The default is `sha256sum` text over the checkpoint's weight files, names
relative to the checkpoint folder, so `cd model && sha256sum -c SHA256SUMS` checks it
without shardkit. `tensors=True` writes a JSON manifest of each tensor's dtype, shape
and data SHA-256, which survives merge and split because it never mentions files.
The checkpoint is validated (headers, index cross-checks) before anything is hashed:
a manifest must never bless a broken checkpoint.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from .. import atomic, storage
from ..checkpoint import Checkpoint, open_checkpoint
from ..errors import OutputError, OutputExistsError
from ..hashing import Streamer
from ..manifest import TensorDigest, format_file_manifest, format_tensor_manifest, tensor_manifest_document
from ..pipeline import find_pipeline
from ..reports import JsonReport
from ..storage import stream
from .writing import ProgressCallback


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
    progress: ProgressCallback | None = None,
) -> ChecksumReport:
    """Hash the checkpoint at `path`; with `output`, also write the manifest there.

    The manifest lists every weight file's SHA-256 in `sha256sum` format, names
    relative to the checkpoint folder; with `tensors`, one SHA-256 per tensor instead
    (JSON), which stays valid across merge and split. `output` is replaced only with
    `force`, and never if it is one of the checkpoint's weight files. `strict` also
    refuses what the format forbids but the reference reader tolerates;
    `progress(advance, total)` is called with the bytes just hashed.

    Example::

        shardkit.checksum("model", output="model/SHA256SUMS")
    """
    started = time.perf_counter()
    location = storage.as_path(path)
    shown = storage.display(path) if isinstance(path, str) and "://" in path else str(location)
    pipeline = find_pipeline(location)
    if pipeline is not None:  # a diffusers pipeline: one manifest for every component
        from .pipeline import checksum_pipeline

        return checksum_pipeline(  # type: ignore[return-value]
            pipeline, shown, tensors=tensors, output=output, force=force, strict=strict, progress=progress
        )
    checkpoint = open_checkpoint(location, strict=strict)
    if output is not None:
        _check_output(Path(output), checkpoint, force)
    if tensors:
        digests = tensor_digests(checkpoint, progress)
        files: list[FileChecksum] = []
        total = checkpoint.total_bytes
    else:
        files = file_checksums(checkpoint, progress)
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
    )
    if output is not None:
        _write_atomically(Path(output), report.manifest())
    return dataclasses.replace(report, seconds=round(time.perf_counter() - started, 6))


def file_checksums(checkpoint: Checkpoint, progress: ProgressCallback | None = None) -> list[FileChecksum]:
    """SHA-256 of each weight file, named relative to the checkpoint folder."""
    shards = sorted(checkpoint.shards, key=lambda h: h.path)
    total = sum(h.file_size for h in shards)
    on_bytes = (lambda step: progress(step, total)) if progress is not None else None
    result = []
    with Streamer() as streamer:
        for header in shards:
            digest = stream.digest_file(streamer, header.path, on_bytes=on_bytes).file
            assert digest is not None
            name = manifest_name(storage.lookup(header.path), checkpoint.root)  # type: ignore[arg-type]
            result.append(FileChecksum(name, header.file_size, digest))
    return result


def tensor_digests(checkpoint: Checkpoint, progress: ProgressCallback | None = None) -> dict[str, TensorDigest]:
    """dtype, shape and data SHA-256 of every tensor; each file is read once, in order."""
    total = checkpoint.total_bytes
    on_bytes = (lambda step: progress(step, total)) if progress is not None else None
    digests: dict[str, TensorDigest] = {}
    with Streamer() as streamer:
        for header in checkpoint.shards:
            ranges = [(header.data_start + t.begin, header.data_start + t.end) for t in header.tensors]
            hashes = stream.digest_file(streamer, header.path, whole=False, ranges=ranges, on_bytes=on_bytes).ranges
            for info, digest in zip(header.tensors, hashes):
                digests[info.name] = TensorDigest(info.dtype, info.shape, digest)
    return dict(sorted(digests.items()))


def manifest_name(file: Path, root: Path) -> str:
    """How a manifest names `file`: relative to the checkpoint folder, '/'-separated."""
    try:
        return file.relative_to(root).as_posix()
    except ValueError:
        return file.as_posix()


def _check_output(output: Path, checkpoint: Checkpoint, force: bool) -> None:
    resolved = output.resolve()
    if any(resolved == p.resolve() for p in checkpoint.weight_files) or output.name.endswith(".safetensors"):
        raise OutputError(f"{output}: refusing to write a checksum manifest over a weight file")
    if output.is_dir():
        raise OutputError(f"{output}: is a folder; give the manifest's file name (e.g. {output}/SHA256SUMS)")
    if output.exists() and not force:
        raise OutputExistsError(output)
    if not output.parent.is_dir():
        raise OutputError(f"{output}: parent folder {output.parent} does not exist")


def _write_atomically(path: Path, text: str) -> None:
    staged = atomic.temp_name(path)
    try:
        with open(staged, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(staged, path)
    except BaseException:
        atomic.remove(staged)
        raise
