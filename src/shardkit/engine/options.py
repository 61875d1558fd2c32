"""How a writing command writes: the options merge, split, convert and a pipeline's
components share, as one value passed from the public call down to the executor.

The public functions keep their keyword arguments (`shardkit.merge(..., force=True)`);
each builds one :class:`WriteOptions` and every layer below takes it whole, so an
option added here reaches every writer without another parameter in five signatures.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

#: Called as `progress(advance, total)` with bytes just written and the bytes to write.
ProgressCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class WriteOptions:
    """`force` replaces an earlier output (only what shardkit writes); `sha256` hashes
    the output in the same pass and writes a `sha256sum -c` file; `dry_run` plans and
    writes nothing; `verify` compares the staged output with the source before it is
    committed. `progress` and `verify_progress` are called `(advance, total)` with the
    bytes written and the bytes compared."""

    force: bool = False
    sha256: bool = False
    dry_run: bool = False
    verify: bool = False
    progress: ProgressCallback | None = None
    verify_progress: ProgressCallback | None = None

    def replace(self, **changes: object) -> WriteOptions:
        """These options with `changes` (a pipeline's component: no force, its own progress)."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]
