"""The two checksum manifests: `sha256sum` text for files, JSON for tensors.

A file manifest is what `sha256sum` prints and `sha256sum -c` checks, names relative
to the checkpoint folder; it proves the files are the ones produced, and changes
whenever the sharding does. A tensor manifest records each tensor's dtype, shape and
the SHA-256 of its data bytes; it does not depend on which file a tensor sits in or
where, so it stays valid across merge and split. :func:`read_manifest` tells the two
apart by their first character and also accepts `shardkit checksum --json` reports.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeGuard

from ..errors import BadInputError
from ..storage import Location
from .shards import WEIGHT_SUFFIXES, Checkpoint, companion_files

TENSOR_MANIFEST_FORMAT = "shardkit.tensor-sha256"
TENSOR_MANIFEST_VERSION = 1
_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")
#: GNU (`HASH  name`, `HASH *name` in binary mode) and BSD tag (`SHA256 (name) = HASH`) lines.
_GNU_LINE = re.compile(r"^(?P<hash>[0-9a-fA-F]+) [ *](?P<name>.+)$")
_TAG_LINE = re.compile(r"^SHA256 \((?P<name>.+)\) = (?P<hash>[0-9a-fA-F]+)$")
#: What GNU sha256sum escapes in names, and how (`filename_unescape` in coreutils' digest.c).
_ESCAPES = {"\\": "\\\\", "\n": "\\n", "\r": "\\r"}
_UNESCAPES = {"\\": "\\", "n": "\n", "r": "\r"}


@dataclass(frozen=True)
class TensorDigest:
    dtype: str
    shape: tuple[int, ...]
    sha256: str


@dataclass(frozen=True)
class Manifest:
    """A parsed manifest: `files` (name relative to the checkpoint folder → SHA-256)
    or `tensors` (name → digest), according to `kind`."""

    path: str
    kind: str  # "files" | "tensors"
    files: dict[str, str] = field(default_factory=dict)
    tensors: dict[str, TensorDigest] = field(default_factory=dict)


# --------------------------------------------------------------------------- writing


def format_file_manifest(entries: Iterable[tuple[str, str]]) -> str:
    """`sha256sum` output for (name, sha256) pairs, escaping names as GNU coreutils (9.x)
    does: a name holding a backslash, newline or carriage return gets a line starting
    with a backslash, and those three characters written as `\\\\`, `\\n` and `\\r`."""
    lines = []
    for name, digest in entries:
        if any(c in name for c in _ESCAPES):
            lines.append("\\" + digest + "  " + "".join(_ESCAPES.get(c, c) for c in name))
        else:
            lines.append(f"{digest}  {name}")
    return "".join(line + "\n" for line in lines)


def tensor_manifest_document(tensors: Mapping[str, TensorDigest]) -> dict[str, object]:
    return {
        "format": TENSOR_MANIFEST_FORMAT,
        "version": TENSOR_MANIFEST_VERSION,
        "tensors": {
            name: {"dtype": d.dtype, "shape": list(d.shape), "sha256": d.sha256}
            for name, d in sorted(tensors.items())
        },
    }


def format_tensor_manifest(tensors: Mapping[str, TensorDigest]) -> str:
    return json.dumps(tensor_manifest_document(tensors), indent=2, ensure_ascii=False) + "\n"


# --------------------------------------------------------------------------- recognising

#: A file manifest of a few files is a few hundred bytes; anything larger is not one.
_MANIFEST_MAX_BYTES = 1 << 20
_SHA256SUM_NAMES = ("sha256sums", "sha256sums.txt", "sha256sum", "sha256sum.txt", "checksums", "checksums.txt")
_SHA256SUM_SUFFIXES = (".sha256", ".sha256sum", ".sha256sums")


def companions(checkpoint: Checkpoint, exclude: Location | None = None) -> list[tuple[Location, str]]:
    """The checkpoint's companion files (:func:`~shardkit.checkpoint.shards.companion_files`:
    config, tokenizer, ...) without the file manifests that name its weight files:
    what a merge or split copies, what `checksum` covers and `diff` compares."""
    found = companion_files(checkpoint, exclude)
    return [(path, name) for path, name in found if not names_files_of(path, WEIGHT_SUFFIXES)]


def names_files_of(path: object, suffixes: tuple[str, ...]) -> bool:
    """Whether `path` (a local or remote location) is a file manifest — `sha256sum` text
    or `shardkit checksum --json` — listing a file whose name ends in one of `suffixes`.

    Such a manifest is stale in any output that rewrites those files (a merge, a
    split), so it is never copied there; a tensor manifest stays valid and is kept.
    """
    name = path.name  # type: ignore[attr-defined]
    lower = name.lower()
    if not (lower in _SHA256SUM_NAMES or lower.endswith(_SHA256SUM_SUFFIXES) or lower.endswith(".json")):
        return False
    try:
        if path.stat().st_size > _MANIFEST_MAX_BYTES:  # type: ignore[attr-defined]
            return False
        text = path.read_text(encoding="utf-8")  # type: ignore[attr-defined]
        if lower.endswith(".json"):
            if '"kind"' not in text:
                return False
            manifest = _read_json(Path(name), text)
        else:
            manifest = _read_sha256sum(Path(name), text)
    except (OSError, UnicodeDecodeError, BadInputError):
        return False
    return manifest.kind == "files" and any(listed.endswith(suffixes) for listed in manifest.files)


# --------------------------------------------------------------------------- reading


def read_manifest(path: str | os.PathLike[str]) -> Manifest:
    """Parse either kind of manifest; anything else is a BadInputError naming the line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BadInputError(f"{path}: checksum manifest not found") from None
    except UnicodeDecodeError:
        raise BadInputError(f"{path}: not a checksum manifest (not UTF-8 text)") from None
    except OSError as exc:
        raise BadInputError(f"{path}: cannot read the checksum manifest: {exc.strerror}") from None
    if text.lstrip().startswith("{"):
        return _read_json(path, text)
    return _read_sha256sum(path, text)


def _read_sha256sum(path: Path, text: str) -> Manifest:
    files: dict[str, str] = {}
    # Lines end at "\n" only: str.splitlines() would also cut a name at "\x85" or "\u2028",
    # which sha256sum leaves as they are. A CRLF file (written on Windows) is read too.
    for number, line in enumerate(text.split("\n"), 1):
        line = line.removesuffix("\r")
        if not line.strip() or line.startswith("#"):
            continue
        escaped = line.startswith("\\")
        body = line[1:] if escaped else line
        match = _GNU_LINE.match(body) or _TAG_LINE.match(body)
        if match is None:
            raise BadInputError(f"{path}:{number}: not a sha256sum line: {line[:80]!r}")
        digest, name = match.group("hash").lower(), match.group("name")
        if len(digest) != 64:
            raise BadInputError(
                f"{path}:{number}: a {len(digest) * 4}-bit hash, not SHA-256 (use a sha256sum manifest)"
            )
        if escaped:
            name = _unescape(name, path, number)
        if files.get(name, digest) != digest:
            raise BadInputError(f"{path}:{number}: {name!r} is listed twice with different hashes")
        files[name] = digest
    if not files:
        raise BadInputError(f"{path}: the checksum manifest lists no file")
    return Manifest(str(path), "files", files=files)


def _unescape(name: str, path: Path, number: int) -> str:
    def one(match: re.Match[str]) -> str:
        escaped = _UNESCAPES.get(match.group(1))
        if escaped is None:
            raise BadInputError(
                f"{path}:{number}: {match.group(0)!r} in an escaped name: sha256sum writes only \\\\, \\n and \\r"
            )
        return escaped

    return re.sub(r"\\(.?)", one, name)


def _read_json(path: Path, text: str) -> Manifest:
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadInputError(f"{path}: not valid JSON: {exc}") from None
    except RecursionError:
        raise BadInputError(f"{path}: not a checksum manifest: JSON nested too deeply to read") from None
    if not isinstance(document, dict):
        raise BadInputError(f"{path}: not a checksum manifest (JSON is not an object)")
    if document.get("format") == TENSOR_MANIFEST_FORMAT or document.get("kind") == "tensors":
        version = document.get("version", TENSOR_MANIFEST_VERSION)
        if version != TENSOR_MANIFEST_VERSION:
            raise BadInputError(f"{path}: tensor manifest version {version!r} is not supported")
        return Manifest(str(path), "tensors", tensors=_tensor_entries(path, document.get("tensors")))
    if document.get("kind") == "files" and isinstance(document.get("files"), list):
        files = {}
        for entry in document["files"]:
            if not (isinstance(entry, dict) and isinstance(entry.get("name"), str) and _is_hex64(entry.get("sha256"))):
                raise BadInputError(f"{path}: files entry {entry!r} needs a name and a 64-hex sha256")
            files[entry["name"]] = entry["sha256"].lower()
        return Manifest(str(path), "files", files=files)
    raise BadInputError(f"{path}: JSON but not a shardkit checksum manifest (no format {TENSOR_MANIFEST_FORMAT!r})")


def _tensor_entries(path: Path, raw: object) -> dict[str, TensorDigest]:
    if not isinstance(raw, dict):
        raise BadInputError(f"{path}: \"tensors\" must be an object of tensor name to digest")
    tensors = {}
    for name, entry in raw.items():
        if not isinstance(entry, dict):
            raise BadInputError(f"{path}: tensor {name!r}: entry must be an object")
        dtype, shape, digest = entry.get("dtype"), entry.get("shape"), entry.get("sha256")
        if not isinstance(dtype, str):
            raise BadInputError(f"{path}: tensor {name!r}: dtype must be a string")
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            raise BadInputError(f"{path}: tensor {name!r}: shape must be a list of non-negative integers")
        if not _is_hex64(digest):
            raise BadInputError(f"{path}: tensor {name!r}: sha256 must be 64 hex digits")
        tensors[name] = TensorDigest(dtype, tuple(shape), digest.lower())
    return tensors


def _is_hex64(value: object) -> TypeGuard[str]:
    return isinstance(value, str) and _HEX64.match(value) is not None
