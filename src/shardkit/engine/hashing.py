"""SHA-256 of files and of byte ranges inside them, at `sha256sum` speed, in constant memory.

One file is read front to back in large chunks into two reused buffers while a second
thread hashes the chunk before (hashlib releases the GIL, so the two overlap): the
run takes as long as the slower of reading and hashing, not their sum. The same pass
can feed a whole-file digest and one digest per byte range (per tensor), so a file is
read once whatever is asked of it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from ..storage.location import read_exactly

#: Large reads keep a cold disk streaming; two such buffers are all the memory hashing takes.
CHUNK = 16 * 1024 * 1024


@dataclass(frozen=True)
class Digests:
    """What one pass over a file produced: the whole file's SHA-256 (if asked) and one
    per requested range, in the order the ranges were given."""

    file: str | None
    ranges: list[str] = field(default_factory=list)
    bytes_read: int = 0


class Streamer:
    """Reads files in chunks on the calling thread and hashes on one worker thread.

    Reuse one streamer for many files (its buffers and thread are kept); close it, or
    use it as a context manager, when done.
    """

    def __init__(self, chunk: int = CHUNK) -> None:
        self.chunk = chunk
        self._buffers = [bytearray(chunk), bytearray(chunk)]
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shardkit-hash")

    def __enter__(self) -> Streamer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def digest(
        self,
        path: str | os.PathLike[str],
        *,
        whole: bool = True,
        ranges: Sequence[tuple[int, int]] = (),
        on_bytes: Callable[[int], None] | None = None,
    ) -> Digests:
        """Hash the whole file and/or each `(begin, end)` range (absolute offsets, sorted,
        non-overlapping). Without `whole`, only the bytes the ranges span are read."""
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            _advise_sequential(fd)
            hashing = DigestPass(os.fstat(fd).st_size, whole=whole, ranges=ranges)
            self._walk(fd, hashing.start, hashing.end, hashing.update, on_bytes, str(path))
        finally:
            os.close(fd)
        return hashing.digests()

    def _walk(
        self,
        fd: int,
        start: int,
        end: int,
        consume: Callable[[memoryview, int], None],
        on_bytes: Callable[[int], None] | None,
        path: str,
    ) -> None:
        """Read [start, end) into alternating buffers; `consume(view, offset)` runs on the
        worker, in file order. A buffer is refilled only once its previous chunk is hashed."""
        pending: list[Future[None] | None] = [None, None]
        slot = 0
        offset = start
        try:
            while offset < end:
                step = min(self.chunk, end - offset)
                previous = pending[slot]
                if previous is not None:
                    previous.result()
                view = _read_into(fd, self._buffers[slot], offset, step, path)
                pending[slot] = self._pool.submit(consume, view, offset)
                if on_bytes is not None:
                    on_bytes(step)
                offset += step
                slot ^= 1
        finally:
            # Never return while the worker still reads a buffer the next call will refill.
            for future in pending:
                if future is not None:
                    future.result()


class DigestPass:
    """One front-to-back pass over a file: the span it must read (the whole file, or only
    what `ranges` cover) and the digests it feeds, for local and remote readers alike."""

    def __init__(self, size: int, *, whole: bool, ranges: Sequence[tuple[int, int]]) -> None:
        self._file = hashlib.sha256() if whole else None
        self._ranges = RangeHashers(ranges)
        if whole:
            self.start, self.end = 0, size
        elif ranges:
            self.start, self.end = ranges[0][0], ranges[-1][1]
        else:
            self.start = self.end = 0

    def update(self, view: memoryview, offset: int) -> None:
        """Hash the bytes read at `offset` (passes call it in file order)."""
        if self._file is not None:
            self._file.update(view)
        self._ranges.update(view, offset)

    def digests(self) -> Digests:
        return Digests(self._file.hexdigest() if self._file else None, self._ranges.hexdigests(), self.end - self.start)


class RangeHashers:
    """One SHA-256 per range; routes each chunk's bytes to the ranges it overlaps."""

    def __init__(self, ranges: Sequence[tuple[int, int]]) -> None:
        self.ranges = list(ranges)
        self.hashers = [hashlib.sha256() for _ in self.ranges]
        self._next = 0  # first range not yet fully hashed

    def update(self, view: memoryview, offset: int) -> None:
        chunk_end = offset + len(view)
        index = self._next
        while index < len(self.ranges):
            begin, end = self.ranges[index]
            if begin >= chunk_end:
                break
            low, high = max(begin, offset), min(end, chunk_end)
            if high > low:
                self.hashers[index].update(view[low - offset : high - offset])
            if end > chunk_end:
                break
            index += 1
        self._next = index

    def hexdigests(self) -> list[str]:
        return [h.hexdigest() for h in self.hashers]


def _read_into(fd: int, buffer: bytearray, offset: int, length: int, path: str) -> memoryview:
    view = memoryview(buffer)[:length]
    read_exactly(fd, view, offset, path)
    return view


def _advise_sequential(fd: int) -> None:
    """Ask for aggressive read-ahead: a cold file then streams at disk speed."""
    if hasattr(os, "posix_fadvise"):
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        except OSError:
            pass


def sha256_file(path: str | os.PathLike[str], on_bytes: Callable[[int], None] | None = None) -> str:
    """The SHA-256 `sha256sum` prints for `path`."""
    with Streamer() as streamer:
        digest = streamer.digest(Path(path), on_bytes=on_bytes).file
    assert digest is not None
    return digest
