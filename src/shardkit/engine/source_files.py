"""Source files opened as they are needed, within a bounded number of descriptors.

Why: a checkpoint may have more shards than the process may open files (MoE models
ship thousands; `ulimit -n` is often 1,024, and 256 on some systems). Opening every
shard of a merge, split or comparison at once then fails with "Too many open files".
:class:`SourceFiles` keeps at most :attr:`SourceFiles.limit` of them open and closes
the least recently used one to make room.

The copy reads each source front to back, one after the other, so in the common case
(fewer shards than the limit, or shards read in order) every source is opened exactly
once, as before; only an access pattern that jumps between more sources than the
limit reopens files. A reopened file must still be the file first opened (same
device, inode, size and modification time): a source replaced meanwhile would mix
bytes of two files into one output.

Safe to share between threads: a descriptor in use (:meth:`SourceFiles.use`) is never
closed under its user; the block writer's two workers and its read-ahead use at most
three at a time, and a conversion's source stream (three readers) three more, which
may take the count past a limit below six for as long as they read.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial

from .. import storage
from ..errors import SourceChangedError
from ..storage import RangeReader
from ..storage.location import pread_exactly, read_exactly

#: Never fewer: the block writer's workers and read-ahead pin up to three at once (a
#: conversion's source stream up to three more, beyond the limit while it reads).
MIN_OPEN = 4
#: Never more: enough for every shard of the models people ship to stay open, while
#: leaving room under a 1,024 limit for the outputs a split writes at once.
MAX_OPEN = 64


def default_limit() -> int:
    """An eighth of the soft RLIMIT_NOFILE, within [MIN_OPEN, MAX_OPEN]."""
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, OSError, ValueError):
        return MAX_OPEN
    if soft == getattr(resource, "RLIM_INFINITY", -1) or soft < 0:
        return MAX_OPEN
    return max(MIN_OPEN, min(MAX_OPEN, soft // 8))


def _identity(fd: int) -> tuple[int, int, int, int]:
    st = os.fstat(fd)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class SourceFiles:
    """Read-only descriptors of local source files, opened on first use, LRU-bounded.

    Use as a context manager (or call :meth:`close`) so every descriptor is closed.
    """

    def __init__(self, limit: int | None = None) -> None:
        self.limit = max(MIN_OPEN, default_limit() if limit is None else limit)
        self._fds: OrderedDict[str, int] = OrderedDict()  # least recently used first
        self._users: dict[str, int] = {}
        self._identities: dict[str, tuple[int, int, int, int]] = {}
        self._remote: dict[str, RangeReader] = {}
        self._lock = threading.Lock()
        #: open() calls made, for tests and measurements: equals the number of distinct
        #: sources whenever no file had to be reopened.
        self.opens = 0

    def __enter__(self) -> SourceFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def use(self, path: str | os.PathLike[str]) -> Iterator[int]:
        """A descriptor of `path`, open (and kept open) until the block ends."""
        key = os.fspath(path)
        fd = self._acquire(key)
        try:
            yield fd
        finally:
            with self._lock:
                self._users[key] -= 1

    def read(self, path: str | os.PathLike[str], offset: int, length: int) -> bytes:
        """Exactly `length` bytes of `path` at `offset`; a file that ends early is an error."""
        with self.use(path) as fd:
            return pread_exactly(fd, offset, length, os.fspath(path))

    def read_into(self, path: str, offset: int, into: memoryview) -> None:
        """Fill `into` with the bytes of `path` from `offset`: the `read` that
        :func:`shardkit.plan.fill.fill` takes, for local sources."""
        with self.use(path) as fd:
            read_exactly(fd, into, offset, path)

    def reader(self, path: str | os.PathLike[str]) -> RangeReader:
        """A range reader of any location: a local file through these descriptors, a
        remote one (`s3://`, `http(s)://`) opened once and closed with this object."""
        if not storage.is_remote(path):
            return _LocalReader(self, os.fspath(path))
        key = str(path)
        with self._lock:
            remote = self._remote.get(key)
        if remote is None:
            remote = storage.open_reader(path)
            with self._lock:
                remote = self._remote.setdefault(key, remote)
        return remote

    def close(self) -> None:
        """Close every descriptor and remote reader, even if one close() fails."""
        with self._lock:
            fds, self._fds = list(self._fds.values()), OrderedDict()
            remotes, self._remote = list(self._remote.values()), {}
        failure: Exception | None = None
        closes: list[Callable[[], None]] = [*(partial(os.close, fd) for fd in fds), *(r.close for r in remotes)]
        for close in closes:
            try:
                close()
            except Exception as exc:  # noqa: BLE001 - re-raised once everything is closed
                failure = failure or exc
        if failure is not None:
            raise failure

    # ------------------------------------------------------------------ internals

    def _acquire(self, key: str) -> int:
        with self._lock:
            fd = self._fds.get(key)
            if fd is None:
                self._make_room()
                fd = self._open(key)
                self._fds[key] = fd
            else:
                self._fds.move_to_end(key)
            self._users[key] = self._users.get(key, 0) + 1
            return fd

    def _make_room(self) -> None:
        """Close least recently used descriptors nobody is using, down to limit - 1."""
        for key in list(self._fds):
            if len(self._fds) < self.limit:
                return
            if not self._users.get(key):
                os.close(self._fds.pop(key))

    def _open(self, key: str) -> int:
        fd = os.open(key, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        self.opens += 1
        try:
            identity = _identity(fd)
            first = self._identities.setdefault(key, identity)
        except BaseException:
            os.close(fd)
            raise
        if identity != first:
            os.close(fd)
            raise SourceChangedError(f"{key}: replaced or modified while it was being read; output discarded")
        return fd


class _LocalReader:
    """:class:`~shardkit.storage.RangeReader` of a local file whose descriptor the
    :class:`SourceFiles` holds; closing it is the SourceFiles' business."""

    def __init__(self, files: SourceFiles, path: str) -> None:
        self.files = files
        self.path = path

    def read(self, offset: int, length: int) -> bytes:
        return self.files.read(self.path, offset, length)

    def close(self) -> None:
        pass
