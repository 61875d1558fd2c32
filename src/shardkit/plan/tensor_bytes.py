"""A tensor's bytes as safetensors would hold them, whatever file they come from.

A safetensors tensor, or a contiguous tensor of a torch file, is one byte range; a
strided view of a torch file is gathered by :func:`shardkit.plan.fill.fill`, the same code
that writes it. Comparing and hashing read through here, so `diff`, `verify --against`
and `checksum --tensors` of a `.bin` see exactly the bytes `convert` writes.
"""

from __future__ import annotations

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
