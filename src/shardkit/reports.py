"""Reports: what a command did, as dataclasses that print as tables or dump as JSON."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path


def to_jsonable(value: object) -> object:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


class JsonReport:
    """Mixin: `to_dict()` and `to_json()` for report dataclasses."""

    def to_dict(self) -> dict[str, object]:
        return to_jsonable(self)  # type: ignore[return-value]

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False)


@dataclass(frozen=True)
class OutputFile(JsonReport):
    path: str
    size: int
    tensors: int
    sha256: str | None = None


@dataclass(frozen=True)
class Transfer(JsonReport):
    """What a run with an object store exchanged with it: the client's requests and
    body bytes each way, and the bytes the store copied by itself (server-side)."""

    requests: int
    bytes_sent: int
    bytes_received: int
    bytes_copied: int
    server_side: bool = False


@dataclass(frozen=True)
class WriteReport(JsonReport):
    """What merge, split and reshard wrote (or, with dry_run, would write)."""

    command: str
    source: str
    output: str
    files: list[OutputFile]
    tensors: int
    parameters: int
    bytes: int
    seconds: float
    dry_run: bool = False
    index: str | None = None
    checksum_file: str | None = None
    copied_files: list[str] = field(default_factory=list)
    source_files: list[str] = field(default_factory=list)
    copy_ranges: int = 0
    header_bytes: int = 0
    warnings: list[str] = field(default_factory=list)
    verified: bool | None = None
    transfer: Transfer | None = None  # with an s3:// source or output
    plan: dict[str, object] | None = None  # with dry_run: the plan itself (Plan.to_dict)

    @property
    def throughput(self) -> float:
        """Bytes per second (0 for a dry run)."""
        return self.bytes / self.seconds if self.seconds > 0 and not self.dry_run else 0.0

    @property
    def sha256(self) -> str | None:
        return self.files[0].sha256 if len(self.files) == 1 else None

    def to_dict(self) -> dict[str, object]:
        data = super().to_dict()
        data["throughput_bytes_per_second"] = round(self.throughput)
        data["sha256"] = self.sha256
        return data


class MergeReport(WriteReport):
    """Report of `merge`."""


@dataclass(frozen=True)
class SplitReport(WriteReport):
    """Report of `split` / reshard. `layout` maps each output shard to its tensors in
    the order they were packed, so a dry run shows exactly what goes where."""

    max_shard_size: int = 0
    layout: dict[str, list[str]] = field(default_factory=dict)
