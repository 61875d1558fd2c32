"""The safetensors format: every rule about one file's bytes lives here.

A file is an 8-byte little-endian header length N, N bytes of UTF-8 JSON, then the
tensor data. The rules below are those of the reference reader (safetensors 0.8,
`SafeTensors::read_metadata` and `Metadata::validate`), checked against it by the
differential tests; `strict=True` adds what the format's documentation forbids but
the reference tolerates. Every other module asks this one instead of re-deriving
sizes, orders or offsets.
"""

from __future__ import annotations

import os
import re
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import cached_property, partial
from itertools import accumulate, chain, compress, repeat
from operator import attrgetter, eq, itemgetter, lt, sub
from typing import NamedTuple, TypeVar

from ..errors import FormatError
from . import header_json
from .gc_pause import gc_paused
from .header_json import JsonFloat, Pairs

#: Bytes of the little-endian u64 that opens every file.
LENGTH_PREFIX = 8
#: The reference reader refuses larger headers before reading them.
MAX_HEADER_SIZE = 100_000_000
#: How a Git LFS pointer file begins: a clone without `git lfs` holds these instead of weights.
LFS_POINTER = b"version https://git-lfs.github.com/spec/v1"
#: The reference writer pads the JSON with spaces so that data starts 8-aligned.
HEADER_ALIGNMENT = 8
METADATA_KEY = "__metadata__"
_TENSOR_FIELDS = ("dtype", "shape", "data_offsets")


@dataclass(frozen=True)
class DType:
    """A safetensors element type. `rank` is its place in the reference enum, which
    the reference writer sorts by (descending) so that wider types come first and
    every tensor stays naturally aligned."""

    code: str
    bits: int
    rank: int
    is_float: bool  # a real floating-point type, as torch's is_floating_point: C64 is not
    torch: str | None  # torch's dtype name (torch.<name>; config.json's torch_dtype), None without one


def _dtypes(*spec: tuple[str, int, bool, str | None]) -> dict[str, DType]:
    return {
        code: DType(code, bits, rank, is_float, torch) for rank, (code, bits, is_float, torch) in enumerate(spec)
    }


#: In the reference enum's order (safetensors/src/tensor.rs `enum Dtype`).
DTYPES: Mapping[str, DType] = _dtypes(
    ("BOOL", 8, False, "bool"),
    ("F4", 4, True, "float4_e2m1fn_x2"),
    ("F6_E2M3", 6, True, None),
    ("F6_E3M2", 6, True, None),
    ("U8", 8, False, "uint8"),
    ("I8", 8, False, "int8"),
    ("F8_E5M2", 8, True, "float8_e5m2"),
    ("F8_E4M3", 8, True, "float8_e4m3fn"),
    ("F8_E8M0", 8, True, "float8_e8m0fnu"),
    ("F8_E4M3FNUZ", 8, True, "float8_e4m3fnuz"),
    ("F8_E5M2FNUZ", 8, True, "float8_e5m2fnuz"),
    ("I16", 16, False, "int16"),
    ("U16", 16, False, "uint16"),
    ("F16", 16, True, "float16"),
    ("BF16", 16, True, "bfloat16"),
    ("I32", 32, False, "int32"),
    ("U32", 32, False, "uint32"),
    ("F32", 32, True, "float32"),
    ("C64", 64, False, "complex64"),
    ("F64", 64, True, "float64"),
    ("I64", 64, False, "int64"),
    ("U64", 64, False, "uint64"),
)


def record_maker(cls: type[T]) -> Callable[[tuple[object, ...]], T]:
    """`make(fields)` builds the named tuple `cls` from a tuple of its fields in C: the
    generated `cls(...)` is a Python call per record, which a million tensors notice."""
    return partial(tuple.__new__, cls)


T = TypeVar("T", bound=tuple)


class TensorInfo(NamedTuple):
    """One header entry. `begin`/`end` are relative to the start of the data section.

    A named tuple rather than a dataclass: a header at the 100 MB limit holds about a
    million of them, and a tuple is built in a fifth of the time, in less memory.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def nelements(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count


@dataclass(frozen=True)
class Header:
    """A validated header: what a reader needs to find every tensor's bytes."""

    path: str
    header_size: int  # N: the JSON bytes, padding included
    file_size: int
    metadata: Mapping[str, str] | None
    tensors: tuple[TensorInfo, ...]  # in data order
    #: (st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns) when read, to notice a change.
    stat: tuple[int, int, int, int, int] | None = field(default=None, compare=False)

    @property
    def data_start(self) -> int:
        """Absolute file offset of the first data byte."""
        return LENGTH_PREFIX + self.header_size

    @property
    def data_size(self) -> int:
        return self.file_size - self.data_start

    @cached_property
    def by_name(self) -> dict[str, TensorInfo]:
        return {t.name: t for t in self.tensors}


def tensor_nbytes(dtype: str, shape: Iterable[int]) -> int:
    """Bytes of a tensor, with the reference's overflow and byte-boundary rules.

    Raises ValueError naming the rule; callers attach the file and tensor.
    """
    count = 1
    for dim in shape:
        count *= dim
        if count > header_json.MAX_U64:
            raise ValueError("shape's element count overflows 64 bits")
    bits = count * DTYPES[dtype].bits
    if bits > header_json.MAX_U64:
        raise ValueError("shape's size in bits overflows 64 bits")
    if bits % 8:
        raise ValueError(f"{count} elements of {dtype} do not end on a byte boundary")
    return bits // 8


def writer_order(name: str, dtype: str) -> tuple[int, str]:
    """Sort key of the reference writer: dtype rank descending, then name."""
    return (-DTYPES[dtype].rank, name)


# --------------------------------------------------------------------------- reading


def read_header(path: str | os.PathLike[str], *, strict: bool = False) -> Header:
    """Read and validate the header of a local file without touching its data."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)

        def read_at(offset: int, length: int) -> bytes:
            return os.pread(fd, length, offset)

        header = parse_file(read_at, st.st_size, str(path), strict=strict)
    finally:
        os.close(fd)
    return Header(header.path, header.header_size, header.file_size, header.metadata, header.tensors, identity(st))


def identity(st: os.stat_result) -> tuple[int, int, int, int, int]:
    """Who a local file is when its header is read (`Header.stat`), to notice a change."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def parse_file(
    read_at: Callable[[int, int], bytes], file_size: int, path: str, *, strict: bool = False
) -> Header:
    """Validate a file given a random-access reader; reads only the header bytes.

    The header length is checked against the 100 MB limit and the file size before
    any header byte is read, so a hostile length costs nothing.
    """
    if file_size < LENGTH_PREFIX:
        raise FormatError(path, f"file is {file_size} bytes, too small to hold the 8-byte header length")
    prefix = _read_exactly(read_at, 0, LENGTH_PREFIX, path)
    if prefix == b"version " and read_at(0, len(LFS_POINTER)) == LFS_POINTER:
        raise FormatError(path, "is a Git LFS pointer, not the weights: run `git lfs pull` in its repository")
    (header_size,) = struct.unpack("<Q", prefix)
    if header_size > MAX_HEADER_SIZE:
        raise FormatError(path, f"header length {header_size} exceeds the {MAX_HEADER_SIZE}-byte limit")
    if LENGTH_PREFIX + header_size > file_size:
        raise FormatError(
            path,
            f"header length {header_size} runs past the end of the {file_size}-byte file: truncated: "
            f"{file_size} of at least {LENGTH_PREFIX + header_size} bytes present — download it again",
        )
    raw = _read_exactly(read_at, LENGTH_PREFIX, header_size, path)
    metadata, tensors = parse_header(raw, path, strict=strict)
    data_end = tensors[-1].end if tensors else 0
    data_size = file_size - LENGTH_PREFIX - header_size
    if data_end > data_size:
        expected = LENGTH_PREFIX + header_size + data_end
        raise FormatError(path, f"truncated: {file_size} of {expected} bytes present — download it again")
    if data_end < data_size:
        raise FormatError(
            path, f"tensors cover {data_end} data bytes but the file holds {data_size}: the file has trailing bytes"
        )
    return Header(path, header_size, file_size, metadata, tensors)


def _read_exactly(read_at: Callable[[int, int], bytes], offset: int, length: int, path: str) -> bytes:
    data = read_at(offset, length)
    if len(data) != length:
        raise FormatError(path, f"could read only {len(data)} of {length} bytes at offset {offset}")
    return data


@gc_paused()
def parse_header(
    raw: bytes, path: str, *, strict: bool = False
) -> tuple[dict[str, str] | None, tuple[TensorInfo, ...]]:
    """Parse and validate header JSON bytes; tensors come back in data order.

    A header written the usual way is read by :func:`_read_usual`, in a fraction of
    the time and memory; anything else, and every header that breaks a rule, is read
    by the exact reader, so the verdict and the error are the exact reader's.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FormatError(path, f"header is not valid UTF-8 (byte {exc.start})") from None
    usual = _read_usual(text, path, strict)
    if usual is None:
        return _read_exact(text, path, strict)
    metadata, entries, checked = usual
    if checked:
        return metadata, tuple(entries)
    tensors = tuple(sorted(entries, key=_DATA_ORDER))
    _validate_offsets(tensors, path)  # the exact reader would have the same tensors here
    return metadata, tensors


_DATA_ORDER = attrgetter("begin", "end")


def _read_exact(text: str, path: str, strict: bool = False) -> tuple[dict[str, str] | None, tuple[TensorInfo, ...]]:
    """Any header: JSON read as serde_json reads it, then every rule of the reference."""
    if strict and not text.startswith("{"):
        raise FormatError(path, "strict: header does not start with '{'")
    try:
        document = header_json.loads(text)
    except header_json.JsonSyntaxError as exc:
        raise FormatError(path, f"header is not valid JSON: {exc}") from None
    if not isinstance(document, Pairs):
        raise FormatError(path, "header JSON is not an object")

    metadata: dict[str, str] | None = None
    seen_metadata = False
    entries: dict[str, TensorInfo] = {}
    for key, value in document:
        if key == METADATA_KEY:
            if seen_metadata:
                raise FormatError(path, "__metadata__ appears twice")
            seen_metadata = True
            metadata = _parse_metadata(value, path, strict)
            continue
        if key in entries and strict:
            raise FormatError(path, "strict: tensor name appears twice in the header", key)
        entries[key] = _parse_entry(key, value, path, strict)

    tensors = tuple(sorted(entries.values(), key=_DATA_ORDER))
    _validate_offsets(tensors, path)
    return metadata, tensors


# The usual header is what the reference writer (and every writer built on serde or
# json.dumps with compact separators) produces: optional `__metadata__` first, then
# entries `"name":{"dtype":"BF16","shape":[2048,768],"data_offsets":[0,3145728]}`.
# For such text the exact reader's result is known without building its JSON tree:
# a string with no backslash and no control character reads as itself, and an
# integer of at most 19 digits (below 2**64) as that integer, so each entry is one
# match of _USUAL_ENTRY (its shape's digits checked once per distinct shape, by
# _DIMS). The matches must tile the text end to end; a name seen twice, a name
# `__metadata__`, an unknown dtype, a 20-digit number, a space, an escape or a
# field in another order makes the text unusual, and the exact reader reads it.

_U64 = r"(?:0|[1-9][0-9]{0,18})"
_ENTRY = (
    r'"([^"\\\x00-\x1f]*+)":\{"dtype":"([0-9A-Z_]++)",'
    rf'"shape":\[([0-9,]*+)\],"data_offsets":\[({_U64}),({_U64})\]\}}'
)
_DIMS = re.compile(rf"(?:{_U64}(?:,{_U64})*)?")
_USUAL_FIRST_ENTRY = re.compile(_ENTRY)
_USUAL_ENTRY = re.compile("," + _ENTRY)
_USUAL_METADATA_START = '{"__metadata__":'
#: Finds where a `__metadata__` object of strings ends; the exact reader then reads it.
_STRING = r'"(?:[^"\\]|\\.)*"'
_USUAL_METADATA = re.compile(rf"\{{(?:{_STRING}:{_STRING}(?:,{_STRING}:{_STRING})*)?\}}")
_DTYPE_CODES = {code: code for code in DTYPES}
_make_info = record_maker(TensorInfo)
#: Characters of an entry other than its five fields: `,"` … `]}` around them.
_ENTRY_FIXED = len(',"":{"dtype":"","shape":[],"data_offsets":[,]}')
#: Where an entry ends. In a usual header no name holds a quote, so this text is never
#: inside a name: the entries are cut into runs there (a wrong cut cannot make a
#: broken header pass: each run must still be tiled by entries).
_ENTRY_END = re.compile(r'"data_offsets":\[[0-9]+,[0-9]+\]\}')
#: Characters of header text matched at a time: a run's rows (five strings each) are
#: alive only until its tensors are built, so a 100 MB header never holds them all.
_RUN = 1 << 20


def _read_usual(
    text: str, path: str, strict: bool
) -> tuple[dict[str, str] | None, list[TensorInfo], bool] | None:
    """The metadata and the entries (in file order) of a usual header, and whether
    they are known to be valid in that order, which is then their data order (the
    first begins at 0, each where the one before ends, each as long as its dtype and
    shape need); None if the header is not usual.
    Never raises: a broken header is for the exact reader."""
    stop = len(text.rstrip(" ")) - 1  # the reference writer pads with spaces
    if stop < 1 or text[stop] != "}":
        return None
    metadata: dict[str, str] | None = None
    first_rows: list[list[tuple[str, ...]]] = []  # the first entry, when no comma leads it
    if text.startswith(_USUAL_METADATA_START):
        found = _USUAL_METADATA.match(text, len(_USUAL_METADATA_START))
        if found is None:
            return None
        try:
            metadata = _parse_metadata(header_json.loads(found.group()), path, strict)
        except (header_json.JsonSyntaxError, FormatError):
            return None
        at = found.end()
    else:
        first = _USUAL_FIRST_ENTRY.match(text, 1)
        if first is None:
            return None
        first_rows.append([first.groups()])
        at = first.end()
    if at > stop:  # what was read ends on the last brace: the outer object's own is missing
        return None
    entries = _UsualEntries()
    try:
        for rows in chain(first_rows, _tiled_runs(text, at, stop)):
            entries.add(rows)
    except _Unusual:
        return None
    names = set(map(_NAME, entries.infos))
    if len(names) != len(entries.infos) or METADATA_KEY in names:
        return None
    return metadata, entries.infos, entries.checked


class _Unusual(Exception):
    """The header is not usual after all: the exact reader reads it."""


def _tiled_runs(text: str, at: int, stop: int) -> Iterator[list[tuple[str, ...]]]:
    """The fields of the entries that tile text[at:stop], a run of about `_RUN`
    characters at a time; :class:`_Unusual` where they do not tile it.

    Matches found in a run never overlap, so they tile it exactly when their lengths
    add up to its length: the check needs no Python step per entry.
    """
    while at < stop:
        cut = _ENTRY_END.search(text, min(at + _RUN, stop), stop)
        end = cut.end() if cut is not None else stop
        rows = _USUAL_ENTRY.findall(text, at, end)
        if not rows or sum(map(len, chain.from_iterable(rows))) + _ENTRY_FIXED * len(rows) != end - at:
            raise _Unusual
        yield rows
        at = end


class _Kinds(dict[tuple[str, str], tuple[str, tuple[int, ...], int | None]]):
    """(dtype, shape, bytes) by an entry's dtype and shape text, each worked out once:
    a million tensors are of a few dozen kinds. :class:`_Unusual` for a dtype the
    format does not have or a shape not spelled as _DIMS spells it; bytes are None
    where the format refuses the size (:func:`_validate_offsets` then says why)."""

    def __missing__(self, key: tuple[str, str]) -> tuple[str, tuple[int, ...], int | None]:
        dtype, dims = key
        if dtype not in _DTYPE_CODES or not _DIMS.fullmatch(dims):
            raise _Unusual
        shape = tuple(map(int, dims.split(","))) if dims else ()
        try:
            nbytes: int | None = tensor_nbytes(dtype, shape)
        except ValueError:
            nbytes = None
        kind = self[key] = (_DTYPE_CODES[dtype], shape, nbytes)
        return kind


class _UsualEntries:
    """A usual header's entries, built a run of rows at a time column by column, by
    map and zip: no Python step per entry.

    `checked` stays true while the entries, in file order, lie end to end from 0 and
    each spans the bytes its dtype and shape need. Offsets are digits without leading
    zeros, so equal text is an equal number: that is checked on the text, and each
    entry's begin is the int object of the previous one's end.
    """

    def __init__(self) -> None:
        self.infos: list[TensorInfo] = []
        self.checked = True
        self._kinds = _Kinds()
        self._last_end, self._last_end_text = 0, "0"

    def add(self, rows: list[tuple[str, ...]]) -> None:
        names, dtypes, dims, begins, ends = zip(*rows)
        kinds = list(map(self._kinds.__getitem__, zip(dtypes, dims)))
        end_values = list(map(int, ends))
        if self.checked and begins[0] == self._last_end_text and begins[1:] == ends[:-1]:
            begin_values = [self._last_end, *end_values[:-1]]
            self.checked = list(map(sub, end_values, begin_values)) == list(map(_THIRD, kinds))
        else:
            self.checked = False
            begin_values = list(map(int, begins))
        self.infos.extend(
            map(_make_info, zip(names, map(_FIRST, kinds), map(_SECOND, kinds), begin_values, end_values))
        )
        self._last_end, self._last_end_text = end_values[-1], ends[-1]


_NAME = attrgetter("name")


def _parse_metadata(value: object, path: str, strict: bool) -> dict[str, str] | None:
    if value is None:
        if strict:
            raise FormatError(path, "strict: __metadata__ is null; the format wants an object of string to string")
        return None
    if not isinstance(value, Pairs):
        raise FormatError(path, "__metadata__ must be an object of string to string")
    metadata: dict[str, str] = {}
    for key, item in value:
        if not isinstance(item, str):
            raise FormatError(path, f"__metadata__ value of {key!r} is not a string")
        if strict and key in metadata:
            raise FormatError(path, f"strict: __metadata__ key {key!r} appears twice")
        metadata[key] = item
    return metadata


def _parse_entry(name: str, value: object, path: str, strict: bool) -> TensorInfo:
    if isinstance(value, Pairs):
        fields: dict[str, object] = {}
        for key, item in value:
            if key in _TENSOR_FIELDS:
                if key in fields:
                    raise FormatError(path, f"field {key!r} appears twice", name)
                fields[key] = item
            elif strict:
                raise FormatError(path, f"strict: unknown field {key!r}", name)
        for key in _TENSOR_FIELDS:
            if key not in fields:
                raise FormatError(path, f"missing field {key!r}", name)
        dtype, shape, offsets = (fields[k] for k in _TENSOR_FIELDS)
    elif isinstance(value, list):
        # serde reads a struct from a 3-element sequence too; the reference accepts it.
        if strict:
            raise FormatError(path, "strict: entry is a [dtype, shape, data_offsets] sequence, not an object", name)
        if len(value) != 3:
            raise FormatError(path, "entry must be an object with dtype, shape and data_offsets", name)
        dtype, shape, offsets = value
    else:
        raise FormatError(path, "entry must be an object with dtype, shape and data_offsets", name)

    dtype = _dtype_code(dtype, path, name, strict)
    if not isinstance(shape, list) or isinstance(shape, Pairs) or not all(map(header_json.is_u64, shape)):
        raise FormatError(path, f"shape must be a list of non-negative integers, got {_show(shape)}", name)
    if (
        not isinstance(offsets, list)
        or isinstance(offsets, Pairs)
        or len(offsets) != 2
        or not all(map(header_json.is_u64, offsets))
    ):
        raise FormatError(path, f"data_offsets must be two non-negative integers, got {_show(offsets)}", name)
    return TensorInfo(name, dtype, tuple(shape), offsets[0], offsets[1])


def _dtype_code(value: object, path: str, name: str, strict: bool) -> str:
    # serde also reads an enum's unit variant from the one-key object {"F32": null},
    # so the reference accepts that spelling of a dtype.
    if isinstance(value, Pairs) and len(value) == 1 and value[0][1] is None and isinstance(value[0][0], str):
        if strict:
            raise FormatError(path, f"strict: dtype written as the object {{{value[0][0]!r}: null}}", name)
        value = value[0][0]
    if not isinstance(value, str) or value not in DTYPES:
        raise FormatError(path, f"unknown dtype {_show(value)}", name)
    return value


def _show(value: object) -> str:
    if isinstance(value, JsonFloat):
        return repr(float(value))
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _validate_offsets(tensors: tuple[TensorInfo, ...], path: str) -> None:
    expected_begin = 0
    sizes: dict[tuple[str, tuple[int, ...]], int] = {}  # a million tensors have a few dozen shapes
    for name, dtype, shape, begin, end in tensors:
        if begin != expected_begin or end < begin:
            raise FormatError(
                path,
                f"data_offsets [{begin}, {end}] leave a gap or overlap: "
                f"expected the tensor to start at {expected_begin}",
                name,
            )
        expected_begin = end
        nbytes = sizes.get((dtype, shape))
        if nbytes is None:
            try:
                nbytes = sizes[dtype, shape] = tensor_nbytes(dtype, shape)
            except ValueError as exc:
                raise FormatError(path, str(exc), name) from None
        if nbytes != end - begin:
            raise FormatError(
                path, f"{dtype}{list(shape)} needs {nbytes} bytes but data_offsets span {end - begin}", name
            )


# --------------------------------------------------------------------------- writing


class TensorSpec(NamedTuple):
    """What the writer needs to know of a tensor to place it (a named tuple, as
    :class:`TensorInfo` is: a merge of a 100 MB header places a million of them)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


def serialize_header(
    tensors: Iterable[TensorSpec], metadata: Mapping[str, str] | None
) -> tuple[bytes, list[tuple[TensorSpec, int]]]:
    """The bytes before the data, exactly as the reference writer lays them out.

    Tensors are placed in the reference writer's order (see :func:`writer_order`);
    returns the prefix (length + padded JSON) and each tensor with its data offset
    relative to the data section, in that order.

    Each entry's JSON is written directly, as `dumps_compact` of the whole document
    would write it, field for field (`test_format_rules.py` holds the two equal):
    building a million small dicts for json.dumps took longer than anything else in
    a `merge --dry-run` of a 100 MB header.
    """
    specs = list(tensors)
    names = list(map(_FIRST, specs))
    if METADATA_KEY in names:
        raise ValueError("a tensor cannot be named __metadata__")
    ordered = _in_writer_order(specs, names)
    sizes = list(map(_FOURTH, ordered))
    offsets = list(map(str, accumulate(sizes, initial=0)))  # each end is the next begin: one text
    shapes = list(map(tuple, map(_THIRD, ordered)))
    dims = {shape: ",".join(map(str, shape)) for shape in set(shapes)}
    parts = ["{"]
    if metadata is not None:
        parts.append(header_json.dumps_compact({METADATA_KEY: {key: metadata[key] for key in sorted(metadata)}})[1:-1])
    # Each entry `"name":{"dtype":"BF16","shape":[2,3],"data_offsets":[0,12]}` as its
    # pieces, joined once: a str.format per entry took half again as long.
    separators = chain(("," if metadata is not None else "",), repeat(","))
    pieces = zip(
        separators, map(header_json.dumps_string, map(_FIRST, ordered)), repeat(':{"dtype":"'), map(_SECOND, ordered),
        repeat('","shape":['), map(dims.__getitem__, shapes), repeat('],"data_offsets":['), offsets, repeat(","),
        offsets[1:], repeat("]}"),
    )
    body = "".join(chain(parts, chain.from_iterable(pieces), "}")).encode("utf-8")
    body += b" " * (-len(body) % HEADER_ALIGNMENT)
    return struct.pack("<Q", len(body)) + body, list(zip(ordered, accumulate(sizes, initial=0)))


def _in_writer_order(specs: list[TensorSpec], names: list[str]) -> list[TensorSpec]:
    """`specs` in writer_order (rank descending, then name), by map and zip rather than
    one Python call per tensor. Specs given in name order (a checkpoint's tensors are)
    only need grouping by rank, a pass per dtype; names are unique, so in a sort of
    (rank, name, index) the index never decides."""
    ranks = list(map(_NEGATIVE_RANK.__getitem__, map(_SECOND, specs)))
    if all(map(lt, names, names[1:])):
        return list(chain.from_iterable(compress(specs, map(eq, ranks, repeat(rank))) for rank in sorted(set(ranks))))
    return [specs[i] for _, _, i in sorted(zip(ranks, names, range(len(specs))))]


_FIRST, _SECOND, _THIRD, _FOURTH = (itemgetter(i) for i in range(4))
_NEGATIVE_RANK = {code: -dtype.rank for code, dtype in DTYPES.items()}


def header_excess(header: bytes) -> int:
    """How far the JSON of a serialized header (from :func:`serialize_header`) is over
    the format's limit, in bytes; 0 when it fits. A file over it opens in no reader,
    shardkit's own included."""
    return max(0, len(header) - LENGTH_PREFIX - MAX_HEADER_SIZE)
