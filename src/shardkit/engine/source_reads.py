"""How both executors read their sources: ranged readers opened as needed, as many
chunks in flight as suit the store, and the check that nothing changed meanwhile.

Shared by :mod:`shardkit.engine.execute` and :mod:`shardkit.engine.execute_s3`, which
import it and not each other.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence

from .. import storage
from ..errors import SourceChangedError
from ..plan.files import PlannedFile, Source
from . import stream
from .source_files import SourceFiles


def check_sources_unchanged(sources: Sequence[Source]) -> None:
    for source in sources:
        reason = storage.source_changed(source)
        if reason is not None:
            raise SourceChangedError(f"{source.path}: {reason}")


def stream_workers(remote: bool) -> int:
    """Chunks made at once: enough ranged reads in flight for a store, else every core."""
    return stream.WORKERS if remote else max(2, os.cpu_count() or 1)


class RangeSources:
    """Ranged readers (pread locally, ranged GETs remotely) of the sources of planned
    files, opened as needed (:class:`SourceFiles`: local ones within a bounded number of
    descriptors); `read` is the `read` of :func:`shardkit.plan.fill.fill`."""

    def __init__(self, planned: Sequence[PlannedFile]) -> None:
        self._files = SourceFiles()

    def read(self, source: str, offset: int, into: memoryview) -> None:
        data = self._files.reader(source).read(offset, len(into))
        if len(data) != len(into):
            raise OSError(errno.EIO, f"{source}: ended early at offset {offset + len(data)} (file shrank?)")
        into[:] = data

    def close(self) -> None:
        self._files.close()

    def __enter__(self) -> RangeSources:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
