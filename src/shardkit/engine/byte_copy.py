"""Moving bytes between files through the kernel, in constant memory.

The fallback copy: local outputs are normally written by :mod:`shardkit.engine.block_writer`
(O_DIRECT blocks); this path serves destinations that refuse O_DIRECT and outputs
fed from remote sources (:func:`RangeCopier.write` of fetched chunks).

`os.copy_file_range` lets the kernel move the data without it ever entering this
process; where the kernel or filesystem refuses (EXDEV on old kernels, ENOSYS,
EINVAL, EOPNOTSUPP) we fall back to `os.sendfile`, then to plain reads into one
reused buffer. With hashing on, the data must pass through user space anyway, so it
is read once into a buffer, written, and hashed on a second thread meanwhile.

Write-back is paced with `sync_file_range`: each chunk is handed to the disk as soon
as it is written, and only chunks well behind are waited for, so the final fsync
finds little left to do and dirty memory stays bounded.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Protocol

from ..storage.location import read_exactly

CHUNK = 16 * 1024 * 1024
HASH_CHUNK = 8 * 1024 * 1024
_FALLBACK_ERRNOS = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF, errno.ETXTBSY}

_SYNC_FILE_RANGE_WAIT_BEFORE = 1
_SYNC_FILE_RANGE_WRITE = 2
_SYNC_FILE_RANGE_WAIT_AFTER = 4


class Hasher(Protocol):
    def update(self, data: bytes | memoryview, /) -> None: ...


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        function = ctypes.CDLL(name, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    function.restype = ctypes.c_int
    return function


_sync_file_range = _load_sync_file_range()


class WritebackPacer:
    """Starts write-back of each written chunk at once; waits only for old chunks.

    Waiting for the chunk just before stalls the copy while the disk drains it;
    waiting `lag` chunks behind keeps the disk busy and still bounds how much dirty
    data the copy can pile up (lag × chunk size).
    """

    def __init__(self, fd: int, enabled: bool = True, lag: int = 64) -> None:
        self.fd = fd
        self.enabled = enabled and _sync_file_range is not None
        self.lag = lag
        self._pending: deque[tuple[int, int]] = deque()

    def written(self, offset: int, length: int) -> None:
        if not self.enabled or length == 0:
            return
        assert _sync_file_range is not None
        if _sync_file_range(self.fd, offset, length, _SYNC_FILE_RANGE_WRITE) != 0:
            self.enabled = False  # e.g. a filesystem that does not support it
            return
        self._pending.append((offset, length))
        if len(self._pending) > self.lag:
            before, size = self._pending.popleft()
            flags = _SYNC_FILE_RANGE_WAIT_BEFORE | _SYNC_FILE_RANGE_WRITE | _SYNC_FILE_RANGE_WAIT_AFTER
            _sync_file_range(self.fd, before, size, flags)


class RangeCopier:
    """Copies byte ranges into one destination file; remembers which method works."""

    def __init__(
        self,
        dst_fd: int,
        *,
        hasher: Hasher | None = None,
        on_progress: Callable[[int], None] | None = None,
        pace_writeback: bool = True,
    ) -> None:
        self.dst_fd = dst_fd
        self.hasher = hasher
        self.on_progress = on_progress
        self.pacer = WritebackPacer(dst_fd, pace_writeback)
        self.method = "copy_file_range" if hasattr(os, "copy_file_range") else "sendfile"
        self._pool: ThreadPoolExecutor | None = None
        self._buffers: list[bytearray] = []

    def write(self, data: bytes, dest_offset: int) -> None:
        """Write bytes this process made (a header) at `dest_offset`."""
        view = memoryview(data)
        while view:
            written = os.pwrite(self.dst_fd, view, dest_offset)
            view, dest_offset = view[written:], dest_offset + written
        if self.hasher is not None:
            self.hasher.update(data)
        self._advance(dest_offset - len(data), len(data))

    def copy(self, src_fd: int, src_offset: int, dest_offset: int, length: int) -> None:
        if self.hasher is not None:
            self._copy_hashing(src_fd, src_offset, dest_offset, length)
            return
        while length > 0:
            step = min(CHUNK, length)
            done = self._copy_chunk(src_fd, src_offset, dest_offset, step)
            self._advance(dest_offset, done)
            src_offset, dest_offset, length = src_offset + done, dest_offset + done, length - done

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    # ------------------------------------------------------------------ internals

    def _advance(self, offset: int, length: int) -> None:
        self.pacer.written(offset, length)
        if self.on_progress is not None:
            self.on_progress(length)

    def _copy_chunk(self, src_fd: int, src_offset: int, dest_offset: int, length: int) -> int:
        """Copy up to `length` bytes with the best method that works; returns bytes copied."""
        if self.method == "copy_file_range":
            try:
                done = os.copy_file_range(src_fd, self.dst_fd, length, src_offset, dest_offset)
            except OSError as exc:
                if exc.errno not in _FALLBACK_ERRNOS:
                    raise
                self.method = "sendfile"
            else:
                return self._check_progress(done, src_offset)
        if self.method == "sendfile":
            try:
                os.lseek(self.dst_fd, dest_offset, os.SEEK_SET)
                done = os.sendfile(self.dst_fd, src_fd, src_offset, length)
            except OSError as exc:
                if exc.errno not in _FALLBACK_ERRNOS:
                    raise
                self.method = "read"
            else:
                return self._check_progress(done, src_offset)
        return self._copy_read(src_fd, src_offset, dest_offset, min(length, HASH_CHUNK))

    @staticmethod
    def _check_progress(done: int, src_offset: int) -> int:
        if done == 0:
            raise OSError(errno.EIO, f"source ended early at offset {src_offset} (file shrank?)")
        return done

    def _buffer(self, slot: int) -> bytearray:
        while len(self._buffers) <= slot:
            self._buffers.append(bytearray(HASH_CHUNK))
        return self._buffers[slot]

    def _read_into(self, src_fd: int, buffer: bytearray, src_offset: int, length: int) -> memoryview:
        view = memoryview(buffer)[:length]
        read_exactly(src_fd, view, src_offset)
        return view

    def _write_all(self, view: memoryview, dest_offset: int) -> None:
        while view:
            written = os.pwrite(self.dst_fd, view, dest_offset)
            view, dest_offset = view[written:], dest_offset + written

    def _copy_read(self, src_fd: int, src_offset: int, dest_offset: int, length: int) -> int:
        view = self._read_into(src_fd, self._buffer(0), src_offset, length)
        self._write_all(view, dest_offset)
        return length

    def _copy_hashing(self, src_fd: int, src_offset: int, dest_offset: int, length: int) -> None:
        """Read once, then write on this thread while the other thread hashes.

        Two buffers alternate; a buffer is refilled only after its hash finished, and
        the single hashing thread keeps the updates in file order.
        """
        assert self.hasher is not None
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shardkit-hash")
        pending: list[Future[None] | None] = [None, None]
        slot = 0
        while length > 0:
            step = min(HASH_CHUNK, length)
            previous = pending[slot]
            if previous is not None:
                previous.result()
            view = self._read_into(src_fd, self._buffer(slot), src_offset, step)
            pending[slot] = self._pool.submit(self.hasher.update, view)
            self._write_all(view, dest_offset)
            self._advance(dest_offset, step)
            src_offset, dest_offset, length = src_offset + step, dest_offset + step, length - step
            slot ^= 1
        for future in pending:
            if future is not None:
                future.result()
