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

Only names are looked at here (the variant rules are :mod:`shardkit.checkpoint.variants`), no
header is read: opening a weight set is :func:`shardkit.checkpoint.shards.open_weight_set`,
and the commands decide what to do with each.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .. import storage
from ..errors import CheckpointError, option
from ..storage import Location
from .readability import check_folder_readable
from .shards import WEIGHT_SUFFIXES
from .variants import WeightSet, weight_sets

MODEL_INDEX = "model_index.json"


@dataclass(frozen=True)
class Pipeline:
    root: Path  # pipelines are local folders
    weight_sets: tuple[WeightSet, ...]
    #: Files copied as they are (path, name relative to the root): model_index.json,
    #: top-level README/LICENSE, and every file of the components without weights.
    copies: tuple[tuple[Path, str], ...]
    warnings: tuple[str, ...] = ()

    @property
    def components(self) -> list[str]:
        return sorted({s.component for s in self.weight_sets})

    def find(self, component: str, variant: str | None) -> WeightSet | None:
        return next((s for s in self.weight_sets if (s.component, s.variant) == (component, variant)), None)


def is_pipeline(path: object) -> bool:
    """A local folder with `model_index.json` (remote folders are not asked: every
    question is a request, and a remote pipeline is not supported)."""
    if not (isinstance(path, Path) and path.is_dir()):
        return False
    check_folder_readable(path)  # else the question below fails with "model_index.json: Permission denied"
    return (path / MODEL_INDEX).is_file()


def find_pipeline(path: object, *, allow_unindexed: bool = False) -> Pipeline | None:
    """The pipeline at `path`, or None when `path` is not a pipeline's root folder
    (a component folder, a file or an ordinary checkpoint)."""
    if not isinstance(path, Path) or not is_pipeline(path):
        return None
    index = path / MODEL_INDEX
    sets: list[WeightSet] = []
    copies: list[tuple[Path, str]] = [(index, MODEL_INDEX)]
    warnings: list[str] = []
    for component in _components(index):
        folder = path / component
        if not folder.is_dir():
            raise CheckpointError(f"{index}: names component {component!r}, but there is no {component}/ folder")
        found, stray = weight_sets(component, folder)
        for file in stray:
            message = f"{file}: not a weight file diffusers would load (its name fits no variant of {component})"
            if not allow_unindexed:
                raise CheckpointError(message + f"; pass {option('allow_unindexed')} to ignore it")
            warnings.append(message + "; ignored")
        if found:
            sets += found
            continue
        _refuse_foreign_weights(folder, component)
        copies += ((Path(str(file)), f"{component}/{relative}") for file, relative in storage.walk_files(folder))
    for file, relative in storage.walk_files(path):
        if "/" in relative or relative == MODEL_INDEX:
            continue
        if relative.endswith(WEIGHT_SUFFIXES):
            warnings.append(f"{file}: not part of the pipeline (model_index.json names no such component); left alone")
        else:
            copies.append((Path(str(file)), relative))
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


def _refuse_foreign_weights(folder: Location, component: str) -> None:
    """A component whose weights exist only as .bin (pickle) or another format."""
    foreign = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
    if foreign:
        raise CheckpointError(
            f"{folder}: component {component!r} holds {', '.join(foreign)} and no .safetensors; shardkit reads "
            "safetensors only and never unpickles (save it again with safe_serialization=True)"
        )
