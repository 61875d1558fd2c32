"""`shardkit diff`: how two checkpoints differ, whatever their sharding.

Original shards against their merge, two fine-tunes of one base, a download
against a re-upload: names, dtypes and shapes come from the headers, data is
compared byte for byte in constant memory (`compare.compare_checkpoints`), and
metadata is compared as a loader sees it, regardless of which file holds what.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .. import storage
from ..checkpoint.manifest import companions
from ..checkpoint.metadata import metadata_union
from ..checkpoint.pipeline import is_pipeline
from ..checkpoint.shards import Checkpoint, SourceTensor, open_checkpoint
from ..checks.compare import compare_checkpoints
from ..errors import BadInputError, option, option_name
from ..plan.selection import apply_selection, parse_selection
from ..reports import JsonReport

if TYPE_CHECKING:
    from .pipeline_runs import PipelineReport

#: Bytes of each side decoded at a time for --max-abs-diff; widened to float64 that
#: is 8 MB per side for BF16, whatever the tensor size.
NUMERIC_CHUNK = 1024 * 1024

#: Derived from the tensors (which are compared anyway) and present only when sharded.
_DERIVED_INDEX_KEYS = ("total_size",)


@dataclass(frozen=True)
class Change(JsonReport):
    """A tensor on both sides whose dtype (or shape) differs."""

    name: str
    a: str
    b: str


@dataclass(frozen=True)
class MetadataChange(JsonReport):
    """A metadata key whose value differs; None means the key is absent on that side.

    `scope` is "file" for the safetensors `__metadata__` (the union over a side's
    files) or "index" for the index's `metadata` (compared when both sides have one).
    """

    scope: str
    key: str
    a: object
    b: object


@dataclass(frozen=True)
class DiffReport(JsonReport):
    a: str
    b: str
    identical: bool
    tensors_a: int
    tensors_b: int
    only_a: list[str]
    only_b: list[str]
    dtype_changed: list[Change]
    shape_changed: list[Change]
    metadata_changed: list[MetadataChange]
    data_compared: bool
    data_equal: int
    data_different: list[str]
    compared_bytes: int
    #: With max_abs_diff: tensor → max |a − b| for each tensor of `data_different`;
    #: None for dtypes that are not decodable floats (integers, bool, F4, F6).
    max_abs_diff: dict[str, float | None] | None = None
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # e.g. which file loaders use
    #: Companion files (config, tokenizer, ...: what merge copies), compared when both
    #: sides are folders or indexes; names relative to each side's folder.
    files_only_a: list[str] = field(default_factory=list)
    files_only_b: list[str] = field(default_factory=list)
    files_different: list[str] = field(default_factory=list)
    #: [name in A, name in B] of tensors that differ only by name (same dtype, shape, bytes).
    renamed: list[list[str]] = field(default_factory=list)

    def __bool__(self) -> bool:
        """A report is true when the two sides are identical, as `diff`'s exit code 0 is."""
        return self.identical

    def to_dict(self) -> dict[str, object]:
        data = super().to_dict()
        if self.max_abs_diff is not None:
            # JSON has no NaN or Infinity; scripts get them as strings.
            data["max_abs_diff"] = {name: _jsonable(value) for name, value in self.max_abs_diff.items()}
        return data


def _jsonable(value: float | None) -> object:
    if value is None or math.isfinite(value):
        return value
    return str(value)


def diff(
    a: str | os.PathLike[str],
    b: str | os.PathLike[str],
    *,
    data: bool = True,
    max_abs_diff: bool = False,
    strict: bool = False,
    allow_unindexed: bool = False,
    rename: Sequence[tuple[str, str]] = (),
    endpoint_url: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> DiffReport:
    """Compare the checkpoints at `a` and `b` (each a file, folder or index).

    With `data=False` only headers are read. With `max_abs_diff`, every float tensor
    whose bytes differ is decoded in chunks to find the largest absolute difference
    (needs the `numeric` extra: numpy and ml_dtypes). Metadata counts as a
    difference, and so do the companion files (config, tokenizer, ...) when both sides
    are folders or indexes: `identical` means a loader could not tell the two apart,
    and the report is true exactly then. `strict`, `allow_unindexed` and `endpoint_url` apply
    to both sides as for :func:`~shardkit.commands.merge.merge`; `rename` renames A's
    tensors before the comparison, as merge's `rename` does. A tensor only in A with the
    same dtype, shape and bytes as one only in B is reported in `renamed` as that pair
    (`= a.weight ↔ b.weight, same bytes`) rather than as missing and added;
    `progress(advance, total)` is called with the bytes just compared.

    Example::

        report = shardkit.diff("base", "finetuned", max_abs_diff=True)
        print(report.identical, report.data_different, report.max_abs_diff)
    """
    if max_abs_diff and not data:
        raise BadInputError(
            f"{option('max_abs_diff')} reads the tensors' values; it cannot be combined with {option('data', False)}"
        )
    if max_abs_diff:
        from ..checks.numeric import require_numeric

        require_numeric(option("max_abs_diff"))
    if any(is_pipeline(storage.as_path(p, endpoint_url=endpoint_url)) for p in (a, b)):
        if rename:
            raise BadInputError(
                f"{a}: {option_name('rename')} applies to one component of a pipeline (e.g. {a}/transformer)"
            )

        return diff_pipelines(  # type: ignore[return-value]
            str(a), str(b), data=data, max_abs_diff=max_abs_diff, strict=strict, progress=progress
        )
    started = time.perf_counter()
    selection = parse_selection(rename=rename)
    left, right = (
        open_checkpoint(storage.as_path(p, endpoint_url=endpoint_url), strict=strict, allow_unindexed=allow_unindexed)
        for p in (a, b)
    )
    left = apply_selection(left, selection).checkpoint
    measured: dict[str, float | None] | None = {} if max_abs_diff else None

    def on_difference(ta: SourceTensor, tb: SourceTensor, readers: object) -> None:
        if measured is not None:
            measured[ta.name] = _max_abs_diff(ta, tb, readers)

    total = _comparable_bytes(left, right)
    on_bytes = (lambda step: progress(step, total)) if progress is not None else None
    comparison = compare_checkpoints(left, right, data=data, on_bytes=on_bytes, on_difference=on_difference)
    metadata_changed = _metadata_changes(left, right)
    only_a, only_b, different = _companion_changes(left, right) if _is_folder(a) and _is_folder(b) else ([], [], [])
    moved = same_bytes_renamed(left, right, comparison.only_a, comparison.only_b) if data else []
    gone, came = {pair[0] for pair in moved}, {pair[1] for pair in moved}
    return DiffReport(
        a=storage.display(a),
        b=storage.display(b),
        identical=comparison.identical and not metadata_changed and not (only_a or only_b or different),
        tensors_a=len(left.tensors),
        tensors_b=len(right.tensors),
        only_a=[n for n in comparison.only_a if n not in gone],
        only_b=[n for n in comparison.only_b if n not in came],
        dtype_changed=[Change(c.name, c.a, c.b) for c in comparison.dtype_changed],
        shape_changed=[Change(c.name, c.a, c.b) for c in comparison.shape_changed],
        metadata_changed=metadata_changed,
        data_compared=comparison.data_compared,
        data_equal=comparison.data_equal,
        data_different=comparison.data_different,
        compared_bytes=comparison.compared_bytes,
        max_abs_diff=dict(sorted(measured.items())) if measured is not None else None,
        seconds=round(time.perf_counter() - started, 6),
        warnings=[*_labelled("A", left.warnings), *_labelled("B", right.warnings)],
        notes=[*_labelled("A", left.notes), *_labelled("B", right.notes)],
        files_only_a=only_a,
        files_only_b=only_b,
        files_different=different,
        renamed=moved,
    )


def same_bytes_renamed(
    left: Checkpoint, right: Checkpoint, only_a: Sequence[str], only_b: Sequence[str]
) -> list[list[str]]:
    """[a, b] for each tensor only in A whose dtype, shape and bytes are those of a
    tensor only in B: the same tensor under another name. Bytes are hashed only for
    tensors whose dtype and shape have a counterpart on the other side."""
    candidates: dict[tuple[str, tuple[int, ...]], list[str]] = {}
    for name in only_b:
        info = right.tensors[name].info
        candidates.setdefault((info.dtype, info.shape), []).append(name)
    digests: dict[tuple[int, str], str] = {}
    pairs = []
    for name in only_a:
        info = left.tensors[name].info
        unmatched = candidates.get((info.dtype, info.shape), [])
        if not unmatched:
            continue
        digest = _tensor_digest(digests, 0, left.tensors[name])
        for other in unmatched:
            if _tensor_digest(digests, 1, right.tensors[other]) == digest:
                unmatched.remove(other)
                pairs.append([name, other])
                break
    return pairs


def _tensor_digest(cache: dict[tuple[int, str], str], side: int, tensor: SourceTensor) -> str:
    key = (side, tensor.name)
    if key not in cache:
        from ..plan.tensor_bytes import read_tensor

        hasher = hashlib.sha256()
        with contextlib.closing(storage.open_reader(tensor.shard.path)) as reader:
            for done in range(0, tensor.info.nbytes, NUMERIC_CHUNK * 8):
                hasher.update(read_tensor(tensor, reader, done, min(NUMERIC_CHUNK * 8, tensor.info.nbytes - done)))
        cache[key] = hasher.hexdigest()
    return cache[key]


def _is_folder(side: str | os.PathLike[str]) -> bool:
    """A side given as a folder or an index is a model; a lone .safetensors file is only weights."""
    return not os.fspath(side).rstrip("/").endswith(".safetensors")


def _companion_changes(left: Checkpoint, right: Checkpoint) -> tuple[list[str], list[str], list[str]]:
    """Companion files only in A, only in B, and on both sides with different bytes."""
    a, b = (dict((name, path) for path, name in companions(side)) for side in (left, right))
    different = [name for name in sorted(a.keys() & b.keys()) if _digest(a[name]) != _digest(b[name])]
    return sorted(a.keys() - b.keys()), sorted(b.keys() - a.keys()), different


def _digest(path: storage.Location) -> str:
    return hashlib.sha256(storage.read_bytes(path)).hexdigest()


def _comparable_bytes(left: Checkpoint, right: Checkpoint) -> int:
    total = 0
    for name, ta in left.tensors.items():
        tb = right.tensors.get(name)
        if tb is not None and (ta.info.dtype, ta.info.shape) == (tb.info.dtype, tb.info.shape):
            total += ta.info.nbytes
    return total


def _metadata_changes(left: Checkpoint, right: Checkpoint) -> list[MetadataChange]:
    changes = _dict_changes("file", metadata_union(left.shards)[0], metadata_union(right.shards)[0])
    if left.index_path is not None and right.index_path is not None:
        changes += _dict_changes(
            "index",
            {k: v for k, v in left.index_metadata.items() if k not in _DERIVED_INDEX_KEYS},
            {k: v for k, v in right.index_metadata.items() if k not in _DERIVED_INDEX_KEYS},
        )
    return changes


def _dict_changes(scope: str, a: Mapping[str, object], b: Mapping[str, object]) -> list[MetadataChange]:
    keys = sorted(a.keys() | b.keys())
    return [MetadataChange(scope, key, a.get(key), b.get(key)) for key in keys if a.get(key) != b.get(key)]


def _labelled(side: str, warnings: tuple[str, ...]) -> list[str]:
    return [f"{side}: {warning}" for warning in warnings]


def _max_abs_diff(ta: SourceTensor, tb: SourceTensor, readers: object) -> float | None:
    from ..checks.numeric import element_size, max_abs_difference, measurable

    dtype = ta.info.dtype
    if not measurable(dtype):
        return None
    step = NUMERIC_CHUNK - NUMERIC_CHUNK % element_size(dtype)

    def pairs() -> Iterator[tuple[bytes, bytes]]:
        for done in range(0, ta.info.nbytes, step):
            length = min(step, ta.info.nbytes - done)
            yield readers.read(ta, done, length), readers.read(tb, done, length)  # type: ignore[attr-defined]

    return max_abs_difference(dtype, pairs())


def diff_pipelines(
    a: str, b: str, *, data: bool, max_abs_diff: bool, strict: bool, progress: Callable[[int, int], None] | None
) -> PipelineReport:
    """Weight sets matched by component and variant, each pair diffed; the copied files
    (model_index.json, scheduler, tokenizer) compared byte for byte."""
    import dataclasses

    from .pipeline_runs import (
        PipelineReport,
        component_row,
        elapsed,
        other_pipeline,
        row_warnings,
        side_warnings,
        weight_set_sizes,
    )


    started = time.perf_counter()
    left, right = other_pipeline(a, "A"), other_pipeline(b, "B")
    rows, problems = [], []
    for weight_set in left.weight_sets:
        match = right.find(weight_set.component, weight_set.variant)
        if match is None:
            problems.append(f"{weight_set.label}: only in A")
            continue
        report = diff(
            str(weight_set.entry), str(match.entry), data=data, max_abs_diff=max_abs_diff, strict=strict,
            allow_unindexed=True, progress=progress,
        )
        warnings = side_warnings(report.warnings, "A", weight_set) + side_warnings(report.warnings, "B", match)
        report = dataclasses.replace(report, warnings=warnings)
        files = sum(1 for f in weight_set.files if f.name.endswith(".safetensors"))
        parameters, size = weight_set_sizes(weight_set, strict)
        shown = f"{weight_set.entry} ↔ {match.entry}"
        rows.append(component_row(
            weight_set, shown, files, report.tensors_a, parameters, size, report.identical, report.to_dict()
        ))
    problems += [f"{s.label}: only in B" for s in right.weight_sets if left.find(s.component, s.variant) is None]
    copies_a = {name: path for path, name in left.copies}
    copies_b = {name: path for path, name in right.copies}
    for name in sorted(copies_a.keys() | copies_b.keys()):
        if name not in copies_b:
            problems.append(f"{name}: only in A")
        elif name not in copies_a:
            problems.append(f"{name}: only in B")
        elif copies_a[name].read_bytes() != copies_b[name].read_bytes():
            problems.append(f"{name}: differs")
    return PipelineReport(
        "diff", f"{a} ↔ {b}", rows, elapsed(started), problems=problems,
        warnings=[*left.warnings, *right.warnings, *row_warnings(rows)],
    )
