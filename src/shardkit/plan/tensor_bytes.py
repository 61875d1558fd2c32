"""A tensor's bytes as safetensors would hold them, whatever file they come from.

A safetensors tensor, or a contiguous tensor of a torch file, is one byte range; a
strided view of a torch file is gathered by :func:`shardkit.plan.fill.fill`, the same code
that writes it. Comparing and hashing read through here, so `diff`, `verify --against`
and `checksum --tensors` of a `.bin` see exactly the bytes `convert` writes.
"""

from __future__ import annotations

import hashlib

from .. import storage
from ..checkpoint.shards import SourceTensor
from ..storage import RangeReader
from .files import PlannedFile, tensor_transform
from .fill import fill


def read_tensor(tensor: SourceTensor, reader: RangeReader, done: int, length: int) -> bytes:
    """Bytes [done, done + length) of `tensor`'s data, contiguous, from its file's `reader`."""
    if tensor.view is None:
        return reader.read(tensor.offset + done, length)
    nbytes = tensor.info.nbytes
    step = tensor_transform(tensor, 0, tensor.info.dtype, nbytes)
    planned = PlannedFile(tensor.name, (step,), (tensor.name,), nbytes)
    out = bytearray(length)

    def read(_source: str, offset: int, into: memoryview) -> None:
        into[:] = reader.read(offset, len(into))

    fill(planned, done, memoryview(out), read)
    return bytes(out)


#: Bytes of a view gathered at a time while hashing it.
_HASH_CHUNK = 8 * 1024 * 1024


def view_sha256(tensor: SourceTensor) -> str:
    """SHA-256 of a strided torch view's bytes made contiguous, as `convert` writes them
    (a hash of the storage range it lies in would match no safetensors file)."""
    digest = hashlib.sha256()
    reader = storage.open_reader(tensor.shard.path)
    try:
        for done in range(0, tensor.info.nbytes, _HASH_CHUNK):
            digest.update(read_tensor(tensor, reader, done, min(_HASH_CHUNK, tensor.info.nbytes - done)))
    finally:
        reader.close()
    return digest.hexdigest()
