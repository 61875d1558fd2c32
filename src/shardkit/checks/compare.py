"""Tensor-by-tensor comparison of two checkpoints, whatever their sharding.

The engine behind `diff` and `verify --against`: names, dtypes and shapes come from
the headers; data is compared by streaming both sides in fixed-size chunks, so memory
stays constant whatever the tensor or model size. Reads follow each side's file order
so that both sides are read sequentially. Either side may be remote: bytes are read
through :func:`shardkit.storage.open_reader` (pread locally, ranged GETs remotely).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from ..checkpoint.shards import Checkpoint, SourceTensor
from ..engine.source_files import SourceFiles
from ..format.header import DTYPES
from ..plan.files import PlannedFile, ScalesFor, Transform, made_by_scales, not_written, scales_made
from ..plan.tensor_bytes import read_tensor

CHUNK = 8 * 1024 * 1024


@dataclass(frozen=True)
class TensorChange:
    """A tensor present on both sides whose dtype or shape differs."""

    name: str
    a: str
    b: str


@dataclass(frozen=True)
class Comparison:
    only_a: list[str] = field(default_factory=list)
    only_b: list[str] = field(default_factory=list)
    dtype_changed: list[TensorChange] = field(default_factory=list)
    shape_changed: list[TensorChange] = field(default_factory=list)
    data_different: list[str] = field(default_factory=list)
    data_equal: int = 0
    data_compared: bool = True
    compared_bytes: int = 0

    @property
    def identical(self) -> bool:
        return not (self.only_a or self.only_b or self.dtype_changed or self.shape_changed or self.data_different)

    def swapped(self) -> Comparison:
        """The same comparison with the sides exchanged."""
        return Comparison(
            self.only_b, self.only_a,
            [TensorChange(c.name, c.b, c.a) for c in self.dtype_changed],
            [TensorChange(c.name, c.b, c.a) for c in self.shape_changed],
            self.data_different, self.data_equal, self.data_compared, self.compared_bytes,
        )

    def problems(self) -> list[str]:
        """One line per difference, naming the tensor."""
        lines = [f"tensor {n!r} is only in the first checkpoint" for n in self.only_a]
        lines += [f"tensor {n!r} is only in the second checkpoint" for n in self.only_b]
        lines += [f"tensor {c.name!r} has dtype {c.a} in the first and {c.b} in the second" for c in self.dtype_changed]
        lines += [f"tensor {c.name!r} has shape {c.a} in the first and {c.b} in the second" for c in self.shape_changed]
        lines += [f"tensor {n!r} holds different bytes" for n in self.data_different]
        return lines


class _Readers:
    """Readers of the files being compared, through :class:`SourceFiles`: thousands of
    local shards stay within the descriptor limit, remote files are opened once each."""

    def __init__(self) -> None:
        self._files = SourceFiles()

    def read(self, tensor: SourceTensor, done: int, length: int) -> bytes:
        """`length` bytes of `tensor`'s data from `done` on."""
        if tensor.pieces:
            return b"".join(self.read(piece, start, size) for piece, start, size in tensor.piece_spans(done, length))
        return read_tensor(tensor, self._files.reader(tensor.shard.path), done, length)

    def read_at(self, path: str, offset: int, into: memoryview) -> None:
        """Fill `into` with the bytes of the file `path` from `offset` (a plan step's `read`)."""
        into[:] = self._files.reader(path).read(offset, len(into))

    def close(self) -> None:
        self._files.close()


def same_bytes(
    a: SourceTensor, b: SourceTensor, readers: _Readers, on_bytes: Callable[[int], None] | None = None
) -> bool:
    """Whether two tensors' data are byte-identical, read in chunks."""
    length = a.info.nbytes
    if length != b.info.nbytes:
        return False
    done = 0
    while done < length:
        step = min(CHUNK, length - done)
        if readers.read(a, done, step) != readers.read(b, done, step):
            return False
        done += step
        if on_bytes is not None:
            on_bytes(step)
    return True


def same_converted(
    a: SourceTensor, b: SourceTensor, readers: _Readers, on_bytes: Callable[[int], None] | None = None
) -> bool:
    """Whether `b` holds exactly the conversion of `a`'s elements to `b`'s dtype,
    recomputed chunk by chunk (the cast is deterministic, so bytes compare exactly)."""
    from ..format import dtype_cast

    src, dst = DTYPES[a.info.dtype].bits // 8, DTYPES[b.info.dtype].bits // 8
    count = a.info.nelements
    if a.info.nbytes != count * src or b.info.nbytes != count * dst:
        return False
    per_chunk = max(1, CHUNK // max(src, dst))
    done = 0
    while done < count:
        step = min(per_chunk, count - done)
        expected = bytearray(step * dst)
        source = readers.read(a, done * src, step * src)
        dtype_cast.cast_into(memoryview(source), a.info.dtype, b.info.dtype, memoryview(expected))
        if readers.read(b, done * dst, step * dst) != expected:
            return False
        done += step
        if on_bytes is not None:
            on_bytes(step * (src + dst))
    return True


def same_made(
    step: Transform, b: SourceTensor, readers: _Readers, on_bytes: Callable[[int], None] | None = None
) -> bool:
    """Whether `b` holds exactly what `step` makes (a dequantised weight, a quantised
    weight's codes or scales), remade chunk by chunk by the writer's own `fill`."""
    from ..plan.fill import fill

    if step.length != b.info.nbytes:
        return False
    planned = PlannedFile(b.name, (step,), (b.name,), step.length)
    done = 0
    while done < step.length:
        size = min(CHUNK, step.length - done)
        expected = bytearray(size)
        fill(planned, done, memoryview(expected), readers.read_at)
        if readers.read(b, done, size) != expected:
            return False
        done += size
        if on_bytes is not None:
            on_bytes(size)
    return True


def compare_checkpoints(
    a: Checkpoint,
    b: Checkpoint,
    *,
    data: bool = True,
    on_bytes: Callable[[int], None] | None = None,
    on_difference: Callable[[SourceTensor, SourceTensor, _Readers], None] | None = None,
    converted: Mapping[str, str] | None = None,
    scales: ScalesFor | None = None,
) -> Comparison:
    """Compare names, dtypes, shapes and (unless `data=False`) every byte.

    `on_difference` is called for each pair whose bytes differ, with readers still
    open, so callers can measure how they differ (e.g. max absolute difference).
    With `converted` (tensor name -> dtype), `b` is expected to hold those tensors of
    `a` converted to that dtype: their dtype must be it and their bytes the cast's.
    With `scales`, `b` is `a` dequantised or quantised by them (see
    :data:`shardkit.plan.files.ScalesFor`): a dequantisation's scales are not expected
    in `b`, a quantisation's are, each made from its weight in `a`, and every such
    tensor must hold what the writer's step makes from `a`.
    """
    scales = scales or {}
    made = scales_made(scales)
    names_a, names_b = (set(a.tensors) - not_written(scales)) | set(made), set(b.tensors)
    only_a, only_b = sorted(names_a - names_b), sorted(names_b - names_a)
    dtype_changed: list[TensorChange] = []
    shape_changed: list[TensorChange] = []
    comparable: list[tuple[str, SourceTensor, SourceTensor, Transform | None]] = []
    for name in sorted(names_a & names_b):
        ta, tb = a.tensors[made[name].weight] if name in made else a.tensors[name], b.tensors[name]
        expected = converted.get(name, ta.info.dtype) if converted is not None else ta.info.dtype
        step = made_by_scales(name, ta, expected, scales) if scales else None
        shape = ta.info.shape
        if name in made:
            block = made[name].block
            shape = (shape[0] // block[0], shape[1] // block[1])
        if expected != tb.info.dtype:
            dtype_changed.append(TensorChange(name, expected, tb.info.dtype))
        elif shape != tb.info.shape:
            shape_changed.append(TensorChange(name, str(list(shape)), str(list(tb.info.shape))))
        else:
            comparable.append((name, ta, tb, step))
    if not data:
        return Comparison(only_a, only_b, dtype_changed, shape_changed, data_compared=False)
    comparable.sort(key=lambda pair: (pair[1].shard.path, pair[1].offset))
    readers = _Readers()
    different: list[str] = []
    equal = compared = 0
    try:
        for name, ta, tb, step in comparable:
            if step is not None:
                same = same_made(step, tb, readers, on_bytes)
            elif ta.info.dtype == tb.info.dtype:
                same = same_bytes(ta, tb, readers, on_bytes)
            else:
                same = same_converted(ta, tb, readers, on_bytes)
            if same:
                equal += 1
            else:
                different.append(name)
                if on_difference is not None:
                    on_difference(ta, tb, readers)
            compared += ta.info.nbytes
    finally:
        readers.close()
    return Comparison(only_a, only_b, dtype_changed, shape_changed, sorted(different), equal, True, compared)
