"""What every kind of location offers, below the kinds themselves (`remote`, `s3`, `http`, `hf`).

The kinds import this module and never the package `__init__`, which picks the kind
for a path and imports them in turn: so there is no import circle in `storage`.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any, Protocol


class FileStat(Protocol):
    """What `Location.stat()` answers: `os.stat_result` locally, a `RemoteStat` remotely."""

    @property
    def st_size(self) -> int: ...


class Location(Protocol):
    """A place a checkpoint's files are: a local :class:`pathlib.Path` or a
    :class:`~shardkit.storage.remote.RemotePath` (`s3://`, `http(s)://`, `hf://`).

    This is the part of the path API that discovery, the cross-checks, comparison and
    the executors use; both kinds implement it, so the code above storage is written
    once. What only one kind can do (open a descriptor, list a bucket) is asked after
    `isinstance(location, Path)` or `storage.is_remote(location)`.
    """

    @property
    def name(self) -> str: ...

    @property
    def parent(self) -> Location: ...

    def __truediv__(self, name: str, /) -> Location: ...

    def with_name(self, name: str, /) -> Location: ...

    def relative_to(self, other: str, /) -> PurePath: ...

    def as_posix(self) -> str: ...

    def resolve(self) -> Location: ...

    def exists(self) -> bool: ...

    def is_file(self) -> bool: ...

    def is_dir(self) -> bool: ...

    def is_symlink(self) -> bool: ...

    def stat(self) -> FileStat: ...

    def iterdir(self) -> Iterator[Location]: ...

    def glob(self, pattern: str, /) -> Iterator[Location]: ...

    def read_bytes(self) -> bytes: ...

    def read_text(self, encoding: str = ...) -> str: ...

    def __lt__(self, other: Any, /) -> bool: ...  # locations sort (by name)


@dataclass(frozen=True)
class Traffic:
    """What the client exchanged with the store: requests, body bytes each way, and the
    bytes the store copied by itself (UploadPartCopy, CopyObject)."""

    requests: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    bytes_copied: int = 0

    def __add__(self, other: Traffic) -> Traffic:
        return Traffic(
            self.requests + other.requests, self.bytes_sent + other.bytes_sent,
            self.bytes_received + other.bytes_received, self.bytes_copied + other.bytes_copied,
        )

    def __sub__(self, other: Traffic) -> Traffic:
        return Traffic(
            self.requests - other.requests, self.bytes_sent - other.bytes_sent,
            self.bytes_received - other.bytes_received, self.bytes_copied - other.bytes_copied,
        )


class SeenFile(Protocol):
    """A file as seen when its header was read: a `Header`, or a plan's `Source`."""

    @property
    def path(self) -> str: ...

    @property
    def stat(self) -> tuple[object, ...] | None: ...


class RangeReader(Protocol):
    """Random access to one file's bytes. `read` returns exactly `length` bytes or raises;
    remote readers are safe to share between threads."""

    def read(self, offset: int, length: int) -> bytes: ...

    def close(self) -> None: ...


class LocalReader:
    """A local file read with pread: positionless, so threads can share it."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = str(path)
        self.fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))

    def read(self, offset: int, length: int) -> bytes:
        return pread_exactly(self.fd, offset, length, self.path)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def pread_exactly(fd: int, offset: int, length: int, path: str | None = None) -> bytes:
    """`length` bytes of `fd` at `offset`, as :func:`read_exactly` reads them."""
    data = os.pread(fd, length, offset)
    if len(data) == length:
        return data
    buffer = bytearray(length)  # a short read: the rest read into place, as everywhere
    buffer[: len(data)] = data
    read_exactly(fd, memoryview(buffer)[len(data) :], offset + len(data), path)
    return bytes(buffer)


def read_exactly(fd: int, target: memoryview, offset: int, path: str | None = None) -> None:
    """Fill `target` from `fd` at `offset`: pread returns less than asked near a signal or
    on some filesystems, so read until full; a file that ends first has shrunk (EIO)."""
    filled = 0
    while filled < len(target):
        got = os.preadv(fd, [target[filled:]], offset + filled)
        if got == 0:
            raise OSError(errno.EIO, f"source ended early at offset {offset + filled} (file shrank?)", path)
        filled += got
