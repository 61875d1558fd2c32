"""FP8 (E4M3) arithmetic: block-scaled dequantisation, bit for bit as transformers does it.

Pure numpy on arrays handed in (no file I/O, no torch, no ml_dtypes), imported on first
use so that `shardkit inspect` does not pay for it.

What "as transformers does it" means, read from
`transformers.integrations.finegrained_fp8` (`_dequantize_fp8_weight` in fp32,
`Fp8Dequantize._dequantize_one`): each FP8 value is widened to float32 exactly, then
multiplied in float32 by the float32 scale of its block, and only that product is
rounded to the output dtype. The last block of a row or column may be partial (576
rows are 4 whole blocks of 128 and one of 64): its scale covers what there is.
The widening is a 256-entry table, built once from the format's definition.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

from .dtype_cast import CastStats, cast_into
from .header import DTYPES

#: The largest finite E4M3 value; the format has no infinities (0x7F and 0xFF are NaN).
E4M3_MAX = 448.0

_table: Any = None
_table_lock = threading.Lock()


def e4m3_table() -> Any:
    """float32 value of each of the 256 E4M3 codes (sign, 4 exponent bits biased by 7,
    3 mantissa bits; exponent 0 is subnormal; S.1111.111 is NaN)."""
    global _table
    import numpy as np

    with _table_lock:
        if _table is None:
            codes = np.arange(256, dtype=np.uint32)
            exponent = (codes >> 3) & 0xF
            mantissa = (codes & 0x7).astype(np.float64)
            magnitude = np.where(
                exponent == 0, mantissa / 8 * 2.0**-6, (1 + mantissa / 8) * np.exp2(exponent.astype(np.float64) - 7)
            )
            magnitude[(codes & 0x7F) == 0x7F] = np.nan
            _table = np.where(codes & 0x80, -magnitude, magnitude).astype(np.float32)
        return _table


def widen(data: Any, dtype: str) -> Any:
    """Scale bytes (F32, BF16 or F16) as float32 values, exactly."""
    import numpy as np

    if dtype == "F32":
        return np.frombuffer(data, "<f4")
    if dtype == "BF16":
        return (np.frombuffer(data, "<u2").astype(np.uint32) << 16).view(np.float32)
    if dtype == "F16":
        return np.frombuffer(data, "<f2").astype(np.float32)
    raise ValueError(f"scales of dtype {dtype} are not supported")


def dequantise_into(
    codes: Any, first: int, columns: int, block: tuple[int, int], scales: Any, first_block_row: int, out: Any
) -> None:
    """Dequantise E4M3 `codes` (uint8), the elements [first, first + len) in row-major
    order of a matrix with `columns` columns, into float32 `out` of the same length.

    `scales` is the float32 scale grid (rows of blocks × blocks per row) from block-row
    `first_block_row` on, covering at least the rows these elements lie in.
    """
    import numpy as np

    np.take(e4m3_table(), codes, out=out)
    scaled_band = -1
    by_column: Any = None
    for band, start, column, rows, length in row_runs(first, codes.size, columns, block[0]):
        if band != scaled_band:  # each column's scale, for this band of block rows
            scaled_band, by_column = band, np.repeat(scales[band - first_block_row], block[1])[:columns]
        segment = out[start : start + length]
        if rows:
            whole = segment.reshape(rows, columns)
            np.multiply(whole, by_column, out=whole)
        else:
            np.multiply(segment, by_column[column : column + length], out=segment)


def row_runs(
    first: int, count: int, columns: int, block_rows: int, most: int | None = None
) -> Iterator[tuple[int, int, int, int, int]]:
    """The elements [first, first + count) of a row-major matrix with `columns` columns,
    cut where a band of `block_rows` rows ends (a band shares one row of scales) into
    runs that are either a piece of one row or whole rows: (band, start, column, rows,
    length), `start` counted from `first`, `rows` 0 for a piece of a row starting at
    `column`. With `most`, no run is longer than `most` elements (or one row)."""
    position = 0
    while position < count:
        band = (first + position) // columns // block_rows
        band_end = min(count, (band + 1) * block_rows * columns - first)
        while position < band_end:
            column = (first + position) % columns
            if column or band_end - position < columns:
                length = min(columns - column, band_end - position, most or count)
                yield band, position, column, 0, length
            else:
                rows = (band_end - position) // columns
                if most is not None:
                    rows = max(1, min(rows, most // columns))
                length = rows * columns
                yield band, position, 0, rows, length
            position += length


#: Elements per call of the table-lookup dequantisation: the intp indices of one call
#: (8 bytes each) stay in L2.
_LOOKUP_CHUNK = 1 << 16
_OUTPUT_WORDS = {2: "<u2", 4: "<u4"}


def dequantise_by_lookup(
    codes: Any, first: int, columns: int, block: tuple[int, int], scales: Any, first_block_row: int,
    dst_dtype: str, out: Any,
) -> CastStats | None:
    """:func:`dequantise_into` followed by the cast to `dst_dtype`, as a table lookup.

    Within one block every element is `cast(table[code] * scale)`: a function of its
    code alone. So each block's 256 possible results are computed once, by exactly that
    float32 multiply and the same cast (:func:`~shardkit.format.dtype_cast.cast_into`),
    and every element is then one lookup of its code in its block's table: bit for bit
    the products-then-cast result, at a fraction of the passes over the data.

    The loss counts are those of casting the products: with finite scales a product is
    NaN exactly where its code is, and no finite product is lost when no table entry
    is. Where a scale is not finite or a table entry overflows or underflows, this
    returns None and the caller takes the element-wise path, which counts them.
    """
    import numpy as np

    size = DTYPES[dst_dtype].bits // 8
    count = codes.size
    if count == 0 or size not in _OUTPUT_WORDS:
        return None
    block_rows, block_columns = block
    first_band = first // columns // block_rows
    last_band = (first + count - 1) // columns // block_rows
    bands = scales[first_band - first_block_row : last_band - first_block_row + 1]
    if not np.isfinite(bands).all():
        return None
    products = e4m3_table()[None, None, :] * bands[:, :, None]  # float32 × float32, as transformers
    tables = np.empty(products.shape, _OUTPUT_WORDS[size])
    made = cast_into(products.reshape(-1), "F32", dst_dtype, tables.reshape(-1))
    if made.overflow or made.underflow:
        return None
    results = np.frombuffer(out, _OUTPUT_WORDS[size], count)
    # each column's offset into its band's tables: its block column's 256 entries
    by_column = (np.arange(columns, dtype=np.intp) // block_columns) * 256
    for band, start, column, rows, length in row_runs(first, count, columns, block_rows, _LOOKUP_CHUNK):
        part = codes[start : start + length]
        if rows:
            index = np.add(part.reshape(rows, columns), by_column, dtype=np.intp).reshape(-1)
        else:
            index = np.add(part, by_column[column : column + length], dtype=np.intp)
        np.take(tables[band - first_band].reshape(-1), index, out=results[start : start + length])
    nan = int(np.count_nonzero((codes & 0x7F) == 0x7F))
    return CastStats(nan=nan)


# Quantisation, as transformers' `Fp8Quantize._quantize_one` computes it (read from
# `transformers.integrations.finegrained_fp8`), step by step in float32:
#   amax  = max |x| over the block (a NaN anywhere in it makes amax NaN)
#   scale = 448.0 / amax where amax > 0, else 1.0. Python's `448.0 / tensor` is torch's
#           `tensor.reciprocal() * 448.0`: two roundings, not one division (a true
#           division differs in about a quarter of the blocks)
#   scale_inv = 1.0 / scale, i.e. scale.reciprocal() (the stored `weight_scale_inv`)
#   code  = E4M3(clamp(x * scale, -448, 448)), clamp keeping NaN
# so a NaN block gets scale 1 (its other values clamped to ±448), an inf block scale 0
# (finite values to 0, the inf to NaN), and a block whose amax is subnormal scale inf
# (its zeros to NaN): transformers' results, kept.

_U32 = 0xFFFFFFFF
#: fp32 bits from which c10's E4M3 conversion gives NaN (480.0: beyond 448 + half a step).
_E4M3_NAN_FROM = 1087 << 20
#: below 2^-6 (the smallest normal E4M3) values are rounded in the float unit by adding 2^14.
_E4M3_NORMAL_FROM = 121 << 23
_E4M3_DENORMAL_ADD = 141 << 23
_E4M3_REBIAS = ((7 - 127) << 23) & _U32


def encode_e4m3(values: Any, out: Any) -> None:
    """float32 `values` to E4M3 codes (uint8 `out`), as c10's `fp8e4m3fn_from_fp32_value`
    (round to nearest even, subnormals kept, NaN to NaN with its sign; see
    :func:`_encode_exactly`), by a table: the rounding of a float32 to 3 mantissa bits
    depends only on its top 16 bits and on whether any lower bit is set, so one lookup
    in 2^17 codes replaces a dozen passes of bit arithmetic."""
    import numpy as np

    bits = values.reshape(-1).view(np.uint32)
    index = np.right_shift(bits, np.uint32(15))
    lower = np.bitwise_and(bits, np.uint32(0x7FFF))
    lower += np.uint32(0x7FFF)  # bit 15 set iff any lower bit is
    lower >>= np.uint32(15)
    index |= lower
    np.take(_encode_table(), index, out=out.reshape(-1), mode="clip")  # every index is < 2^17


_encode_lock = threading.Lock()
_encoded: Any = None


def _encode_table() -> Any:
    """E4M3 code of each (top 16 bits, any lower bit set) of a float32."""
    global _encoded
    import numpy as np

    with _encode_lock:
        if _encoded is None:
            # bit 15 stands for "some of bits 0-15 set": the same rounding as any such value
            representatives = (np.arange(1 << 17, dtype=np.uint32) << np.uint32(15)).view(np.float32)
            table = np.empty(1 << 17, np.uint8)
            _encode_exactly(representatives, table)
            _encoded = table
        return _encoded


def _encode_exactly(values: Any, out: Any) -> None:
    """c10's `fp8e4m3fn_from_fp32_value`, vectorised: round to nearest even, subnormals
    kept, |x| ≥ 480 and NaN to NaN (0x7F, sign kept). Callers clamp to ±448 first, as
    transformers does, so only NaN meets the last rule (torch saturates 464-480 to 448
    in its vectorised path; clamped values never get there)."""
    import numpy as np

    bits = values.view(np.uint32)
    sign = bits & np.uint32(0x80000000)
    magnitude = bits ^ sign
    # normal results: rebias the exponent and round the mantissa to 3 bits, ties to even
    normal = magnitude + np.uint32(_E4M3_REBIAS + 0x7FFFF)
    normal += (magnitude >> np.uint32(20)) & np.uint32(1)
    normal >>= np.uint32(20)
    # subnormal results: the float unit rounds |x| + 2^14 to a multiple of 2^-9
    with np.errstate(invalid="ignore"):  # NaN lanes: replaced below
        small = (magnitude.view(np.float32) + np.float32(2.0**14)).view(np.uint32) - np.uint32(_E4M3_DENORMAL_ADD)
    result = np.where(magnitude < np.uint32(_E4M3_NORMAL_FROM), small, normal)
    result[magnitude >= np.uint32(_E4M3_NAN_FROM)] = 0x7F
    result |= sign >> np.uint32(24)
    np.copyto(out, result, casting="unsafe")


#: The unsigned integer of each source dtype's bits, and its magnitude mask.
_MAGNITUDE = {"F32": ("<u4", 0x7FFFFFFF), "F16": ("<u2", 0x7FFF), "BF16": ("<u2", 0x7FFF)}


def block_amax(bits: Any, dtype: str, block: tuple[int, int]) -> Any:
    """Each block's largest magnitude as float32 (NaN if it holds one), from the raw
    bits of a F32, F16 or BF16 matrix of whole blocks: magnitudes order as their bits
    do, and every NaN's bits exceed inf's, so an integer max is torch's `amax` of the
    values widened to float32 (exactly, as BF16 and F16 widen)."""
    import numpy as np

    uint, mask = _MAGNITUDE[dtype]
    rows, columns = bits.shape
    magnitude = bits & np.dtype(uint).type(mask)
    largest = magnitude.reshape(rows // block[0], block[0], columns // block[1], block[1]).max(axis=(1, 3))
    if dtype == "F32":
        return largest.view(np.float32)
    if dtype == "BF16":
        return (largest.astype(np.uint32) << np.uint32(16)).view(np.float32)
    return largest.view(np.float16).astype(np.float32)


def scales_of(amax: Any) -> tuple[Any, Any]:
    """(scale, scale_inv) in float32 of blocks whose largest magnitudes are `amax`."""
    import numpy as np

    positive = amax > 0
    with np.errstate(all="ignore"):  # a subnormal amax overflows to an inf scale, as in torch
        scale = np.reciprocal(np.where(positive, amax, np.float32(1))) * np.float32(E4M3_MAX)
        scale = np.where(positive, scale, np.float32(1))
        return scale, np.reciprocal(scale)


def block_scales(values: Any, block: tuple[int, int]) -> tuple[Any, Any]:
    """(scale, scale_inv) in float32 of each block of `values`, a float32 matrix whose
    rows and columns are whole blocks: one row of each per band of block rows."""
    import numpy as np

    return scales_of(block_amax(np.ascontiguousarray(values).view(np.uint32), "F32", block))


def quantise_into(values: Any, block: tuple[int, int], scale: Any, out: Any) -> None:
    """E4M3 codes of float32 `values` (whole blocks, overwritten as scratch) into uint8
    `out` of the same shape, given each block's `scale` from :func:`scales_of`.
    Nothing is counted as lost: rounding to 3 mantissa bits (and values under a
    block's 1/458,752 of its largest to zero) is what the quantisation is."""
    import numpy as np

    rows, columns = values.shape
    tiles = values.reshape(rows // block[0], block[0], columns // block[1], block[1])
    with np.errstate(all="ignore"):  # inf × 0 is NaN, as in torch
        np.multiply(tiles, scale[:, None, :, None], out=tiles)
    np.clip(values, -E4M3_MAX, E4M3_MAX, out=values)
    encode_e4m3(values, out)
