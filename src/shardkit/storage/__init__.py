"""Where a checkpoint's bytes live: local files, S3 objects, HTTP(S) URLs, the Hugging Face cache.

Every other module sees a location as a path-like object (:class:`pathlib.Path` for
local files, a :class:`~shardkit.storage.remote.RemotePath` for `s3://` and
`http(s)://`, an :class:`~shardkit.storage.hf.HfPath` for `hf://org/name` on the Hub)
and reads bytes through a :class:`RangeReader`, so checkpoint discovery, the
cross-checks, comparison and the executor are the same code for every kind. Offline,
`hf://` resolves to the local cache snapshot, a plain folder.

Headers and byte ranges keep locations as strings (`Header.path`, `ByteRange.source`);
a remote location is registered under its display string when its header is read, so
`open_reader(header.path)` finds the right store and credentials again. Display strings
never carry credentials or URL signatures.

boto3 is imported only when an `s3://` path is used: local commands stay fast to start.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, TypeGuard

from ..errors import OutputError, ShardkitError
from ..errors import TransportError as TransportError  # defined here before errors.py had it
from ..format.header import Header, identity
from ..format.header import read_header as read_local_header
from ..format.tied_weights import discard_names
from ..format.torch_checkpoint import is_torch_file, read_torch_file
from .location import LocalReader as LocalReader
from .location import Location as Location
from .location import RangeReader as RangeReader
from .location import SeenFile as SeenFile
from .location import Traffic as Traffic

if TYPE_CHECKING:
    from .remote import RemotePath


HF_PREFIX = "hf://"
#: Location strings that name remote files (a `Header.path` of a Hub file is `hf://…`).
REMOTE_PREFIXES = ("s3://", "http://", "https://", HF_PREFIX)


# --------------------------------------------------------------------------- locations

def display(path: object) -> str:
    """How a path argument may be shown: a web URL without user, password or query
    (where presigned URLs carry their signature); anything else as given."""
    if isinstance(path, str) and path.startswith(("http://", "https://")):
        from .http import display_url

        return display_url(path)
    return str(path)


def is_url(text: object) -> TypeGuard[str]:
    return isinstance(text, str) and text.startswith(REMOTE_PREFIXES)


def is_remote(path: object) -> bool:
    """Whether `path` (a location or a location string) is an object store or web location."""
    return _is_remote_path(path) or is_url(path)


def as_path(
    path: str | os.PathLike[str] | Location, *, endpoint_url: str | None = None, output: bool = False
) -> Path | RemotePath:
    """The location `path` names: `s3://…`, `http(s)://…`, `hf://org/name[@rev]` or a local path.

    `endpoint_url` points `s3://` paths at an S3-compatible store (default: the
    `AWS_ENDPOINT_URL` environment variable, else AWS itself). With `output`, the
    kinds shardkit cannot write (web URLs, the Hugging Face cache) are refused.
    """
    if _is_remote_path(path):
        return path
    if output and isinstance(path, str) and path.startswith(("http://", "https://", HF_PREFIX)):
        raise OutputError(f"{display(path)}: cannot write there; outputs go to a local path or an s3:// URL")
    if isinstance(path, str):
        if path.startswith("s3://"):
            from .s3 import S3Path

            return S3Path.parse(path, endpoint_url=endpoint_url)
        if path.startswith(("http://", "https://")):
            from .http import HttpPath

            return HttpPath(path)
        if path.startswith(HF_PREFIX):
            from .hf import resolve_hf

            return resolve_hf(path)
    return Path(_local(path))


def lookup(location: str | os.PathLike[str] | Location) -> Path | RemotePath:
    """The location behind a `Header.path` / `ByteRange.source` string."""
    if _is_remote_path(location):
        return location
    if is_url(location):
        from .remote import registered

        known = registered(location)
        return known if known is not None else as_path(location)
    return Path(_local(location))


def _is_remote_path(path: object) -> TypeGuard[RemotePath]:
    """Whether `path` is a RemotePath object. None exists before `.remote` is imported
    (every remote kind imports it), so a local run never pays for importing it."""
    remote = sys.modules.get(f"{__name__}.remote")
    return remote is not None and isinstance(path, remote.RemotePath)


def as_remote(location: Location) -> RemotePath:
    """`location` once it is known not to be local: every Location is a Path or a RemotePath."""
    from .remote import RemotePath

    if not isinstance(location, RemotePath):
        raise TypeError(f"not a remote location: {location!r}")
    return location


def _local(path: str | os.PathLike[str] | Location) -> str | os.PathLike[str]:
    """`path` once it is known not to be remote: a local path is a str or a PathLike."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"not a location: {path!r}")
    return path


# --------------------------------------------------------------------------- operations


def read_header(path: str | os.PathLike[str] | Location, *, strict: bool = False) -> Header:
    """Read and validate a header, locally with pread or remotely with ranged GETs."""
    location = lookup(path)
    if is_torch_file(location.name):
        return _read_torch_header(location)
    if isinstance(location, Path):
        return read_local_header(location, strict=strict)
    return location.read_header(strict=strict)


def _read_torch_header(location: Path | RemotePath) -> Header:
    """A torch zip's tensors as a header (:mod:`shardkit.format.torch_checkpoint`), read as data."""
    if isinstance(location, Path):
        st = location.stat()
        stat: tuple[object, ...] = identity(st)
        size = st.st_size
        where = str(location)
    else:
        from .remote import register

        remote = location.stat()
        size, stat, where = remote.st_size, ("remote", remote.version, remote.st_size), register(location)
    reader = open_reader(location)
    try:
        return read_torch_file(reader.read, size, where, stat, lambda: discard_names(_config_beside(location)))
    finally:
        reader.close()


def _config_beside(location: Path | RemotePath) -> bytes | None:
    """The config.json of a torch file's folder, which names the model class whose tied
    names the Hub converter drops; None when there is none to read."""
    config = location.parent / "config.json"
    try:
        return config.read_bytes() if config.is_file() else None
    except (OSError, ShardkitError):
        return None


def open_reader(path: str | os.PathLike[str] | Location) -> RangeReader:
    location = lookup(path)
    if isinstance(location, Path):
        return LocalReader(location)
    return location.open_reader()


def size(path: Location) -> int:
    return path.stat().st_size


def read_bytes(path: Location) -> bytes:
    return path.read_bytes()


def walk_files(root: Location, *, exclude: Location | None = None) -> Iterator[tuple[Location, str]]:
    """Every file under `root` with its name relative to it, skipping hidden entries
    (names starting with a dot, shardkit's temporaries among them) and the folder
    `exclude` (resolved; e.g. an output inside the source folder)."""
    if isinstance(root, Path):
        for dirpath, dirnames, filenames in os.walk(root):
            folder = Path(dirpath)
            dirnames[:] = sorted(
                d for d in dirnames if not d.startswith(".") and (exclude is None or (folder / d).resolve() != exclude)
            )
            for name in sorted(filenames):
                if not name.startswith("."):
                    path = folder / name
                    yield path, path.relative_to(root).as_posix()
        return
    inside = str(exclude).rstrip("/") + "/" if exclude is not None else None
    for remote, relative in as_remote(root).walk_files():
        if inside is None or not str(remote).startswith(inside):
            yield remote, relative


def traffic() -> Traffic:
    """Requests and bytes exchanged with every S3 store so far in this process."""
    total = Traffic()
    s3 = sys.modules.get(f"{__name__}.s3")
    if s3 is not None:
        for store in list(s3.S3Store._stores.values()):
            total = total + store.traffic
    return total


def source_changed(header: Header | SeenFile) -> str | None:
    """Why a source no longer matches what was seen when its header was read, or None."""
    location = lookup(header.path)
    if isinstance(location, Path):
        try:
            st = os.stat(location)
        except OSError as exc:
            return f"source disappeared during the copy ({exc.strerror})"
        # The change time too: `rsync --inplace -t` rewrites bytes and restores the
        # modification time, but no one can set st_ctime back.
        now = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        if header.stat is not None and now != header.stat:
            return "source changed (size, modification or change time) during the copy; output discarded"
        return None
    return location.changed_since(header)
