"""What a run writes, as both executors (local and S3) report and name it.

Shared by :mod:`shardkit.engine.execute` and :mod:`shardkit.engine.execute_s3`, which
import it and not each other.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..plan.files import Plan


@dataclass(frozen=True)
class WrittenFile:
    name: str
    size: int
    tensors: int
    sha256: str | None


def checksum_file_name(plan: Plan) -> str:
    """The sha256sum manifest written by --sha256 inside a folder output."""
    return plan.files[0].name + ".sha256" if len(plan.files) == 1 else "SHA256SUMS"


def written_names(plan: Plan, sha256: bool) -> set[str]:
    """Every name a run of `plan` writes inside a folder output, relative to it."""
    names = {f.name for f in plan.files} | {c.name for c in plan.copies}
    if plan.index_name is not None:
        names.add(plan.index_name)
    if sha256:
        names.add(checksum_file_name(plan))
    return names
