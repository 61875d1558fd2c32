"""Tensor bytes as numbers: the one place that needs numpy (the optional `numeric` extra).

Everything else in shardkit treats tensors as opaque byte ranges. Measuring *how*
two float tensors differ needs their values, which numpy decodes, with ml_dtypes
for the types numpy lacks (bfloat16 and the 8-bit floats). Both are imported on
first use, so shardkit runs without them until someone asks for a number.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from ..errors import MissingExtraError

#: safetensors dtype → numpy dtype name, or ml_dtypes attribute (prefixed "ml:").
#: F4 and F6 are left out: their elements are packed across byte boundaries.
_FLOAT_TYPES = {
    "F16": "<f2",
    "F32": "<f4",
    "F64": "<f8",
    "C64": "<c8",
    "BF16": "ml:bfloat16",
    "F8_E4M3": "ml:float8_e4m3fn",
    "F8_E5M2": "ml:float8_e5m2",
    "F8_E4M3FNUZ": "ml:float8_e4m3fnuz",
    "F8_E5M2FNUZ": "ml:float8_e5m2fnuz",
    "F8_E8M0": "ml:float8_e8m0fnu",
}


def require_numeric(feature: str) -> None:
    """Fail before any work if the `numeric` extra is missing."""
    try:
        import ml_dtypes  # noqa: F401
        import numpy  # noqa: F401
    except ImportError:
        raise MissingExtraError(feature, "numeric") from None


def measurable(dtype: str) -> bool:
    """Whether :func:`max_abs_difference` can decode tensors of `dtype`."""
    return dtype in _FLOAT_TYPES


def element_size(dtype: str) -> int:
    return _numpy_dtype(dtype).itemsize


def _numpy_dtype(dtype: str) -> Any:
    import numpy as np

    name = _FLOAT_TYPES[dtype]
    if name.startswith("ml:"):
        import ml_dtypes

        return np.dtype(getattr(ml_dtypes, name[3:]))
    return np.dtype(name)


def max_abs_difference(dtype: str, pairs: Iterable[tuple[bytes, bytes]]) -> float:
    """max |a − b| over chunk pairs of two same-shaped tensors, each chunk a whole
    number of elements.

    Values are widened to float64 (complex128 for C64) so the difference itself does
    not round or overflow for any narrower type. Elements equal on both sides count
    as 0, including equal infinities and NaN on both sides; a NaN on one side only
    makes the result NaN, an infinity facing a finite value makes it inf.
    """
    import numpy as np

    kind = _numpy_dtype(dtype)
    wide = np.complex128 if kind.kind == "c" else np.float64
    result = 0.0
    for chunk_a, chunk_b in pairs:
        with np.errstate(invalid="ignore", over="ignore"):  # NaN and inf are data, not errors
            a = np.frombuffer(chunk_a, dtype=kind).astype(wide)
            b = np.frombuffer(chunk_b, dtype=kind).astype(wide)
            difference = np.abs(a - b)
        difference[(a == b) | (np.isnan(a) & np.isnan(b))] = 0.0
        if difference.size:
            largest = float(difference.max())
            if math.isnan(largest):
                return math.nan
            result = max(result, largest)
    return result
