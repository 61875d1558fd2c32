"""A diffusers pipeline: `model_index.json` and one folder per component.

diffusers saves a pipeline as a folder whose `model_index.json` names its components
(`"unet": ["diffusers", "UNet2DConditionModel"]`, `[null, null]` for an absent one).
Each component with weights (`unet/`, `vae/`, `text_encoder/`, `text_encoder_2/`,
`transformer/` ...) is a checkpoint of its own, with its own config and its own
shards or index, and may hold the same weights more than once as variants: the
default `diffusion_pytorch_model.safetensors` beside `diffusion_pytorch_model.fp16.safetensors`
(sharded: `diffusion_pytorch_model.fp16-00001-of-00002.safetensors` and
`diffusion_pytorch_model.safetensors.index.fp16.json`), chosen by `variant="fp16"` when
loading. Each (component, variant) is therefore one :class:`WeightSet`, opened as an
ordinary checkpoint. Components without weights (scheduler, tokenizer, feature
extractor) and the pipeline's own top-level files are copied as they are.

Only names are looked at here, no header is read: opening a weight set is
:func:`open_weight_set`, and the commands decide what to do with each.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path

from . import storage
from .checkpoint import WEIGHT_SUFFIXES, Checkpoint, find_indexes, open_checkpoint, single_file_name_for
from .errors import CheckpointError
from .storage import Location

MODEL_INDEX = "model_index.json"
#: The weight names the loaders look for: diffusers' models, then transformers'.
LOADER_PREFIXES = ("diffusion_pytorch_model", "model")
#: `prefix[.variant][-00001-of-00002].safetensors`, as diffusers and transformers name weights.
_WEIGHT_FILE = re.compile(
    r"^(?P<prefix>[^.]+?)(?:\.(?P<variant>[^.]+?))?(?:-(?P<number>\d+)-of-(?P<total>\d+))?\.safetensors$"
)
#: `prefix.safetensors.index[.variant].json`.
_INDEX_FILE = re.compile(r"^(?P<prefix>[^.]+)\.safetensors\.index(?:\.(?P<variant>[^.]+))?\.json$")


@dataclass(frozen=True)
class WeightSet:
    """One component's weights in one variant: what a loader opens with `variant=`."""

    component: str  # the folder, relative to the pipeline root: "unet"
    variant: str | None  # "fp16", or None for the default weights
    prefix: str  # "diffusion_pytorch_model" (diffusers) or "model" (transformers)
    entry: Location  # the index, or the single file
    files: tuple[Location, ...]  # every weight and index file of this set

    @property
    def label(self) -> str:
        """How reports name it: `unet`, `unet (fp16)`."""
        return self.component if self.variant is None else f"{self.component} ({self.variant})"


@dataclass(frozen=True)
class Pipeline:
    root: Location
    weight_sets: tuple[WeightSet, ...]
    #: Files copied as they are (path, name relative to the root): model_index.json,
    #: top-level README/LICENSE, and every file of the components without weights.
    copies: tuple[tuple[Location, str], ...]
    warnings: tuple[str, ...] = ()

    @property
    def components(self) -> list[str]:
        return sorted({s.component for s in self.weight_sets})

    def find(self, component: str, variant: str | None) -> WeightSet | None:
        return next((s for s in self.weight_sets if (s.component, s.variant) == (component, variant)), None)


def is_pipeline(path: Location) -> bool:
    """A local folder with `model_index.json` (remote folders are not asked: every
    question is a request, and a remote pipeline is not supported)."""
    return isinstance(path, Path) and path.is_dir() and (path / MODEL_INDEX).is_file()


def find_pipeline(path: Location, *, allow_unindexed: bool = False) -> Pipeline | None:
    """The pipeline at `path`, or None when `path` is not a pipeline's root folder
    (a component folder, a file or an ordinary checkpoint)."""
    if not is_pipeline(path):
        return None
    index = path / MODEL_INDEX
    sets: list[WeightSet] = []
    copies: list[tuple[Location, str]] = [(index, MODEL_INDEX)]
    warnings: list[str] = []
    for component in _components(index):
        folder = path / component
        if not folder.is_dir():
            raise CheckpointError(f"{index}: names component {component!r}, but there is no {component}/ folder")
        found, stray = _weight_sets(component, folder)
        for file in stray:
            message = f"{file}: not a weight file diffusers would load (its name fits no variant of {component})"
            if not allow_unindexed:
                raise CheckpointError(message + "; pass --allow-unindexed to ignore it")
            warnings.append(message + "; ignored")
        if found:
            sets += found
            continue
        _refuse_foreign_weights(folder, component)
        copies += ((file, f"{component}/{relative}") for file, relative in storage.walk_files(folder))
    for file, relative in storage.walk_files(path):
        if "/" in relative or relative == MODEL_INDEX:
            continue
        if relative.endswith(WEIGHT_SUFFIXES):
            warnings.append(f"{file}: not part of the pipeline (model_index.json names no such component); left alone")
        else:
            copies.append((file, relative))
    if not sets:
        raise CheckpointError(f"{path}: a diffusers pipeline (model_index.json) whose components hold no .safetensors")
    return Pipeline(path, tuple(sets), tuple(copies), tuple(warnings))


def _components(index: Location) -> list[str]:
    """Component names of `model_index.json`: keys whose value is `[library, class]`."""
    try:
        document = json.loads(index.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{index}: not valid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise CheckpointError(f"{index}: not a JSON object")
    names = []
    for key, value in document.items():
        if key.startswith("_") or not isinstance(value, list) or len(value) != 2 or value[1] is None:
            continue
        if not isinstance(key, str) or not key or key.startswith(".") or any(c in key for c in "/\\\0"):
            raise CheckpointError(f"{index}: component name {key!r} is not a plain folder name")
        names.append(key)
    return sorted(names)


def _weight_sets(component: str, folder: Location) -> tuple[list[WeightSet], list[Location]]:
    """The folder's weight sets by (prefix, variant), and the .safetensors files that fit none."""
    groups: dict[tuple[str, str | None], list[Location]] = {}
    stray = []
    for file in sorted(p for p in folder.glob("*.safetensors") if p.is_file()):
        match = _WEIGHT_FILE.match(file.name)
        if match is None:
            stray.append(file)
            continue
        groups.setdefault((match.group("prefix"), match.group("variant")), []).append(file)
    indexes = {}
    for index in find_indexes(folder):
        match = _INDEX_FILE.match(index.name)
        if match is not None:
            indexes[(match.group("prefix"), match.group("variant"))] = index
            groups.setdefault((match.group("prefix"), match.group("variant")), [])
    prefixes = {prefix for prefix, _ in groups}
    loaders = prefixes & set(LOADER_PREFIXES)
    if len(loaders) == 1 and len(prefixes) > 1:  # `unet-ema.safetensors` beside the loader's files
        stray += [f for (prefix, _), files in groups.items() if prefix not in loaders for f in files]
        groups = {key: files for key, files in groups.items() if key[0] in loaders}
        prefixes = loaders
    if len(prefixes) > 1:
        raise CheckpointError(
            f"{folder}: weights under several names ({', '.join(sorted(prefixes))}); a loader reads one, "
            f"keep only its files (diffusers: diffusion_pytorch_model, transformers: model)"
        )
    sets = []
    for (prefix, variant), files in sorted(groups.items(), key=lambda item: (item[0][1] or "", item[0][0])):
        index = indexes.get((prefix, variant))
        single = folder / single_file_name_for(index.name) if index is not None else None
        if index is not None and not (single is not None and single.is_file()):
            entry = index
        elif len(files) == 1:
            entry = files[0]
        else:
            names = ", ".join(f.name for f in files)
            raise CheckpointError(f"{folder}: shards without their index ({names}); add the index that lists them")
        members = tuple(files) + ((index,) if index is not None else ())
        sets.append(WeightSet(component, variant, prefix, entry, members))
    return sets, sorted(stray)


def _refuse_foreign_weights(folder: Location, component: str) -> None:
    """A component whose weights exist only as .bin (pickle) or another format."""
    foreign = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
    if foreign:
        raise CheckpointError(
            f"{folder}: component {component!r} holds {', '.join(foreign)} and no .safetensors; shardkit reads "
            "safetensors only and never unpickles (save it again with safe_serialization=True)"
        )


def open_weight_set(weight_set: WeightSet, *, strict: bool = False) -> Checkpoint:
    """Open one weight set as a checkpoint. The other files of its folder are other
    variants (or strays :func:`find_pipeline` reported already), not files this
    checkpoint is missing, so the warnings about them are dropped."""
    checkpoint = open_checkpoint(weight_set.entry, strict=strict, allow_unindexed=True)
    others = [f"{p}: " for p in checkpoint.root.glob("*.safetensors") if p not in weight_set.files]
    warnings = tuple(w for w in checkpoint.warnings if not w.startswith(tuple(others)))
    return dataclasses.replace(checkpoint, warnings=warnings)


def open_default_variant(folder: Location, *, strict: bool = False) -> Checkpoint | None:
    """A folder whose weights are one set in several variants (a pipeline component,
    or `model.safetensors` beside `model.fp16.safetensors`) opens as its default
    weights, as `from_pretrained` without `variant=` loads them; the other variants are
    named in a warning. None for any other folder: the ordinary rules apply."""
    if not isinstance(folder, Path):
        return None
    try:
        sets, stray = _weight_sets(folder.name, folder)
    except CheckpointError:
        return None
    defaults = [s for s in sets if s.variant is None]
    if stray or len(sets) < 2 or len(defaults) != 1:
        return None
    checkpoint = open_weight_set(defaults[0], strict=strict)
    others = ", ".join(f"{s.variant} ({s.entry.name})" for s in sets if s.variant is not None)
    note = (
        f"{folder}: holds the default weights and the variant(s) {others}; using the default, as from_pretrained "
        "does without variant=; pass a variant's index or file as SOURCE to use it"
    )
    return dataclasses.replace(checkpoint, warnings=(note, *checkpoint.warnings))
