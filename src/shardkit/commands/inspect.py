"""`shardkit inspect`: what a checkpoint holds, from its headers alone.

Only the header bytes and the index are read (a few tens of kilobytes for a 7B model),
so inspecting a 70B checkpoint is as quick as a 1B one and works on files still
being downloaded elsewhere, as long as their headers are complete.
"""

from __future__ import annotations

import fnmatch
import math
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from operator import attrgetter, itemgetter, methodcaller
from pathlib import Path
from typing import TYPE_CHECKING

from .. import storage
from ..checkpoint.layers import group_layers, natural_key
from ..checkpoint.metadata import metadata_union
from ..checkpoint.pipeline import find_pipeline
from ..checkpoint.shards import Checkpoint, SourceTensor, open_checkpoint
from ..format.gc_pause import gc_paused
from ..format.header import TensorInfo, tensor_nbytes
from ..reports import JsonReport

if TYPE_CHECKING:
    from ..checkpoint.pipeline import Pipeline
    from ..plan.fp8_layout import Fp8Layout
    from .pipeline_runs import PipelineReport


@dataclass(frozen=True)
class FileSummary(JsonReport):
    path: str
    size: int
    header_size: int  # the JSON, padding included (the 8-byte length not counted)
    tensors: int
    metadata: Mapping[str, str] | None  # the header's own dict, not a copy


@dataclass(frozen=True)
class TensorRow(JsonReport):
    name: str
    dtype: str
    shape: list[int]
    parameters: int
    bytes: int
    shard: str  # file name, relative to the checkpoint's folder
    offset: int  # absolute byte offset of the data in that file


@dataclass(frozen=True)
class LayerRow(JsonReport):
    """Tensors folded over their layer (or expert) numbers; see `shardkit.checkpoint.layers`."""

    pattern: str
    dtype: str
    shape: list[int]
    count: int
    parameters: int  # over all `count` tensors
    bytes: int


@dataclass(frozen=True)
class QuantizationSummary(JsonReport):
    """An FP8 checkpoint's scheme; its scale tensors are not counted as parameters (as
    the Hub counts them)."""

    scheme: str  # "fp8" (fine-grained) or "compressed-tensors"
    block_size: list[int] | None
    quantised_tensors: int
    scale_tensors: int
    scale_parameters: int


@dataclass(frozen=True)
class InspectReport(JsonReport):
    path: str
    index: str | None
    #: None without an index; False when the index's total_size disagrees with the tensors
    #: (the only disagreement a checkpoint may have and still open, see `warnings`).
    index_consistent: bool | None
    files: list[FileSummary]
    tensors: int
    parameters: int
    parameters_by_dtype: dict[str, int]
    bytes: int
    metadata: dict[str, str]  # union of the files' __metadata__
    index_metadata: dict[str, object]
    layers: list[LayerRow]
    filter: str | None = None
    matched_tensors: int = 0
    matched_parameters: int = 0
    matched_bytes: int = 0
    tensor_rows: list[TensorRow] | None = None
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # e.g. which shard of a larger checkpoint PATH is
    quantization: QuantizationSummary | None = None


@gc_paused()
def inspect(
    path: str | os.PathLike[str],
    *,
    tensors: bool = False,
    filter: str | None = None,
    strict: bool = False,
    endpoint_url: str | None = None,
) -> InspectReport:
    """Summarise the checkpoint at `path` (file, folder or index).

    The summary (files, tensor count, parameters in total and by dtype, bytes,
    metadata, index consistency) always covers the whole checkpoint; `filter`, a glob
    such as `model.layers.0.*`, narrows the layer view and the per-tensor rows that
    `tensors=True` adds. Stray weight files no index covers are reported as warnings,
    not refused: inspecting is how one finds out about them. A remote checkpoint
    (`s3://`, `http(s)://`) costs one or two ranged GETs per shard, never a download.
    `strict` also refuses what the format forbids but the reference reader tolerates;
    `endpoint_url` names an S3-compatible store.

    Example::

        report = shardkit.inspect("Qwen2.5-7B-Instruct", filter="model.layers.0.*")
        print(report.parameters, report.parameters_by_dtype)
    """
    location = storage.as_path(path, endpoint_url=endpoint_url)
    pipeline = find_pipeline(location, allow_unindexed=True)
    if pipeline is not None:  # a diffusers pipeline: a summary per component

        return inspect_pipeline(  # type: ignore[return-value]
            pipeline, storage.display(path), tensors=tensors, filter=filter, strict=strict
        )
    checkpoint = open_checkpoint(location, strict=strict, allow_unindexed=True)
    root = checkpoint.root
    metadata, warnings = metadata_union(checkpoint.shards)
    layout = _fp8_layout(checkpoint, warnings)
    scale_names = layout.scale_names if layout is not None else frozenset()
    if filter is None:
        selected = list(checkpoint.tensors.values())
    else:
        selected = [t for t in checkpoint.tensors.values() if fnmatch.fnmatchcase(t.name, filter)]
        if not selected:
            warnings.append(_no_match_hint(filter))
    groups = group_layers(map(_NAME_DTYPE_SHAPE, _infos(selected)))  # groups sort themselves
    # A million tensors have a few dozen (dtype, shape) kinds: count per kind, multiply
    # once; the groups of the whole checkpoint have counted them already.
    kinds: Counter[tuple[str, tuple[int, ...]]] = Counter()
    scale_kinds: Counter[tuple[str, tuple[int, ...]]] = Counter()
    if filter is None:
        for group in groups:
            kinds[group.dtype, group.shape] += group.count
            if scale_names:
                scale_kinds[group.dtype, group.shape] += sum(map(scale_names.__contains__, group.names))
    else:
        kinds.update(map(_DTYPE_AND_SHAPE, _infos(checkpoint.tensors.values())))
        scale_kinds.update(map(_DTYPE_AND_SHAPE, _infos(map(checkpoint.tensors.__getitem__, scale_names))))
    quantization = _quantization_summary(layout, scale_kinds) if layout is not None else None
    kinds.subtract(scale_kinds)  # scales are not parameters, as the Hub counts them
    by_dtype: dict[str, int] = {}
    for (dtype, shape), count in kinds.items():
        if count:
            by_dtype[dtype] = by_dtype.get(dtype, 0) + count * math.prod(shape)
    layers = [
        LayerRow(
            g.pattern, g.dtype, list(g.shape), g.count,
            g.count * math.prod(g.shape), g.count * tensor_nbytes(g.dtype, g.shape),  # equal in a valid file
        )
        for g in groups
    ]
    rows = None
    if tensors:
        rows = [
            TensorRow(
                t.name, t.info.dtype, list(t.info.shape), t.info.nelements, t.info.nbytes,
                _relative(t.shard.path, root), t.offset,
            )
            for t in sorted(selected, key=lambda t: natural_key(t.name))
        ]
    index_consistent = None
    if checkpoint.index_path is not None:
        declared = checkpoint.index_metadata.get("total_size")
        index_consistent = declared is None or declared == checkpoint.total_bytes
    return InspectReport(
        path=storage.display(path),
        index=str(checkpoint.index_path) if checkpoint.index_path else None,
        index_consistent=index_consistent,
        files=[
            FileSummary(_relative(h.path, root), h.file_size, h.header_size, len(h.tensors), h.metadata)
            for h in sorted(checkpoint.shards, key=lambda h: natural_key(h.path))
        ],
        tensors=len(checkpoint.tensors),
        parameters=sum(by_dtype.values()),
        parameters_by_dtype=dict(sorted(by_dtype.items(), key=lambda item: (-item[1], item[0]))),
        bytes=checkpoint.total_bytes,
        metadata=metadata,
        index_metadata=dict(checkpoint.index_metadata),
        layers=layers,
        filter=filter,
        matched_tensors=len(selected),
        matched_parameters=sum(row.parameters for row in layers),
        matched_bytes=sum(row.bytes for row in layers),
        tensor_rows=rows,
        warnings=[*checkpoint.warnings, *warnings],
        notes=list(checkpoint.notes),
        quantization=quantization,
    )


def _infos(tensors: Iterable[SourceTensor]) -> Iterator[TensorInfo]:
    return map(_INFO, tensors)


_INFO = attrgetter("info")
_DTYPE_AND_SHAPE = itemgetter(slice(1, 3))  # of a TensorInfo: (dtype, shape)
_NAME_DTYPE_SHAPE = itemgetter(slice(0, 3))


def _fp8_layout(checkpoint: Checkpoint, warnings: list[str]) -> Fp8Layout | None:
    """The FP8 layout, if any; a layout that does not hold is a warning here
    (inspecting is how one finds out), the error of a conversion."""
    if next(filter(methodcaller("endswith", ("_scale_inv", ".weight_scale")), checkpoint.tensors), None) is None:
        return None  # no scales: not an FP8 layout, and no config.json read (headers only)
    # Imported here, past the common case: the planner modules cost `inspect` ~10 ms of start-up.
    from ..errors import ShardkitError
    from ..plan.conversion import read_config
    from ..plan.fp8_layout import find_layout

    try:
        return find_layout(checkpoint, read_config(checkpoint))
    except ShardkitError as error:
        warnings.append(f"FP8 layout: {error}")
        return None


def _quantization_summary(layout: Fp8Layout, scale_kinds: Counter[tuple[str, tuple[int, ...]]]) -> QuantizationSummary:
    """`scale_kinds`: how many of the layout's scale tensors have each (dtype, shape)."""
    return QuantizationSummary(
        layout.scheme, list(layout.block) if layout.block else None, len(layout.weights), len(layout.scale_names),
        sum(math.prod(shape) * count for (_, shape), count in scale_kinds.items()),
    )


def _relative(path: str, root: object) -> str:
    prefix = str(root).rstrip("/") + "/"
    if storage.is_remote(path):
        return path[len(prefix) :] if path.startswith(prefix) else path
    try:
        return Path(path).relative_to(root).as_posix()  # type: ignore[arg-type]
    except ValueError:
        return path


def _no_match_hint(pattern: str) -> str:
    """Why a filter matched nothing: it is a glob over whole names, not a substring search."""
    hint = f"no tensor matches the filter {pattern!r}"
    if not any(c in pattern for c in "*?["):
        hint += f": it is a glob matched against whole tensor names; for names containing it use '*{pattern}*'"
    return hint


def inspect_pipeline(
    pipeline: Pipeline, shown: str, *, tensors: bool, filter: str | None, strict: bool
) -> PipelineReport:
    import dataclasses
    import time

    from .pipeline_runs import PipelineReport, component_row, elapsed, own_warnings, row_warnings


    started = time.perf_counter()
    rows = []
    # A filter is meant for the whole pipeline: that it matches nothing in one component is no news.
    hint = _no_match_hint(filter) if filter is not None else None
    for weight_set in pipeline.weight_sets:
        report = inspect(str(weight_set.entry), tensors=tensors, filter=filter, strict=strict)
        warnings = [w for w in own_warnings(report.warnings, weight_set) if w != hint]
        report = dataclasses.replace(report, warnings=warnings)
        rows.append(component_row(weight_set, str(weight_set.entry), len(report.files), report.tensors,
                         report.parameters, report.bytes, None, report.to_dict()))
    warnings = [*pipeline.warnings, *row_warnings(rows)]
    if hint is not None and not any(r.report["matched_tensors"] for r in rows):
        warnings.append(hint)
    return PipelineReport(
        "inspect", shown, rows, elapsed(started), copied_files=[name for _, name in pipeline.copies],
        warnings=warnings,
    )
