"""JSON exactly as the reference safetensors reader (Rust serde_json) reads it.

Python's `json` module is laxer than serde_json in ways that matter for a file format
checker, so a header Python accepts could be one every real loader refuses:

* it accepts the literals ``NaN``, ``Infinity`` and ``-Infinity`` (serde: invalid JSON);
* it decodes a lone UTF-16 surrogate escape such as ``"\\ud800"`` (serde: error);
* it turns ``-0`` into the integer 0 (serde: the float -0.0, so not a dimension);
* it reads integers of any size and ``1e400`` as infinity (serde: integers above
  2**64-1 are floats, and a number beyond the f64 range is an error);
* it nests as deep as the interpreter allows (serde: at most 127 levels);
* it keeps only the last of two equal keys (serde: depends on the target type).

:func:`loads` closes those holes. Objects come back as :class:`Pairs` (keys in order,
duplicates kept) so that the format module can apply the reference's rule for each
kind of object; non-integers and integers beyond u64 come back as :class:`JsonFloat`
so that they can never pass for a shape or an offset.
"""

from __future__ import annotations

import json
import math
import re
from itertools import accumulate

MAX_U64 = 2**64 - 1
#: serde_json refuses a document nested 128 levels deep or more.
MAX_DEPTH = 127

_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


class JsonSyntaxError(ValueError):
    """The text is not JSON the reference reader accepts."""


class Pairs(list):
    """A JSON object as its list of (key, value) pairs, duplicates and order kept."""


class JsonFloat(float):
    """A JSON number that serde_json reads as a float (so never as usize)."""


def _parse_int(text: str) -> int | JsonFloat:
    if text == "-0":
        return JsonFloat(-0.0)
    if len(text) <= 20:
        value = int(text)
        if value <= MAX_U64:
            return value
    return _parse_float(text)


def _parse_float(text: str) -> JsonFloat:
    value = float(text)
    if math.isinf(value):
        raise JsonSyntaxError(f"number out of range: {text[:40]}")
    return JsonFloat(value)


def _reject_constant(name: str) -> None:
    raise JsonSyntaxError(f"{name} is not a JSON value")


_DECODER = json.JSONDecoder(
    object_pairs_hook=Pairs,
    parse_int=_parse_int,
    parse_float=_parse_float,
    parse_constant=_reject_constant,
    strict=True,
)


def loads(text: str) -> object:
    """Parse `text` as serde_json would, or raise :class:`JsonSyntaxError`."""
    try:
        value = _DECODER.decode(text)
    except JsonSyntaxError:
        raise
    except RecursionError:
        raise JsonSyntaxError(f"nested deeper than {MAX_DEPTH} levels") from None
    except (ValueError, OverflowError) as exc:
        raise JsonSyntaxError(str(exc)) from None
    # No deeper than its count of opening brackets (strings' included): an index has
    # three whatever its size, and needs no scan.
    if text.count("[") + text.count("{") > MAX_DEPTH and depth(text) > MAX_DEPTH:
        raise JsonSyntaxError(f"nested deeper than {MAX_DEPTH} levels")
    if _SURROGATE_ESCAPE.search(text) and _has_lone_surrogate(value):
        raise JsonSyntaxError("a string holds a lone UTF-16 surrogate escape")
    return value


def depth(text: str) -> int:
    """Nesting depth of arrays and objects in valid JSON `text`; a scalar has depth 0.

    Read from the brackets outside strings rather than by walking the parsed value:
    a 20,000-tensor MoE header has 100,000 values, and the walk cost more than the
    parse itself.
    """
    brackets = _NOT_BRACKET.sub("", _JSON_STRING.sub("", text))
    return max(accumulate(map(_BRACKET_STEP.__getitem__, brackets)), default=0)


_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_BRACKET_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}


def _has_lone_surrogate(value: object) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(item, Pairs):
            for key, inner in item:
                stack.append(key)
                stack.append(inner)
        elif isinstance(item, list):
            stack.extend(item)
    return False


def is_u64(value: object) -> bool:
    """True for a JSON integer serde_json would read as usize on a 64-bit machine."""
    return type(value) is int and 0 <= value <= MAX_U64


#: A string as JSON, as `dumps_compact` writes it inside a document (C speed).
dumps_string = json.encoder.encode_basestring


def dumps_compact(value: object) -> str:
    """Serialise as serde_json::to_string does: no spaces, non-ASCII kept as is."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
