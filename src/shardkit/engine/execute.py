"""Carry out a plan: stage, copy, hash, check the sources did not move, commit.

The only module that writes checkpoint bytes. It never opens a source for writing,
refuses destinations that are, hold or lie inside a source (:mod:`shardkit.engine.destination`),
never replaces an output without `force`, checks free space before the
first byte, and removes everything it staged if anything goes wrong (a disk that
fills up anyway, Ctrl-C). Files are not preallocated: on ext4, writing into
preallocated (unwritten) extents measured slower than plain appends.

Local bytes are written as O_DIRECT blocks (:mod:`shardkit.engine.block_writer`), each
block made by :func:`shardkit.plan.fill.fill` from the plan's steps, or, where the
destination refuses O_DIRECT, with the kernel copy (:mod:`shardkit.engine.byte_copy`) for
plain-copy steps and `fill` for the others (the header, converted tensors).

Sources may be remote: the file is then made by `fill` in chunks, several at once
(parallel ranged reads), and written in order. An `s3://` destination is written
by :mod:`shardkit.engine.execute_s3` as multipart uploads instead of staged files.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Collection, Sequence
from pathlib import Path

from .. import storage
from ..checkpoint.manifest import format_file_manifest
from ..errors import OutputError, ShardkitError, WriteError
from ..plan.files import Copy, Plan, PlannedFile
from ..plan.fill import CAST_READ, SCRATCH, CastLog, Read, fill, ordered_chunks
from . import atomic, block_writer
from .byte_copy import RangeCopier
from .destination import Sources, check_destination, refuse_unexpected, unexpected_entries
from .read_ahead import will_need
from .source_files import SourceFiles
from .source_reads import RangeSources, check_sources_unchanged, stream_workers
from .source_stream import SourceStream
from .written import WrittenFile, checksum_file_name, written_names

#: Room kept free beyond the output's size for metadata and the filesystem itself.
SPACE_MARGIN = 16 * 1024 * 1024


def check_free_space(folder: Path, needed: int) -> None:
    stats = os.statvfs(folder)
    free = stats.f_bavail * stats.f_frsize
    if free < needed + SPACE_MARGIN:
        raise WriteError(
            f"{folder}: not enough free space: the output needs {needed} bytes, {free} are available"
        )


def execute(
    plan: Plan,
    dest: storage.Location,
    *,
    as_folder: bool,
    force: bool = False,
    sha256: bool = False,
    progress: Callable[[int], None] | None = None,
    log: CastLog | None = None,
    protect: Sources | None = None,
    before_commit: Callable[[storage.Location], None] | None = None,
) -> list[WrittenFile]:
    """Write `plan` to `dest` (a file, or a folder holding all planned files).

    The cast statistics of converted tensors go into `log`. `protect` names what must
    never be touched beyond the plan's sources and copied files (the source folder and
    index; see :mod:`shardkit.engine.destination`). `before_commit` is called with the staged
    output once it is complete and fsynced (in S3: complete under its staging prefix),
    before it replaces anything: an exception there (a failed verification, Ctrl-C)
    discards it.
    """
    if not as_folder and len(plan.files) != 1:
        raise ValueError("a single-file destination needs a plan with exactly one file")
    log = log if log is not None else CastLog()
    sources = plan.sources
    if not isinstance(dest, Path):
        from .execute_s3 import execute_s3

        return execute_s3(
            plan, storage.as_remote(dest), as_folder=as_folder, force=force, sha256=sha256, progress=progress, log=log,
            protect=_everything_read(plan, protect), before_commit=before_commit,
        )
    protect = _everything_read(plan, protect)
    check_destination(dest, protect, force=force, as_folder=as_folder, writes=written_names(plan, sha256))
    atomic.clean(dest.parent, dest.name)
    check_free_space(dest.parent, plan.total_bytes + sum(c.source.stat().st_size for c in plan.copies))

    staged = atomic.temp_name(dest)
    try:
        if as_folder:
            staged.mkdir()
            written = _write_files(plan.files, staged, sha256, progress, log)
            _write_extras(plan, staged, written)
            atomic.fsync_path(staged)
        else:
            written = _write_group(plan.files, [staged], sha256, progress, log)
        check_sources_unchanged(sources)
        if before_commit is not None:
            before_commit(staged)
        commit_output(staged, dest, force, written_names(plan, sha256))
    except ShardkitError:  # before OSError: OutputExistsError is a FileExistsError too
        atomic.remove(staged)
        raise
    except OSError as exc:
        atomic.remove(staged)
        check_sources_unchanged(sources)  # a source that shrank mid-copy is the cause, not the write
        raise _write_error(exc, dest) from None
    except BaseException:
        atomic.remove(staged)
        raise
    return written


def _everything_read(plan: Plan, protect: Sources | None) -> Sources:
    """`protect` plus the plan's sources and the companion files it copies."""
    read = tuple(storage.lookup(s.path) for s in plan.sources) + tuple(c.source for c in plan.copies)
    return Sources(read + (protect.files if protect else ()), protect.folder if protect else None)


def commit_output(staged: Path, dest: Path, force: bool, writes: Collection[str]) -> None:
    """Move the staged output into place. With `force`, the folder it replaces is checked
    again right before it is deleted: what was added to it while this run wrote (a
    user's file, another tool's output) makes the commit refuse and stay undone."""

    def still_only_shardkit_files(old: Path) -> None:  # nothing was added to it since the check
        refuse_unexpected(dest, unexpected_entries(old, writes))

    atomic.commit(staged, dest, replace=force, check_old=still_only_shardkit_files)


def _write_error(exc: OSError, dest: Path) -> WriteError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return WriteError(f"{dest}: no space left on device; nothing was written")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return WriteError(f"{dest}: cannot write there: {exc.strerror}")
    return WriteError(f"{dest}: {exc.strerror or exc}")


#: Output files written by one block stream; bounds the open descriptors of a split
#: into thousands of small shards.
FILES_PER_STREAM = 64


def _write_files(
    planned: Sequence[PlannedFile],
    folder: Path,
    sha256: bool,
    progress: Callable[[int], None] | None,
    log: CastLog,
) -> list[WrittenFile]:
    """Write the planned files into `folder`, a group of files per block stream."""
    written: list[WrittenFile] = []
    for first in range(0, len(planned), FILES_PER_STREAM):
        group = planned[first : first + FILES_PER_STREAM]
        written += _write_group(group, [folder / f.name for f in group], sha256, progress, log)
    return written


def _write_group(
    planned: Sequence[PlannedFile],
    paths: Sequence[Path],
    sha256: bool,
    progress: Callable[[int], None] | None,
    log: CastLog,
) -> list[WrittenFile]:
    fds: list[int] = []
    with contextlib.ExitStack() as closing:  # every fd is closed even if one close() fails
        sources = closing.enter_context(SourceFiles())  # opened as read: thousands of shards fit
        for path in paths:
            fds.append(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666))
            closing.callback(os.close, fds[-1])
        remote = any(storage.is_remote(source) for f in planned for source, _, _ in f.source_spans(0, f.size))
        digests = None if remote else _write_direct(fds, planned, sources, sha256, progress, log)
        if digests is None:  # remote sources, or a destination that refuses O_DIRECT
            digests = [_copy_with_kernel(fd, f, sources, sha256, progress, log) for fd, f in zip(fds, planned)]
        for fd in fds:
            os.fsync(fd)
    return [WrittenFile(f.name, f.size, len(f.tensors), digest) for f, digest in zip(planned, digests)]


def copy_method() -> str:
    """How local bytes are written: `SHARDKIT_COPY_METHOD` = auto (default), direct or kernel.

    auto writes O_DIRECT blocks where the destination accepts them and falls back to the
    kernel copy elsewhere; the other two force one path (tests and benchmarks use them).
    """
    method = os.environ.get("SHARDKIT_COPY_METHOD", "auto")
    if method not in ("auto", "direct", "kernel"):
        raise OutputError(f"SHARDKIT_COPY_METHOD={method!r}: expected auto, direct or kernel")
    return method


#: Threads converting each block: the block workers share the cores between them.
CAST_WORKERS = max(1, (os.cpu_count() or 1) // block_writer.WORKERS)
#: Source bytes per cast call: L2-sized pieces (see CAST_READ) where one thread converts;
#: split over several threads, a call needs enough for each thread's share.
CAST_PIECE = CAST_READ if CAST_WORKERS == 1 else SCRATCH


def _write_direct(
    fds: Sequence[int],
    planned: Sequence[PlannedFile],
    sources: SourceFiles,
    sha256: bool,
    progress: Callable[[int], None] | None,
    log: CastLog,
) -> list[str | None] | None:
    """The O_DIRECT block stream; None (outputs emptied again) where the destination refuses it."""
    method = copy_method()
    try:
        if method == "kernel" or not all(block_writer.enable(fd) for fd in fds):
            raise block_writer.DirectIOUnavailable("O_DIRECT not enabled on the output")
        hashers = [hashlib.sha256() if sha256 else None for _ in planned]
        with SourceStream(planned, block_writer.BLOCK, sources) as stream:
            outputs = [
                direct_output(fd, f, hasher, sources, log, stream, which)
                for which, (fd, f, hasher) in enumerate(zip(fds, planned, hashers))
            ]
            block_writer.write_files(outputs, on_progress=progress, on_stop=stream.abort)
    except block_writer.DirectIOUnavailable as exc:
        if method == "direct":
            refused = f"the destination filesystem refuses O_DIRECT writes ({exc})"
            raise OutputError(f"{planned[0].name}: {refused}") from None
        for fd in fds:
            block_writer.disable(fd)
            os.ftruncate(fd, 0)
        return None
    return [hasher.hexdigest() if hasher else None for hasher in hashers]


def direct_output(
    fd: int,
    planned: PlannedFile,
    hasher: hashlib._Hash | None,
    sources: SourceFiles,
    log: CastLog,
    stream: SourceStream | None = None,
    which: int = 0,
) -> block_writer.Output:
    """A planned file (output number `which` of `stream`) as a block-writer output:
    every block made by `fill` from its steps, a converted block's sources read from
    `stream`, the others' from the page cache, hinted ahead."""

    def make(start: int, into: memoryview, read: Read) -> None:
        log.add(fill(planned, start, into, read, workers=CAST_WORKERS, cast_read=CAST_PIECE))

    def fill_block(start: int, into: memoryview) -> None:
        if stream is not None and stream.streams(which, start):
            stream.fill(which, start, into, make)
        else:
            make(start, into, sources.read_into)

    def read_ahead(start: int, end: int) -> None:
        if stream is not None and stream.streams(which, start):
            return  # read by the stream, with O_DIRECT: the page cache would read it twice
        for source, offset, length in planned.source_spans(start, end):
            with sources.use(source) as source_fd:
                will_need(source_fd, offset, length)

    return block_writer.Output(fd, planned.size, fill_block, hasher, read_ahead)


def _copy_with_kernel(
    fd: int,
    planned: PlannedFile,
    sources: SourceFiles,
    sha256: bool,
    progress: Callable[[int], None] | None,
    log: CastLog,
) -> str | None:
    """The kernel copy (copy_file_range, sendfile, reads) for plain copies, `fill` for the
    rest; and the path for remote sources, whose bytes are all made by `fill`."""
    hasher = hashlib.sha256() if sha256 else None
    copier = RangeCopier(fd, hasher=hasher, on_progress=progress)
    try:
        if any(storage.is_remote(source) for source, _, _ in planned.source_spans(0, planned.size)):
            with RangeSources([planned]) as remote:
                _write_made(copier, planned, remote.read, 0, planned.size, log)
        else:
            read = sources.read_into
            for run_start, run_end, copies in _runs(planned):
                if copies:
                    for step in copies:
                        with sources.use(step.source) as source_fd:
                            copier.copy(source_fd, step.source_offset, step.offset, step.length)
                else:
                    _write_made(copier, planned, read, run_start, run_end, log)
    finally:
        copier.close()
    return hasher.hexdigest() if hasher else None


def _runs(planned: PlannedFile) -> list[tuple[int, int, list[Copy]]]:
    """The file as alternating runs: plain copies (a list), and bytes `fill` makes (none)."""
    runs: list[tuple[int, int, list[Copy]]] = []
    for step in planned.steps:
        is_copy = isinstance(step, Copy)
        if runs and bool(runs[-1][2]) == is_copy:
            start, _, copies = runs[-1]
            runs[-1] = (start, step.offset + step.length, copies)
        else:
            runs.append((step.offset, step.offset + step.length, []))
        if is_copy:
            runs[-1][2].append(step)  # type: ignore[arg-type]
    return runs


def _write_made(copier: RangeCopier, planned: PlannedFile, read: Read, start: int, end: int, log: CastLog) -> None:
    """Bytes [start, end) made by `fill`, several chunks at once, written in file order."""
    remote = any(storage.is_remote(source) for source, _, _ in planned.source_spans(start, end))
    workers = stream_workers(remote)
    offset = start
    for chunk in ordered_chunks(planned, read, start=start, end=end, workers=workers, log=log):
        copier.write(chunk, offset)
        offset += len(chunk)


def _write_extras(plan: Plan, staged: Path, written: list[WrittenFile]) -> None:
    """Companion files, then the index, then the checksum file (the plan's write order)."""
    for copy in plan.copies:
        target = staged / copy.name
        target.parent.mkdir(parents=True, exist_ok=True)
        if copy.data is not None:
            target.write_bytes(copy.data)
        elif storage.is_remote(copy.source):
            target.write_bytes(storage.read_bytes(copy.source))
        else:
            shutil.copyfile(copy.source, target)
        _fsync_file(target)
    if plan.index is not None:
        text = json.dumps(plan.index.document, indent=2, sort_keys=True) + "\n"
        atomic.write_synced(staged / plan.index.name, text)
    sums = [(w.name, w.sha256) for w in written if w.sha256]
    if sums:
        atomic.write_synced(staged / checksum_file_name(plan), format_file_manifest(sums))


def write_checksum_beside(dest: storage.Location, written: WrittenFile, *, force: bool = True) -> storage.Location:
    """`model.safetensors.sha256` next to a single-file output, atomically; without
    `force` it never replaces one that appeared meanwhile."""
    path = dest.with_name(dest.name + ".sha256")
    assert written.sha256 is not None, "only a hashed output has a checksum file"
    manifest = format_file_manifest([(dest.name, written.sha256)])
    if not isinstance(path, Path):
        from ..storage.s3 import S3Path
        from .execute_s3 import put_bytes

        if not isinstance(path, S3Path):  # as_path(output=True) refused the others already
            raise OutputError(f"{path}: cannot write there; outputs go to a local path or an s3:// URL")
        put_bytes(path, manifest.encode(), replace=force)
        return path
    atomic.write_small_file(path, manifest, replace=force)
    return path


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
