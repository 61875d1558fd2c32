"""Plans: what each output file holds and which byte ranges of which sources fill it.

Pure functions of the checkpoint's headers: no file is opened here, so every layout
decision (merge into one file, split at a size, reshard) is unit-testable and a
`--dry-run` prints exactly what a real run would write. Merge and split differ only
in how tensors are grouped into files; each file is laid out as the reference writer
lays it out (see `format.serialize_header`), so it is byte-for-byte what
`safetensors.torch.save_file` would produce for the same tensors and metadata.
"""

from __future__ import annotations

import base64
import bisect
import copy
import dataclasses
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from itertools import chain
from operator import attrgetter, itemgetter, sub
from pathlib import Path
from typing import Any

from ..checkpoint.layers import natural_key
from ..checkpoint.metadata import metadata_union
from ..checkpoint.shards import Checkpoint, SourceTensor, single_file_name_for
from ..errors import BadInputError, option_name
from ..format import header_json
from ..format.gc_pause import gc_paused
from ..format.header import (
    DTYPES,
    LENGTH_PREFIX,
    MAX_HEADER_SIZE,
    TensorSpec,
    header_excess,
    record_maker,
    serialize_header,
    tensor_nbytes,
)

#: A tensor's dtype in the output: its source dtype unless the run converts it.
DtypeFor = Callable[[SourceTensor], str]
#: The FP8 weights a run dequantises (weight name -> ScaleOf: the scale tensors and what
#: goes with them are not written) or quantises (weight name -> QuantiseAs: a scale
#: tensor is written beside each).
ScalesFor = Mapping[str, "ScaleOf | QuantiseAs"]


@dataclass(frozen=True)
class ScaleOf:
    """How one FP8 weight is dequantised: by `scale`'s grid, one scale per `block`,
    the float32 products rounded to `product_dtype` before the output's dtype."""

    scale: SourceTensor
    block: tuple[int, int]
    product_dtype: str = "F32"
    also_dropped: tuple[str, ...] = ()  # e.g. the activation's input_scale: nothing to apply it to after


@dataclass(frozen=True)
class QuantiseAs:
    """How one weight is quantised to E4M3: in `block`s, each with its float32 scale,
    the grid of them written as the tensor `weight` + `_scale_inv`."""

    block: tuple[int, int]
    weight: str

    @property
    def scale_name(self) -> str:
        return self.weight + "_scale_inv"


def not_written(scales: ScalesFor) -> set[str]:
    """The tensors a dequantisation leaves out: the scales and what goes with them."""
    first = next(iter(scales.values()), None)
    if first is None or isinstance(first, QuantiseAs):  # a quantisation writes every tensor (and makes scales)
        return set()
    names = set(map(_SCALE_NAME, scales.values()))
    names.update(chain.from_iterable(map(_ALSO_DROPPED, scales.values())))
    return names


_SCALE_NAME = attrgetter("scale.info.name")
_ALSO_DROPPED = attrgetter("also_dropped")


def with_made_scales(tensors: Iterable[SourceTensor], scales: ScalesFor) -> Iterator[SourceTensor]:
    """`tensors` and, after each weight a quantisation quantises, its scale tensor: the
    same source bytes under the scale's name (the planner gives it the grid's shape)."""
    for tensor in tensors:
        yield tensor
        of = scales.get(tensor.name)
        if isinstance(of, QuantiseAs):
            yield tensor._replace(info=tensor.info._replace(name=of.scale_name))


def scales_made(scales: ScalesFor) -> dict[str, QuantiseAs]:
    """scale tensor name -> the quantisation that makes it."""
    return {of.scale_name: of for of in scales.values() if isinstance(of, QuantiseAs)}


@dataclass(frozen=True)
class Source:
    """A file the plan reads, and who it was when its header was read.

    `stat` is what :func:`shardkit.storage.source_changed` compares after the copy:
    (device, inode, size, mtime_ns, ctime_ns) for a local file, ("remote", ETag, size) for an
    object; a plan run against a file that has changed since is discarded.
    """

    path: str
    size: int
    stat: tuple[object, ...] | None = None

    def identity(self) -> dict[str, object]:
        if self.stat is None:
            return {"size": self.size}
        if self.stat[0] == "remote":
            return {"size": self.size, "etag": self.stat[1]}
        device, inode, size, mtime_ns, ctime_ns = self.stat
        return {"size": size, "device": device, "inode": inode, "mtime_ns": mtime_ns, "ctime_ns": ctime_ns}


@dataclass(frozen=True)
class Literal:
    """Bytes the plan itself holds (a header, padding), at `offset` of the output."""

    offset: int
    data: bytes

    @property
    def length(self) -> int:
        return len(self.data)


@dataclass(frozen=True)
class Copy:
    """`length` bytes of `source` from `source_offset`, unchanged, at `offset` of the output."""

    offset: int
    length: int
    source: str
    source_offset: int


@dataclass(frozen=True)
class Scales:
    """The block scales a dequantising transform multiplies by: the float32 grid
    `grid` (block rows × blocks per row) of tensor `tensor`, `source_length` bytes at
    `source_offset` of `source`, one scale per `block` of a weight with `columns`
    columns (the last block of a row or column may be partial)."""

    source: str
    source_offset: int
    source_length: int
    tensor: str
    grid: tuple[int, int]
    block: tuple[int, int]
    columns: int
    dtype: str = "F32"  # of the scales (compressed-tensors stores them in the model's dtype)
    product_dtype: str = "F32"  # the products are rounded to this before the output's dtype

    def band_span(self, first_band: int, last_band: int) -> tuple[str, int, int]:
        """(source, offset, length) of the scale rows of block rows first..last."""
        row = self.grid[1] * (DTYPES[self.dtype].bits // 8)
        return self.source, self.source_offset + first_band * row, (last_band - first_band + 1) * row


@dataclass(frozen=True)
class Quantise:
    """A weight quantised to E4M3 in `block`s (a `rows` × `columns` matrix of whole
    blocks): `part` "codes" makes the E4M3 bytes, "scales" the float32 grid of
    `weight_scale_inv` (one row per band of `block[0]` rows); both read the weight."""

    block: tuple[int, int]
    rows: int
    columns: int
    part: str  # "codes" or "scales"

    @property
    def band_bytes(self) -> int:
        """Output bytes per band of block rows."""
        if self.part == "codes":
            return self.block[0] * self.columns
        return self.columns // self.block[1] * 4

    def bands(self, lo: int, hi: int) -> range:
        """The bands output bytes [lo, hi) of this part lie in."""
        return range(lo // self.band_bytes, -(-hi // self.band_bytes))


@dataclass(frozen=True)
class Gather:
    """Where a strided tensor's elements are: element (i0, i1, ...) in C order is at
    `source_offset + (i0*stride[0] + i1*stride[1] + ...) * itemsize` of the source.
    A torch file stores a transposed or sliced view as its whole storage plus this."""

    shape: tuple[int, ...]
    stride: tuple[int, ...]  # in elements

    def span(self, itemsize: int) -> int:
        """Bytes from the first element's start to the last one's end."""
        return (sum((n - 1) * s for n, s in zip(self.shape, self.stride)) + 1) * itemsize


@dataclass(frozen=True)
class Transform:
    """A tensor's elements re-encoded: `source_length` bytes of `src_dtype` elements at
    `source_offset` of `source` become `length` bytes of `dst_dtype` at `offset`.

    With `gather`, the elements are not one run of source bytes but a strided view
    (made contiguous, as `tensor.contiguous()` does); `source_length` is still what
    they would take as one run. Either or both (gather, then cast) may apply.

    What it produces (dtype, size, place) is fixed here; the bytes are made while
    writing, a chunk at a time, by :func:`shardkit.plan.fill.fill`. The range covers whole
    elements on both sides, so any part of it can be produced on its own.
    """

    offset: int
    length: int
    source: str
    source_offset: int
    source_length: int
    src_dtype: str
    dst_dtype: str
    tensor: str
    scales: Scales | None = None  # set: FP8 elements dequantised by these block scales
    gather: Gather | None = None  # set: a strided view gathered into C order
    quantise: Quantise | None = None  # set: quantised to E4M3 codes or their scale grid

    def band_span(self, band: int) -> tuple[str, int, int]:
        """The source bytes of one band of block rows of a quantised weight."""
        assert self.quantise is not None
        size = self.quantise.block[0] * self.quantise.columns * (DTYPES[self.src_dtype].bits // 8)
        return self.source, self.source_offset + band * size, size

    def scale_span(self, first_element: int, last_element: int) -> tuple[str, int, int]:
        """The scale bytes that elements first..last (inclusive) are multiplied by."""
        assert self.scales is not None
        rows = self.scales.block[0]
        columns = self.scales.columns
        return self.scales.band_span(first_element // columns // rows, last_element // columns // rows)


Step = Literal | Copy | Transform


@dataclass(frozen=True)
class PlannedFile:
    """One output file as the steps that fill it, contiguous from offset 0 to `size`."""

    name: str  # relative to the output folder
    steps: tuple[Step, ...]
    tensors: tuple[str, ...]  # in data order
    size: int
    header_size: int = 0  # bytes before the first tensor (length prefix + JSON)
    packed: tuple[str, ...] = ()  # a split's shard: its tensors in the (natural name) order they were packed

    @property
    def data_bytes(self) -> int:
        return self.size - self.header_size

    @property
    def copies(self) -> tuple[Copy, ...]:
        return tuple(s for s in self.steps if isinstance(s, Copy))

    @property
    def transforms(self) -> tuple[Transform, ...]:
        return tuple(s for s in self.steps if isinstance(s, Transform))

    @property
    def literal_bytes(self) -> int:
        return sum(s.length for s in self.steps if isinstance(s, Literal))

    @cached_property
    def starts(self) -> list[int]:
        """Each step's output offset, for bisecting to the step that holds a byte."""
        return [s.offset for s in self.steps]

    def steps_in(self, start: int, end: int) -> Iterator[Step]:
        """The steps that overlap bytes [start, end) of this file, in order."""
        index = max(bisect.bisect_right(self.starts, start) - 1, 0)
        while index < len(self.steps) and self.steps[index].offset < end:
            step = self.steps[index]
            if step.offset + step.length > start:
                yield step
            index += 1

    def source_spans(self, start: int, end: int) -> Iterator[tuple[str, int, int]]:
        """(source, offset, length) of the source bytes that bytes [start, end) are made
        from: what to read ahead, or what a client fetches to make them."""
        for step in self.steps_in(start, end):
            lo, hi = max(start, step.offset) - step.offset, min(end, step.offset + step.length) - step.offset
            if isinstance(step, Copy):
                yield step.source, step.source_offset + lo, hi - lo
            elif isinstance(step, Transform):
                src, dst = DTYPES[step.src_dtype].bits // 8, DTYPES[step.dst_dtype].bits // 8
                if step.quantise is not None:  # whole bands of block rows
                    bands = step.quantise.bands(lo, hi)
                    source, first, size = step.band_span(bands.start)
                    yield source, first, size * len(bands)
                    continue
                if step.gather is not None:  # any element may be anywhere in the view's span
                    yield step.source, step.source_offset, step.gather.span(src)
                    continue
                first, last = lo // dst, -(-hi // dst)
                yield step.source, step.source_offset + first * src, (last - first) * src
                if step.scales is not None:
                    yield step.scale_span(first, last - 1)

    def only_copies(self, start: int, end: int) -> bool:
        """Whether bytes [start, end) are plain copies, which a fast path may move by itself."""
        return all(isinstance(s, Copy) for s in self.steps_in(start, end))


@dataclass(frozen=True)
class FileCopy:
    """A non-weight file (config, tokenizer, README, ...) copied as is, or, when `data`
    is set, written with that content (a config.json whose dtype was changed)."""

    source: Path
    name: str
    data: bytes | None = None


@dataclass(frozen=True)
class IndexFile:
    """The index a folder output gets: its file name and its JSON document, one value
    so that neither can be set without the other."""

    name: str
    document: Mapping[str, object]


@dataclass(frozen=True)
class Plan:
    """Everything a run writes: weight files, then companion files, then the index.

    Self-contained: `sources` names every file read with the identity it had when its
    header was read, so a plan can be printed, compared, dumped and executed without
    the checkpoint it came from.
    """

    files: tuple[PlannedFile, ...]
    index: IndexFile | None = None
    copies: tuple[FileCopy, ...] = ()
    warnings: tuple[str, ...] = field(default=())
    sources: tuple[Source, ...] = ()

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def tensor_count(self) -> int:
        return sum(len(f.tensors) for f in self.files)

    @property
    def writes(self) -> tuple[str, ...]:
        """Every file written, in the order it is written (an index never names a shard
        that is not there yet)."""
        names = [f.name for f in self.files] + [c.name for c in self.copies]
        return tuple(names + ([self.index.name] if self.index else []))

    @property
    def index_name(self) -> str | None:
        return self.index.name if self.index is not None else None

    @gc_paused()  # a dict per step, no cycles: collections would only rescan them
    def to_dict(self) -> dict[str, object]:
        """The plan as JSON-ready data: literal bytes in base64, nothing left out."""
        return {
            "sources": [{"path": s.path, **s.identity()} for s in self.sources],
            "writes": list(self.writes),
            "files": [
                {
                    "name": f.name, "size": f.size, "header_size": f.header_size, "tensors": list(f.tensors),
                    "steps": [_step_dict(s) for s in f.steps],
                }
                for f in self.files
            ],
            "index_name": self.index_name,
            "index": self.index.document if self.index is not None else None,
            "copies": [
                {"name": c.name, "source": str(c.source), **({"rewritten": True} if c.data is not None else {})}
                for c in self.copies
            ],
        }


def _step_dict(step: Step) -> dict[str, object]:
    if isinstance(step, Literal):
        return {"kind": "literal", "offset": step.offset, "length": step.length,
                "data_base64": base64.b64encode(step.data).decode("ascii")}
    return {"kind": "copy" if isinstance(step, Copy) else "transform", **_record(step)}


def _record(value: object) -> dict[str, object]:
    """`dataclasses.asdict(value)` for a step's frozen records, without deep-copying
    every field (a second for the 46,000 steps of a DeepSeek-V3 dry run): the fields
    are read from the instance's own dict (a dataclass sets them in field order), and
    only those whose type is not plainly immutable (an FP8 weight's `Scales`) are
    converted in turn."""
    names, nested = _FIELDS.get(type(value)) or _fields(type(value))
    record = dict(vars(value))
    if len(record) != len(names):  # something beside the fields (a cached property): take the fields alone
        record = {name: record[name] if name in record else getattr(value, name) for name in names}
    for name in nested:
        inner = record[name]
        if type(inner) not in _PLAIN:
            record[name] = _record(inner) if dataclasses.is_dataclass(inner) else copy.deepcopy(inner)
    return record


#: Field types whose values need no conversion: what asdict would copy is equal and immutable.
_PLAIN = frozenset({int, str, bytes, float, bool, tuple, type(None)})
_PLAIN_TYPES = frozenset({"int", "str", "bytes", "float", "bool", "tuple[int, ...]", "tuple[int, int]"})
_FIELDS: dict[type, tuple[tuple[str, ...], tuple[str, ...]]] = {}


def _fields(cls: type) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The field names of a record class, and those that may hold another record."""
    fields = dataclasses.fields(cls)
    _FIELDS[cls] = (
        tuple(f.name for f in fields),
        tuple(f.name for f in fields if str(f.type).removesuffix(" | None") not in _PLAIN_TYPES),
    )
    return _FIELDS[cls]


def check_planned_file(planned: PlannedFile) -> None:
    """Raise ValueError unless the steps tile the file exactly and each is well formed:
    contiguous from 0 to `size`, none empty, transforms whole elements on both sides."""
    position = 0
    for number, step in enumerate(planned.steps):
        where = f"{planned.name}: step {number}"
        if step.offset != position:
            raise ValueError(f"{where} starts at {step.offset}, expected {position}")
        if step.length <= 0:
            raise ValueError(f"{where} is empty")
        if isinstance(step, Transform) and step.quantise is None:
            src, dst = DTYPES[step.src_dtype].bits, DTYPES[step.dst_dtype].bits
            elements = step.source_length * 8 // src
            if step.source_length * 8 % src or step.length * 8 % dst or elements != step.length * 8 // dst:
                raise ValueError(f"{where} does not map whole {step.src_dtype} elements to {step.dst_dtype}")
        position += step.length
    if position != planned.size:
        raise ValueError(f"{planned.name}: steps end at {position}, the file is {planned.size} bytes")


def merged_metadata(checkpoint: Checkpoint) -> tuple[dict[str, str], list[str]]:
    """The shards' :func:`~shardkit.checkpoint.metadata.metadata_union`, with
    `format: pt` ensured: transformers refuses a file whose metadata lacks it."""
    metadata, warnings = metadata_union(checkpoint.shards)
    metadata.setdefault("format", "pt")
    if metadata["format"] != "pt":
        warnings.append(f"metadata format is {metadata['format']!r}, not 'pt'; kept as is")
    return metadata, warnings


def plan_file(
    name: str,
    tensors: Iterable[SourceTensor],
    metadata: Mapping[str, str] | None,
    dtype_for: DtypeFor | None = None,
    scales: ScalesFor | None = None,
) -> PlannedFile:
    """Lay out one file: its header as a literal, then each tensor as a copy (adjacent
    copies coalesced) or, where `dtype_for` changes its dtype, as a transform; a weight
    in `scales` is dequantised by its scale tensor, which is left out, or quantised (its
    scale tensor, from :func:`with_made_scales`, among `tensors`)."""
    scales = scales or {}
    dropped = not_written(scales)
    made = scales_made(scales)
    given = list(tensors)
    by_name = dict(zip(map(_SOURCE_NAME, given), given))  # by map: a MoE merge plans 500,000
    for tensor in dropped & by_name.keys():
        del by_name[tensor]
    if made:
        assert dtype_for is not None
        specs: Iterable[TensorSpec] = (_quantised_spec(t, dtype_for(t), made) for t in by_name.values())
    elif dtype_for is None:
        infos = list(map(_INFO, by_name.values()))
        sizes = map(sub, map(_END, infos), map(_BEGIN, infos))
        specs = map(
            _make_spec, zip(map(_NAME, infos), map(_DTYPE, infos), map(_SHAPE, infos), sizes)
        )
    else:
        dtypes = {n: dtype_for(t) for n, t in by_name.items()}
        specs = (TensorSpec(n, dtypes[n], t.info.shape, _output_nbytes(t, dtypes[n])) for n, t in by_name.items())
    header, placed = serialize_header(specs, metadata)
    refuse_oversized_header(name, header, metadata or {}, len(placed))
    steps = _Steps([Literal(0, header)] if header else [])
    add_copy = steps.copy
    for spec, offset in placed:
        if spec.nbytes == 0:
            continue
        source = by_name[spec.name]
        dest = len(header) + offset
        of = scales.get(spec.name)
        quantised = made.get(spec.name) or (of if isinstance(of, QuantiseAs) else None)
        if quantised is not None:
            steps.add(_quantise_step(source, dest, spec, quantised))
            continue
        if not source.pieces:
            scale = _scales(source, of)
            if spec.dtype == source.info.dtype and source.view is None:
                shard = source.shard
                add_copy(dest, spec.nbytes, shard.path, shard.data_start + source.info.begin)
            else:
                steps.add(tensor_transform(source, dest, spec.dtype, spec.nbytes, scale))
            continue
        if spec.name in scales:
            raise BadInputError(f"{spec.name}: a fused tensor cannot be dequantised by block scales")
        for piece in source.pieces:  # a recipe's fuse or swap: each piece copied (or cast) in turn
            nbytes = _output_nbytes(piece, spec.dtype)
            if spec.dtype == piece.info.dtype and piece.view is None:
                add_copy(dest, nbytes, piece.shard.path, piece.offset)
            else:
                steps.add(tensor_transform(piece, dest, spec.dtype, nbytes, None))
            dest += nbytes
    data = sum(map(_NBYTES, map(_FIRST, placed)))
    return PlannedFile(name, steps.done(), tuple(map(_NAME, map(_FIRST, placed))), len(header) + data, len(header))


class _Steps:
    """A file's steps as they are added, adjacent copies coalesced: a copy whose bytes
    follow on in the same source is kept as four numbers and becomes one Copy when a
    step that does not follow on comes (a Copy made, then replaced, per tensor was
    most of planning the merge of a MoE index)."""

    def __init__(self, steps: list[Step]) -> None:
        self._steps = steps
        self._run: list[Any] | None = None  # [offset, length, source, source_offset]

    def copy(self, offset: int, length: int, source: str, source_offset: int) -> None:
        run = self._run
        if run is not None and run[2] == source and run[3] + run[1] == source_offset and run[0] + run[1] == offset:
            run[1] += length
            return
        self._end_run()
        self._run = [offset, length, source, source_offset]

    def add(self, step: Step) -> None:
        self._end_run()
        self._steps.append(step)

    def done(self) -> tuple[Step, ...]:
        self._end_run()
        return tuple(self._steps)

    def _end_run(self) -> None:
        if self._run is not None:
            self._steps.append(Copy(*self._run))
            self._run = None


_FIRST, _NBYTES, _SOURCE_NAME = itemgetter(0), attrgetter("nbytes"), attrgetter("info.name")
_NAME, _DTYPE, _SHAPE, _BEGIN, _END = map(attrgetter, ("name", "dtype", "shape", "begin", "end"))


def made_by_scales(name: str, source: SourceTensor, dtype: str, scales: ScalesFor) -> Transform | None:
    """The step (at offset 0) that makes output tensor `name` from `source` in a run that
    (de)quantises by `scales`: a dequantised weight, a quantised weight's codes, or the
    scale grid made from the weight `source`; None for any other tensor. What `--verify`
    recomputes and compares with what was written."""
    made = scales_made(scales)
    of = scales.get(name)
    if name in made:
        renamed = source._replace(info=source.info._replace(name=name))
        return _quantise_step(renamed, 0, _quantised_spec(renamed, "F32", made), made[name])
    if isinstance(of, QuantiseAs):
        return _quantise_step(source, 0, _quantised_spec(source, dtype, made), of)
    if isinstance(of, ScaleOf):
        return tensor_transform(source, 0, dtype, tensor_nbytes(dtype, source.info.shape), _scales(source, of))
    return None


def _quantised_spec(tensor: SourceTensor, dtype: str, made: Mapping[str, QuantiseAs]) -> TensorSpec:
    """A tensor's entry in the header of a quantised file: a made scale tensor has its grid's shape."""
    of = made.get(tensor.name)
    if of is None:
        return TensorSpec(tensor.name, dtype, tensor.info.shape, _output_nbytes(tensor, dtype))
    rows, columns = tensor.info.shape
    grid = (rows // of.block[0], columns // of.block[1])
    return TensorSpec(tensor.name, "F32", grid, grid[0] * grid[1] * 4)


def _quantise_step(source: SourceTensor, dest: int, spec: TensorSpec, of: QuantiseAs) -> Transform:
    if source.pieces or source.view is not None:
        raise BadInputError(f"{spec.name}: a fused or strided tensor cannot be quantised; save it contiguous first")
    rows, columns = source.info.shape
    part = "scales" if spec.name == of.scale_name else "codes"
    return Transform(
        dest, spec.nbytes, source.shard.path, source.offset, source.info.nbytes, source.info.dtype, spec.dtype,
        spec.name, quantise=Quantise(of.block, rows, columns, part),
    )


def _scales(weight: SourceTensor, of: ScaleOf | QuantiseAs | None) -> Scales | None:
    if not isinstance(of, ScaleOf):
        return None
    scale = of.scale
    rows, columns = weight.info.shape[-2:]
    grid = (-(-rows // of.block[0]), -(-columns // of.block[1]))
    return Scales(
        scale.shard.path, scale.offset, scale.info.nbytes, scale.name, grid, of.block, columns,
        scale.info.dtype, of.product_dtype,
    )


def tensor_transform(
    source: SourceTensor, offset: int, dtype: str, nbytes: int, scales: Scales | None = None
) -> Transform:
    """The step that makes `source` contiguous in `dtype` (`nbytes` of it) at `offset`,
    dequantised by `scales` when given."""
    view = source.view
    gather = Gather(view.shape, view.stride) if view is not None else None
    if gather is not None and scales is not None:
        raise BadInputError(
            f"{source.name}: a strided FP8 view with block scales cannot be dequantised; save it contiguous first"
        )
    return Transform(
        offset, nbytes, source.shard.path, source.offset, source.info.nbytes, source.info.dtype, dtype,
        source.name, scales, gather,
    )


_make_spec = record_maker(TensorSpec)
_INFO = attrgetter("info")


def _output_nbytes(tensor: SourceTensor, dtype: str) -> int:
    return tensor.info.nbytes if dtype == tensor.info.dtype else tensor_nbytes(dtype, tensor.info.shape)


def plan_sources(checkpoint: Checkpoint) -> tuple[Source, ...]:
    return tuple(Source(h.path, h.file_size, h.stat) for h in checkpoint.shards)


def tied_warnings(checkpoint: Checkpoint) -> tuple[str, ...]:
    """One line per torch file whose tied tensors are written once (see
    :mod:`shardkit.format.torch_checkpoint`): which names were dropped for which."""
    lines = []
    for shard in checkpoint.shards:
        dropped = getattr(shard, "dropped", None)
        if dropped:
            pairs = ", ".join(f"{name} (= {kept})" for name, kept in sorted(dropped.items()))
            lines.append(
                f"{Path(shard.path).name}: {len(dropped)} tied tensor name(s) share a storage with a kept "
                f"tensor and are written once, recorded in the file's metadata as the Hub converter does: {pairs}"
            )
    return tuple(lines)


def plan_convert(
    checkpoint: Checkpoint,
    copies: Sequence[FileCopy] = (),
    dtype_for: DtypeFor | None = None,
    scales: ScalesFor | None = None,
) -> Plan:
    """The folder the Hub's converter makes of a `.bin` checkpoint: one safetensors file
    per source file with the same tensors and metadata (`pytorch_model-00001-of-00002.bin`
    → `model-00001-of-00002.safetensors`), and for several an index
    `model.safetensors.index.json` keeping the source index's metadata."""
    from ..format.torch_checkpoint import safetensors_name

    by_shard: dict[str, list[SourceTensor]] = {}
    for tensor in with_made_scales(checkpoint.tensors.values(), scales or {}):
        by_shard.setdefault(tensor.shard.path, []).append(tensor)
    files = tuple(
        plan_file(safetensors_name(Path(shard.path).name), by_shard.get(shard.path, []),
                  {"format": "pt", **(shard.metadata or {})}, dtype_for, scales)
        for shard in checkpoint.shards
    )
    names = [f.name for f in files]
    if len(set(names)) != len(names):
        raise BadInputError(f"{checkpoint.root}: two source files would convert to the same name ({names})")
    index = None
    if len(files) > 1:
        single = single_file_name_for(checkpoint.index_path.name) if checkpoint.index_path else "model.safetensors"
        index = IndexFile(f"{single}.index.json", _hub_index(checkpoint, files))
    warnings = tuple(checkpoint.warnings) + tied_warnings(checkpoint)
    return Plan(files, index, tuple(copies), warnings, plan_sources(checkpoint))




@gc_paused()  # a million tensors' steps and specs: no cycles, nothing for the collector
def plan_merge(
    checkpoint: Checkpoint,
    file_name: str,
    copies: Sequence[FileCopy] = (),
    dtype_for: DtypeFor | None = None,
    scales: ScalesFor | None = None,
) -> Plan:
    """Every tensor into one file called `file_name`."""
    metadata, warnings = merged_metadata(checkpoint)
    tensors = with_made_scales(checkpoint.tensors.values(), scales) if scales else checkpoint.tensors.values()
    planned = plan_file(file_name, tensors, metadata, dtype_for, scales)
    return Plan(
        (planned,), copies=tuple(copies),
        warnings=checkpoint.notes + checkpoint.warnings + tuple(warnings) + tied_warnings(checkpoint),
        sources=plan_sources(checkpoint),
    )


def refuse_oversized_header(name: str, header: bytes, metadata: Mapping[str, str], tensors: int) -> None:
    """Refuse, before anything is written, a header over the format's limit, naming the
    metadata keys that make it so: the fewest largest keys whose removal brings it
    under, and every other key of 1 MB or more. Shards that are each valid can carry
    metadata whose union (which merge and split copy into every output file) is not."""
    excess = header_excess(header)
    if not excess:
        return
    sizes = sorted(
        ((len(header_json.dumps_compact({key: value}).encode()) - 1, key) for key, value in metadata.items()),
        reverse=True,
    )
    culprits: list[str] = []
    freed = 0
    for size, key in sizes:
        if freed >= excess and size < _LARGE_METADATA:
            break
        culprits.append(f"{key!r} ({size:,} bytes)")
        freed += size
    over = (
        f"{name}: its header would be {len(header) - LENGTH_PREFIX:,} bytes, "
        f"over the format's {MAX_HEADER_SIZE:,}-byte limit"
    )
    if freed < excess:
        raise BadInputError(
            f"{over}: {tensors:,} tensors are too many for one header; spread them over more files "
            f"(a smaller {option_name('max_shard_size')})"
        )
    shown = ", ".join(culprits[:10]) + (f" and {len(culprits) - 10} more" if len(culprits) > 10 else "")
    raise BadInputError(
        f"{over}, so no reader could open it; the metadata that makes it too large: {shown}; "
        "remove or shorten these keys in the sources' __metadata__"
    )


#: A metadata value this large is named when a header is over the limit, even if
#: removing the larger ones alone would do.
_LARGE_METADATA = 1_000_000


def group_into_shards(sizes: Sequence[tuple[str, int]], max_shard_size: int) -> list[list[str]]:
    """huggingface_hub's packing (`split_state_dict_into_shards_factory`), exactly.

    Tensors are taken in the given order and added to the current shard until the
    next one would tip it over `max_shard_size`; a tensor bigger than the limit gets
    a shard of its own, placed before the shard being filled.
    """
    shards: list[list[str]] = []
    current: list[str] = []
    current_size = 0
    for name, size in sizes:
        if size > max_shard_size:
            shards.append([name])
            continue
        if current_size + size > max_shard_size:
            shards.append(current)
            current, current_size = [], 0
        current.append(name)
        current_size += size
    if current:
        shards.append(current)
    return shards


def shard_file_names(prefix: str, count: int) -> list[str]:
    if count == 1:
        return [f"{prefix}.safetensors"]
    return [f"{prefix}-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


@gc_paused()
def plan_split(
    checkpoint: Checkpoint,
    max_shard_size: int,
    prefix: str = "model",
    copies: Sequence[FileCopy] = (),
    dtype_for: DtypeFor | None = None,
    scales: ScalesFor | None = None,
) -> Plan:
    """Shards of at most `max_shard_size` data bytes plus a Hugging Face index.

    Tensors are packed in natural name order, so the grouping depends only on the
    tensors, never on how the source happened to be sharded: splitting a merge of a
    split reproduces that split. One shard means `{prefix}.safetensors` and no index.
    Shards are packed by the tensors' output sizes, so a conversion packs as
    `save_pretrained` of the converted model would.
    """
    metadata, warnings = merged_metadata(checkpoint)
    scales = scales or {}
    dropped = not_written(scales)
    made = scales_made(scales)
    # Without scales nothing is added or left out: the checkpoint's own name -> tensor map
    # is what would be rebuilt (a third of a second for 500,000 tensors), as plan_merge takes it.
    written = checkpoint.tensors if not scales else {
        t.name: t for t in with_made_scales(checkpoint.tensors.values(), scales) if t.name not in dropped
    }
    in_order = sorted(written, key=natural_key)
    if made:
        assert dtype_for is not None
        sizes = [(name, _quantised_spec(written[name], dtype_for(written[name]), made).nbytes) for name in in_order]
    elif dtype_for is None:
        infos = list(map(_INFO, map(written.__getitem__, in_order)))
        sizes = list(zip(in_order, map(sub, map(_END, infos), map(_BEGIN, infos))))
    else:
        sizes = [(name, _output_nbytes(written[name], dtype_for(written[name]))) for name in in_order]
    groups = group_into_shards(sizes, max_shard_size)
    if not groups:
        groups = [[]]
    names = shard_file_names(prefix, len(groups))
    files = tuple(
        dataclasses.replace(
            plan_file(name, (written[t] for t in group), metadata, dtype_for, scales), packed=tuple(group)
        )
        for name, group in zip(names, groups)
    )
    index = IndexFile(f"{prefix}.safetensors.index.json", _hub_index(checkpoint, files)) if len(files) > 1 else None
    warnings = [*checkpoint.notes, *checkpoint.warnings, *warnings, *tied_warnings(checkpoint)]
    return Plan(files, index, tuple(copies), tuple(warnings), plan_sources(checkpoint))


def _hub_index(checkpoint: Checkpoint, files: Sequence[PlannedFile]) -> dict[str, object]:
    """A Hugging Face index of `files`: the source index's metadata, total_size recounted."""
    metadata = {k: v for k, v in checkpoint.index_metadata.items() if k != "total_size"}
    metadata["total_size"] = sum(f.data_bytes for f in files)
    weight_map = {t: f.name for f in files for t in f.tensors}
    return {"metadata": metadata, "weight_map": dict(sorted(weight_map.items()))}
