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
        fields = to_jsonable(self)
        assert isinstance(fields, dict), "a report is a dataclass"
        return fields

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


#: Loss warnings shown one per tensor; the rest are summed up in one line.
SHOWN_LOSSES = 5


@dataclass(frozen=True)
class TensorLoss(JsonReport):
    tensor: str
    source_dtype: str
    overflow: int  # finite values that became ±inf
    underflow: int  # non-zero values that became zero


@dataclass(frozen=True)
class DtypeReport(JsonReport):
    """What a `--dtype` run converted and what it lost."""

    target: str
    converted: int  # tensors converted
    already: int  # float tensors already in the target dtype: plain copies
    kept: list[str] = field(default_factory=list)
    not_float: dict[str, int] = field(default_factory=dict)  # dtype -> tensors copied unchanged
    losses: list[TensorLoss] = field(default_factory=list)  # tensors that lost values, by name
    lossless: bool | None = None  # None before the bytes were made (a dry run), and for a quantisation
    block: list[int] | None = None  # --dtype fp8: the block size of the scales
    unquantised: int = 0  # --dtype fp8: tensors left as they are (not Linear weights of whole blocks, or kept)

    def notes(self) -> list[str]:
        """What the human report prints about the conversion."""
        if self.block is not None:
            lines = [
                f"dtype: {self.converted} weight(s) quantised to {self.target} in {self.block[0]}x{self.block[1]} "
                f"blocks, each with a F32 weight_scale_inv; {self.unquantised} other tensor(s) copied as they are"
            ]
            if self.kept:
                lines.append(f"not quantised (--keep): {len(self.kept)} weight(s)")
            return lines
        lines = [f"dtype: {self.converted} tensor(s) converted to {self.target}"]
        if self.already:
            lines[0] += f", {self.already} already {self.target} (copied)"
        if self.kept:
            lines.append(f"kept in their dtype (--keep): {len(self.kept)} tensor(s)")
        if self.not_float:
            counts = ", ".join(f"{n} {d}" for d, n in sorted(self.not_float.items()))
            lines.append(f"copied unchanged (not F64/F32/F16/BF16): {counts}")
        if self.lossless:
            lines.append(f"lossless range: no value overflowed to ±inf or underflowed to zero in {self.target}")
        return lines

    def warnings(self) -> list[str]:
        """One line per tensor that lost values, summed up past a few."""
        lines = [
            f"{loss.tensor}: {loss.source_dtype} → {self.target}: "
            f"{loss.overflow} value(s) overflowed to ±inf, {loss.underflow} underflowed to zero"
            for loss in self.losses[:SHOWN_LOSSES]
        ]
        rest = self.losses[SHOWN_LOSSES:]
        if rest:
            overflow, underflow = sum(r.overflow for r in rest), sum(r.underflow for r in rest)
            lines.append(
                f"… and {len(rest)} more tensor(s) converted to {self.target} lost values: "
                f"{overflow} overflowed, {underflow} underflowed (--json lists them all)"
            )
        return lines


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
    dtype: DtypeReport | None = None  # with a dtype conversion
    #: `seconds` is the whole run; of it, writing (up to the staged output being
    #: complete) and `--verify`'s comparison (None when not asked or a dry run).
    copy_seconds: float | None = None
    verify_seconds: float | None = None
    #: [old, new] for each tensor written under a new name (`rename`), in source order.
    renamed: list[list[str]] = field(default_factory=list)

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
class ConvertReport(WriteReport):
    """Report of `convert` (tied tensor names written once are in `warnings`)."""


@dataclass(frozen=True)
class SplitReport(WriteReport):
    """Report of `split` / reshard. `layout` maps each output shard to its tensors in
    the order they were packed, so a dry run shows exactly what goes where."""

    max_shard_size: int = 0
    layout: dict[str, list[str]] = field(default_factory=dict)
