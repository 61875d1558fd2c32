"""`shardkit clean`: remove what killed runs left behind in a folder.

A run that is killed (SIGKILL, power loss) cannot clean up after itself; all it can
leave is entries named `.shardkit-tmp-<output>.<pid>.<random>` beside the output it
was writing (see `atomic`). The next run on the same output removes them; this
command removes them for a whole folder. An entry whose writer is still running is
never touched, so it is safe to run while another merge or split is in progress.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ..engine import atomic
from ..errors import BadInputError
from ..reports import JsonReport


@dataclass(frozen=True)
class CleanReport(JsonReport):
    folder: str
    removed: list[str] = field(default_factory=list)  # entry names, relative to folder
    bytes: int = 0  # disk space the removed entries held (apparent size)
    in_use: list[str] = field(default_factory=list)  # temporaries of writers still running, kept
    dry_run: bool = False


def clean(folder: str | os.PathLike[str], *, dry_run: bool = False) -> CleanReport:
    """Remove stale shardkit temporaries directly inside `folder` and report them.

    A temporary is stale when the process that wrote it is gone; those of a run still
    going are kept. With `dry_run`, list them and remove nothing.

    Example::

        print(shardkit.clean("models").removed)
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise BadInputError(f"{folder}: not a folder")
    stale = atomic.stale_temporaries(folder)
    in_use = sorted(p.name for p in folder.iterdir() if p.name.startswith(atomic.TEMP_MARK) and p not in stale)
    size = sum(_size(p) for p in stale)
    if not dry_run:
        for entry in stale:
            atomic.remove(entry)
    return CleanReport(str(folder), [p.name for p in stale], size, in_use, dry_run)


def _size(path: Path) -> int:
    if path.is_symlink() or not path.is_dir():
        return path.lstat().st_size
    return sum(os.lstat(os.path.join(d, f)).st_size for d, _, files in os.walk(path) for f in files)
