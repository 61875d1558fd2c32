"""The one function that produces any byte range of a planned file from its steps.

Every executor calls :func:`fill` for whatever it cannot move by itself: the local
block writer for every block, the kernel copy and the S3 executors for every range
that is not a plain copy (headers, converted tensors). So what a literal, a copy and a
transform mean is written once, here, and replaying a plan on bytes in memory (the
tests do) exercises the same code that writes to disk.

Sources are read through a `read(source, offset, into)` callback that fills `into`
exactly, so the same function serves file descriptors and ranged GETs. A transform
reads its source a bounded chunk at a time (:data:`SCRATCH` bytes per thread), so
converting a multi-GB tensor needs no more memory than copying it.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from ..format.dtype_cast import CastStats, cast_into, cast_parallel
from ..format.header import DTYPES
from .files import Copy, Literal, PlannedFile, Transform

#: `read(source, offset, into)`: fill `into` with the bytes of `source` from `offset`.
Read = Callable[[str, int, memoryview], None]
#: `read.view(source, offset, length)`, where a `read` has it: those bytes where they
#: already are in memory (a source stream's slot), lent without a copy, or None.
Lend = Callable[[str, int, int], "memoryview | None"]

#: Source bytes read per call (one such buffer per thread that fills): a dequantised
#: chunk, a window of a strided gather.
SCRATCH = 4 * 1024 * 1024
#: Source bytes a cast reads and converts per call where reads are cheap (pread from the
#: page cache; `fill(..., cast_read=CAST_READ)`): what `read` just copied in is then
#: still in the core's L2 (2 MiB here) when the conversion reads it, its scratch beside
#: it. Measured per CPU-second, pread plus cast_into, 4 MiB → 256 KiB: F32 → BF16
#: 2.30 → 2.53 GB/s, BF16 → F16 1.30 → 1.42 GB/s; smaller pieces lose it again to
#: per-call overhead. Remote reads keep SCRATCH: each one is a request.
CAST_READ = 256 * 1024
#: Chunk of the output produced per job by :func:`ordered_chunks`.
CHUNK = 8 * 1024 * 1024

_scratch = threading.local()


def fill(
    planned: PlannedFile, start: int, out: memoryview, read: Read, *, workers: int = 1, cast_read: int = SCRATCH
) -> dict[str, CastStats]:
    """Write bytes [start, start + len(out)) of `planned` into `out`.

    Returns the cast statistics (overflow, underflow, NaN counts) of the
    transformed elements this range produced, by tensor. An element cut by the range's
    edges is converted whole and counted only by the range holding its first byte, so
    ranges that tile a file count every element once. `workers` threads convert each
    chunk (the conversion releases the GIL), `cast_read` source bytes at a time (at
    most SCRATCH).
    """
    end = start + len(out)
    stats: dict[str, CastStats] = {}
    for step in planned.steps_in(start, end):
        lo, hi = max(start, step.offset), min(end, step.offset + step.length)
        target = out[lo - start : hi - start]
        into = lo - step.offset
        if isinstance(step, Copy):
            read(step.source, step.source_offset + into, target)
        elif isinstance(step, Literal):
            target[:] = step.data[into : into + len(target)]
        else:
            counted = _transform(step, into, target, read, workers, min(cast_read, SCRATCH))
            if counted is not None:
                stats[step.tensor] = stats[step.tensor] + counted if step.tensor in stats else counted
    return stats


def _transform(
    step: Transform, into: int, target: memoryview, read: Read, workers: int, cast_read: int
) -> CastStats | None:
    """Bytes [into, into + len(target)) of a transform's output."""
    if step.gather is not None:
        return _gathered(step, into, target, read)
    if step.quantise is not None:
        _quantised(step, into, target, read)
        return None
    src_size, dst_size = DTYPES[step.src_dtype].bits // 8, DTYPES[step.dst_dtype].bits // 8
    produce = _dequantiser(step, read) if step.scales is not None else _caster(step, read, workers)
    # a dequantised element passes through float32 scratch: 4 bytes of it per element; a
    # cast from bytes lent in place copies nothing, so it takes them SCRATCH at a time
    # (fewer calls: 12% less CPU for a BF16 → FP16 merge than in 256 KiB pieces)
    lent = getattr(read, "view", None) is not None
    most = SCRATCH // 4 if step.scales is not None else max(1, (SCRATCH if lent else cast_read) // src_size)
    total: CastStats | None = None
    position, end = into, into + len(target)
    while position < end:
        element, cut = divmod(position, dst_size)
        if cut or end - position < dst_size:  # an edge element: convert it whole, keep the part in range
            take = min(dst_size - cut, end - position)
            whole = bytearray(dst_size)
            edge = produce(element, 1, memoryview(whole))
            target[position - into : position - into + take] = whole[cut : cut + take]
            counted = None if cut else edge
        else:
            count = min((end - position) // dst_size, most)
            take = count * dst_size
            counted = produce(element, count, target[position - into : position - into + take])
        if counted is not None:
            total = counted if total is None else total + counted
        position += take
    return total


#: `produce(first_element, count, out)`: write `count` output elements into `out`.
Produce = Callable[[int, int, memoryview], CastStats]


def _caster(step: Transform, read: Read, workers: int) -> Produce:
    src_size = DTYPES[step.src_dtype].bits // 8
    lend: Lend | None = getattr(read, "view", None)

    def produce(element: int, count: int, out: memoryview) -> CastStats:
        offset, length = step.source_offset + element * src_size, count * src_size
        source = lend(step.source, offset, length) if lend is not None else None
        if source is None:
            source = _scratch_buffer()[:length]
            read(step.source, offset, source)
        if workers > 1:
            return cast_parallel(source, step.src_dtype, step.dst_dtype, out, workers)
        return cast_into(source, step.src_dtype, step.dst_dtype, out)

    return produce


def _dequantiser(step: Transform, read: Read) -> Produce:
    """FP8 codes times their block's scale in float32 (:mod:`shardkit.format.fp8`), then the
    float32 products cast to the output dtype as any float32 tensor is."""
    import numpy as np

    from ..format.fp8 import dequantise_by_lookup, dequantise_into, widen

    scales = step.scales
    assert scales is not None

    def produce(element: int, count: int, out: memoryview) -> CastStats:
        codes = _scratch_buffer()[:count]
        read(step.source, step.source_offset + element, codes)
        source, offset, length = step.scale_span(element, element + count - 1)
        grid = bytearray(length)
        read(source, offset, memoryview(grid))
        rows = widen(grid, scales.dtype).reshape(-1, scales.grid[1])
        first_band = element // scales.columns // scales.block[0]
        if scales.product_dtype == "F32":
            looked_up = dequantise_by_lookup(
                np.frombuffer(codes, np.uint8), element, scales.columns, scales.block, rows, first_band,
                step.dst_dtype, out,
            )
            if looked_up is not None:
                return looked_up
        products = _products_buffer()[: count * 4]
        dequantise_into(
            np.frombuffer(codes, np.uint8), element, scales.columns, scales.block, rows, first_band,
            np.frombuffer(products, np.float32),
        )
        if scales.product_dtype == "F32":
            return cast_into(products, "F32", step.dst_dtype, out)
        # compressed-tensors multiplies in the scale's dtype: torch rounds the (exact)
        # float32 product to it, and only then is the result cast to the output's dtype
        rounded = memoryview(bytearray(count * DTYPES[scales.product_dtype].bits // 8))
        cast_into(products, "F32", scales.product_dtype, rounded)
        return cast_into(rounded, scales.product_dtype, step.dst_dtype, out)

    return produce


def _products_buffer() -> memoryview:
    buffer = getattr(_scratch, "products", None)
    if buffer is None:
        buffer = _scratch.products = memoryview(bytearray(SCRATCH))
    return buffer


#: Elements of a quantised weight converted to float32 at a time: a band of block rows
#: is taken in groups of whole blocks of about this many elements (2 MiB of float32).
QUANTISE_ELEMENTS = 512 * 1024


def _quantised(step: Transform, into: int, target: memoryview, read: Read) -> None:
    """Bytes [into, into + len(target)) of a quantised weight's E4M3 codes or of its
    scale grid. Each band of block rows is made whole: a block's scale needs all of it."""
    quantise = step.quantise
    assert quantise is not None
    per_band = quantise.band_bytes
    end = into + len(target)
    for band in quantise.bands(into, end):
        start = band * per_band
        made = _quantise_band(step, band, read)
        lo, hi = max(into, start), min(end, start + per_band)
        target[lo - into : hi - into] = made[lo - start : hi - start]


def _quantise_band(step: Transform, band: int, read: Read) -> memoryview:
    """One band of block rows of a quantised weight: its codes (row-major, as in the
    weight) or its row of scales, float32 bytes. Both need the band's scales, found
    from the raw bits (an integer max, a fifth of the codes' work); the codes are made
    a group of whole blocks at a time, so memory stays bounded for any width."""
    import numpy as np

    from ..format import fp8

    quantise = step.quantise
    assert quantise is not None
    block_rows, block_columns = quantise.block
    columns = quantise.columns
    source, offset, length = step.band_span(band)
    raw = bytearray(length)
    read(source, offset, memoryview(raw))
    src = np.frombuffer(raw, _NUMPY_UINT[step.src_dtype]).reshape(block_rows, columns)
    if step.src_dtype == "F64":  # torch rounds to float32 first; the largest magnitude is of those
        amax = fp8.block_amax(_as_float32(src, "F64").view(np.uint32), "F32", quantise.block)
    else:
        amax = fp8.block_amax(src, step.src_dtype, quantise.block)
    scale, inverse = fp8.scales_of(amax)
    if quantise.part == "scales":
        return memoryview(inverse.reshape(-1).view(np.uint8))
    codes = np.empty((block_rows, columns), np.uint8)
    group = max(block_columns, QUANTISE_ELEMENTS // block_rows // block_columns * block_columns)
    for first in range(0, columns, group):
        last = min(columns, first + group)
        values = _as_float32(np.ascontiguousarray(src[:, first:last]), step.src_dtype)
        part = np.empty(values.shape, np.uint8)
        fp8.quantise_into(values, quantise.block, scale[:, first // block_columns : last // block_columns], part)
        codes[:, first:last] = part
    return memoryview(codes.reshape(-1))  # type: ignore[arg-type]


_NUMPY_UINT = {"F64": "<u8", "F32": "<u4", "F16": "<u2", "BF16": "<u2"}


def _as_float32(elements: Any, dtype: str) -> Any:
    """Source elements (their bits, as unsigned integers) as float32, as torch's `.to(float32)`."""
    import numpy as np

    if dtype == "F32":
        return elements.view(np.float32).copy()
    out = np.empty(elements.shape, np.float32)
    cast_into(elements.reshape(-1).view(np.uint8), dtype, "F32", out.reshape(-1).view(np.uint8))
    return out



#: Source bytes of a strided view gathered per round when it is cast. A transposed
#: view's rows are spread over its whole span, so each round reads all of it; uncast,
#: the elements go straight into the output range, read once per range.
GATHER_BYTES = 8 * 1024 * 1024


def _gathered(step: Transform, into: int, target: memoryview, read: Read) -> CastStats | None:
    """Bytes [into, into + len(target)) of a strided view made contiguous (then cast
    when the dtypes differ)."""
    size = DTYPES[step.src_dtype].bits // 8
    lo, hi = -(-into // size), (into + len(target)) // size
    if step.src_dtype != step.dst_dtype or lo >= hi:
        return _gathered_in_rounds(step, into, target, read)
    _gather(step, lo, hi - lo, target[lo * size - into : hi * size - into], read)
    if into < lo * size:  # the ends of elements cut by the range's edges
        _gathered_in_rounds(step, into, target[: lo * size - into], read)
    if hi * size < into + len(target):
        _gathered_in_rounds(step, hi * size, target[hi * size - into :], read)
    return None


def _gathered_in_rounds(step: Transform, into: int, target: memoryview, read: Read) -> CastStats | None:
    """:func:`_gathered` through a buffer of :data:`GATHER_BYTES` at a time."""
    src_size, dst_size = DTYPES[step.src_dtype].bits // 8, DTYPES[step.dst_dtype].bits // 8
    end = into + len(target)
    first, last = into // dst_size, -(-end // dst_size)
    total: CastStats | None = None
    for lo in range(first, last, GATHER_BYTES // src_size):
        count = min(last, lo + GATHER_BYTES // src_size) - lo
        elements = bytearray(count * src_size)
        _gather(step, lo, count, memoryview(elements), read)
        produced = memoryview(elements)
        if step.src_dtype != step.dst_dtype:
            produced = memoryview(bytearray(count * dst_size))
            cut = 1 if lo == first and into % dst_size else 0  # counted by the range holding its first byte
            cast_into(memoryview(elements)[: cut * src_size], step.src_dtype, step.dst_dtype,
                                 produced[: cut * dst_size])
            counted = cast_into(memoryview(elements)[cut * src_size :], step.src_dtype, step.dst_dtype,
                                           produced[cut * dst_size :])
            total = counted if total is None else total + counted
        a, b = max(into, lo * dst_size), min(end, (lo + count) * dst_size)
        target[a - into : b - into] = produced[a - lo * dst_size : b - lo * dst_size]
    return total


#: numpy's view of one element, by size: strided copies move whole elements, not bytes.
_ELEMENT = {1: "u1", 2: "u2", 4: "u4", 8: "u8"}


def _gather(step: Transform, first: int, count: int, into: memoryview, read: Read) -> None:
    """Elements [first, first + count) (C order) of the view into `into`. The range is
    cut into boxes (:func:`_boxes`); each box is read a window of source bytes at a
    time and copied by numpy's strided copy, so no index array is built."""
    import numpy as np

    assert step.gather is not None
    itemsize = DTYPES[step.src_dtype].bits // 8
    out = np.frombuffer(into, dtype=_ELEMENT[itemsize])
    shape, stride = step.gather.shape, step.gather.stride
    done = 0
    for index, box in _boxes(shape, first, count):
        size = _product(box)
        base = sum(i * s for i, s in zip(index, stride))
        target = out[done : done + size].reshape(box)
        _copy_box(step, base, box, stride, target, itemsize, read)
        done += size


def _copy_box(
    step: Transform, base: int, box: tuple[int, ...], stride: tuple[int, ...], target: object, itemsize: int,
    read: Read,
) -> None:
    """The elements of one box of the view (first at element `base` of the source)
    into `target` (a numpy array of the box's shape): read whole when its span fits
    the scratch window, else cut along the dimension of largest stride."""
    import numpy as np

    window = len(_scratch_buffer()) // itemsize
    span = 1 + sum((n - 1) * s for n, s in zip(box, stride))
    if span <= window:
        buffer = _scratch_buffer()[: span * itemsize]
        read(step.source, step.source_offset + base * itemsize, buffer)
        source = np.frombuffer(buffer, dtype=_ELEMENT[itemsize])
        strides = tuple(s * itemsize for s in stride)
        target[...] = np.lib.stride_tricks.as_strided(source, box, strides)  # type: ignore[index]
        return
    cut = max((d for d in range(len(box)) if box[d] > 1), key=lambda d: stride[d])
    rest = span - (box[cut] - 1) * stride[cut]
    per = max(1, (window - rest) // stride[cut] + 1) if rest <= window else 1
    for lo in range(0, box[cut], per):
        n = min(per, box[cut] - lo)
        part = (*box[:cut], n, *box[cut + 1 :])
        where = (slice(None),) * cut + (slice(lo, lo + n),)
        _copy_box(step, base + lo * stride[cut], part, stride, target[where], itemsize, read)  # type: ignore[index]


def _boxes(shape: tuple[int, ...], first: int, count: int) -> Iterator[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Elements [first, first + count) of `shape` in C order as (start index, box
    shape) boxes, each a run of that order: a partial row, whole slabs, a partial row."""
    if count <= 0:
        return
    if len(shape) == 1:
        yield (first,), (count,)
        return
    inner = _product(shape[1:])
    row, offset = divmod(first, inner)
    end_row, end_offset = divmod(first + count, inner)
    if row == end_row:
        for index, box in _boxes(shape[1:], offset, count):
            yield (row, *index), (1, *box)
        return
    if offset:
        for index, box in _boxes(shape[1:], offset, inner - offset):
            yield (row, *index), (1, *box)
        row += 1
    if end_row > row:
        yield (row, *(0,) * (len(shape) - 1)), (end_row - row, *shape[1:])
    if end_offset:
        for index, box in _boxes(shape[1:], 0, end_offset):
            yield (end_row, *index), (1, *box)


def _product(values: tuple[int, ...]) -> int:
    result = 1
    for value in values:
        result *= value
    return result


def _scratch_buffer() -> memoryview:
    buffer = getattr(_scratch, "buffer", None)
    if buffer is None:
        buffer = _scratch.buffer = memoryview(bytearray(SCRATCH))
    return buffer


class CastLog:
    """Cast statistics by tensor, summed over the ranges (and threads) that produced them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.by_tensor: dict[str, CastStats] = {}

    def add(self, stats: Mapping[str, CastStats]) -> None:
        if not stats:
            return
        with self._lock:
            for name, counted in stats.items():
                known = self.by_tensor.get(name)
                self.by_tensor[name] = counted if known is None else known + counted


def ordered_chunks(
    planned: PlannedFile,
    read: Read,
    *,
    start: int = 0,
    end: int | None = None,
    chunk: int = CHUNK,
    workers: int = 8,
    max_buffered: int = 8 * CHUNK,
    log: CastLog | None = None,
) -> Iterator[bytes]:
    """Bytes [start, end) of `planned` in order, `chunk` at a time, filled `workers` at once.

    Remote sources are fast only with several reads in flight and conversions want
    every core, while writers (a hashed file, a multipart upload) consume in order:
    at most `max_buffered` bytes are filled ahead of the consumer.
    """
    end = planned.size if end is None else end
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="shardkit-fill")
    pending: deque[Future[bytes]] = deque()

    def job(offset: int, length: int) -> bytes:
        buffer = bytearray(length)
        stats = fill(planned, offset, memoryview(buffer), read)
        if log is not None:
            log.add(stats)
        return buffer  # type: ignore[return-value]

    try:
        in_flight = 0
        for offset in range(start, end, chunk):
            length = min(chunk, end - offset)
            while pending and in_flight + length > max_buffered:
                ready = pending.popleft().result()
                in_flight -= len(ready)
                yield ready
            pending.append(pool.submit(job, offset, length))
            in_flight += length
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
