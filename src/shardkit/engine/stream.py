"""Parallel ranged reads delivered in order, in bounded memory.

Remote stores are fast only with several requests in flight; writers (a local file
being hashed, a multipart upload) want bytes in file order. `ordered_reads` runs the
reads on a small thread pool, keeps at most `max_buffered` bytes requested but not yet
consumed, and yields each chunk in the order given, so the caller writes and hashes
sequentially while the pool fetches ahead.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

from ..storage.location import Location, RangeReader
from .hashing import DigestPass, Digests, Streamer

if TYPE_CHECKING:
    from ..storage.remote import RemotePath

CHUNK = 8 * 1024 * 1024
WORKERS = 8
#: Bytes requested ahead of the writer, at most: as many as the workers fetch at once, so
#: a merge from S3 stays near 180 MB of RSS (a larger lead did not run faster).
MAX_BUFFERED = WORKERS * CHUNK


def chunked(
    pieces: Iterable[tuple[RangeReader, int, int]], chunk: int = CHUNK
) -> Iterator[tuple[RangeReader, int, int]]:
    for reader, offset, length in pieces:
        done = 0
        while done < length:
            step = min(chunk, length - done)
            yield reader, offset + done, step
            done += step


def ordered_reads(
    pieces: Iterable[tuple[RangeReader, int, int]],
    *,
    workers: int = WORKERS,
    chunk: int = CHUNK,
    max_buffered: int = MAX_BUFFERED,
) -> Iterator[bytes]:
    """The bytes of each (reader, offset, length) piece, in order, read `workers` at a time."""
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="shardkit-read")
    pending: deque[tuple[Future[bytes], int]] = deque()
    in_flight = 0
    try:
        for reader, offset, length in chunked(pieces, chunk):
            while pending and in_flight + length > max_buffered:
                future, size = pending.popleft()
                in_flight -= size
                yield future.result()
            pending.append((pool.submit(reader.read, offset, length), length))
            in_flight += length
        while pending:
            future, _ = pending.popleft()
            yield future.result()
    finally:
        # Stop fetching ahead; reads already running finish (each at most one chunk).
        pool.shutdown(wait=True, cancel_futures=True)


def digest_file(
    streamer: Streamer,
    path: str | os.PathLike[str] | Location,
    *,
    whole: bool = True,
    ranges: Sequence[tuple[int, int]] = (),
    on_bytes: Callable[[int], None] | None = None,
) -> Digests:
    """Digests of a local file (with `streamer`) or a remote one (with ranged reads)."""
    from ..storage import lookup

    location = lookup(path)
    if isinstance(location, os.PathLike):
        return streamer.digest(location, whole=whole, ranges=ranges, on_bytes=on_bytes)
    return digest(location, whole=whole, ranges=ranges, on_bytes=on_bytes)


def digest(
    path: RemotePath,
    *,
    whole: bool = True,
    ranges: Sequence[tuple[int, int]] = (),
    on_bytes: Callable[[int], None] | None = None,
) -> Digests:
    """`hashing.Streamer.digest` for a remote file: the same digests, fetched with parallel
    ranged reads and hashed in order."""
    hashing = DigestPass(path.stat().st_size, whole=whole, ranges=ranges)
    reader = path.open_reader()
    offset = hashing.start
    try:
        for chunk in ordered_reads([(reader, hashing.start, hashing.end - hashing.start)]):
            hashing.update(memoryview(chunk), offset)
            offset += len(chunk)
            if on_bytes is not None:
                on_bytes(len(chunk))
    finally:
        reader.close()
    return hashing.digests()
