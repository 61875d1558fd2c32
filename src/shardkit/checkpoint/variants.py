"""Variants: the same weights saved more than once in one folder, told apart by name.

transformers and diffusers save `variant="fp16"` weights beside the default ones as
`prefix.fp16.safetensors` (sharded: `prefix.fp16-00001-of-00002.safetensors` with
`prefix.safetensors.index.fp16.json`), where the default is `prefix.safetensors` (or
`prefix-00001-of-00002.safetensors` with `prefix.safetensors.index.json`); `from_pretrained`
picks one by its `variant=`. A diffusers pipeline's components are saved so, and so
are some model folders. This module reads names only, no header: which files form
which :class:`WeightSet`, and which fit none.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import CheckpointError
from ..storage import Location

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


def weight_sets(component: str, folder: Location) -> tuple[list[WeightSet], list[Location]]:
    """The folder's weight sets by (prefix, variant), and the .safetensors files that fit none."""
    groups: dict[tuple[str, str | None], list[Location]] = {}
    stray = []
    for file in sorted(p for p in folder.glob("*.safetensors") if p.is_file()):
        match = _WEIGHT_FILE.match(file.name)
        if match is None:
            stray.append(file)
            continue
        groups.setdefault((match.group("prefix"), match.group("variant")), []).append(file)
    indexes: dict[tuple[str, str | None], Location] = {}
    for index in sorted(p for p in folder.glob("*.safetensors.index*.json") if p.is_file()):
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
        listed_by = indexes.get((prefix, variant))
        single = folder / (f"{prefix}.{variant}.safetensors" if variant else f"{prefix}.safetensors")
        entry: Location
        if listed_by is not None and not single.is_file():  # the single file wins, as in transformers
            entry = listed_by
        elif len(files) == 1:
            entry = files[0]
        else:
            names = ", ".join(f.name for f in files)
            raise CheckpointError(f"{folder}: shards without their index ({names}); add the index that lists them")
        members = tuple(files) + ((listed_by,) if listed_by is not None else ())
        sets.append(WeightSet(component, variant, prefix, entry, members))
    return sets, sorted(stray)
