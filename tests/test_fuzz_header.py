"""Differential fuzzing of the header parser against the reference reader.

Hypothesis builds safetensors files — valid ones (every dtype, zero-size and scalar
tensors, metadata, odd names, any entry order and JSON spacing) and mutations of
them at the JSON level (fields changed, repeated, removed, numbers made floats,
negatives, -0 or huge, entries written as sequences, strings with lone surrogates,
deep nesting) and at the byte level (bytes flipped, lengths changed, truncation,
trailing bytes). For every file:

* `format.parse_file` accepts it exactly when `safetensors.deserialize` does, and
  then finds the same tensors at the same bytes;
* with `strict=True` it may only be stricter than the reference, never laxer;
* nothing but `FormatError` ever escapes it, and no input makes it hang.

`SHARDKIT_FUZZ_EXAMPLES` sets the examples per test (`make fuzz` runs 20000).
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import pytest
import safetensors
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from shardkit.errors import FormatError
from shardkit.format import header as shardkit_format
from shardkit.format.header import DTYPES, parse_file, tensor_nbytes

EXAMPLES = int(os.environ.get("SHARDKIT_FUZZ_EXAMPLES", "300"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=timedelta(seconds=10),  # a hang, not a slow machine
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    database=None,
)

try:  # a Rust panic surfaces as pyo3's PanicException, a BaseException
    from pyo3_runtime import PanicException  # type: ignore[import-not-found]
except ImportError:
    PanicException = BaseException  # noqa: N816


# ----------------------------------------------------------------- the two readers


@dataclass(frozen=True)
class Verdict:
    accepted: bool
    tensors: dict[str, tuple[str, tuple[int, ...], bytes]] | None = None
    reason: str = ""


def reference(raw: bytes) -> Verdict:
    try:
        loaded = safetensors.deserialize(raw)
    except safetensors.SafetensorError as exc:
        return Verdict(False, reason=str(exc))
    except PanicException as exc:  # recorded as a refusal; the assertion message shows it
        return Verdict(False, reason=f"reference panicked: {exc}")
    return Verdict(True, {name: (e["dtype"], tuple(e["shape"]), bytes(e["data"])) for name, e in loaded})


def shardkit(raw: bytes, strict: bool = False) -> Verdict:
    try:
        header = parse_file(lambda offset, length: raw[offset : offset + length], len(raw), "fuzz", strict=strict)
    except FormatError as exc:
        return Verdict(False, reason=str(exc))
    data = raw[header.data_start :]
    return Verdict(True, {t.name: (t.dtype, t.shape, data[t.begin : t.end]) for t in header.tensors})


def assert_agree(raw: bytes) -> None:
    """The differential property, for one file."""
    ours, theirs, strict = shardkit(raw), reference(raw), shardkit(raw, strict=True)
    assert ours.accepted == theirs.accepted, (
        f"shardkit {'accepts' if ours.accepted else 'refuses'} what the reference "
        f"{'accepts' if theirs.accepted else 'refuses'}: {raw[:300]!r}\nshardkit: {ours.reason}\n"
        f"reference: {theirs.reason}"
    )
    if ours.accepted:
        assert ours.tensors == theirs.tensors, raw[:300]
    assert not strict.accepted or ours.accepted, f"strict mode is laxer than the default: {raw[:300]!r}"
    if strict.accepted:
        assert strict.tensors == ours.tensors


# ----------------------------------------------------------------- JSON with every liberty


class Raw(str):
    """JSON text written as is: NaN, -0, 1e400, escapes, anything json.dumps will not write."""


class Obj(list):
    """A JSON object as (key, value) pairs: duplicates and order are the test's to choose."""


def dump(value: object, space: str = "") -> str:
    if isinstance(value, Raw):
        return value
    if isinstance(value, Obj):
        items = (f"{dump_key(k)}{space}:{space}{dump(v, space)}" for k, v in value)
        return "{" + space + f",{space}".join(items) + space + "}"
    if isinstance(value, (list, tuple)):
        return "[" + f",{space}".join(dump(v, space) for v in value) + "]"
    return json.dumps(value, ensure_ascii=False)


def dump_key(key: str) -> str:
    return key if isinstance(key, Raw) else json.dumps(key, ensure_ascii=False)


def file_bytes(header: str | bytes, data: bytes) -> bytes:
    body = header.encode("utf-8", "surrogatepass") if isinstance(header, str) else header
    return struct.pack("<Q", len(body)) + body + data


# ----------------------------------------------------------------- valid files


@dataclass
class Tensor:
    name: str
    dtype: str
    shape: list[int]
    nbytes: int


NAMES = st.one_of(
    st.text(min_size=0, max_size=12),
    st.sampled_from(["model.embed_tokens.weight", "lm_head.weight", "a", "", " ", "é", "🤗", "\0", "a\nb", "__x__"]),
).filter(lambda name: name != "__metadata__")


@st.composite
def tensors(draw: st.DrawFn) -> Tensor:
    dtype = draw(st.sampled_from(sorted(DTYPES)))
    shape = draw(st.lists(st.integers(0, 5), max_size=4))
    try:
        nbytes = tensor_nbytes(dtype, shape)
    except ValueError:  # sub-byte count off a byte boundary: make it whole
        shape = [*shape, 8]
        nbytes = tensor_nbytes(dtype, shape)
    return Tensor(draw(NAMES), dtype, shape, nbytes)


METADATA = st.one_of(
    st.none(),
    st.just("absent"),
    st.dictionaries(st.text(max_size=8), st.text(max_size=12), max_size=4),
)


@dataclass
class ValidFile:
    entries: list[tuple[str, Obj]]  # in JSON order; data laid out in another order
    metadata: object
    data: bytes
    space: str
    lead: str
    pad: str

    def document(self) -> Obj:
        doc = Obj()
        if self.metadata != "absent":
            doc.append(("__metadata__", None if self.metadata is None else Obj(self.metadata.items())))
        doc.extend(self.entries)
        return doc

    def render(self, doc: Obj | None = None, data: bytes | None = None) -> bytes:
        text = self.lead + dump(self.document() if doc is None else doc, self.space) + self.pad
        return file_bytes(text, self.data if data is None else data)


@st.composite
def valid_files(draw: st.DrawFn) -> ValidFile:
    found = draw(st.lists(tensors(), max_size=6, unique_by=lambda t: t.name))
    layout = draw(st.permutations(found))  # data order, independent of JSON order
    offsets, position = {}, 0
    for tensor in layout:
        offsets[tensor.name] = (position, position + tensor.nbytes)
        position += tensor.nbytes
    entries = [
        (t.name, Obj([("dtype", t.dtype), ("shape", t.shape), ("data_offsets", list(offsets[t.name]))]))
        for t in found
    ]
    for _, entry in entries:  # field order is free
        entry[:] = draw(st.permutations(entry))
    data = draw(st.binary(min_size=position, max_size=position))
    space = draw(st.sampled_from(["", " ", "\n", "\t", "\r\n  "]))
    pad = draw(st.sampled_from(["", " ", "       ", "\n"]))
    return ValidFile(entries, draw(METADATA), data, space, "", pad)


@FUZZ
@given(valid_files())
@example(ValidFile([], "absent", b"", "", "", ""))
def test_valid_files_are_read_like_the_reference(made: ValidFile) -> None:
    raw = made.render()
    assert reference(raw).accepted, raw[:200]
    assert_agree(raw)
    assert shardkit(raw, strict=True).accepted == (made.metadata is not None)  # only null metadata is non-strict


# ----------------------------------------------------------------- mutations of valid files


ODD_VALUES = [
    Raw("-0"), Raw("0.0"), Raw("1.0"), Raw("1e0"), Raw("1E+1"), Raw("NaN"), Raw("Infinity"), Raw("-Infinity"),
    Raw("1e400"), Raw("-1e400"), Raw("1e-400"), Raw("01"), Raw("0x10"), Raw("+1"), Raw(".5"), Raw("1."),
    Raw("18446744073709551615"), Raw("18446744073709551616"), Raw("-9223372036854775808"),
    Raw("-9223372036854775809"), Raw("1" + "0" * 30), Raw("\"\\ud800\""), Raw("\"\\udc00\\ud800\""),
    Raw("\"\\ud83d\\ude00\""), Raw("\"\\u0000\""), Raw("tru"), Raw("nul"), Raw("[1,]"), Raw("{,}"), Raw("'a'"),
    -1, 0, 1, 2, 3, 4, 8, 2**32, 2**63, 2**64 - 1, True, False, None, "4", "F32", [], [0], [0, 0], [0, 0, 0],
    Obj(), Obj([("F32", None)]), Obj([("U8", None)]), Obj([("BOOL", None), ("U8", None)]), 4.5,
]
ODD_DTYPES = [
    "f32", "F32 ", " F32", "FLOAT32", "float32", "F128", "Q4_K", "U1", "", "bf16", "BF16\0",
    Obj([("F32", None)]), Obj([("F4", None)]), Obj([("F32", [])]), Obj([("F32", Obj())]), Obj([("F33", None)]),
    Obj([("F32", None), ("F16", None)]), Obj([("F32", Raw("-0"))]), ["F32"], 32, None,
]


def pick(draw: st.DrawFn, doc: Obj) -> tuple[int, str, Obj] | None:
    """A tensor entry of `doc` that is still an object, with its position."""
    objects = [(i, k, v) for i, (k, v) in enumerate(doc) if k != "__metadata__" and isinstance(v, Obj)]
    return draw(st.sampled_from(objects)) if objects else None


def odd_value(draw: st.DrawFn) -> object:
    return draw(st.one_of(st.sampled_from(ODD_VALUES), st.integers(-(2**70), 2**70), st.floats(allow_nan=False)))


def respell_number(draw: st.DrawFn, value: object) -> object:
    """The same number written as serde might read it differently: 4.0, 4e0, 04, -0, 4E+0."""
    if not isinstance(value, int) or isinstance(value, bool):
        return value
    return draw(st.sampled_from([
        Raw(f"{value}.0"), Raw(f"{value}e0"), Raw(f"{value}E+0"), Raw(f"0{value}"), Raw(f"-{value}"),
        Raw(f"{value} "), Raw(f"{value}" + "0" * 25 if value else "-0"), value,
    ]))


def respell_string(draw: st.DrawFn, value: str) -> object:
    """The same string, or its close neighbours: escaped, as an enum object, cased, padded."""
    escaped = Raw('"' + "".join(f"\\u{ord(c):04x}" for c in value) + '"')
    return draw(st.sampled_from([
        escaped, Obj([(value, None)]), Obj([(value, Obj())]), Obj([(value, [])]), Obj([(value, Raw("-0"))]),
        value.lower(), f" {value}", f"{value}\0", [value], Obj([(escaped, None)]),
    ]))


def deep(depth: int) -> Raw:
    return Raw("[" * depth + "]" * depth)


def mutate_json(draw: st.DrawFn, doc: Obj) -> Obj:
    if not isinstance(doc, Obj):  # a top-level mutation already made it something else
        return doc
    kind = draw(st.sampled_from([
        "field-value", "shape-element", "offset-element", "offset-shift", "dtype", "repeat-field", "remove-field",
        "unknown-field", "as-sequence", "repeat-entry", "metadata", "repeat-metadata", "name", "top-level",
        "respell-number", "respell-number", "respell-dtype", "respell-dtype",
    ]))
    chosen = pick(draw, doc)
    if kind == "top-level":
        return draw(st.sampled_from([Obj(), Raw("[]"), Raw("null"), Raw("\"x\""), Raw("{}{}"), Raw("[{}]"),
                                     Raw(dump(doc) + "x"), Raw(dump(doc)[:-1]), Raw(dump(doc) + "\0")]))
    if kind in ("metadata", "repeat-metadata"):
        value = draw(st.one_of(st.sampled_from([None, Obj(), Obj([("k", "v"), ("k", "w")]), Raw("[]"), "pt"]),
                               st.builds(lambda v: Obj([("k", v)]), st.sampled_from(ODD_VALUES))))
        entry = ("__metadata__", value)
        if kind == "metadata":
            doc[:] = [(k, v) for k, v in doc if k != "__metadata__"]
        doc.insert(draw(st.integers(0, len(doc))), entry)
        return doc
    if kind == "name":
        if not doc:
            return doc
        index = draw(st.integers(0, len(doc) - 1))
        name = draw(st.sampled_from([Raw('"\\ud800"'), Raw('"\\udfff x"'), Raw('"\\ud83d\\ude00"'), Raw('"\\u0041"'),
                                     Raw('"a\\/b"'), Raw('"\\x41"'), Raw('"tab\tin"'), Raw('"__metadata__"'),
                                     Raw('"\\u005f_metadata__"'), "__metadata__"]))
        doc[index] = (name, doc[index][1])
        return doc
    if chosen is None:
        return doc
    index, name, entry = chosen
    fields = [k for k, _ in entry]
    if kind == "field-value" and fields:
        position = draw(st.integers(0, len(entry) - 1))
        entry[position] = (entry[position][0], odd_value(draw))
    elif kind == "shape-element":
        shape = next((list(v) for k, v in entry if k == "shape" and isinstance(v, list)), None)
        if shape is not None:
            at = draw(st.integers(0, len(shape)))
            shape[at:at + 1] = [odd_value(draw)]
            entry[:] = [(k, shape if k == "shape" else v) for k, v in entry]
    elif kind in ("offset-element", "offset-shift"):
        offsets = next((list(v) for k, v in entry if k == "data_offsets" and isinstance(v, list)), None)
        if offsets:
            at = draw(st.integers(0, len(offsets) - 1))
            if kind == "offset-element" or not isinstance(offsets[at], int):
                offsets[at] = odd_value(draw)
            else:
                offsets[at] = max(0, offsets[at] + draw(st.sampled_from([-8, -2, -1, 1, 2, 8])))
            entry[:] = [(k, offsets if k == "data_offsets" else v) for k, v in entry]
    elif kind == "respell-number":
        numbers = [(k, v) for k, v in entry if k in ("shape", "data_offsets") and isinstance(v, list)]
        spots = [(k, i) for k, v in numbers for i in range(len(v))]
        if spots:
            key, at = draw(st.sampled_from(spots))
            entry[:] = [
                (k, [respell_number(draw, x) if i == at else x for i, x in enumerate(v)])
                if k == key and isinstance(v, list)  # a repeated field may hold a non-list
                else (k, v)
                for k, v in entry
            ]
    elif kind == "respell-dtype":
        entry[:] = [(k, respell_string(draw, v) if k == "dtype" and isinstance(v, str) else v) for k, v in entry]
    elif kind == "dtype":
        entry[:] = [(k, draw(st.sampled_from(ODD_DTYPES)) if k == "dtype" else v) for k, v in entry]
    elif kind == "repeat-field" and fields:
        original = draw(st.sampled_from(entry))
        copy = (original[0], draw(st.sampled_from([original[1], odd_value(draw)])))
        entry.insert(draw(st.integers(0, len(entry))), copy)
    elif kind == "remove-field" and fields:
        del entry[draw(st.integers(0, len(entry) - 1))]
    elif kind == "unknown-field":
        key = draw(st.sampled_from(["x", "quantization", "DTYPE", "dtype ", "offsets", ""]))
        value = draw(st.one_of(st.sampled_from(ODD_VALUES), st.integers(120, 130).map(deep)))
        entry.insert(draw(st.integers(0, len(entry))), (key, value))
    elif kind == "as-sequence":
        values = dict(entry)
        ordered = [values.get("dtype"), values.get("shape"), values.get("data_offsets")]
        size = draw(st.sampled_from([3, 3, 3, 2, 4, 0]))
        if draw(st.booleans()):
            ordered = draw(st.permutations(ordered))
        doc[index] = (name, (ordered + [0])[:size])
    elif kind == "repeat-entry":
        twin = Obj(entry)
        if draw(st.booleans()):
            twin = Obj([(k, odd_value(draw) if k == "shape" else v) for k, v in entry])
        doc.insert(draw(st.integers(0, len(doc))), (name, twin))
    return doc


@FUZZ
@given(valid_files(), st.data())
def test_json_mutations_are_judged_like_the_reference(made: ValidFile, data: st.DataObject) -> None:
    doc = made.document()
    for _ in range(data.draw(st.integers(1, 3))):
        doc = mutate_json(data.draw, doc)
    if data.draw(st.booleans()):
        made.lead = data.draw(st.sampled_from([" ", "\n", "\t\r\n", "\u00a0", "\ufeff", "\x0c"]))
    assert_agree(made.render(doc))


@st.composite
def byte_mutations(draw: st.DrawFn, files: st.SearchStrategy[ValidFile] | None = None) -> bytes:
    made = draw(valid_files() if files is None else files)
    raw = bytearray(made.render())
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["flip", "set", "length", "truncate", "append", "insert"]))
        if kind in ("flip", "set") and raw:
            at = draw(st.integers(0, len(raw) - 1))  # mostly the header: the data is a few bytes
            if kind == "flip":
                raw[at] ^= 1 << draw(st.integers(0, 7))
            else:
                raw[at] = draw(st.sampled_from(list(b'{}[]",:-.0123456789eE \\/u\x00\x80\xc0\xed\xff')))
        elif kind == "length" and len(raw) >= 8:
            (length,) = struct.unpack("<Q", bytes(raw[:8]))
            length = draw(st.one_of(
                st.integers(-16, 16).map(lambda d, length=length: min(2**64 - 1, max(0, length + d))),
                st.sampled_from([0, 1, 100_000_000, 100_000_001, 2**63, 2**64 - 1]),
            ))
            raw[:8] = struct.pack("<Q", length)
        elif kind == "truncate":
            del raw[draw(st.integers(0, len(raw))):]
        elif kind == "append":
            raw += draw(st.binary(min_size=1, max_size=9))
        elif kind == "insert":
            at = draw(st.integers(0, len(raw)))
            raw[at:at] = draw(st.binary(min_size=1, max_size=3))
    return bytes(raw)


@FUZZ
@given(byte_mutations())
def test_byte_mutations_are_judged_like_the_reference(raw: bytes) -> None:
    assert_agree(raw)


# ----------------------------------------------------------------- anything at all


JSON_TOKENS = [*'{}[]":,- 0123456789.eE+tnrufalsNIy\\u\n"ad_', '"__metadata__"', '"dtype"', '"shape"',
               '"data_offsets"', '"F32"', '"U8"', '"F4"', "null", "true", "NaN", "-0", "\\ud800"]
JSONISH = st.lists(st.sampled_from(JSON_TOKENS), max_size=40).map("".join)


@FUZZ
@given(st.one_of(JSONISH, st.text(max_size=30)), st.binary(max_size=8))
def test_json_like_text_is_judged_like_the_reference(text: str, data: bytes) -> None:
    assert_agree(file_bytes(text, data))


@FUZZ
@given(st.binary(max_size=64))
def test_arbitrary_bytes_only_ever_raise_format_error(raw: bytes) -> None:
    """No traceback: any exception other than FormatError fails this test."""
    for strict in (False, True):
        shardkit(raw, strict)
    shardkit(struct.pack("<Q", len(raw)) + raw, strict=False)
    assert_agree(struct.pack("<Q", len(raw)) + raw)


# ----------------------------------------------------------------- the usual header's reader
#
# Headers laid out as writers lay them out (compact, fields in the reference's order,
# `__metadata__` first) are read by a fast reader; anything else by the exact one. The
# properties above hold whichever reads; these make sure the fast one is really used,
# and that on usual files and their mutations both readers give the same answer.


def as_usual(made: ValidFile) -> ValidFile:
    """The same file in the layout of the reference writer."""
    order = {"dtype": 0, "shape": 1, "data_offsets": 2}
    for _, entry in made.entries:
        entry.sort(key=lambda field: order[field[0]])
    made.space, made.lead = "", ""
    made.pad = made.pad.replace("\n", " ")
    return made


USUAL_FILES = valid_files().map(as_usual)


def parse_in_short_runs(header: bytes, path: str, strict: bool = False) -> object:
    """parse_header with the usual reader cutting the entries into runs of one entry
    (a 100 MB header is read a megabyte at a time): the cuts must change nothing."""
    run = shardkit_format._RUN
    shardkit_format._RUN = 1
    try:
        return shardkit_format.parse_header(header, path, strict=strict)
    finally:
        shardkit_format._RUN = run


def readers_agree(raw: bytes) -> None:
    """parse_header (fast reader, exact one as fallback, in one run and in short
    runs) and the exact reader alone: the same metadata and tensors, or the same error."""
    if len(raw) < 8:
        return
    (length,) = struct.unpack("<Q", raw[:8])
    header = raw[8 : 8 + length]
    try:
        text = header.decode("utf-8")
    except UnicodeDecodeError:
        return
    readers = (
        (shardkit_format.parse_header, header), (parse_in_short_runs, header), (shardkit_format._read_exact, text)
    )
    for strict in (False, True):
        outcomes = []
        for read, argument in readers:
            try:
                outcomes.append(read(argument, "fuzz", strict=strict))  # type: ignore[operator]
            except FormatError as exc:
                outcomes.append(str(exc))
        assert outcomes[0] == outcomes[1] == outcomes[2], header[:300]


@FUZZ
@given(USUAL_FILES)
def test_usual_files_are_read_by_the_fast_reader_like_the_reference(made: ValidFile) -> None:
    raw = made.render()
    assert_agree(raw)
    readers_agree(raw)
    (length,) = struct.unpack("<Q", raw[:8])
    text = raw[8 : 8 + length].decode("utf-8")
    escaped = any("\\" in json.dumps(name, ensure_ascii=False) for name, _ in made.entries)
    if made.entries and made.metadata is not None and not escaped:
        assert shardkit_format._read_usual(text, "fuzz", False) is not None, text[:300]


BOUNDARY_NUMBERS = [2**64 - 1, 2**64, 10**19 - 1, 10**19, 10**20 - 1, 10**20, 2**63, 0, 1]


def near_usual(draw: st.DrawFn, doc: Obj) -> Obj:
    """A change that keeps the layout usual but may break a rule only the readers see:
    numbers at the edge of 64 bits and 19 digits, a repeated name, a tensor named
    `__metadata__`, an unknown dtype, repeated metadata keys."""
    chosen = pick(draw, doc)
    kind = draw(st.sampled_from(["number", "number", "repeat-entry", "metadata-name", "dtype", "metadata"]))
    if kind == "metadata":
        doc[:] = [(k, v) for k, v in doc if k != "__metadata__"]
        doc.insert(0, ("__metadata__", Obj([("k", "v"), ("k", draw(st.sampled_from(["v", "w"])))])))
        return doc
    if chosen is None:
        return doc
    index, name, entry = chosen
    if kind == "number":
        key = draw(st.sampled_from(["shape", "data_offsets"]))
        values = next((list(v) for k, v in entry if k == key), [])
        if values:
            values[draw(st.integers(0, len(values) - 1))] = draw(st.sampled_from(BOUNDARY_NUMBERS))
            entry[:] = [(k, values if k == key else v) for k, v in entry]
    elif kind == "repeat-entry":
        doc.insert(draw(st.integers(0, len(doc))), (name, Obj(entry)))
    elif kind == "metadata-name":
        doc[index] = ("__metadata__", entry)
    elif kind == "dtype":
        entry[:] = [(k, draw(st.sampled_from(["F33", "Q4_K", "BF16X", "F", "U1"])) if k == "dtype" else v)
                    for k, v in entry]
    return doc


@FUZZ
@given(USUAL_FILES, st.sampled_from([mutate_json, near_usual]), st.data())
def test_mutations_of_usual_files_are_judged_like_the_reference(
    made: ValidFile, mutate: Callable[[st.DrawFn, Obj], Obj], data: st.DataObject
) -> None:
    """Any JSON mutation, and those that keep the layout usual but break a rule."""
    doc = made.document()
    for _ in range(data.draw(st.integers(1, 2))):
        doc = mutate(data.draw, doc)
    raw = made.render(doc)
    assert_agree(raw)
    readers_agree(raw)


@FUZZ
@given(byte_mutations(USUAL_FILES))
def test_byte_mutations_of_usual_files_are_judged_like_the_reference(raw: bytes) -> None:
    assert_agree(raw)
    readers_agree(raw)


def test_writers_output_is_read_by_the_fast_reader() -> None:
    """What safetensors and shardkit write takes the fast path (else the benchmark lies)."""
    import numpy as np
    from safetensors.numpy import save

    from shardkit.format.header import TensorSpec, serialize_header

    made = save({"b": np.zeros((2, 3), np.float32), "a.weight": np.ones(4, np.int8), "é": np.zeros((), np.float16)},
                metadata={"format": "np", "quote": 'a "b" \\ c'})
    (length,) = struct.unpack("<Q", made[:8])
    usual = shardkit_format._read_usual(made[8 : 8 + length].decode(), "x", True)
    assert usual is not None and usual[2], "the entries are in data order: checked as they are, not sorted"
    prefix, _ = serialize_header([TensorSpec("w", "BF16", (2, 2), 8), TensorSpec("v", "F32", (), 4)], None)
    usual = shardkit_format._read_usual(prefix[8:].decode(), "x", True)
    assert usual is not None and usual[2]


@pytest.mark.parametrize("text", [
    '{"__metadata__":{}',
    '{"__metadata__":{"format":"pt"}',
    '{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}',
    '{"__metadata__":{},"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}',
])
def test_a_usual_header_without_its_closing_brace_is_refused_like_the_reference(text: str) -> None:
    """Found by the fuzzing: the fast reader's last brace was the metadata's or the
    last entry's own, and it accepted the header the reference refuses."""
    header = text.encode()
    raw = struct.pack("<Q", len(header)) + header + (b"\0\0" if '"a"' in text else b"")
    assert_agree(raw)
    readers_agree(raw)
