"""A checkpoint's `__metadata__`: the union of its files', the one rule merge, split,
inspect and diff share, so what inspect shows is what a merge writes."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from ..format.header import Header
from .layers import natural_key


def metadata_union(shards: Iterable[Header]) -> tuple[dict[str, str], list[str]]:
    """Every file's `__metadata__` in one dict, and a warning per key whose value
    differs between files. Files are taken in natural order (shard 2 before shard 10)
    and the first value wins: one value cannot describe both."""
    union: dict[str, str] = {}
    origin: dict[str, str] = {}
    warnings: list[str] = []
    for header in sorted(shards, key=lambda h: natural_key(h.path)):
        for key, value in (header.metadata or {}).items():
            if key not in union:
                union[key], origin[key] = value, Path(header.path).name
            elif union[key] != value:
                warnings.append(
                    f"metadata {key!r} differs between shards: {union[key]!r} in {origin[key]}, "
                    f"{value!r} in {Path(header.path).name}; keeping {union[key]!r}"
                )
    return union, warnings
