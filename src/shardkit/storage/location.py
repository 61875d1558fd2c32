"""What every kind of location offers, below the kinds themselves (`remote`, `s3`, `http`, `hf`).

The kinds import this module and never the package `__init__`, which picks the kind
for a path and imports them in turn: so there is no import circle in `storage`.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from typing import Protocol


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
        data = os.pread(self.fd, length, offset)
        if len(data) == length:
            return data
        buffer = bytearray(length)  # a short read: the rest read into place, as everywhere
        buffer[: len(data)] = data
        read_exactly(self.fd, memoryview(buffer)[len(data) :], offset + len(data), self.path)
        return bytes(buffer)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def read_exactly(fd: int, target: memoryview, offset: int, path: str | None = None) -> None:
    """Fill `target` from `fd` at `offset`: pread returns less than asked near a signal or
    on some filesystems, so read until full; a file that ends first has shrunk (EIO)."""
    filled = 0
    while filled < len(target):
        got = os.preadv(fd, [target[filled:]], offset + filled)
        if got == 0:
            raise OSError(errno.EIO, f"source ended early at offset {offset + filled} (file shrank?)", path)
        filled += got
