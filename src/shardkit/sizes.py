"""Byte sizes as people and the Hugging Face tools write them.

"5GB" is 5·10⁹ bytes (huggingface_hub's `parse_size_to_int`), "4GiB" is 4·2³⁰
(transformers' `convert_file_size_to_int`), a plain integer is bytes.
"""

from __future__ import annotations

import re

from .errors import BadInputError

#: huggingface_hub's `MAX_SHARD_SIZE` (serialization/_base.py) and transformers' default.
DEFAULT_MAX_SHARD_SIZE = "5GB"

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")
#: The largest file Linux and the format's u64 offsets allow both (off_t is signed).
MAX_SIZE = 2**63 - 1
#: More digits than any size up to MAX_SIZE needs; longer numbers are refused before
#: they are converted (Python refuses to convert more than 4,300 digits at all).
_MAX_DIGITS = 40


def parse_size(text: str | int) -> int:
    """Bytes in `text`; raises BadInputError with the accepted forms on anything else."""
    if isinstance(text, int):
        size = text
    else:
        match = _SIZE.match(text)
        unit = match.group(2).upper() if match else None
        if match is None or unit not in _UNITS:
            raise BadInputError(
                f"cannot read size {text!r}: use bytes or a number with KB, MB, GB, TB "
                "(powers of 10) or KiB, MiB, GiB, TiB (powers of 2), e.g. 5GB"
            )
        number = match.group(1)
        if len(number) > _MAX_DIGITS:
            raise BadInputError(f"size {_shorten(text)} is larger than any file can be (at most {MAX_SIZE:,} bytes)")
        from fractions import Fraction  # here: it imports decimal, ~5 ms of every start-up

        size = int(Fraction(number) * _UNITS[unit])  # exact: a float loses bytes past 2**53
    if size > MAX_SIZE:
        raise BadInputError(f"size {_shorten(str(text))} is larger than any file can be (at most {MAX_SIZE:,} bytes)")
    if size <= 0:
        raise BadInputError(f"size {text!r} must be greater than zero")
    return size


def _shorten(text: str) -> str:
    """A size as the user typed it, cut to fit on the error's one line."""
    return repr(text) if len(text) <= 40 else repr(text[:20] + "…" + text[-12:]) + f" ({len(text)} characters)"


def format_size(size: int) -> str:
    """A short human reading of a byte count (decimal units, as `ls -lh --si`)."""
    value = float(size)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(value) < 1000 or unit == "TB":
            return f"{int(value)} B" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")
