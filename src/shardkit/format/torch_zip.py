"""The zip container of a torch checkpoint, read from its central directory and checked.

`torch.save` (torch >= 1.6) writes a zip whose members are *stored*, never
compressed, each one's data 64-byte aligned: `ROOT/data.pkl` (the pickle that says
which tensor is where), `ROOT/data/KEY` (one storage's raw bytes each), and a few
small records (`version`, `byteorder`, ...). So every tensor is a byte range of the
file, and nothing has to be inflated. This module finds those ranges and refuses any
zip that is not laid out that way: a compressed or encrypted member, a member outside
the file or overlapping another (the shape of a zip bomb), a name torch would not
write. It never extracts anything and never trusts a size it has not checked
against the file.

Only the central directory and the local headers are read, through a
`read(offset, length)` callback, so it works the same for local files and ranged GETs.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from ..errors import BadInputError

#: `read(offset, length)` -> exactly `length` bytes of the file from `offset`.
ReadAt = Callable[[int, int], bytes]

ZIP_MAGIC = b"PK\x03\x04"
_EOCD = struct.Struct("<4sHHHHIIH")
_EOCD64_LOCATOR = struct.Struct("<4sIQI")
_EOCD64 = struct.Struct("<4sQHHIIQQQQ")
_CENTRAL = struct.Struct("<4sHHHHHHIIIHHHHHII")
_LOCAL = struct.Struct("<4sHHHHHIIIHH")
_MAX_COMMENT = 0xFFFF
#: More members than this is no state dict (one per storage plus a handful).
MAX_MEMBERS = 1_000_000
#: Bits of the general-purpose flag torch's writer may set: data descriptor, UTF-8 names.
_ALLOWED_FLAGS = 0x0008 | 0x0800
#: The records torch writes beside data.pkl and the storages.
_RECORD_NAMES = frozenset({"version", ".format_version", ".storage_alignment", "byteorder",
                           ".data/version", ".data/serialization_id"})
_STORAGE_NAME = re.compile(r"data/([0-9]{1,20})")
_ROOT_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,255}")


@dataclass(frozen=True)
class Member:
    """One stored member: its name inside the root folder and its data's place in the file."""

    name: str  # e.g. "data.pkl", "data/0"
    offset: int  # absolute offset of the first data byte
    size: int


@dataclass(frozen=True)
class TorchZip:
    """The members of a torch zip, by name relative to its root folder (`archive/`, ...)."""

    path: str
    root: str
    members: Mapping[str, Member]

    def storage(self, key: str) -> Member | None:
        return self.members.get(f"data/{key}")


def read_torch_zip(path: str, file_size: int, read: ReadAt) -> TorchZip:
    """The checked members of the torch zip at `path` (`file_size` bytes)."""
    if file_size < _EOCD.size or read(0, 4) != ZIP_MAGIC:
        raise BadInputError(legacy_message(path))
    count, cd_offset, cd_size = _end_of_central_directory(path, file_size, read)
    if cd_offset + cd_size > file_size:
        raise BadInputError(f"{path}: the zip's central directory runs past the end of the file (truncated?)")
    directory = read(cd_offset, cd_size)
    members: dict[str, Member] = {}
    extents: list[tuple[int, int, str]] = []
    root: str | None = None
    position = 0
    for _ in range(count):
        name, header_offset, size, position = _central_entry(path, directory, position)
        folder, _, inner = name.partition("/")
        if root is None:
            root = folder
        if folder != root or not _ROOT_NAME.fullmatch(folder) or not _is_torch_name(inner):
            raise BadInputError(
                f"{path}: zip member {name!r} is not one torch writes (expected {root or 'archive'}/data.pkl, "
                f"{root or 'archive'}/data/0, ...); refused"
            )
        if inner in members:
            raise BadInputError(f"{path}: zip member {name!r} appears twice; refused")
        start = _local_data_start(path, name, header_offset, file_size, read)
        if start + size > cd_offset:
            raise BadInputError(
                f"{path}: zip member {name!r} ({size:,} bytes at {start:,}) runs past the zip's data "
                f"(which ends at {cd_offset:,}); refused"
            )
        members[inner] = Member(inner, start, size)
        extents.append((header_offset, start + size, name))
    if position != len(directory):
        raise BadInputError(f"{path}: the zip's central directory has bytes after its {count} entries; refused")
    _refuse_overlaps(path, extents)
    if root is None or "data.pkl" not in members:
        raise BadInputError(f"{path}: a zip without data.pkl is not a torch checkpoint")
    return TorchZip(path, root, members)


def legacy_message(path: str) -> str:
    return (
        f"{path}: not a zip-based torch checkpoint (a legacy pre-1.6 torch.save file, one saved with "
        "_use_new_zipfile_serialization=False, or a bare pickle); shardkit reads only the zip format and "
        "never unpickles; re-save it with torch >= 1.6 where you trust it"
    )


def _end_of_central_directory(path: str, file_size: int, read: ReadAt) -> tuple[int, int, int]:
    """(entries, central directory offset, size), from the zip64 record when there is one."""
    tail_start = max(0, file_size - _EOCD.size - _MAX_COMMENT)
    tail = read(tail_start, file_size - tail_start)
    at = tail.rfind(b"PK\x05\x06")
    while at >= 0 and at + _EOCD.size + struct.unpack_from("<H", tail, at + 20)[0] != len(tail):
        at = tail.rfind(b"PK\x05\x06", 0, at)
    if at < 0:
        raise BadInputError(f"{path}: starts like a zip but has no end-of-central-directory record (truncated?)")
    _, disk, cd_disk, _, count, cd_size, cd_offset, _ = _EOCD.unpack_from(tail, at)
    if disk or cd_disk:
        raise BadInputError(f"{path}: a multi-disk zip is not a torch checkpoint")
    eocd = tail_start + at
    if 0xFFFF in (count,) or 0xFFFFFFFF in (cd_size, cd_offset):
        if eocd < _EOCD64_LOCATOR.size:
            raise BadInputError(f"{path}: zip64 sizes but no zip64 locator")
        signature, _, record, _ = _EOCD64_LOCATOR.unpack(read(eocd - _EOCD64_LOCATOR.size, _EOCD64_LOCATOR.size))
        if signature != b"PK\x06\x07" or record + _EOCD64.size > eocd:
            raise BadInputError(f"{path}: the zip64 end-of-central-directory locator is broken")
        fields = _EOCD64.unpack(read(record, _EOCD64.size))
        if fields[0] != b"PK\x06\x06":
            raise BadInputError(f"{path}: the zip64 end-of-central-directory record is missing")
        count, cd_size, cd_offset = fields[7], fields[8], fields[9]
        eocd = record
    if count > MAX_MEMBERS:
        raise BadInputError(f"{path}: the zip claims {count:,} members, more than any state dict has; refused")
    if cd_offset + cd_size > eocd:
        raise BadInputError(f"{path}: the zip's central directory overlaps its end record; refused")
    return count, cd_offset, cd_size


def _central_entry(path: str, directory: bytes, position: int) -> tuple[str, int, int, int]:
    """One central directory entry: (name, local header offset, size, next position)."""
    if position + _CENTRAL.size > len(directory):
        raise BadInputError(f"{path}: the zip's central directory ends inside an entry (truncated?)")
    (signature, _, _, flags, method, _, _, _, compressed, size, name_length, extra_length, comment_length,
     _, _, _, header_offset) = _CENTRAL.unpack_from(directory, position)
    if signature != b"PK\x01\x02":
        raise BadInputError(f"{path}: the zip's central directory has a broken entry at byte {position}")
    start = position + _CENTRAL.size
    end = start + name_length + extra_length + comment_length
    if end > len(directory):
        raise BadInputError(f"{path}: the zip's central directory ends inside an entry (truncated?)")
    raw_name = directory[start : start + name_length]
    try:
        name = raw_name.decode("utf-8")
    except UnicodeDecodeError:
        raise BadInputError(f"{path}: zip member name {raw_name!r} is not UTF-8; refused") from None
    if method != 0:
        raise BadInputError(
            f"{path}: zip member {name!r} is compressed (method {method}); torch stores members uncompressed, "
            "so this file was not written by torch.save: refused"
        )
    if flags & ~_ALLOWED_FLAGS:
        raise BadInputError(f"{path}: zip member {name!r} has flags {flags:#06x} (encrypted?); refused")
    extra = directory[start + name_length : start + name_length + extra_length]
    compressed, size, header_offset = _zip64_sizes(path, name, extra, compressed, size, header_offset)
    if compressed != size:
        raise BadInputError(f"{path}: zip member {name!r} is stored but its two sizes differ; refused")
    return name, header_offset, size, end


def _zip64_sizes(path: str, name: str, extra: bytes, compressed: int, size: int, offset: int) -> tuple[int, int, int]:
    """Sizes and offset, the ones saturated at 0xFFFFFFFF taken from the zip64 extra field."""
    wanted = [f for f, v in (("size", size), ("compressed", compressed), ("offset", offset)) if v == 0xFFFFFFFF]
    if not wanted:
        return compressed, size, offset
    at = 0
    while at + 4 <= len(extra):
        tag, length = struct.unpack_from("<HH", extra, at)
        if tag == 0x0001:
            if length < 8 * len(wanted) or at + 4 + length > len(extra):
                break
            values = dict(zip(wanted, struct.unpack_from(f"<{len(wanted)}Q", extra, at + 4)))
            return values.get("compressed", compressed), values.get("size", size), values.get("offset", offset)
        at += 4 + length
    raise BadInputError(f"{path}: zip member {name!r} lacks the zip64 sizes its entry needs; refused")


def _local_data_start(path: str, name: str, header_offset: int, file_size: int, read: ReadAt) -> int:
    if header_offset + _LOCAL.size > file_size:
        raise BadInputError(f"{path}: zip member {name!r} starts past the end of the file; refused")
    fields = _LOCAL.unpack(read(header_offset, _LOCAL.size))
    signature, method, name_length, extra_length = fields[0], fields[3], fields[9], fields[10]
    if signature != ZIP_MAGIC:
        raise BadInputError(f"{path}: zip member {name!r} has no local header where the directory says; refused")
    if method != 0:
        raise BadInputError(f"{path}: zip member {name!r} is compressed in its local header; refused")
    local_name = read(header_offset + _LOCAL.size, name_length) if name_length <= 0xFFFF else b""
    if local_name != name.encode("utf-8"):
        raise BadInputError(f"{path}: zip member {name!r} has another name in its local header; refused")
    return header_offset + _LOCAL.size + name_length + extra_length


def _refuse_overlaps(path: str, extents: list[tuple[int, int, str]]) -> None:
    """Members, local header to last data byte, must not share a byte: overlapping
    members are how a small zip claims to hold far more than it does."""
    extents.sort()
    for (_, end, name), (start, _, other) in zip(extents, extents[1:]):
        if start < end:
            raise BadInputError(f"{path}: zip members {name!r} and {other!r} overlap; refused")


def _is_torch_name(inner: str) -> bool:
    return inner == "data.pkl" or inner in _RECORD_NAMES or _STORAGE_NAME.fullmatch(inner) is not None
