"""The path API of remote locations: the part of `pathlib.Path` that checkpoint discovery uses.

A remote path is a URL-shaped name (`s3://bucket/folder/model.safetensors`) plus the
store that answers for it. It does not implement `__fspath__` on purpose: handing one
to `os.open` must fail loudly, not open a local file called `s3:/…`.
"""

from __future__ import annotations

import fnmatch
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import TYPE_CHECKING

from ..errors import ShardkitError
from ..format.header import Header, parse_file

if TYPE_CHECKING:
    from typing_extensions import Self

    from .location import SeenFile

#: The first read of a header fetches this much: one request covers almost every header.
HEADER_PREFETCH = 64 * 1024


@dataclass(frozen=True)
class RemoteStat:
    """What `stat()` offers for a remote file: its size, and a version tag (ETag)."""

    st_size: int
    version: str | None = None


class RemotePath:
    """Base of `S3Path` and `HttpPath`. Subclasses define `url`, `store_key`, `_child`,
    `_parent`, `stat` (or None when missing), `_list` and `open_reader`."""

    url: str  # display form: no credentials, no signature

    # ------------------------------------------------------------------ naming

    @property
    def store_key(self) -> object:
        """What identifies the store (endpoint); two paths with equal URLs and store keys are equal."""
        raise NotImplementedError

    @property
    def name(self) -> str:
        return self.url.rstrip("/").rsplit("/", 1)[-1]

    @property
    def parent(self) -> Self:
        return self._parent()

    def __truediv__(self, name: str) -> Self:
        path = self
        for part in name.split("/"):
            if part:
                path = path._child(part)
        return path

    def _child(self, name: str) -> Self:
        raise NotImplementedError

    def _parent(self) -> Self:
        raise NotImplementedError

    def with_name(self, name: str) -> Self:
        return self.parent / name

    def relative_to(self, other: object) -> PurePosixPath:
        prefix = str(other).rstrip("/") + "/"
        if not self.url.startswith(prefix):
            raise ValueError(f"{self.url} is not inside {other}")
        return PurePosixPath(self.url[len(prefix) :])

    def as_posix(self) -> str:
        return self.url

    def resolve(self) -> RemotePath:
        return self

    def is_symlink(self) -> bool:
        return False

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RemotePath) and (self.url, self.store_key) == (other.url, other.store_key)

    def __hash__(self) -> int:
        return hash(self.url)

    def __lt__(self, other: RemotePath) -> bool:
        return self.url < other.url

    # ------------------------------------------------------------------ what is there

    def stat(self) -> RemoteStat:
        found = self.file_stat()
        if found is None:
            raise FileNotFoundError(os.strerror(2), str(self))
        return found

    def file_stat(self) -> RemoteStat | None:
        """Size and version of the file at this path, or None if there is no such file."""
        raise NotImplementedError

    def is_file(self) -> bool:
        return self.file_stat() is not None

    def is_dir(self) -> bool:
        raise NotImplementedError

    def exists(self) -> bool:
        return self.is_file() or self.is_dir()

    def iterdir(self) -> Iterator[RemotePath]:
        """Files directly in this folder (object stores have no empty folders)."""
        return iter(self._list())

    def glob(self, pattern: str) -> Iterator[RemotePath]:
        """Files directly in this folder whose name matches `pattern` (no `**`)."""
        return iter([p for p in self._list() if fnmatch.fnmatchcase(p.name, pattern)])

    def _list(self) -> list[RemotePath]:
        raise NotImplementedError

    def walk_files(self) -> Iterator[tuple[RemotePath, str]]:
        raise NotImplementedError

    # ------------------------------------------------------------------ bytes

    def read_bytes(self) -> bytes:
        raise NotImplementedError

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def open_reader(self):  # noqa: ANN201 - a RangeReader
        raise NotImplementedError

    def read_header(self, *, strict: bool = False) -> Header:
        """Validate the header with ranged reads only: the first read fetches the
        length prefix and usually the whole header; a longer header costs one more."""
        reader = self.open_reader()
        try:
            head = reader.read_prefix(HEADER_PREFETCH)
            stat = reader.stat()

            def read_at(offset: int, length: int) -> bytes:
                if offset + length <= len(head):
                    return head[offset : offset + length]
                return reader.read(offset, length)

            header = parse_file(read_at, stat.st_size, register(self), strict=strict)
        finally:
            reader.close()
        return Header(
            header.path, header.header_size, header.file_size, header.metadata, header.tensors,
            ("remote", stat.version, stat.st_size),  # type: ignore[arg-type]
        )

    def changed_since(self, header: Header | SeenFile) -> str | None:
        """Why the file no longer is the one whose header was read, or None."""
        self.forget()
        stat = self.file_stat()
        if stat is None:
            return "source disappeared during the copy"
        if header.stat is not None and ("remote", stat.version, stat.st_size) != header.stat:
            return "source changed (size or version) during the copy; output discarded"
        return None

    def forget(self) -> None:
        """Drop cached metadata, so the next question asks the store again."""


# --------------------------------------------------------------------------- the registry of remote paths

_registry: dict[str, RemotePath] = {}
_registry_lock = threading.Lock()


def register(path: RemotePath) -> str:
    """Remember `path` under its display string; returns that string (a `Header.path`)."""
    key = str(path)
    with _registry_lock:
        known = _registry.get(key)
        if known is not None and known.store_key != path.store_key:
            # Two stores answering to one URL in one process: say so rather than mix them up.
            raise ShardkitError(f"{key}: names objects in two different stores in one run; use one endpoint")
        _registry[key] = path
    return key


def registered(key: str) -> RemotePath | None:
    """The remote path registered under `key` (a display string), or None."""
    with _registry_lock:
        return _registry.get(key)
