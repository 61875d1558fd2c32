"""Plans: what each output file holds and which byte ranges of which sources fill it.

Pure functions of the checkpoint's headers: no file is opened here, so every layout
decision (merge into one file, split at a size, reshard) is unit-testable and a
`--dry-run` prints exactly what a real run would write. Merge and split differ only
in how tensors are grouped into files; each file is laid out as the reference writer
lays it out (see `format.serialize_header`), so it is byte-for-byte what
`safetensors.torch.save_file` would produce for the same tensors and metadata.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .checkpoint import Checkpoint, SourceTensor
from .format import TensorSpec, serialize_header


@dataclass(frozen=True)
class ByteRange:
    """Copy `length` bytes from `source` at `source_offset` to `dest_offset`."""

    source: str
    source_offset: int
    dest_offset: int
    length: int


@dataclass(frozen=True)
class PlannedFile:
    """One output file: its header bytes, then its data as ranges of source files."""

    name: str  # relative to the output folder
    header: bytes
    ranges: tuple[ByteRange, ...]
    tensors: tuple[str, ...]  # in data order
    size: int

    @property
    def data_bytes(self) -> int:
        return self.size - len(self.header)


@dataclass(frozen=True)
class FileCopy:
    """A non-weight file (config, tokenizer, README, ...) copied as is."""

    source: Path
    name: str


@dataclass(frozen=True)
class Plan:
    files: tuple[PlannedFile, ...]
    index_name: str | None = None
    index: Mapping[str, object] | None = None
    copies: tuple[FileCopy, ...] = ()
    warnings: tuple[str, ...] = field(default=())

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def tensor_count(self) -> int:
        return sum(len(f.tensors) for f in self.files)


def merged_metadata(checkpoint: Checkpoint) -> tuple[dict[str, str], list[str]]:
    """Union of the shards' `__metadata__`, with `format: pt` ensured.

    transformers refuses a file whose metadata lacks `format`; a key with different
    values in different shards keeps the first shard's value and is reported.
    """
    metadata: dict[str, str] = {}
    origin: dict[str, str] = {}
    warnings: list[str] = []
    for shard in checkpoint.shards:
        for key, value in (shard.metadata or {}).items():
            if key in metadata and metadata[key] != value:
                warnings.append(
                    f"metadata {key!r} differs between shards: {metadata[key]!r} in {origin[key]}, "
                    f"{value!r} in {Path(shard.path).name}; keeping {metadata[key]!r}"
                )
            elif key not in metadata:
                metadata[key] = value
                origin[key] = Path(shard.path).name
    metadata.setdefault("format", "pt")
    if metadata["format"] != "pt":
        warnings.append(f"metadata format is {metadata['format']!r}, not 'pt'; kept as is")
    return metadata, warnings


def plan_file(name: str, tensors: Iterable[SourceTensor], metadata: Mapping[str, str] | None) -> PlannedFile:
    """Lay out one file and the (coalesced) source ranges that fill it."""
    by_name = {t.name: t for t in tensors}
    specs = (TensorSpec(t.name, t.info.dtype, t.info.shape, t.info.nbytes) for t in by_name.values())
    header, placed = serialize_header(specs, metadata)
    ranges: list[ByteRange] = []
    for spec, offset in placed:
        source = by_name[spec.name]
        dest = len(header) + offset
        if spec.nbytes == 0:
            continue
        last = ranges[-1] if ranges else None
        if (
            last is not None
            and last.source == source.shard.path
            and last.source_offset + last.length == source.offset
            and last.dest_offset + last.length == dest
        ):
            ranges[-1] = ByteRange(last.source, last.source_offset, last.dest_offset, last.length + spec.nbytes)
        else:
            ranges.append(ByteRange(source.shard.path, source.offset, dest, spec.nbytes))
    data = sum(spec.nbytes for spec, _ in placed)
    return PlannedFile(name, header, tuple(ranges), tuple(s.name for s, _ in placed), len(header) + data)


def plan_merge(
    checkpoint: Checkpoint, file_name: str, copies: Sequence[FileCopy] = ()
) -> Plan:
    """Every tensor into one file called `file_name`."""
    metadata, warnings = merged_metadata(checkpoint)
    planned = plan_file(file_name, checkpoint.tensors.values(), metadata)
    return Plan((planned,), copies=tuple(copies), warnings=tuple(checkpoint.warnings) + tuple(warnings))


_DIGITS = re.compile(r"(\d+)")


def natural_key(name: str) -> list[object]:
    """`model.layers.2.x` before `model.layers.10.x`: digits compare as numbers."""
    return [int(part) if i % 2 else part for i, part in enumerate(_DIGITS.split(name))]


def group_into_shards(sizes: Sequence[tuple[str, int]], max_shard_size: int) -> list[list[str]]:
    """huggingface_hub's packing (`split_state_dict_into_shards_factory`), exactly.

    Tensors are taken in the given order and added to the current shard until the
    next one would tip it over `max_shard_size`; a tensor bigger than the limit gets
    a shard of its own, placed before the shard being filled.
    """
    shards: list[list[str]] = []
    current: list[str] = []
    current_size = 0
    for name, size in sizes:
        if size > max_shard_size:
            shards.append([name])
            continue
        if current_size + size > max_shard_size:
            shards.append(current)
            current, current_size = [], 0
        current.append(name)
        current_size += size
    if current:
        shards.append(current)
    return shards


def shard_file_names(prefix: str, count: int) -> list[str]:
    if count == 1:
        return [f"{prefix}.safetensors"]
    return [f"{prefix}-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def plan_split(
    checkpoint: Checkpoint, max_shard_size: int, prefix: str = "model", copies: Sequence[FileCopy] = ()
) -> Plan:
    """Shards of at most `max_shard_size` data bytes plus a Hugging Face index.

    Tensors are packed in natural name order, so the grouping depends only on the
    tensors, never on how the source happened to be sharded: splitting a merge of a
    split reproduces that split. One shard means `{prefix}.safetensors` and no index.
    """
    metadata, warnings = merged_metadata(checkpoint)
    order = sorted(checkpoint.tensors.values(), key=lambda t: natural_key(t.name))
    groups = group_into_shards([(t.name, t.info.nbytes) for t in order], max_shard_size)
    if not groups:
        groups = [[]]
    names = shard_file_names(prefix, len(groups))
    files = tuple(
        plan_file(name, (checkpoint.tensors[t] for t in group), metadata) for name, group in zip(names, groups)
    )
    index_name = index = None
    if len(files) > 1:
        index_name = f"{prefix}.safetensors.index.json"
        index_metadata = {k: v for k, v in checkpoint.index_metadata.items() if k != "total_size"}
        index_metadata["total_size"] = sum(f.data_bytes for f in files)
        weight_map = {t: f.name for f in files for t in f.tensors}
        index = {"metadata": index_metadata, "weight_map": dict(sorted(weight_map.items()))}
    return Plan(files, index_name, index, tuple(copies), tuple(checkpoint.warnings) + tuple(warnings))
