"""dtype_cast against torch: every converted value bit-identical to `tensor.to(dtype)`.

NaN lanes are compared for NaN-ness only (torch's own NaN bits differ between its CPU
code paths) and checked against what shardkit documents: the source's sign, quiet.
The loss counts are checked against torch's result too: a finite source whose torch
result is ±inf is an overflow, a non-zero source whose torch result is ±0 an underflow.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from shardkit.errors import BadInputError
from shardkit.format.dtype_cast import (
    SUB_CHUNK,
    TARGETS,
    CastStats,
    cast_into,
    cast_parallel,
    is_convertible,
    parse_target,
)

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.hf

CODES = ("F64", "F32", "F16", "BF16")
UINT = {"F64": np.uint64, "F32": np.uint32, "F16": np.uint16, "BF16": np.uint16}
TORCH = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
TORCH_INT = {np.uint64: torch.int64, np.uint32: torch.int32, np.uint16: torch.int16}
SIGNED = {np.uint64: np.int64, np.uint32: np.int32, np.uint16: np.int16}
#: (bits, mantissa bits) of each layout
LAYOUT = {"F64": (64, 52), "F32": (32, 23), "F16": (16, 10), "BF16": (16, 7)}


def _sign(bits: np.ndarray, code: str) -> np.ndarray:
    return (bits >> (LAYOUT[code][0] - 1)).astype(bool)


def _magnitude(bits: np.ndarray, code: str) -> np.ndarray:
    return bits & UINT[code]((1 << (LAYOUT[code][0] - 1)) - 1)


def _inf_bits(code: str) -> int:
    width, mantissa = LAYOUT[code]
    return ((1 << (width - 1 - mantissa)) - 1) << mantissa


def is_nan(bits: np.ndarray, code: str) -> np.ndarray:
    return _magnitude(bits, code) > _inf_bits(code)


def is_inf(bits: np.ndarray, code: str) -> np.ndarray:
    return _magnitude(bits, code) == _inf_bits(code)


def is_zero(bits: np.ndarray, code: str) -> np.ndarray:
    return _magnitude(bits, code) == 0


def ours(bits: np.ndarray, src: str, dst: str) -> tuple[np.ndarray, CastStats]:
    out = np.empty(bits.size, UINT[dst])
    stats = cast_into(memoryview(bits), src, dst, memoryview(out))
    return out, stats


def torch_result(bits: np.ndarray, src: str, dst: str) -> np.ndarray:
    values = torch.from_numpy(bits.view(SIGNED[UINT[src]])).view(TORCH[src])
    converted = values.to(TORCH[dst]).contiguous()
    return converted.view(TORCH_INT[UINT[dst]]).numpy().view(UINT[dst])


def assert_as_torch(bits: np.ndarray, src: str, dst: str) -> int:
    """Convert `bits` with shardkit and torch; assert equality as described above.
    Returns how many patterns were compared."""
    bits = np.ascontiguousarray(bits, UINT[src])
    got, stats = ours(bits, src, dst)
    want = torch_result(bits, src, dst)
    nan = is_nan(want, dst)
    assert np.array_equal(is_nan(got, dst), nan), f"{src}→{dst}: NaN-ness differs"
    wrong = np.flatnonzero(~nan & (got != want))
    assert wrong.size == 0, f"{src}→{dst}: {wrong.size} values differ from torch, first: " + ", ".join(
        f"{int(bits[i]):#x}→{int(got[i]):#x} (torch {int(want[i]):#x})" for i in wrong[:5]
    )
    if src != dst:  # a copy keeps NaN bits as they are
        assert np.array_equal(_sign(got[nan], dst), _sign(bits[nan], src)), f"{src}→{dst}: a NaN lost its sign"
        quiet = UINT[dst](1 << (LAYOUT[dst][1] - 1))
        assert np.all(got[nan] & quiet), f"{src}→{dst}: a NaN was not quieted"
    finite = ~is_nan(bits, src) & ~is_inf(bits, src)
    expected = CastStats(
        overflow=int(np.count_nonzero(finite & is_inf(want, dst))),
        underflow=int(np.count_nonzero(finite & ~is_zero(bits, src) & is_zero(want, dst))),
        nan=int(np.count_nonzero(is_nan(bits, src))),
    )
    assert stats == expected, f"{src}→{dst}"
    return bits.size


# -- all 65,536 patterns of the 16-bit types


@pytest.mark.parametrize("dst", CODES)
@pytest.mark.parametrize("src", ["BF16", "F16"])
def test_every_16_bit_pattern_converts_as_torch(src: str, dst: str) -> None:
    assert assert_as_torch(np.arange(1 << 16, dtype=np.uint16), src, dst) == 65536


def test_bf16_to_fp16_rounds_once_from_the_exact_float32() -> None:
    # bf16 0x3F81 = 1 + 2⁻⁷ is exact in fp16; the loss counts are what fp16's range cuts.
    values = np.array([0x3F81, 0x4780, 0x477F, 0x3380, 0x3300, 0x0001], np.uint16)
    got, stats = ours(values, "BF16", "F16")
    # 1+2⁻⁷, 65536 → inf, 65280, 2⁻²⁴ (fp16's least subnormal), 2⁻²⁵ → 0 (tie to even), 9e-41 → 0
    assert [hex(v) for v in got] == ["0x3c08", "0x7c00", "0x7bf8", "0x1", "0x0", "0x0"]
    assert stats == CastStats(overflow=1, underflow=2, nan=0)


# -- float32: every exponent, every pattern of the low 16 bits, and a random sweep


def _f32_strata(high_bits: np.ndarray | int, rng: np.random.Generator, per_chunk: int = 16):
    """For every sign and exponent (the top 9 bits) all 65,536 patterns of the low 16
    mantissa bits (the bits bf16 rounds away, and fp16's rounding bits), with the 7
    high mantissa bits given (or random when `high_bits` is None)."""
    low = np.arange(1 << 16, dtype=np.uint32)
    for first in range(0, 512, per_chunk):
        top = np.arange(first, first + per_chunk, dtype=np.uint32)[:, None] << np.uint32(23)
        chunk = (top | low[None, :]).ravel()
        if isinstance(high_bits, int):
            chunk |= np.uint32(high_bits << 16)
        else:
            chunk |= rng.integers(0, 128, chunk.size, dtype=np.uint32) << np.uint32(16)
        yield chunk


def _f32_sweep(chunks, targets=("BF16", "F16", "F64")) -> int:
    compared = 0
    for chunk in chunks:
        for dst in targets:
            assert_as_torch(chunk, "F32", dst)
        compared += chunk.size
    return compared


def test_f32_every_exponent_and_low_half_converts_as_torch() -> None:
    """33.5 million patterns (10⁷ is the floor kept in every run)."""
    compared = _f32_sweep(_f32_strata(None, np.random.default_rng(13)))
    assert compared == 512 * 65536


@pytest.mark.slow
def test_f32_hundred_million_patterns_convert_as_torch() -> None:
    """≥ 10⁸ patterns: the strata with the high mantissa bits at the values where
    carries and ties differ (0, 1, all ones, around the middle), plus 2²⁵ uniformly
    random patterns."""
    rng = np.random.default_rng(1313)
    compared = 0
    for high in (0x00, 0x01, 0x3F, 0x7F):
        compared += _f32_sweep(_f32_strata(high, rng))
    compared += _f32_sweep(rng.integers(0, 1 << 32, 1 << 22, dtype=np.uint32) for _ in range(8))
    assert compared >= 10**8


def test_f32_to_f32_is_a_byte_copy() -> None:
    bits = np.array([0x7F800001, 0xFFC00001, 0x00000001, 0x80000000, 0x3F800000], np.uint32)
    got, stats = ours(bits, "F32", "F32")
    assert got.tobytes() == bits.tobytes()
    assert stats == CastStats(nan=2)


# -- float64: every exponent, plus the cases where rounding twice differs from once


def _f64_strata(rng: np.random.Generator, per_exponent: int = 256) -> np.ndarray:
    top = np.repeat(np.arange(4096, dtype=np.uint64), per_exponent) << np.uint64(52)
    mantissa = rng.integers(0, 1 << 52, top.size, dtype=np.uint64)
    # the mantissas that matter most: tiny, all ones, exact halves of the targets' ulps
    mantissa[::per_exponent] = 0
    mantissa[1::per_exponent] = (1 << 52) - 1
    mantissa[2::per_exponent] = 1
    for k, shift in enumerate((52 - 7, 52 - 10, 52 - 23)):  # half an ulp of bf16, fp16, fp32
        mantissa[3 + k :: per_exponent] = 1 << (shift - 1)
    return top | mantissa


def _midpoints(dst: str) -> np.ndarray:
    """The exact midpoints between neighbouring `dst` values, as float64, and values
    just beside them: below float32's resolution (so float32 rounds onto the midpoint
    and the tie goes to even: torch's double rounding) and one float64 ulp away."""
    if dst == "F32":
        rng = np.random.default_rng(32)
        bits = rng.integers(0, 0x7F7FFFFF, 1 << 18, dtype=np.uint32)
        bits[:256] = np.arange(256, dtype=np.uint32)  # subnormals
        low = bits.view(np.float32).astype(np.float64)
        high = (bits + np.uint32(1)).view(np.float32).astype(np.float64)
    else:
        bits = np.arange(0, _inf_bits(dst), dtype=np.uint16)
        to64 = torch_result  # exact widening
        low = to64(bits, dst, "F64").view(np.float64)
        high = to64(bits + np.uint16(1), dst, "F64").view(np.float64)
    mid = (low + high) / 2  # exact: one more bit than dst has
    beside = [mid, np.nextafter(mid, 0), np.nextafter(mid, np.inf), mid * (1 + 2.0**-40), mid * (1 - 2.0**-40)]
    both_signs = np.concatenate(beside + [-v for v in beside])
    return both_signs.view(np.uint64)


def _boundaries() -> np.ndarray:
    """Around fp16's largest value (65504) and its overflow threshold (65520), bf16's
    largest (0x7F7F) and its threshold, float32's largest and its threshold."""
    centres = [65504.0, 65520.0, 65536.0, float(np.uint32(0x7F7F0000).view(np.float32)),
               float(np.uint32(0x7F7F8000).view(np.float32)), float(np.finfo(np.float32).max),
               float(np.finfo(np.float32).max) + 2.0**103, 2.0**-24, 2.0**-25, 2.0**-133, 2.0**-134,
               2.0**-149, 2.0**-150, 5e-324]  # fmt: skip
    values = []
    for centre in centres:
        below = above = np.float64(centre)
        for _ in range(40):
            values += [below, above]
            below, above = np.nextafter(below, 0), np.nextafter(above, np.inf)
        for scale in (1 - 2.0**-30, 1 + 2.0**-30, 1 - 2.0**-12, 1 + 2.0**-12):
            values.append(np.float64(centre * scale))
    positive = np.array(values, np.float64)
    return np.concatenate([positive, -positive]).view(np.uint64)


def _f64_specials() -> np.ndarray:
    return np.array(
        [0, 1 << 63, 0x7FF0000000000000, 0xFFF0000000000000, 0x7FF8000000000000, 0xFFF8000000000001,
         0x7FF0000000000001, 0xFFFFFFFFFFFFFFFF, 0x7FF7FFFFFFFFFFFF],
        np.uint64,
    )  # fmt: skip


@pytest.mark.parametrize("dst", ["F32", "BF16", "F16", "F64"])
def test_f64_converts_as_torch(dst: str) -> None:
    rng = np.random.default_rng(64)
    cases = [_f64_strata(rng), _boundaries(), _f64_specials()] + [_midpoints(t) for t in ("F32", "BF16", "F16")]
    assert sum(assert_as_torch(case, "F64", dst) for case in cases) > 3_000_000


def test_f64_to_bf16_rounds_through_float32_as_torch_does() -> None:
    # 1 + 2⁻⁸ + 2⁻⁴⁰: rounded once it is bf16 1 + 2⁻⁷; torch rounds to float32 first
    # (1 + 2⁻⁸, a tie) and then to even: 1.0. The same for fp16 at 1 + 2⁻¹¹ + 2⁻⁴⁰.
    bf16, _ = ours(np.array([1 + 2.0**-8 + 2.0**-40]).view(np.uint64), "F64", "BF16")
    fp16, _ = ours(np.array([1 + 2.0**-11 + 2.0**-40]).view(np.uint64), "F64", "F16")
    assert (hex(bf16[0]), hex(fp16[0])) == ("0x3f80", "0x3c00")


# -- what shardkit writes for NaN, and the loss counts


def test_nan_keeps_its_sign_and_leading_payload_and_is_quieted() -> None:
    f32 = np.array([0x7F800001, 0xFF800001, 0x7FC12345, 0xFFFFFFFF, 0x7FFF8000], np.uint32)
    assert [hex(v) for v in ours(f32, "F32", "BF16")[0]] == ["0x7fc0", "0xffc0", "0x7fc1", "0xffff", "0x7fff"]
    assert [hex(v) for v in ours(f32, "F32", "F16")[0]] == ["0x7e00", "0xfe00", "0x7e09", "0xffff", "0x7ffc"]
    bf16 = np.array([0x7F81, 0xFFC1], np.uint16)
    assert [hex(v) for v in ours(bf16, "BF16", "F32")[0]] == ["0x7fc10000", "0xffc10000"]
    assert [hex(v) for v in ours(bf16, "BF16", "F16")[0]] == ["0x7e08", "0xfe08"]
    f16 = np.array([0x7C01, 0xFE01], np.uint16)
    assert [hex(v) for v in ours(f16, "F16", "F64")[0]] == ["0x7ff8040000000000", "0xfff8040000000000"]


def test_loss_is_counted_on_crafted_values() -> None:
    values = np.array(
        [1e5, -1e5, 65504, 65519.99, 65520, np.inf, -np.inf, np.nan, -np.nan, 1e-8, -1e-8, 0.0, -0.0,
         2.0**-24, 2.0**-25, 2.0**-25 * (1 + 2.0**-20), 1.0, -3.5],
        np.float32,
    )  # fmt: skip
    got, stats = ours(values.view(np.uint32), "F32", "F16")
    # overflow: ±1e5 and 65520; underflow: ±1e-8 and 2⁻²⁵ (a tie, to even: 0)
    assert stats == CastStats(overflow=3, underflow=3, nan=2)
    assert got.view(np.float16)[3] == 65504 and got[15] == 1  # just under the thresholds: kept

    extremes = np.array([np.finfo(np.float32).max, -np.finfo(np.float32).max, 2.0**-149, 2.0**-133], np.float32)
    assert ours(extremes.view(np.uint32), "F32", "BF16")[1] == CastStats(overflow=2, underflow=1)
    wide = np.array([1e300, -1e39, 1e-300, -1e-46, 1e-45, np.inf, 0.0], np.float64)
    assert ours(wide.view(np.uint64), "F64", "F32")[1] == CastStats(overflow=2, underflow=2)


def test_a_lossless_conversion_counts_nothing() -> None:
    values = np.linspace(-1000, 1000, 3 * SUB_CHUNK + 5, dtype=np.float32)
    assert ours(values.view(np.uint32), "F32", "BF16")[1] == CastStats()
    assert ours(values.view(np.uint32), "F32", "F64")[1] == CastStats()


def test_counts_add_across_sub_chunks() -> None:
    values = np.ones(5 * SUB_CHUNK + 3, np.float32)
    values[[1, SUB_CHUNK, 4 * SUB_CHUNK + 2]] = 1e6  # overflow
    values[[0, SUB_CHUNK - 1, 5 * SUB_CHUNK + 2]] = 1e-9  # underflow
    values[[7, 3 * SUB_CHUNK]] = np.nan
    assert ours(values.view(np.uint32), "F32", "F16")[1] == CastStats(overflow=3, underflow=3, nan=2)
    assert CastStats(1, 2, 3) + CastStats(10, 20, 30) == CastStats(11, 22, 33)


# -- threads


@pytest.mark.parametrize(("src", "dst"), [("F32", "BF16"), ("BF16", "F16"), ("F64", "F16"), ("F16", "F32")])
@pytest.mark.parametrize("workers", [2, 3, 7])
def test_cast_parallel_writes_what_cast_into_writes(src: str, dst: str, workers: int) -> None:
    rng = np.random.default_rng(workers)
    count = 4 * SUB_CHUNK + 13  # ranges split at odd element boundaries
    bits = rng.integers(0, np.iinfo(UINT[src]).max, count, dtype=UINT[src], endpoint=True)
    alone, alone_stats = ours(bits, src, dst)
    together = np.empty(count, UINT[dst])
    stats = cast_parallel(memoryview(bits), src, dst, memoryview(together), workers)
    assert together.tobytes() == alone.tobytes()
    assert stats == alone_stats and stats.nan > 0


def test_cast_parallel_reports_a_bad_buffer_before_starting() -> None:
    with pytest.raises(BadInputError, match="whole number of F32 elements"):
        cast_parallel(bytes(4 * SUB_CHUNK * 4 + 2), "F32", "BF16", bytearray(2 * SUB_CHUNK * 4 + 1), 2)


# -- the door


def test_targets_and_their_spellings() -> None:
    assert {name: parse_target(name) for name in TARGETS} == TARGETS
    assert parse_target("BF16") == "BF16"
    with pytest.raises(BadInputError, match="unknown dtype='int8': choose one of bf16, fp16, fp32"):
        parse_target("int8")


def test_convertible_dtypes() -> None:
    assert [code for code in ("F64", "F32", "F16", "BF16", "I32", "F8_E4M3", "BOOL") if is_convertible(code)] == [
        "F64",
        "F32",
        "F16",
        "BF16",
    ]


@pytest.mark.parametrize(
    ("src", "src_dtype", "dst_dtype", "out", "message"),
    [
        (bytes(7), "F32", "BF16", bytearray(2), "source of 7 bytes is not a whole number of F32 elements"),
        (bytes(8), "F32", "BF16", bytearray(6), "output buffer of 6 bytes does not fit 2 BF16 elements"),
        (bytes(8), "F32", "F64", bytearray(8), "output buffer of 8 bytes does not fit 2 F64 elements"),
        (bytes(8), "I32", "BF16", bytearray(4), "cannot convert source dtype 'I32'"),
        (bytes(8), "F32", "F8_E4M3", bytearray(2), "cannot convert target dtype 'F8_E4M3'"),
        (bytes(8), "F32", "BF16", bytes(4), "output buffer is read-only"),
        (memoryview(bytes(16))[::2], "F16", "F32", bytearray(16), "source buffer is not contiguous"),
    ],
)
def test_unusable_buffers_are_refused_with_a_sentence(src, src_dtype, dst_dtype, out, message) -> None:
    with pytest.raises(BadInputError, match=message):
        cast_into(src, src_dtype, dst_dtype, out)


def test_bytes_and_an_unaligned_view_are_accepted() -> None:
    values = np.array([1.0, -2.5, 3e38], np.float32)
    unaligned = memoryview(b"x" + values.tobytes())[1:]
    out = bytearray(6)
    assert cast_into(unaligned, "F32", "BF16", out) == CastStats()
    assert bytes(out) == torch_result(values.view(np.uint32), "F32", "BF16").tobytes()


def test_importing_the_module_does_not_import_numpy() -> None:
    code = "import sys, shardkit.format.dtype_cast; print('numpy' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"


def test_empty_buffers_convert_to_nothing() -> None:
    assert cast_into(b"", "F32", "BF16", bytearray()) == CastStats()
    assert cast_parallel(b"", "BF16", "F16", bytearray(), 2) == CastStats()


def test_conversion_releases_the_gil() -> None:
    """With a long switch interval a GIL-holding converter would let this thread run
    only a few times a second; numpy's loops release it, so it runs freely."""
    import threading
    import time

    values = np.zeros(8 << 20, np.float32)
    out = bytearray(values.size * 2)
    previous = sys.getswitchinterval()
    sys.setswitchinterval(0.25)
    try:
        worker = threading.Thread(target=lambda: [cast_into(values, "F32", "BF16", out) for _ in range(20)])
        started = time.perf_counter()
        worker.start()
        turns = 0
        while worker.is_alive():
            time.sleep(0)
            turns += 1
        seconds = time.perf_counter() - started
    finally:
        sys.setswitchinterval(previous)
    assert turns > 50 * (seconds / 0.25 + 1), (turns, seconds)
