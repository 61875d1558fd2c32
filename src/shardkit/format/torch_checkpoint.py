"""A torch `.bin`/`.pt`/`.pth` file as the header of a safetensors file it converts to.

:func:`read_torch_file` reads the zip's directory (:mod:`shardkit.format.torch_zip`) and its
pickle as data (:mod:`shardkit.format.torch_pickle`), checks every tensor against the storage
it views, and answers with a :class:`TorchHeader`: the same record a safetensors
header gives, so discovery, planning, inspect, diff and checksum treat a `.bin` shard
like any other. Each tensor's `begin`/`end` is the absolute byte range its elements
would take if contiguous; a view whose elements are not one run of bytes (a
transposed or strided tensor) also has a :class:`View`, which planning turns into a
strided gather.

Tensors that share a storage are resolved as safetensors' `convert.py` resolves them
(`_remove_duplicate_names`, which the Hub's converter uses): overlapping tensors of
one storage form a group, of those covering the whole storage the first by name that
the model class does not tie again on load is kept (:mod:`shardkit.format.tied_weights`),
the others are dropped and recorded in the metadata as `dropped: kept`; views that do
not overlap each get their own bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..errors import BadInputError
from .header import DTYPES, Header, TensorInfo, tensor_nbytes
from .tied_weights import kept_name

if TYPE_CHECKING:  # the readers load with the first torch file: every other command starts ~7 ms sooner
    from .torch_pickle import StorageRef, TensorRef
    from .torch_zip import Member, ReadAt, TorchZip

#: File names that are torch pickles (zip-based since torch 1.6).
TORCH_SUFFIXES = (".bin", ".pt", ".pth")
#: data.pkl larger than this is no state dict (a 20,000-tensor MoE's is about 3 MB).
MAX_PICKLE = 256 * 1024 * 1024

#: torch dtype name -> safetensors dtype code (safetensors.torch's table), from the one
#: dtype table; F4's torch type packs two elements a byte and its shape counts bytes: not read.
SAFETENSORS_DTYPES = {d.torch: d.code for d in DTYPES.values() if d.torch is not None and d.bits % 8 == 0}
#: Bytes per element of a storage's dtype; complex128 has no safetensors code but sizes a storage.
_ITEMSIZE = {**{torch: DTYPES[code].bits // 8 for torch, code in SAFETENSORS_DTYPES.items()}, "complex128": 16}


def is_torch_file(name: str) -> bool:
    return name.endswith(TORCH_SUFFIXES)


def safetensors_name(name: str) -> str:
    """The Hub converter's name for a torch file's conversion: `pytorch_model.bin` →
    `model.safetensors`, `pytorch_model-00001-of-00002.bin` → `model-00001-of-00002.safetensors`,
    any other `NAME.bin` (`diffusion_pytorch_model.bin`) → `NAME.safetensors`."""
    stem = name.rsplit(".", 1)[0]
    if stem.startswith("pytorch_model"):
        stem = "model" + stem[len("pytorch_model") :]
    return f"{stem}.safetensors"


@dataclass(frozen=True)
class View:
    """A tensor whose elements are not one run of bytes: element (i0, i1, ...) is at
    `base + (i0*stride[0] + i1*stride[1] + ...) * itemsize` of the file."""

    base: int  # absolute offset of element (0, 0, ...)
    shape: tuple[int, ...]
    stride: tuple[int, ...]  # in elements
    itemsize: int

    @property
    def span(self) -> tuple[int, int]:
        """The bytes [first, end) of the file the view's elements lie in."""
        last = sum((n - 1) * s for n, s in zip(self.shape, self.stride))
        return self.base, self.base + (last + 1) * self.itemsize


@dataclass(frozen=True)
class TorchHeader(Header):
    """A torch file described as a safetensors header: offsets are absolute."""

    views: Mapping[str, View] = field(default_factory=dict)
    dropped: Mapping[str, str] = field(default_factory=dict)  # tied name -> the name kept

    @property
    def data_start(self) -> int:
        return 0


@dataclass(frozen=True)
class _Found:
    """One tensor of the pickle, checked against its storage."""

    name: str
    ref: TensorRef
    storage: Member
    storage_bytes: int
    itemsize: int

    @property
    def nelements(self) -> int:
        count = 1
        for dim in self.ref.shape:
            count *= dim
        return count

    @property
    def start(self) -> int:
        """Byte offset of element 0 in its storage (`data_ptr - storage_ptr`)."""
        return self.ref.offset * self.itemsize

    @property
    def stop(self) -> int:
        """safetensors' `_end_ptr`: one past the last element (the start when empty)."""
        if not self.nelements:
            return self.start
        last = self.ref.offset + sum((n - 1) * s for n, s in zip(self.ref.shape, self.ref.stride))
        return (last + 1) * self.itemsize

    @property
    def complete(self) -> bool:
        """safetensors' `_is_complete`: starts the storage and covers all of it."""
        return self.start == 0 and self.nelements * self.itemsize == self.storage_bytes

    @property
    def contiguous(self) -> bool:
        expected = 1
        for size, stride in zip(reversed(self.ref.shape), reversed(self.ref.stride)):
            if size != 1 and stride != expected:
                return False
            expected *= size
        return True


def read_torch_file(
    read: ReadAt,
    file_size: int,
    path: str,
    stat: tuple[object, ...] | None = None,
    discard: Callable[[], frozenset[str]] = frozenset,
) -> TorchHeader:
    """The tensors of the torch checkpoint at `path`, read as data, never executed.
    `discard` answers convert.py's `discard_names` (asked only when a storage has
    several complete names to choose from)."""
    from .torch_pickle import load as load_pickle
    from .torch_zip import read_torch_zip

    archive = read_torch_zip(path, file_size, read)
    _refuse_big_endian(archive, read)
    pickle = archive.members["data.pkl"]
    if pickle.size > MAX_PICKLE:
        raise BadInputError(f"{path}: its data.pkl is {pickle.size:,} bytes, more than any state dict; refused")
    value = load_pickle(read(pickle.offset, pickle.size), f"{path}: data.pkl")
    found = [_check(archive, name, ref) for name, ref in _state_dict(value, path).items()]
    dropped = _tied_names(found, path, discard)
    metadata: dict[str, str] = {"format": "pt"}
    for name, kept in dropped.items():
        metadata.setdefault(name, kept)
    tensors: list[TensorInfo] = []
    views: dict[str, View] = {}
    for tensor in found:
        if tensor.name in dropped:
            continue
        dtype = SAFETENSORS_DTYPES[tensor.ref.dtype]
        begin = tensor.storage.offset + tensor.start
        end = begin + tensor.nelements * tensor.itemsize
        tensors.append(TensorInfo(tensor.name, dtype, tensor.ref.shape, begin, end))
        if not tensor.contiguous:
            views[tensor.name] = View(begin, tensor.ref.shape, tensor.ref.stride, tensor.itemsize)
    tensors.sort(key=lambda t: (t.begin, t.name))
    return TorchHeader(path, 0, file_size, metadata, tuple(tensors), stat, views, dropped)  # type: ignore[arg-type]


def _refuse_big_endian(archive: TorchZip, read: ReadAt) -> None:
    record = archive.members.get("byteorder")
    if record is not None and (record.size > 16 or read(record.offset, record.size) != b"little"):
        raise BadInputError(f"{archive.path}: written on a big-endian machine; only little-endian files convert")


def _state_dict(value: object, path: str) -> dict[str, TensorRef]:
    """The name -> tensor mapping; like convert.py, a top-level `state_dict` key is unwrapped."""
    from .torch_pickle import TensorRef

    if isinstance(value, dict) and isinstance(value.get("state_dict"), dict):
        value = value["state_dict"]
    if not isinstance(value, dict):
        raise BadInputError(f"{path}: holds a {type(value).__name__}, not a state dict of tensors")
    for name, tensor in value.items():
        if not isinstance(name, str):
            raise BadInputError(f"{path}: a state dict key is {name!r}, not a tensor name")
        if not isinstance(tensor, TensorRef):
            raise BadInputError(
                f"{path}: {name!r} is a {type(tensor).__name__}, not a tensor; only state dicts of tensors convert"
            )
    return value


def _check(archive: TorchZip, name: str, ref: TensorRef) -> _Found:
    """The tensor, once its dtype, sizes and storage are known to hold together."""
    where = f"{archive.path}: tensor {name!r}"
    if ref.dtype not in SAFETENSORS_DTYPES:
        raise BadInputError(f"{where} is {ref.dtype}, which safetensors cannot store")
    storage = archive.storage(ref.storage.key)
    if storage is None:
        raise BadInputError(f"{where}: its storage data/{ref.storage.key} is not in the zip")
    itemsize = _ITEMSIZE[ref.dtype]
    declared = _storage_bytes(ref.storage)
    if storage.size < declared:
        raise BadInputError(
            f"{where}: storage data/{ref.storage.key} holds {storage.size:,} bytes but declares {declared:,}; refused"
        )
    try:
        nbytes = tensor_nbytes(SAFETENSORS_DTYPES[ref.dtype], ref.shape)
    except ValueError as exc:
        raise BadInputError(f"{where}: shape {list(ref.shape)} {exc}; refused") from None
    found = _Found(name, ref, storage, declared, itemsize)
    if nbytes and found.stop > declared:
        raise BadInputError(
            f"{where}: {ref.dtype}{list(ref.shape)} at element {ref.offset} with stride {list(ref.stride)} "
            f"reaches byte {found.stop:,} of a {declared:,}-byte storage; refused"
        )
    return found


def _storage_bytes(storage: StorageRef) -> int:
    return storage.numel * _ITEMSIZE[storage.dtype]


def _tied_names(found: list[_Found], path: str, discard: Callable[[], frozenset[str]]) -> dict[str, str]:
    """Names dropped because another tensor of the same storage overlaps them, each
    mapped to the name kept (`_find_shared_tensors` + `_remove_duplicate_names`)."""
    by_storage: dict[str, list[_Found]] = {}
    for tensor in found:
        if tensor.storage_bytes:
            by_storage.setdefault(tensor.ref.storage.key, []).append(tensor)
    dropped: dict[str, str] = {}
    for group in by_storage.values():
        for shared in _overlapping(group):
            complete = sorted(t.name for t in shared if t.complete)
            if not complete:
                if len(shared) == 1:
                    continue  # convert.py clones it: its own bytes, as written
                names = ", ".join(sorted(t.name for t in shared))
                raise BadInputError(
                    f"{path}: tensors {names} share a storage and none covers all of it; "
                    "convert.py refuses such a file too (it would store more than the tensors hold)"
                )
            kept = kept_name(complete, discard()) if len(complete) > 1 else complete[0]
            for tensor in shared:
                if tensor.name != kept:
                    dropped[tensor.name] = kept
    return dropped


def _overlapping(group: list[_Found]) -> list[list[_Found]]:
    """safetensors' `_filter_shared_not_shared`: a tensor starting before the previous
    one (in start order) stops joins its group."""
    areas = sorted(group, key=lambda t: (t.start, t.stop, t.name))
    groups = [[areas[0]]]
    last_stop = areas[0].stop
    for tensor in areas[1:]:
        if tensor.start >= last_stop:
            groups.append([tensor])
        else:
            groups[-1].append(tensor)
        last_stop = tensor.stop
    return groups


def byte_runs(header: Header) -> list[TensorInfo]:
    """The tensors of `header` whose bytes are one run of the file, as a safetensors file
    holds them: all of a safetensors file's; a torch file's strided views are not (their
    bytes are gathered, :func:`shardkit.plan.tensor_bytes.view_sha256` hashes them)."""
    views = header.views if isinstance(header, TorchHeader) else None
    return [t for t in header.tensors if t.name not in views] if views else list(header.tensors)
