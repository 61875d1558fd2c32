"""Every rule of the safetensors format (issue 2 §2): one broken file per rule.

Each broken file is first shown to the reference reader (`safetensors.deserialize`),
which must refuse it too, so our rule is the reference's rule and not a guess. Then
the file becomes one shard of an otherwise good checkpoint and `shardkit merge` must
fail cleanly: one line naming the shard, the tensor and the rule, exit code 2, no
output, no temporary file, sources byte-identical. The last tests cover what the
reference tolerates although the format forbids it: accepted by default, refused
with `--strict`.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import pytest
import safetensors

import shardkit
from conftest import assert_clean_failure, run_cli, snapshot, temporaries
from shardkit.synthetic import SHAPES, ByteSource, SyntheticTensor, write_companion_files, write_safetensors

BROKEN_SHARD = "model-00002-of-00002.safetensors"
GOOD_TENSOR = SyntheticTensor("model.norm.weight", "BF16", (64,))


def file_bytes(header: str | bytes, data: bytes = b"") -> bytes:
    raw = header.encode("utf-8") if isinstance(header, str) else header
    return struct.pack("<Q", len(raw)) + raw + data


class Raw(str):
    """JSON text inserted as is: NaN, -0, 4e0, lone surrogate escapes, deep nesting."""


def _json(value: object) -> str:
    if isinstance(value, Raw):
        return value
    return json.dumps(list(value) if isinstance(value, tuple) else value, separators=(",", ":"))


def entry(dtype: object = "U8", shape: object = (4,), offsets: object = (0, 4), **extra: object) -> str:
    fields = {"dtype": dtype, "shape": shape, "data_offsets": offsets, **extra}
    return "{" + ",".join(f"{json.dumps(k)}:{_json(v)}" for k, v in fields.items()) + "}"


def one(value: str, name: str = "a") -> str:
    """A header holding one tensor entry."""
    return "{" + (name if isinstance(name, Raw) else json.dumps(name)) + ":" + value + "}"


ABCD = b"abcd"


@dataclass(frozen=True)
class Broken:
    id: str
    raw: bytes
    message: str
    tensor: str | None = None  # the message must name it when the rule is about one tensor


NOT_A_STRING = "__metadata__ value of 'k' is not a string"
DEEP = 126  # arrays inside an entry field: 2 + 126 = 128 levels, one past serde_json's limit

BROKEN = [
    # the 8-byte length prefix and the header length
    Broken("empty-file", b"", "too small to hold the 8-byte header length"),
    Broken("7-byte-file", b"\x02\x00\x00\x00\x00\x00\x00", "too small to hold the 8-byte header length"),
    Broken("header-over-100MB", struct.pack("<Q", 100_000_001) + b"{}", "exceeds the 100000000-byte limit"),
    Broken("header-length-2^64-1", b"\xff" * 8 + b"{}", "exceeds the 100000000-byte limit"),
    Broken("header-past-end", struct.pack("<Q", 64) + b"{}", "runs past the end"),
    Broken("header-length-zero", struct.pack("<Q", 0), "not valid JSON"),
    # the JSON itself
    Broken("not-utf8", file_bytes(b'{"a\xff":' + entry().encode() + b"}", ABCD), "not valid UTF-8"),
    Broken("utf8-encoded-surrogate", file_bytes(b'{"\xed\xa0\x80":1}'), "not valid UTF-8"),
    Broken("not-json", file_bytes("{"), "not valid JSON"),
    Broken("trailing-garbage-in-header", file_bytes("{} x"), "not valid JSON"),
    Broken("byte-order-mark", file_bytes("\ufeff{}"), "not valid JSON"),
    Broken("control-char-in-string", file_bytes('{"__metadata__":{"a":"\x01"}}'), "not valid JSON"),
    Broken("leading-zero", file_bytes(one(entry(shape=Raw("[04]"))), ABCD), "not valid JSON"),
    Broken("json-array", file_bytes("[]"), "header JSON is not an object"),
    Broken("json-string", file_bytes('"hello"'), "header JSON is not an object"),
    Broken("nan-literal", file_bytes(one(entry(shape=Raw("[NaN]"))), ABCD), "NaN is not a JSON value"),
    Broken("infinity-literal", file_bytes('{"__metadata__":{"a":"b"},"x":Infinity}'), "Infinity is not a JSON value"),
    Broken("number-out-of-range", file_bytes(one(entry(x=Raw("1e400"))), ABCD), "number out of range"),
    Broken("lone-surrogate-value", file_bytes('{"__metadata__":{"a":"\\ud800"}}'), "lone UTF-16 surrogate"),
    Broken("lone-surrogate-name", file_bytes(one(entry(), Raw('"\\udc00"')), ABCD), "lone UTF-16 surrogate"),
    Broken("nested-128-deep", file_bytes(one(entry(x=Raw("[" * DEEP + "]" * DEEP))), ABCD),
           "nested deeper than 127 levels"),
    # __metadata__
    Broken("metadata-int-value", file_bytes('{"__metadata__":{"k":1}}'), NOT_A_STRING),
    Broken("metadata-null-value", file_bytes('{"__metadata__":{"k":null}}'), NOT_A_STRING),
    Broken("metadata-nested", file_bytes('{"__metadata__":{"k":{"a":"b"}}}'), NOT_A_STRING),
    Broken("metadata-list", file_bytes('{"__metadata__":[["k","v"]]}'), "__metadata__ must be an object"),
    Broken("metadata-string", file_bytes('{"__metadata__":"pt"}'), "__metadata__ must be an object"),
    Broken("metadata-twice", file_bytes('{"__metadata__":{},"__metadata__":{}}'), "__metadata__ appears twice"),
    # one tensor entry
    Broken("entry-null", file_bytes(one("null")), "entry must be an object", "a"),
    Broken("entry-string", file_bytes(one('"U8"')), "entry must be an object", "a"),
    Broken("entry-sequence-of-4", file_bytes(one('["U8",[4],[0,4],1]'), ABCD), "entry must be an object", "a"),
    Broken("entry-sequence-of-2", file_bytes(one('["U8",[4]]'), ABCD), "entry must be an object", "a"),
    Broken("missing-dtype", file_bytes(one('{"shape":[4],"data_offsets":[0,4]}'), ABCD),
           "missing field 'dtype'", "a"),
    Broken("missing-offsets", file_bytes(one('{"dtype":"U8","shape":[4]}'), ABCD),
           "missing field 'data_offsets'", "a"),
    Broken("repeated-dtype", file_bytes(one(entry()[:-1] + ',"dtype":"U8"}'), ABCD),
           "field 'dtype' appears twice", "a"),
    Broken("repeated-shape", file_bytes(one(entry()[:-1] + ',"shape":[4]}'), ABCD), "field 'shape' appears twice", "a"),
    Broken("repeated-offsets", file_bytes(one(entry()[:-1] + ',"data_offsets":[0,4]}'), ABCD),
           "field 'data_offsets' appears twice", "a"),
    # dtypes
    Broken("unknown-dtype", file_bytes(one(entry("F128")), ABCD), "unknown dtype 'F128'", "a"),
    Broken("lowercase-dtype", file_bytes(one(entry("f32", offsets=(0, 16))), b"x" * 16), "unknown dtype 'f32'", "a"),
    Broken("torch-dtype-name", file_bytes(one(entry("float32", offsets=(0, 16))), b"x" * 16), "unknown dtype", "a"),
    Broken("dtype-number", file_bytes(one(entry(8)), ABCD), "unknown dtype 8", "a"),
    Broken("dtype-object-not-null", file_bytes(one(entry({"U8": []})), ABCD), "unknown dtype", "a"),
    Broken("F4-odd-count", file_bytes(one(entry("F4", (3,), (0, 2))), b"ab"),
           "3 elements of F4 do not end on a byte boundary", "a"),
    Broken("F4-odd-2d", file_bytes(one(entry("F4", (3, 5), (0, 8))), b"x" * 8), "15 elements of F4", "a"),
    Broken("F6_E2M3-3", file_bytes(one(entry("F6_E2M3", (3,), (0, 3))), b"abc"),
           "3 elements of F6_E2M3 do not end on a byte boundary", "a"),
    Broken("F6_E3M2-5", file_bytes(one(entry("F6_E3M2", (5,), (0, 4))), ABCD),
           "5 elements of F6_E3M2 do not end on a byte boundary", "a"),
    Broken("F6_E3M2-2", file_bytes(one(entry("F6_E3M2", (2,), (0, 2))), b"ab"), "do not end on a byte boundary", "a"),
    # shapes
    Broken("shape-bool", file_bytes(one(entry(shape=[True]))), "shape must be a list of non-negative integers", "a"),
    Broken("shape-float", file_bytes(one(entry(shape=[4.0])), ABCD), "got [4.0]", "a"),
    Broken("shape-exponent", file_bytes(one(entry(shape=Raw("[4e0]"))), ABCD), "got [4.0]", "a"),
    Broken("shape-negative", file_bytes(one(entry(shape=[-4])), ABCD), "got [-4]", "a"),
    Broken("shape-minus-zero", file_bytes(one(entry(shape=Raw("[-0]"), offsets=(0, 0)))), "got [-0.0]", "a"),
    Broken("shape-2^64", file_bytes(one(entry(shape=[2**64])), ABCD), "shape must be a list", "a"),
    Broken("shape-string", file_bytes(one(entry(shape=["4"])), ABCD), "shape must be a list", "a"),
    Broken("shape-not-list", file_bytes(one(entry(shape=4)), ABCD), "shape must be a list", "a"),
    Broken("shape-object", file_bytes(one(entry(shape={"0": 4})), ABCD), "shape must be a list", "a"),
    # 64-bit overflow
    Broken("elements-overflow", file_bytes(one(entry(shape=[2**32, 2**32], offsets=(0, 0)))), "overflows 64 bits", "a"),
    Broken("bits-overflow", file_bytes(one(entry("F32", shape=[2**62], offsets=(0, 0)))), "overflows 64 bits", "a"),
    Broken("u64-max-dimension", file_bytes(one(entry(shape=[2**64 - 1], offsets=(0, 0)))), "overflows 64 bits", "a"),
    # offsets
    Broken("offsets-three", file_bytes(one(entry(offsets=[0, 4, 4])), ABCD), "data_offsets must be two", "a"),
    Broken("offsets-float", file_bytes(one(entry(offsets=[0.0, 4])), ABCD), "data_offsets must be two", "a"),
    Broken("offsets-negative", file_bytes(one(entry(shape=[0], offsets=[-1, -1]))), "data_offsets must be two", "a"),
    Broken("offsets-minus-zero", file_bytes(one(entry(shape=[0], offsets=Raw("[0,-0]")))),
           "data_offsets must be two", "a"),
    Broken("offsets-not-from-zero", file_bytes(one(entry(offsets=(4, 8))), b"x" * 8), "leave a gap or overlap", "a"),
    Broken("offsets-gap", file_bytes('{"a":' + entry() + ',"b":' + entry(offsets=(8, 12)) + "}", b"x" * 12),
           "leave a gap or overlap", "b"),
    Broken("offsets-overlap", file_bytes('{"a":' + entry() + ',"b":' + entry(offsets=(2, 6)) + "}", b"x" * 6),
           "leave a gap or overlap", "b"),
    Broken("offsets-same-range", file_bytes('{"a":' + entry() + ',"b":' + entry() + "}", b"x" * 4),
           "leave a gap or overlap"),
    Broken("offsets-reversed", file_bytes(one(entry(shape=[0], offsets=(4, 0))), ABCD), "leave a gap or overlap", "a"),
    Broken("byte-length-short", file_bytes(one(entry("F32", (2,), (0, 4))), b"x" * 4),
           "F32[2] needs 8 bytes but data_offsets span 4", "a"),
    Broken("byte-length-long", file_bytes(one(entry("BF16", (2,), (0, 8))), b"x" * 8),
           "BF16[2] needs 4 bytes but data_offsets span 8", "a"),
    Broken("scalar-needs-one-element", file_bytes(one(entry("F32", (), (0, 0)))), "F32[] needs 4 bytes", "a"),
    # the file must be exactly covered
    Broken("trailing-bytes", file_bytes(one(entry()), b"abcde"), "has trailing bytes"),
    Broken("truncated-data", file_bytes(one(entry()), b"abc"), "truncated"),
    Broken("data-without-tensors", file_bytes("{}", b"x"), "has trailing bytes"),
]


@dataclass(frozen=True)
class Tolerated:
    """Accepted by the reference reader although the format's documentation forbids it."""

    id: str
    raw: bytes
    tensors: dict[str, bytes]  # what the merged output must hold from this shard


TOLERATED = [
    Tolerated("leading-whitespace", file_bytes(" \n\t" + one(entry()), ABCD), {"a": ABCD}),
    Tolerated("tensor-key-repeated-identically", file_bytes('{"a":' + entry() + ',"a":' + entry() + "}", ABCD),
              {"a": ABCD}),
    Tolerated("unknown-field-in-entry", file_bytes(one(entry(quantization={"bits": [4, 8]})), ABCD), {"a": ABCD}),
    Tolerated("entry-as-3-sequence", file_bytes(one('["U8",[4],[0,4]]'), ABCD), {"a": ABCD}),
    Tolerated("metadata-null", file_bytes('{"__metadata__":null,"a":' + entry() + "}", ABCD), {"a": ABCD}),
    Tolerated("metadata-key-repeated", file_bytes('{"__metadata__":{"k":"1","k":"2"},"a":' + entry() + "}", ABCD),
              {"a": ABCD}),
    Tolerated("nested-127-deep", file_bytes(one(entry(x=Raw("[" * 125 + "]" * 125))), ABCD), {"a": ABCD}),
    Tolerated("dtype-as-enum-object", file_bytes(one(entry({"U8": None})), ABCD), {"a": ABCD}),
]

#: Legal corners: accepted by the reference and by shardkit, strict or not.
LEGAL = [
    Tolerated("F6-four-elements", file_bytes(one(entry("F6_E2M3", (4,), (0, 3))), b"abc"), {"a": b"abc"}),
    Tolerated("F4-even", file_bytes(one(entry("F4", (3, 2), (0, 3))), b"abc"), {"a": b"abc"}),
    Tolerated("zero-size-and-scalar",
              file_bytes('{"a":' + entry("F16", (0, 7), (0, 0)) + ',"s":' + entry("I32", (), (0, 4)) + "}", ABCD),
              {"a": b"", "s": ABCD}),
    Tolerated("overflow-free-zero-dim", file_bytes(one(entry(shape=[0, 2**40, 2**40], offsets=(0, 0)))), {"a": b""}),
    Tolerated("trailing-spaces", file_bytes(one(entry()) + "        ", ABCD), {"a": ABCD}),
    Tolerated("empty-metadata", file_bytes('{"__metadata__":{},"a":' + entry() + "}", ABCD), {"a": ABCD}),
    Tolerated("surrogate-pair", file_bytes('{"__metadata__":{"k":"\\ud83d\\ude00"},"a":' + entry() + "}", ABCD),
              {"a": ABCD}),
]


def broken_checkpoint(folder: Path, raw: bytes, tensors: object = ("a",)) -> Path:
    """A good shard, `raw` as the second shard, an index naming `tensors` in it, a config."""
    folder.mkdir(parents=True)
    write_safetensors(folder / "model-00001-of-00002.safetensors", [GOOD_TENSOR], ByteSource(1), {"format": "pt"})
    (folder / BROKEN_SHARD).write_bytes(raw)
    weight_map = {GOOD_TENSOR.name: "model-00001-of-00002.safetensors", **{t: BROKEN_SHARD for t in tensors}}
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    write_companion_files(folder, SHAPES["tiny"])
    return folder


def assert_refused(tmp_path: Path, source: Path, where: str, rule: str, *flags: str) -> None:
    """Exit 2, one line naming the shard (and tensor) and the rule; nothing written or touched."""
    before = snapshot(source)
    out = tmp_path / "merged.safetensors"
    result = run_cli("merge", source, "-o", out, *flags)
    assert_clean_failure(result, 2, where)
    assert rule in result.stderr
    assert result.stdout == ""
    assert not out.exists()
    assert temporaries(tmp_path) == []
    assert snapshot(source) == before


@pytest.mark.parametrize("case", BROKEN, ids=lambda c: c.id)
def test_rule_matches_reference_and_merge_fails_cleanly(case: Broken, tmp_path: Path) -> None:
    with pytest.raises(safetensors.SafetensorError):
        safetensors.deserialize(case.raw)
    source = broken_checkpoint(tmp_path / "ckpt", case.raw)
    where = f"{source / BROKEN_SHARD}: " + (f"tensor {case.tensor!r}: " if case.tensor else "")
    assert_refused(tmp_path, source, where, case.message)


@pytest.mark.parametrize("case", TOLERATED, ids=lambda c: c.id)
def test_tolerated_by_default_refused_by_strict(case: Tolerated, tmp_path: Path) -> None:
    safetensors.deserialize(case.raw)  # the reference reader accepts it
    source = broken_checkpoint(tmp_path / "ckpt", case.raw, case.tensors)
    assert_merges(source, tmp_path, case.tensors)
    assert_refused(tmp_path, source, f"{source / BROKEN_SHARD}: ", "strict", "--strict")


@pytest.mark.parametrize("case", LEGAL, ids=lambda c: c.id)
def test_legal_corners_are_accepted_even_strict(case: Tolerated, tmp_path: Path) -> None:
    safetensors.deserialize(case.raw)
    source = broken_checkpoint(tmp_path / "ckpt", case.raw, case.tensors)
    assert_merges(source, tmp_path, case.tensors, "--strict")


def assert_merges(source: Path, tmp_path: Path, expected: dict[str, bytes], *flags: str) -> None:
    out = tmp_path / "merged.safetensors"
    result = run_cli("merge", source, "-o", out, *flags)
    assert result.exit_code == 0, result.stderr
    merged = dict(safetensors.deserialize(out.read_bytes()))
    assert set(merged) == {GOOD_TENSOR.name, *expected}
    for name, data in expected.items():
        assert bytes(merged[name]["data"]) == data
    out.unlink()


# ----------------------------------------------------------------- the other commands read through the same rules


@pytest.mark.parametrize("case", BROKEN, ids=lambda c: c.id)
def test_verify_reports_the_same_rule(case: Broken, tmp_path: Path) -> None:
    """verify goes on past a broken shard and reports it as a `format` problem."""
    source = broken_checkpoint(tmp_path / "ckpt", case.raw)
    before = snapshot(source)
    report = shardkit.verify(source, architecture=False)
    assert not report.ok
    problems = [p for p in report.problems if p.check == "format"]
    assert len(problems) == 1, report.problems
    assert problems[0].file == str(source / BROKEN_SHARD)
    assert case.message in problems[0].message
    assert problems[0].tensor == case.tensor or case.tensor is None
    assert snapshot(source) == before


#: One per kind of rule, for the commands that refuse a broken input outright.
REPRESENTATIVE = ["header-over-100MB", "not-utf8", "lone-surrogate-value", "metadata-int-value", "repeated-dtype",
                  "F4-odd-count", "shape-minus-zero", "bits-overflow", "offsets-gap", "truncated-data"]


@pytest.mark.parametrize("command", ["split", "inspect", "diff", "checksum"])
@pytest.mark.parametrize("case", [c for c in BROKEN if c.id in REPRESENTATIVE], ids=lambda c: c.id)
def test_other_commands_refuse_cleanly(case: Broken, command: str, tmp_path: Path) -> None:
    source = broken_checkpoint(tmp_path / "ckpt", case.raw)
    out = tmp_path / "out"
    args = {
        "split": ["split", source, "-o", out],
        "inspect": ["inspect", source],
        "diff": ["diff", source, source],
        "checksum": ["checksum", source, "-o", out],
    }[command]
    before = snapshot(source)
    result = run_cli(*args)
    where = f"{source / BROKEN_SHARD}: " + (f"tensor {case.tensor!r}: " if case.tensor else "")
    assert_clean_failure(result, 2, where)
    assert case.message in result.stderr
    assert result.stdout == ""
    assert not out.exists() and temporaries(tmp_path) == []
    assert snapshot(source) == before


def test_brackets_inside_strings_do_not_count_as_nesting() -> None:
    """The depth limit is read from the text: brackets in keys and values, escaped quotes
    and backslashes included, are not nesting (the reference reader agrees)."""
    from shardkit.format import header_json

    text = '{"a[[[": "' + "[" * 300 + '", "q\\"[[": ["\\\\", [[]]], "e": "\\\\"}'
    assert header_json.depth(text) == 4  # object, list, [[]], []
    assert header_json.loads(text)[1] == ('q"[[', ["\\", [[]]])
    nested = "[" * 127 + '"]]]]"' + "]" * 127
    assert header_json.depth(nested) == 127
    with pytest.raises(header_json.JsonSyntaxError, match="nested deeper than 127 levels"):
        header_json.loads("[" + nested + "]")


def test_parsing_pauses_the_garbage_collector_and_always_resumes_it(tmp_path: Path, monkeypatch) -> None:
    """Collection is off while a header is parsed, back on afterwards, also after a
    refused header; a caller that had it off keeps it off."""
    import gc

    from shardkit.errors import FormatError
    from shardkit.format import header as format
    from shardkit.format import header_json
    from shardkit.format.gc_pause import gc_paused
    from shardkit.format.header import read_header

    seen: list[bool] = []

    def recording(real):  # both readers: the usual header's and the exact one
        def record(*args: object) -> object:
            seen.append(gc.isenabled())
            return real(*args)

        return record

    good = tmp_path / "good.safetensors"
    good.write_bytes(file_bytes(one(entry()), ABCD))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(file_bytes(one(entry(x=Raw("[" * 200 + "]" * 200))), ABCD))
    monkeypatch.setattr(header_json, "loads", recording(header_json.loads))
    monkeypatch.setattr(format, "_read_usual", recording(format._read_usual))
    assert gc.isenabled()
    read_header(good)
    assert gc.isenabled()
    with pytest.raises(FormatError, match="nested deeper"):
        read_header(bad)
    assert gc.isenabled()
    gc.disable()
    try:
        with gc_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()
    assert seen == [False, False, False]  # good: usual reader; bad: usual reader, then exact


ODD_NAMES = ["a", "", "é", "🤗", 'q"uote', "back\\slash", "new\nline", "\0", "\x1f\x7f", "\u2028", "__x__", "{}"]


def test_the_header_writer_writes_what_json_dumps_of_the_document_writes() -> None:
    """serialize_header writes each entry's JSON itself (a million dicts for json.dumps
    were the slowest part of merging a 100 MB header); it must equal the document
    written whole, and what the reference writer writes."""
    import numpy as np
    from safetensors.numpy import save

    from shardkit.format import header_json
    from shardkit.format.header import DTYPES, HEADER_ALIGNMENT, TensorSpec, serialize_header, writer_order

    specs = [
        TensorSpec(name, dtype, shape, 0)
        for i, name in enumerate(ODD_NAMES)
        for dtype, shape in [(sorted(DTYPES)[i % len(DTYPES)], (0, i, 3)[: i % 4])]
    ]
    for metadata in (None, {}, {"format": "pt", "z": 'a "b" \\ \n é', "a": ""}):
        prefix, placed = serialize_header(specs, metadata)
        document: dict[str, object] = {} if metadata is None else {"__metadata__": dict(sorted(metadata.items()))}
        for spec in sorted(specs, key=lambda s: writer_order(s.name, s.dtype)):
            document[spec.name] = {"dtype": spec.dtype, "shape": list(spec.shape), "data_offsets": [0, 0]}
        body = header_json.dumps_compact(document).encode()
        body += b" " * (-len(body) % HEADER_ALIGNMENT)
        assert prefix == struct.pack("<Q", len(body)) + body
        assert [spec.name for spec, _ in placed] == list(document)[metadata is not None :]
    tensors = {name: np.zeros((2, i + 1), np.float32) for i, name in enumerate(ODD_NAMES)}
    reference = save(tensors, metadata={"format": "pt"})
    ours, _ = serialize_header([TensorSpec(n, "F32", t.shape, t.nbytes) for n, t in tensors.items()], {"format": "pt"})
    assert reference.startswith(ours)


def test_the_dtype_table_agrees_with_torch_and_safetensors() -> None:
    """One table of dtype facts: its torch names, float-ness (C64 is not a float, as torch's
    is_floating_point says) and widths are torch's, and safetensors.torch maps the same names."""
    torch = pytest.importorskip("torch")
    from safetensors.torch import _TYPES as reference

    from shardkit.checks.architecture import _is_float_code
    from shardkit.format.header import DTYPES
    from shardkit.format.torch_checkpoint import SAFETENSORS_DTYPES

    assert DTYPES["C64"].is_float is False and _is_float_code("C64") is False
    for code, dtype in DTYPES.items():
        assert _is_float_code(code) == dtype.is_float, code
        if dtype.torch is None:
            assert code.startswith("F6"), code  # no torch type
            continue
        torch_type = getattr(torch, dtype.torch)
        assert torch_type.is_floating_point == dtype.is_float, code
        if dtype.bits % 8 == 0:
            assert torch_type.itemsize * 8 == dtype.bits, code
            assert SAFETENSORS_DTYPES[dtype.torch] == code
        if code in reference:
            assert reference[code] == torch_type, code
