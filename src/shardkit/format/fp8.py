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
from typing import Any

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
    block_rows, block_columns = block
    count = codes.size
    position = 0
    while position < count:
        row, column = divmod(first + position, columns)
        band = row // block_rows
        # every element up to the end of this band of block rows shares one row of scales
        band_end = min(count, (band + 1) * block_rows * columns - first)
        by_column = np.repeat(scales[band - first_block_row], block_columns)[:columns]
        segment = out[position:band_end]
        head = min(segment.size, columns - column if column else 0)
        if head:
            np.multiply(segment[:head], by_column[column : column + head], out=segment[:head])
        rows, tail = divmod(segment.size - head, columns)
        if rows:
            whole = segment[head : head + rows * columns].reshape(rows, columns)
            np.multiply(whole, by_column, out=whole)
        if tail:
            np.multiply(segment[segment.size - tail :], by_column[:tail], out=segment[segment.size - tail :])
        position = band_end
