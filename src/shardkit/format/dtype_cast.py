"""Changing the precision of floating-point tensor bytes, bit for bit as torch does.

Pure: bytes in (a memoryview of whole little-endian elements), bytes out (a
preallocated memoryview of exactly the converted size), plus a count of what the
conversion lost. No file I/O, no torch, no ml_dtypes: numpy only, imported on first
use so that `shardkit inspect` does not pay for it.

What "as torch does" means, found by reading c10 (`BFloat16(float)`, `Half(float)`
are the only constructors) and confirmed by the exhaustive tests against torch 2.13:

- Every conversion rounds to nearest, ties to even, and goes through float32: a
  float64 is first rounded to float32, then to bf16/fp16 (two roundings: torch's
  result, not the correctly rounded one, e.g. 1 + 2⁻⁸ + 2⁻⁴⁰ becomes bf16 1.0); a
  bf16 or fp16 is widened to float32 exactly, then rounded once.
- ±0, ±inf and subnormals come out as torch gives them (no flush to zero).
- NaN stays NaN with its sign: shardkit writes the quiet NaN that x86 and ARM
  conversion instructions write (sign kept, the leading payload bits kept, the quiet
  bit set). torch's own NaN bits differ between its CPU code paths (its vectorised
  fp32→bf16 writes 0xFFFF for every NaN, its scalar path 0x7FC0), so only NaN-ness
  can be compared with it.

Speed comes from working in sub-chunks that stay in the core's cache, with
preallocated scratch and `out=` ufuncs (no temporaries), and from numpy releasing
the GIL inside each ufunc, so :func:`cast_parallel` scales with threads.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from ..errors import BadInputError, option
from .header import DTYPES

#: --dtype spellings → safetensors dtype code.
TARGETS: dict[str, str] = {
    "bf16": "BF16",
    "bfloat16": "BF16",
    "fp16": "F16",
    "float16": "F16",
    "fp32": "F32",
    "float32": "F32",
}


def parse_target(name: str) -> str:
    """The safetensors dtype code for a --dtype value."""
    code = TARGETS.get(name.strip().lower())
    if code is None:
        raise BadInputError(
            f"unknown {option('dtype', name)}: choose one of bf16, fp16, fp32 (or bfloat16, float16, float32)"
        )
    return code


@dataclass(frozen=True)
class _Float:
    """The bit layout of one IEEE-style binary float type."""

    code: str
    exponent_bits: int
    mantissa_bits: int

    # cached: these are read once per sub-chunk, in the hot loop
    @cached_property
    def size(self) -> int:
        return DTYPES[self.code].bits // 8

    @cached_property
    def uint(self) -> str:
        return f"<u{self.size}"

    @cached_property
    def sign_bit(self) -> int:
        return 1 << (8 * self.size - 1)

    @cached_property
    def abs_mask(self) -> int:
        return self.sign_bit - 1

    @cached_property
    def inf_bits(self) -> int:
        return ((1 << self.exponent_bits) - 1) << self.mantissa_bits

    @cached_property
    def quiet_bit(self) -> int:
        return 1 << (self.mantissa_bits - 1)

    def covers(self, other: _Float) -> bool:
        """Whether every finite value of `other` stays finite and non-zero in self (no
        overflow or underflow is possible: a wider exponent reaches beyond the other's
        subnormals; an equal one needs at least as many mantissa bits)."""
        if self.exponent_bits != other.exponent_bits:
            return self.exponent_bits > other.exponent_bits
        return self.mantissa_bits >= other.mantissa_bits


_FLOATS = {f.code: f for f in (_Float("F64", 11, 52), _Float("F32", 8, 23), _Float("F16", 5, 10), _Float("BF16", 8, 7))}


def is_convertible(src: str) -> bool:
    """Whether tensors of dtype `src` can be converted (F64, F32, F16, BF16)."""
    return src in _FLOATS


@dataclass(frozen=True)
class CastStats:
    """What a conversion lost. overflow: finite values that became ±inf; underflow:
    non-zero values that became ±0; nan: NaN values met (they stay NaN)."""

    overflow: int = 0
    underflow: int = 0
    nan: int = 0

    def __add__(self, other: CastStats) -> CastStats:
        return CastStats(self.overflow + other.overflow, self.underflow + other.underflow, self.nan + other.nan)


_NOTHING = CastStats()


#: Elements per sub-chunk: source, scratch and output of one sub-chunk (≈ 1 MiB for
#: F32 → BF16) stay in the 2 MiB-per-core L2 of the machine measured, while each
#: ufunc call's overhead (≈ 0.5 µs) stays small beside the ≈ 60 µs of work per chunk.
#: Measured F32 → BF16 GB/s per CPU-second at 2¹⁴…2¹⁸: 1.9, 2.4, 2.5, 2.3, 2.0.
SUB_CHUNK = 1 << 16


def cast_into(src: Any, src_dtype: str, dst_dtype: str, out: Any) -> CastStats:
    """Convert the elements in `src` (little-endian `src_dtype`) into `out`, which
    must hold exactly as many `dst_dtype` elements. Same dtype is a byte copy."""
    source, target = _check(src, src_dtype, dst_dtype, out)
    return _run(source, _FLOATS[src_dtype], _FLOATS[dst_dtype], target)


def cast_parallel(src: Any, src_dtype: str, dst_dtype: str, out: Any, workers: int) -> CastStats:
    """:func:`cast_into` split into `workers` element-aligned ranges converted on
    threads (numpy releases the GIL inside its loops). The result and the bytes are
    those of :func:`cast_into`."""
    source, target = _check(src, src_dtype, dst_dtype, out)
    sfmt, dfmt = _FLOATS[src_dtype], _FLOATS[dst_dtype]
    count = source.nbytes // sfmt.size
    workers = max(1, min(workers, count // SUB_CHUNK))
    if workers == 1:
        return _run(source, sfmt, dfmt, target)
    bounds = [count * i // workers for i in range(workers + 1)]
    results: list[CastStats | BaseException] = [CastStats()] * workers

    def work(i: int) -> None:
        a, b = bounds[i], bounds[i + 1]
        try:
            results[i] = _run(source[a * sfmt.size : b * sfmt.size], sfmt, dfmt, target[a * dfmt.size : b * dfmt.size])
        except BaseException as error:  # re-raised in the caller's thread
            results[i] = error

    threads = [threading.Thread(target=work, args=(i,), name=f"shardkit-cast-{i}") for i in range(1, workers)]
    for thread in threads:
        thread.start()
    work(0)
    for thread in threads:
        thread.join()
    total = CastStats()
    for result in results:
        if isinstance(result, BaseException):
            raise result
        total = total + result
    return total


def _check(src: Any, src_dtype: str, dst_dtype: str, out: Any) -> tuple[memoryview, memoryview]:
    """Reject what cannot be converted with a sentence, not a numpy traceback; return
    both buffers as flat byte views."""
    for role, code in (("source", src_dtype), ("target", dst_dtype)):
        if code not in _FLOATS:
            raise BadInputError(f"cannot convert {role} dtype {code!r}: only F64, F32, F16 and BF16 are converted")
    source, target = _bytes_view(src, "source"), _bytes_view(out, "output")
    sfmt, dfmt = _FLOATS[src_dtype], _FLOATS[dst_dtype]
    if source.nbytes % sfmt.size:
        raise BadInputError(
            f"source of {source.nbytes} bytes is not a whole number of {src_dtype} elements ({sfmt.size} bytes each)"
        )
    expected = source.nbytes // sfmt.size * dfmt.size
    if target.nbytes != expected:
        raise BadInputError(
            f"output buffer of {target.nbytes} bytes does not fit {source.nbytes // sfmt.size} {dst_dtype} elements "
            f"({expected} bytes)"
        )
    if target.readonly:
        raise BadInputError("output buffer is read-only")
    return source, target


def _bytes_view(buffer: Any, role: str) -> memoryview:
    view = memoryview(buffer)
    if not view.c_contiguous:
        raise BadInputError(f"{role} buffer is not contiguous")
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


def _run(source: memoryview, sfmt: _Float, dfmt: _Float, target: memoryview) -> CastStats:
    import numpy as np

    if sfmt == dfmt:
        target[:] = source
        return CastStats(nan=_count_nan(np.frombuffer(source, sfmt.uint), sfmt))
    src = np.frombuffer(source, sfmt.uint)
    out = np.frombuffer(target, dfmt.uint)
    kernel, floats = _conversion(sfmt, dfmt)
    # overflow to inf and NaN are data here, counted below; entering np.errstate costs
    # ≈ 5 µs, as much as a tenth of a 256 KiB call, so only where floats are computed
    with np.errstate(all="ignore") if floats else contextlib.nullcontext():
        total = _NOTHING
        for begin in range(0, src.size, SUB_CHUNK):
            s, o = src[begin : begin + SUB_CHUNK], out[begin : begin + SUB_CHUNK]
            kernel(s, o)
            lost = _settle(s, sfmt, o, dfmt)
            if lost is not _NOTHING:
                total = total + lost
    return total


_conversions: dict[tuple[str, str], tuple[Kernel, bool]] = {}


def _conversion(sfmt: _Float, dfmt: _Float) -> tuple[Kernel, bool]:
    """The kernel for a pair, made once (a table kernel builds its table on first use),
    and whether it computes in floating point (F64 ↔ F32 casts, F32 → F16's rounding
    addition), where numpy would warn about overflow and NaN; the others are integer
    arithmetic and table lookups."""
    key = (sfmt.code, dfmt.code)
    made = _conversions.get(key)
    if made is None:
        floats = "F64" in key or key == ("F32", "F16")
        made = _conversions[key] = (_kernel(sfmt, dfmt), floats)
    return made


# -- the conversions proper: each writes every non-NaN element exactly; NaN lanes may
# -- hold anything until _settle rewrites them from the source.

Kernel = Callable[[Any, Any], None]


def _kernel(sfmt: _Float, dfmt: _Float) -> Kernel:
    if sfmt.size == 2:
        if sfmt.code == "BF16" and dfmt.code == "F32":
            return _bf16_to_f32
        return _lookup(sfmt, dfmt)
    pair = (sfmt.code, dfmt.code)
    if pair == ("F32", "BF16"):
        return _f32_to_bf16
    if pair == ("F32", "F16"):
        return _f32_to_f16
    if pair in (("F32", "F64"), ("F64", "F32")):
        return _numpy_cast(sfmt, dfmt)
    if sfmt.code == "F64":  # to BF16 or F16: round to float32 first, as torch does
        return _via_f32(_numpy_cast(sfmt, _FLOATS["F32"]), _kernel(_FLOATS["F32"], dfmt))
    raise AssertionError(pair)


def _f32_to_bf16(src: Any, out: Any) -> None:
    """c10's round_to_nearest_even: add 0x7FFF plus the lowest kept bit, keep the top
    half. A carry into the exponent is the right answer (up to ±inf)."""
    import numpy as np

    t = _scratch("u32", src.size, np.uint32)
    np.right_shift(src, 16, out=t)
    np.bitwise_and(t, 1, out=t)
    np.add(t, 0x7FFF, out=t)
    np.add(t, src, out=t)
    np.right_shift(t, 16, out=out, casting="unsafe")


def _f32_to_f16(src: Any, out: Any) -> None:
    """Round to nearest even in integer steps (numpy's own float16 cast is scalar code,
    2× slower). Normal results: clamp the magnitude to fp16's range (2⁻¹⁴ up to 2¹⁶,
    which lands on inf), rebias the exponent and round at bit 13 as for bf16.
    Subnormal results: adding 0.5 in float32 makes the CPU round at fp16's least
    subnormal (2⁻²⁴), and the bits above 0.5's are the fp16 bits. The smaller of the
    two is the answer (the subnormal form is the larger one wherever the normal form
    applies, the clamped normal form 2⁻¹⁴ the larger one below)."""
    import numpy as np

    size = src.size
    magnitude, normal, small = (_scratch(name, size, np.uint32) for name in ("f16-abs", "u32", "f16-small"))
    np.bitwise_and(src, 0x7FFFFFFF, out=magnitude)
    np.clip(magnitude, 0x38800000, 0x47800000, out=normal)
    np.right_shift(normal, 13, out=small)
    np.bitwise_and(small, 1, out=small)
    np.add(normal, small, out=normal)
    np.add(normal, (15 - 127 << 23) + 0xFFF & 0xFFFFFFFF, out=normal)
    np.right_shift(normal, 13, out=normal)
    np.add(magnitude.view(np.float32), np.float32(0.5), out=small.view(np.float32))
    np.subtract(small, 0x3F000000, out=small)
    np.minimum(normal, small, out=normal)
    np.right_shift(src, 16, out=small)
    np.bitwise_and(small, 0x8000, out=small)
    np.bitwise_or(normal, small, out=out, casting="unsafe")


def _bf16_to_f32(src: Any, out: Any) -> None:
    import numpy as np

    np.left_shift(src, 16, out=out, dtype=np.uint32)


def _numpy_cast(sfmt: _Float, dfmt: _Float) -> Kernel:
    """F64 ↔ F32: numpy's cast is the C cast, the CPU's own round to nearest even."""
    import numpy as np

    floats = {"F64": np.float64, "F32": np.float32}
    sf, df = floats[sfmt.code], floats[dfmt.code]

    def kernel(src: Any, out: Any) -> None:
        np.copyto(out.view(df), src.view(sf), casting="same_kind")

    return kernel


def _via_f32(first: Kernel, second: Kernel) -> Kernel:
    import numpy as np

    def kernel(src: Any, out: Any) -> None:
        middle = _scratch("via-f32", src.size, np.uint32)
        first(src, middle)
        second(middle, out)

    return kernel


_tables: dict[tuple[str, str], Any] = {}
_tables_lock = threading.Lock()


def _lookup(sfmt: _Float, dfmt: _Float) -> Kernel:
    """16-bit sources have 65,536 values: convert each once (exact widening to float32,
    then the float32 conversion) and index the table."""
    import numpy as np

    table = _table(sfmt, dfmt)

    def kernel(src: Any, out: Any) -> None:
        index = _scratch("index", src.size, np.intp)
        np.copyto(index, src)
        np.take(table, index, out=out, mode="wrap")

    return kernel


def _table(sfmt: _Float, dfmt: _Float) -> Any:
    import numpy as np

    key = (sfmt.code, dfmt.code)
    with _tables_lock:
        if key not in _tables:
            f32 = _FLOATS["F32"]
            every = np.arange(1 << 16, dtype=np.uint16)
            wide = np.empty(every.size, np.uint32)
            with np.errstate(all="ignore"):
                if sfmt.code == "BF16":
                    _bf16_to_f32(every, wide)
                else:
                    np.copyto(wide.view(np.float32), every.view(np.float16))
                _settle(every, sfmt, wide, f32)
                table = np.empty(every.size, dfmt.uint)
                if dfmt == f32:
                    table[:] = wide
                else:
                    _kernel(f32, dfmt)(wide, table)
                    _settle(every, sfmt, table, dfmt)
            _tables[key] = table
        return _tables[key]


# -- after the conversion: rewrite NaN lanes, count what was lost


def _settle(src: Any, sfmt: _Float, out: Any, dfmt: _Float) -> CastStats:
    """Rewrite the NaN lanes of `out` from the source (sign and leading payload bits
    kept, quiet bit set) and count overflow/underflow by comparison with the source:
    a finite value only becomes ±inf by overflow and a non-zero one only ±0 by
    underflow, so each is (count in the output) − (count in the source).

    The usual chunk has nothing to count, and cheap reductions say so. A widening
    looks at its (narrower) source for NaN. A narrowing looks at its output: every
    kernel turns a NaN into something of magnitude ≥ inf or into ±0 (the bf16
    rounding wraps the highest NaN payloads to ±0), so an output without either
    holds no NaN, no overflow and no underflow, and the source is not read again.
    (Counting the few ±0/±inf lanes one by one instead was slower: per-call
    overhead of the small arrays.)"""
    import numpy as np

    if not src.size:
        return _NOTHING
    if dfmt.covers(sfmt):
        magnitude = _scratch("src-abs", src.size, src.dtype)
        np.bitwise_and(src, sfmt.abs_mask, out=magnitude)
        nan = _fix_nans(src, sfmt, out, dfmt, magnitude)
        return CastStats(nan=nan) if nan else _NOTHING
    result = _scratch("dst-abs", src.size, out.dtype)
    np.bitwise_and(out, dfmt.abs_mask, out=result)
    special, zeros = result.max() >= dfmt.inf_bits, result.min() == 0
    if not (special or zeros):
        return _NOTHING
    magnitude = _scratch("src-abs", src.size, src.dtype)
    np.bitwise_and(src, sfmt.abs_mask, out=magnitude)
    nan = _fix_nans(src, sfmt, out, dfmt, magnitude, result)
    overflow = underflow = 0
    if special:
        flags = _scratch("flags", src.size, np.bool_)
        overflow = int(np.count_nonzero(np.equal(result, dfmt.inf_bits, out=flags)))
        overflow -= int(np.count_nonzero(np.equal(magnitude, sfmt.inf_bits, out=flags)))
    if zeros:
        underflow = int(np.count_nonzero(magnitude)) - int(np.count_nonzero(result))
    return CastStats(overflow, underflow, nan)


def _fix_nans(src: Any, sfmt: _Float, out: Any, dfmt: _Float, magnitude: Any, result: Any = None) -> int:
    """Write shardkit's NaN into the lanes where the source is NaN (and their
    magnitude into `result`); return how many there were."""
    import numpy as np

    if magnitude.max() <= sfmt.inf_bits:
        return 0
    lanes = np.flatnonzero(magnitude > sfmt.inf_bits)
    out[lanes] = _quiet_nan(src[lanes], sfmt, dfmt)
    if result is not None:
        result[lanes] = out[lanes] & dfmt.abs_mask
    return lanes.size


def _quiet_nan(src: Any, sfmt: _Float, dfmt: _Float) -> Any:
    """What shardkit writes for a NaN: the same sign, the leading payload bits (cut or
    zero-extended), the quiet bit set."""
    import numpy as np

    wide = src.astype(np.uint64)
    payload = wide & np.uint64(sfmt.quiet_bit * 2 - 1)
    shift = dfmt.mantissa_bits - sfmt.mantissa_bits
    payload = payload << np.uint64(shift) if shift >= 0 else payload >> np.uint64(-shift)
    sign = (wide >> np.uint64(8 * sfmt.size - 1)) << np.uint64(8 * dfmt.size - 1)
    return (sign | np.uint64(dfmt.inf_bits | dfmt.quiet_bit) | payload).astype(dfmt.uint)


def _count_nan(values: Any, fmt: _Float) -> int:
    import numpy as np

    count = 0
    for begin in range(0, values.size, SUB_CHUNK):
        part = values[begin : begin + SUB_CHUNK]
        magnitude = _scratch("src-abs", part.size, part.dtype)
        np.bitwise_and(part, fmt.abs_mask, out=magnitude)
        if magnitude.max() > fmt.inf_bits:
            count += int(np.count_nonzero(magnitude > fmt.inf_bits))
    return count


_local = threading.local()


def _scratch(name: str, size: int, dtype: Any) -> Any:
    """A per-thread work array of at least `size` elements, reused across calls so the
    hot loop never allocates (and never page-faults fresh memory)."""
    import numpy as np

    try:
        buffers = _local.buffers
    except AttributeError:
        buffers = _local.buffers = {}
    buffer = buffers.get((name, dtype))
    if buffer is None or buffer.size < size:
        buffer = buffers[name, dtype] = np.empty(max(size, SUB_CHUNK), dtype)
    return buffer[:size]
