"""A checkpoint: which files hold which tensors, cross-checked before any write.

A checkpoint is a single `.safetensors` file, or shards plus an index whose
`weight_map` is the truth (transformers and diffusers load through it), or, with no
index, a complete `{prefix}-NNNNN-of-NNNNN.safetensors` set. :func:`open_checkpoint`
reads headers only and refuses anything a merge would silently get wrong: a shard
outside the folder, a tensor in two shards, a tensor the index does not list, a
weight file in the folder that no index covers.

The checkpoint may be local or remote (`s3://`, `http(s)://`): every question about
files goes through the location's small path API and every header is read through
:func:`shardkit.storage.read_header`, so the discovery rules and cross-checks below
are the same code for both.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from itertools import repeat
from operator import attrgetter, is_, itemgetter, lt, sub
from pathlib import Path
from typing import NamedTuple

from .. import storage
from ..errors import BadInputError, CheckpointError, MissingShardsError, PathNotFoundError, ShardkitError, option
from ..format import header_json
from ..format.gc_pause import gc_paused
from ..format.header import Header, TensorInfo, record_maker
from ..format.torch_checkpoint import TORCH_SUFFIXES, TorchHeader, View, is_torch_file, safetensors_name
from ..storage import Location
from . import index_json, layouts, variants
from .readability import check_folder_readable, file_problem
from .variants import WeightSet

INDEX_PATTERNS = ("*.safetensors.index.json", "*.safetensors.index.*.json")
SHARD_NAME = re.compile(r"^(?P<prefix>.+)-(?P<number>\d+)-of-(?P<total>\d+)\.safetensors$")
#: Pickles that are not torch's zip checkpoints: never read.
_PICKLE_SUFFIXES = (".ckpt", ".pkl", ".pickle")
#: pytorch_model.bin.index.json, pytorch_model.fp16.bin.index.json: the weight map of .bin shards.
TORCH_INDEX_PATTERNS = ("*.bin.index.json",)
#: torch files of a training folder that are not the model's weights.
_NOT_WEIGHTS = frozenset({"training_args.bin", "optimizer.pt", "scheduler.pt", "scaler.pt", "rng_state.pth"})
#: Files that hold weights in formats shardkit does not write: never an output's name.
FOREIGN_WEIGHT_SUFFIXES = (
    *TORCH_SUFFIXES, *_PICKLE_SUFFIXES, ".gguf", ".ggml", ".h5", ".msgpack", ".onnx", ".npz", ".ot",
)
#: Files that hold weights in some format (the one list): a model-folder output never
#: copies them, and a pipeline component holding only such files is refused.
WEIGHT_SUFFIXES = (".safetensors", *FOREIGN_WEIGHT_SUFFIXES)


class SourceTensor(NamedTuple):
    """A tensor and where its bytes are: `offset` is absolute in `shard.path`.
    (A named tuple: a checkpoint may hold a million.)"""

    info: TensorInfo
    shard: Header
    #: The name it has in `shard` when a selection renamed it (`info.name` is the output name).
    shard_name: str | None = None
    #: A tensor a recipe made by concatenating dim-0 ranges of others (`fuse`, a half
    #: swap): its bytes are these pieces' bytes, in order; `shard` is the first piece's.
    pieces: tuple[SourceTensor, ...] = ()

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def offset(self) -> int:
        return self.shard.data_start + self.info.begin

    def piece_spans(self, done: int, length: int) -> list[tuple[SourceTensor, int, int]]:
        """The (piece, start, length) ranges that bytes [done, done + length) of a
        composite tensor come from."""
        spans, start = [], 0
        for piece in self.pieces:
            lo, hi = max(done, start), min(done + length, start + piece.info.nbytes)
            if lo < hi:
                spans.append((piece, lo - start, hi - lo))
            start += piece.info.nbytes
        return spans

    @property
    def view(self) -> View | None:
        """How a strided tensor of a torch file lies in it; None when its bytes are one run."""
        return self.shard.views.get(self.shard_name or self.name) if isinstance(self.shard, TorchHeader) else None


@dataclass(frozen=True)
class Checkpoint:
    """Everything known about a checkpoint after reading headers only."""

    root: Location  # the folder, where config and tokenizer files live
    index_path: Location | None
    index_metadata: dict[str, object]
    shards: tuple[Header, ...]
    tensors: dict[str, SourceTensor]  # sorted by name
    warnings: tuple[str, ...] = ()
    #: Weight and index files of the folder, excluded when copying non-weight files.
    weight_files: frozenset[Location] = field(default_factory=frozenset)
    #: Facts about a well-known layout (which file loaders use), never a failure, even --strict.
    notes: tuple[str, ...] = ()

    @cached_property
    def total_bytes(self) -> int:
        return _data_bytes(self.tensors)

    @cached_property
    def parameters(self) -> int:
        shapes = Counter(map(_SHAPE, self.tensors.values()))  # a few dozen for a million tensors
        return sum(math.prod(shape) * count for shape, count in shapes.items())

    @property
    def source_files(self) -> tuple[Location, ...]:
        return tuple(storage.lookup(h.path) for h in self.shards)


@gc_paused()
def open_checkpoint(
    path: str | os.PathLike[str] | Location,
    *,
    strict: bool = False,
    allow_unindexed: bool = False,
    whole: bool = False,
) -> Checkpoint:
    """Discover, read and cross-check the checkpoint at `path` (file, folder or index;
    local, `s3://…`, `http(s)://…` or `hf://org/name`).

    A `path` that is one shard of a larger checkpoint is read alone, with a note saying
    which shard it is; with `whole` (merge, split: their output must never be a partial
    model) the whole checkpoint it belongs to is read instead, as `gguf-split --merge`
    does with a first shard, and a warning says so.
    """
    path = storage.as_path(path)
    if not path.exists():
        raise PathNotFoundError(path, layouts.missing_path(path))
    if path.is_file():
        if is_torch_file(path.name):
            return _single_file(path, strict)
        if path.name.endswith(".safetensors"):
            position = shard_position(path)
            if position is None:
                return _single_file(path, strict)
            if whole:
                if not (position.whole.is_file() or position.whole.is_dir()):
                    raise CheckpointError(
                        f"{path} is shard {position.number} of {position.total}, and a web server cannot list "
                        "its folder: pass the URL of its index .json"
                    )
                checkpoint = open_checkpoint(position.whole, strict=strict, allow_unindexed=allow_unindexed)
                taken = f"{path} is {position}: using the whole checkpoint, as gguf-split does with a first shard"
                return dataclasses.replace(checkpoint, warnings=(taken, *checkpoint.warnings))
            alone = _single_file(path, strict)
            note = f"{path.name} is {position}; pass that for the whole model"
            return dataclasses.replace(alone, notes=(note,))
        if path.name.endswith(".json"):
            return _indexed(path, strict, allow_unindexed)
        _refuse_non_safetensors(path)
    return _folder(path, strict, allow_unindexed)


def open_file(path: Location, *, strict: bool = False) -> Checkpoint:
    """One safetensors file whatever its name (a staged output under its temporary name)."""
    return _single_file(path, strict)


def _refuse_non_safetensors(path: Location) -> None:
    if path.name.endswith(_PICKLE_SUFFIXES):
        raise BadInputError(f"{path}: pickle-based weight files are refused; shardkit never unpickles")
    raise BadInputError(f"{path}: not a .safetensors or torch .bin/.pt/.pth file, an index .json or a folder")


def _folder(root: Location, strict: bool, allow_unindexed: bool) -> Checkpoint:
    if isinstance(root, Path):
        check_folder_readable(root)
    default = _default_variant(root, strict)
    if default is not None:
        return default
    indexes = find_indexes(root)
    if len(indexes) > 1:
        names = ", ".join(p.name for p in indexes)
        raise CheckpointError(f"{root}: several indexes ({names}); pass the one to use as SOURCE")
    if indexes:
        index = indexes[0]
        single = root / single_file_name_for(index.name)
        if single.is_file():
            checkpoint = _single_file(single, strict)
            note = (
                f"{root}: both {single.name} and {index.name} are present; using {single.name} "
                "as transformers does, the index and its shards are ignored"
            )
            checkpoint = dataclasses.replace(checkpoint, notes=(note,))
            return _with_folder_checks(checkpoint, indexes, allow_unindexed, [])
        return _indexed(index, strict, allow_unindexed)

    files = sorted(p for p in root.glob("*.safetensors") if p.is_file())
    if not files:
        return _torch_folder(root, strict, allow_unindexed)
    if len(files) == 1:
        return _single_file(files[0], strict)
    return _with_folder_checks(_shard_set(root, files, strict), [], allow_unindexed, [])


def open_weight_set(weight_set: WeightSet, *, strict: bool = False) -> Checkpoint:
    """One variant of a folder's weights as a checkpoint. The folder's other weight
    files are other variants (or strays the caller deals with), not files this one is
    missing, so the warnings about them are dropped."""
    checkpoint = open_checkpoint(weight_set.entry, strict=strict, allow_unindexed=True)
    others = tuple(f"{p}: " for p in checkpoint.root.glob("*.safetensors") if p not in weight_set.files)
    warnings = tuple(w for w in checkpoint.warnings if not (others and w.startswith(others)))
    return dataclasses.replace(checkpoint, warnings=warnings)


def _default_variant(folder: Location, strict: bool) -> Checkpoint | None:
    """A folder holding one set of weights in several variants (a diffusers component,
    `model.safetensors` beside `model.fp16.safetensors`) opens as its default weights,
    as `from_pretrained` without `variant=` loads them, and a warning names the others.
    None for any other folder: the rules below apply."""
    if not isinstance(folder, Path):  # every name question would be a request
        return None
    try:
        sets, stray = variants.weight_sets(folder.name, folder)
    except CheckpointError:
        return None
    defaults = [s for s in sets if s.variant is None]
    if stray or len(sets) < 2 or len(defaults) != 1:
        return None
    others = ", ".join(f"{s.variant} ({s.entry.name})" for s in sets if s.variant is not None)
    note = (
        f"{folder}: holds the default weights and the variant(s) {others}; using the default, as from_pretrained "
        "does without variant=; pass a variant's index or file as SOURCE to use it"
    )
    checkpoint = open_weight_set(defaults[0], strict=strict)
    return dataclasses.replace(checkpoint, warnings=(note, *checkpoint.warnings))


def _torch_folder(root: Location, strict: bool, allow_unindexed: bool) -> Checkpoint:
    """A folder without safetensors: its `pytorch_model.bin.index.json`, else its one
    torch weight file (`pytorch_model.bin` first), as transformers would load it."""
    indexes = sorted({p for pattern in TORCH_INDEX_PATTERNS for p in root.glob(pattern) if p.is_file()})
    if len(indexes) > 1:
        raise CheckpointError(f"{root}: several indexes ({', '.join(p.name for p in indexes)}); pass the one to use")
    if indexes:
        return _indexed(indexes[0], strict, allow_unindexed)
    found = torch_weight_files(root)
    preferred = [p for p in found if p.name == "pytorch_model.bin"]
    if preferred or len(found) == 1:
        return _single_file((preferred or found)[0], strict)
    if found:
        raise CheckpointError(
            f"{root}: several torch files and no index ({', '.join(p.name for p in found)}); pass the one to use"
        )
    raise CheckpointError(layouts.no_weights(root))


def torch_weight_files(root: Location) -> list[Location]:
    """The folder's torch `.bin`/`.pt`/`.pth` files that may be weights (not training state)."""
    return sorted(
        p for suffix in TORCH_SUFFIXES for p in root.glob(f"*{suffix}") if p.is_file() and p.name not in _NOT_WEIGHTS
    )


def find_indexes(root: Location) -> list[Location]:
    """Index files of a folder (`model.safetensors.index.json`, variants such as `.fp16`)."""
    found = {p for pattern in INDEX_PATTERNS for p in root.glob(pattern) if p.is_file()}
    return sorted(found)


def single_file_name_for(index_name: str) -> str:
    """`model.safetensors.index.json` → `model.safetensors`; variant `.index.fp16.json`
    → `model.fp16.safetensors` (transformers' `_add_variant`)."""
    if ".safetensors.index" not in index_name and ".bin.index" in index_name:
        return safetensors_name(index_name.partition(".bin.index")[0] + ".bin")
    prefix, _, rest = index_name.partition(".safetensors.index")
    variant = rest[: -len(".json")].strip(".")
    return f"{prefix}.{variant}.safetensors" if variant else f"{prefix}.safetensors"


_NAME, _INFO, _BEGIN, _END = attrgetter("name"), attrgetter("info"), attrgetter("begin"), attrgetter("end")
_SOURCE_NAME, _SHAPE, _SHARD = attrgetter("info.name"), attrgetter("info.shape"), attrgetter("shard")
_KEY, _VALUE = itemgetter(0), itemgetter(1)
_make_source = record_maker(SourceTensor)
#: The fields after (info, shard) as a plain tensor of a shard has them; built from the
#: defaults, so a field added to SourceTensor cannot be left out of the fast construction.
_PLAIN_SOURCE_FIELDS = tuple(SourceTensor._field_defaults[f] for f in SourceTensor._fields[2:])


def _plain_sources(header: Header) -> Iterator[tuple[object, ...]]:
    """The field tuples of the tensors of one shard, for `_make_source`."""
    return zip(header.tensors, repeat(header), *map(repeat, _PLAIN_SOURCE_FIELDS))


def _sorted_sources(headers: Iterable[Header]) -> list[SourceTensor]:
    """Every tensor of `headers` as a SourceTensor, in name order: sorted as one list,
    not as a dict and then a sorted dict of its items (a MoE index has 500,000)."""
    sources: list[SourceTensor] = []
    for header in headers:
        sources.extend(map(_make_source, _plain_sources(header)))
    sources.sort(key=_SOURCE_NAME)
    return sources


def _sources_by_name(headers: Iterable[Header]) -> dict[str, SourceTensor]:
    """:func:`_sorted_sources` by name, for headers whose names are known to be distinct."""
    sources = _sorted_sources(headers)
    return dict(zip(map(_SOURCE_NAME, sources), sources))


def _data_bytes(tensors: dict[str, SourceTensor]) -> int:
    """Bytes of the tensors' data, summed by map (a Python step per tensor showed at MoE scale)."""
    infos = list(map(_INFO, tensors.values()))
    return sum(map(sub, map(_END, infos), map(_BEGIN, infos)))


def _single_file(path: Location, strict: bool) -> Checkpoint:
    header = storage.read_header(path, strict=strict)
    return Checkpoint(
        root=path.parent,
        index_path=None,
        index_metadata={},
        shards=(header,),
        tensors=_sources_by_name((header,)),
        weight_files=frozenset({path}),
    )


def _shard_set(root: Location, files: list[Location], strict: bool) -> Checkpoint:
    """Shards without an index: accepted only as one complete `-of-` set."""
    matches = [SHARD_NAME.match(p.name) for p in files]
    groups = {(m.group("prefix"), int(m.group("total"))) for m in matches if m}
    if None in matches or len(groups) != 1:
        names = ", ".join(p.name for p in files)
        raise CheckpointError(
            f"{root}: several .safetensors files and no index ({names}); "
            "pass a single file, or add the model.safetensors.index.json that ties them together"
        )
    (prefix, total), = groups
    numbers = sorted(int(m.group("number")) for m in matches if m)
    missing = sorted(set(range(1, total + 1)) - set(numbers))
    if missing or len(numbers) != total:
        raise CheckpointError(
            f"{root}: shard set {prefix}-*-of-{total:05d} is incomplete: missing "
            + ", ".join(f"{prefix}-{n:05d}-of-{total:05d}.safetensors" for n in missing)
        )
    headers = tuple(storage.read_header(p, strict=strict) for p in files)
    tensors: dict[str, SourceTensor] = {}
    for header in headers:
        for info in header.tensors:
            if info.name in tensors:
                other = Path(tensors[info.name].shard.path).name
                raise CheckpointError(
                    f"{root}: tensor {info.name!r} is in two shards: {other} and {Path(header.path).name}"
                )
            tensors[info.name] = SourceTensor(info, header)
    return Checkpoint(
        root=root,
        index_path=None,
        index_metadata={},
        shards=headers,
        tensors=dict(sorted(tensors.items())),
        weight_files=frozenset(files),
    )


def _indexed(index_path: Location, strict: bool, allow_unindexed: bool) -> Checkpoint:
    root = index_path.parent
    index = read_index(index_path)
    headers = _indexed_shards(index_path, index, strict)
    sources = _sorted_sources(headers.values())
    names = list(map(_SOURCE_NAME, sources))
    if not _shards_match_index(headers, sources, names, index):
        _refuse_mismatch(index_path, headers, index.weight_map)
    metadata = index.metadata
    del index  # its 500,000 names (a MoE index) go before the tensors' dict is built
    tensors = dict(zip(names, sources))
    warnings = []
    total_bytes = _data_bytes(tensors)
    declared = metadata.get("total_size")
    if declared is not None and declared != total_bytes:
        warnings.append(
            f"{index_path}: metadata.total_size is {declared} but the tensors hold {total_bytes} bytes"
        )
    checkpoint = Checkpoint(
        root=root,
        index_path=index_path,
        index_metadata=metadata,
        shards=tuple(headers.values()),
        tensors=tensors,
        weight_files=frozenset({index_path, *(root / name for name in headers)}),
    )
    return _with_folder_checks(checkpoint, find_indexes(root), allow_unindexed, warnings)


def _indexed_shards(index_path: Location, index: Index, strict: bool) -> dict[str, Header]:
    """The header of every shard the index names, by name."""
    root = index_path.parent
    # One path object per shard: a remote one remembers its stat, so each shard costs one request.
    shard_paths = {name: root / name for name in sorted(set(index.shards))}
    missing = [name for name, shard_path in shard_paths.items() if not shard_path.exists()]
    if missing:
        raise MissingShardsError(index_path, missing, len(shard_paths))
    headers: dict[str, Header] = {}
    for shard_name, shard_path in shard_paths.items():
        if not shard_path.is_file():
            raise CheckpointError(f"{index_path}: shard {shard_name} is not a regular file")
        headers[shard_name] = storage.read_header(shard_path, strict=strict)
    return headers


def _shards_match_index(
    headers: dict[str, Header], sources: list[SourceTensor], names: list[str], index: Index
) -> bool:
    """Each shard holds exactly the tensors weight_map gives it, or those and its tied
    duplicates (:func:`tied_duplicates`): then no tensor is missing, unlisted or in two
    shards. `sources` are the shards' tensors in name order, `names` theirs.

    When weight_map lists only what the shards hold (no tied duplicates), both sides
    are in name order and this compares lists: as many tensors, the same names, each
    in the shard weight_map gives, without a lookup per tensor (a MoE index lists
    hundreds of thousands). Otherwise it compares one set per shard."""
    if len(sources) == len(index.tensors) and names == index.tensors:
        holders = map(headers.__getitem__, index.shards)
        if all(map(is_, map(_SHARD, sources), holders)):
            return True
    by_shard: dict[str, list[str]] = {}
    for tensor, shard_name in zip(index.tensors, index.shards):
        by_shard.setdefault(shard_name, []).append(tensor)
    for shard_name, header in headers.items():
        held = {info.name for info in header.tensors}
        listed = by_shard[shard_name]
        if len(held) == len(listed) and held.issuperset(listed):
            continue
        extra = set(listed) - held
        if len(listed) - len(extra) != len(held) or not extra <= tied_duplicates(header):
            return False
    return True


def tied_duplicates(header: Header) -> frozenset[str]:
    """Names a shard does not hold because they share a tensor it holds: those a torch
    file's reader dropped, and those a safetensors file's metadata records as
    `dropped: kept` with `kept` among its tensors, as the Hub converter (convert.py)
    writes them. Indexes list them: transformers 4 wrote both tied names into a `.bin`
    index, and convert.py keeps them when it renames that index."""
    if isinstance(header, TorchHeader):
        return frozenset(header.dropped)
    metadata = header.metadata or {}
    return frozenset(
        name for name, kept in metadata.items() if kept in header.by_name and name not in header.by_name
    )


def _refuse_mismatch(index_path: Location, headers: dict[str, Header], weight_map: dict[str, str]) -> None:
    """Name the first disagreement between the index and the shards."""
    seen: set[str] = set()
    for shard_name, header in headers.items():
        for info in header.tensors:
            listed_in = weight_map.get(info.name)
            if listed_in is None:
                raise CheckpointError(
                    f"{index_path}: tensor {info.name!r} is in {shard_name} but not in weight_map"
                )
            if listed_in != shard_name:
                raise CheckpointError(
                    f"{index_path}: tensor {info.name!r} is in {shard_name} and in {listed_in} "
                    f"(weight_map names {listed_in})"
                    if info.name in headers[listed_in].by_name
                    else f"{index_path}: tensor {info.name!r} is in {shard_name} but weight_map names {listed_in}"
                )
            seen.add(info.name)
    tied = {shard_name: tied_duplicates(header) for shard_name, header in headers.items()}
    for tensor, shard_name in weight_map.items():
        if tensor not in seen and tensor not in tied[shard_name]:
            raise CheckpointError(
                f"{index_path}: tensor {tensor!r} is listed in weight_map for {shard_name} but that shard lacks it"
            )
    raise AssertionError("unreachable: the shards disagree with the index somewhere")


class Index(NamedTuple):
    """An index as read: its metadata, and its weight_map as two lists in tensor-name
    order (the names, each once, and the shard file each is in: one string per shard
    file, where JSON gives each entry its own copy, 40 MB for a MoE index)."""

    metadata: dict[str, object]
    tensors: list[str]
    shards: list[str]

    @property
    def weight_map(self) -> dict[str, str]:
        return dict(zip(self.tensors, self.shards))


def read_index(index_path: Location, *, check_names: bool = True) -> Index:
    """An index read strictly (serde_json's grammar, no repeated key, every value of the
    right type): the one reader of a weight index. Without `check_names`, shard names
    that are not plain file names in the folder are kept for the caller to judge."""
    try:
        document = index_json.loads(index_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, header_json.JsonSyntaxError) as exc:
        raise CheckpointError(f"{index_path}: not a valid JSON index: {exc}") from None
    if not isinstance(document, header_json.Pairs):
        raise CheckpointError(f"{index_path}: index is not a JSON object")
    top = _unique(document, index_path, "index")
    raw_map = top.get("weight_map")
    if raw_map is None and ".index" not in index_path.name:
        raise CheckpointError(layouts.not_an_index(index_path))
    if not isinstance(raw_map, header_json.Pairs):
        raise CheckpointError(f"{index_path}: index has no weight_map object")
    entries = _in_name_order(raw_map, index_path)
    if check_names:
        _check_shard_names(raw_map, index_path)
    raw_metadata = top.get("metadata", header_json.Pairs())
    if not isinstance(raw_metadata, header_json.Pairs):
        raise CheckpointError(f"{index_path}: index metadata is not an object")
    metadata = {k: _plain(v) for k, v in _unique(raw_metadata, index_path, "metadata").items()}
    shards = list(map(_VALUE, entries))
    shared: dict[str, str] = {}
    return Index(metadata, list(map(_KEY, entries)), list(map(shared.setdefault, shards, shards)))


def _in_name_order(pairs: header_json.Pairs, index_path: Location) -> list[tuple[str, object]]:
    """weight_map's entries in tensor-name order, refusing a name listed twice.
    save_pretrained writes them in that order: then they are checked, not sorted."""
    names = list(map(_KEY, pairs))
    if all(map(lt, names, names[1:])):
        return pairs
    entries = sorted(pairs, key=_KEY)
    names = list(map(_KEY, entries))
    if not all(map(lt, names, names[1:])):
        _unique(pairs, index_path, "weight_map")  # names the first repeated
    return entries


def _check_shard_names(weight_map: header_json.Pairs, index_path: Location) -> None:
    """Every weight_map value names a shard inside the folder. A MoE index names the
    same few shards hundreds of thousands of times: each distinct name is checked once,
    and only when one is bad are the entries walked, to name the first that uses it."""
    try:
        distinct = set(map(_VALUE, weight_map))
    except TypeError:  # a list or object among the values
        distinct = None
    if distinct is not None:
        try:
            for shard_name in distinct:
                check_shard_name(shard_name, index_path, "")
            return
        except CheckpointError:
            pass
    for tensor, shard_name in weight_map:
        check_shard_name(shard_name, index_path, tensor)


def _unique(pairs: header_json.Pairs, index_path: Location, what: str) -> dict[str, object]:
    result = dict(pairs)
    if len(result) == len(pairs):
        return result
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            raise CheckpointError(f"{index_path}: {what} lists {key!r} twice")
        seen.add(key)
    raise AssertionError("unreachable: fewer keys than pairs means a key repeats")


def _plain(value: object) -> object:
    """Pairs → dict, JsonFloat → float: index metadata kept as ordinary JSON values."""
    if isinstance(value, header_json.Pairs):
        return {k: _plain(v) for k, v in value}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, header_json.JsonFloat):
        return float(value)
    return value


def check_shard_name(shard_name: object, index_path: Location, tensor: str) -> None:
    """A weight_map value must name a `.safetensors` file inside the index's folder."""
    where = f"{index_path}: weight_map entry {tensor!r}"
    if not isinstance(shard_name, str) or not shard_name:
        raise CheckpointError(f"{where} must be a file name, got {shard_name!r}")
    if "\0" in shard_name:
        raise CheckpointError(f"{where} names a file with a NUL byte")
    if "\\" in shard_name or re.match(r"^[A-Za-z]:", shard_name):
        raise CheckpointError(f"{where} names {shard_name!r}: Windows paths are refused")
    if shard_name.startswith("/"):
        raise CheckpointError(f"{where} names absolute path {shard_name!r}: shards must be inside the folder")
    if ".." in shard_name.split("/"):
        raise CheckpointError(f"{where} names {shard_name!r}, which escapes the folder")
    if shard_name.endswith(_PICKLE_SUFFIXES):
        raise CheckpointError(
            f"{where} names {shard_name!r}, a pickle-based file: refused, shardkit never unpickles"
        )
    if not shard_name.endswith(".safetensors") and not is_torch_file(shard_name):
        raise CheckpointError(f"{where} names {shard_name!r}, which is not a .safetensors or torch .bin file")


def _with_folder_checks(
    checkpoint: Checkpoint, indexes: Iterable[Location], allow_unindexed: bool, warnings: list[str]
) -> Checkpoint:
    """Refuse (or, if allowed, warn about) weight files of the folder no index covers:
    a merge would silently drop their tensors."""
    covered = set(checkpoint.weight_files)
    for index in indexes:
        covered.add(index)
        if index == checkpoint.index_path:
            continue  # read already; its shards are among the weight files
        try:
            other = read_index(index)
        except CheckpointError:
            continue
        covered.update(checkpoint.root / name for name in set(other.shards))
    stray = sorted(p for p in checkpoint.root.glob("*.safetensors") if p.is_file() and p not in covered)
    notes = list(checkpoint.notes)
    for path in stray:
        note = layouts.sibling_note(path, _loaded(checkpoint))
        if note is not None:
            notes.append(note)
            covered.add(path)
            continue
        message = f"{path}: this weight file is not part of the checkpoint ({_describe(path)})"
        if not allow_unindexed:
            raise CheckpointError(message + f"; merging would drop it (pass {option('allow_unindexed')} to ignore it)")
        warnings.append(message + "; ignored")
    return Checkpoint(
        root=checkpoint.root,
        index_path=checkpoint.index_path,
        index_metadata=checkpoint.index_metadata,
        shards=checkpoint.shards,
        tensors=checkpoint.tensors,
        warnings=tuple(warnings) + checkpoint.warnings,
        weight_files=frozenset(covered),
        notes=tuple(notes),
    )


def _loaded(checkpoint: Checkpoint) -> str:
    if checkpoint.index_path is not None:
        return f"the {len(checkpoint.shards)} shards of {checkpoint.index_path.name}"
    return ", ".join(Path(h.path).name for h in checkpoint.shards)


@dataclass(frozen=True)
class ShardPosition:
    """Where one file sits in the checkpoint it belongs to (`whole`: its index or folder)."""

    number: int
    total: int
    whole: Location

    def __str__(self) -> str:
        return f"shard {self.number} of {self.total} of the checkpoint {self.whole}"


def _indexes_beside(path: Location) -> list[Location]:
    """The indexes in `path`'s folder; where none is listed (a web server lists nothing),
    the one named after the shard's prefix, if it exists."""
    try:
        found = find_indexes(path.parent)
    except ShardkitError:
        found = []
    if found:
        return found
    match = SHARD_NAME.match(path.name)
    if match is None:
        return []
    index = path.parent / f"{match.group('prefix')}.safetensors.index.json"
    try:
        return [index] if index.is_file() else []
    except (ShardkitError, OSError):
        return []


def shard_position(path: Location) -> ShardPosition | None:
    """Which shard of a larger checkpoint `path` is: an index beside it lists it among
    other files, or, with no index, its name says `-NNNNN-of-NNNNN` with more than one.
    None for a file that is a whole checkpoint by itself."""
    for index in _indexes_beside(path):
        try:
            listed = sorted(set(read_index(index).shards))
        except CheckpointError:
            continue
        if path.name in listed:
            return ShardPosition(listed.index(path.name) + 1, len(listed), index) if len(listed) > 1 else None
    match = SHARD_NAME.match(path.name)
    if match and int(match.group("total")) > 1:
        return ShardPosition(int(match.group("number")), int(match.group("total")), path.parent)
    return None


def _describe(path: Location) -> str:
    try:
        names = [t.name for t in storage.read_header(path).tensors]
    except (ShardkitError, OSError) as exc:
        return f"unreadable: {exc}"
    shown = ", ".join(names[:3]) + (f", … {len(names) - 3} more" if len(names) > 3 else "")
    return f"{len(names)} tensors: {shown}"


def companion_files(checkpoint: Checkpoint, exclude: Location | None = None) -> list[tuple[Location, str]]:
    """Non-weight files of the checkpoint's folder (config, generation config, tokenizer,
    chat template, README, LICENSE, ...) as (path, relative name).

    Weight files of any format, indexes, hidden entries, shardkit's temporaries and
    `exclude` (an output placed inside the source folder) are left out, and so are
    subfolders: a loader reads the folder's own files, and a subfolder (an earlier
    `resharded/` output, Llama's `original/`) is another checkpoint, not part of this one.
    Checksum manifests are still among them (:func:`shardkit.checkpoint.manifest.companions` leaves
    out those that name weight files).
    A file that cannot be read (a dangling or looping symlink, no permission) is an
    error: a "ready-to-load" output without it would not load.
    """
    found, broken = _companions(checkpoint, exclude)
    if broken:
        path, problem = broken[0]
        also = f" (also unreadable: {', '.join(str(p) for p, _ in broken[1:])})" if len(broken) > 1 else ""
        raise CheckpointError(f"{path}: the output needs this file, but it {problem}{also}")
    return found


def broken_companions(checkpoint: Checkpoint) -> list[tuple[Location, str]]:
    """Companion files that cannot be read (a dangling or looping symlink, no read
    permission), each with what is wrong with it."""
    return _companions(checkpoint, None)[1]


def _companions(
    checkpoint: Checkpoint, exclude: Location | None
) -> tuple[list[tuple[Location, str]], list[tuple[Location, str]]]:
    root = checkpoint.root
    if checkpoint.index_path is None and len(checkpoint.shards) == 1 and not (root / "config.json").is_file():
        # A lone file in e.g. ~/Downloads: its neighbours are not a model's files.
        return [], []
    excluded = exclude.resolve() if exclude is not None else None
    found: list[tuple[Location, str]] = []
    broken: list[tuple[Location, str]] = []
    if isinstance(root, Path):
        check_folder_readable(root)  # else its files would silently be missing
    for path, relative in storage.walk_files(root, exclude=excluded):
        name = path.name
        if (
            "/" in relative
            or name.endswith(WEIGHT_SUFFIXES)
            or path in checkpoint.weight_files
            or ".safetensors.index" in name
            or name.endswith(".bin.index.json")
        ):
            continue
        # A file that cannot be read is not silently left out of a "ready-to-load" output.
        problem = file_problem(path) if isinstance(path, Path) else None
        if problem is not None:
            broken.append((path, problem))
        elif path.is_file() and (excluded is None or path.resolve() != excluded):
            found.append((path, relative))
    return found, broken
