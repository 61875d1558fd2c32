"""What to tell a user whose path is not the checkpoint they meant.

The first things people pass are a shard instead of its folder, `config.json`, a file
name that the folder does not have, a folder of `.bin` or `.gguf` files, a diffusers
pipeline's root. Each gets one line naming what is actually there and what to pass
instead. The well-known sibling layouts (Mistral's `consolidated.safetensors` beside
the Hugging Face shards) get a note naming the file loaders use. Nothing here
decides what a checkpoint is; :mod:`shardkit.checkpoint.shards` does, and asks this module
for the words.
"""

from __future__ import annotations

from ..storage import Location

#: Names shown before "… N more" when a folder holds many files.
SHOWN = 3

_PICKLE_HINT = (
    "pickle files shardkit does not read (it reads safetensors and zip-format torch files, and never unpickles); "
    "where you trust their origin, re-save them with torch >= 1.6 or convert them with transformers"
)
_OTHER_FORMATS = {
    ".bin": _PICKLE_HINT,
    ".pt": _PICKLE_HINT,
    ".pth": _PICKLE_HINT,
    ".ckpt": _PICKLE_HINT,
    ".pkl": _PICKLE_HINT,
    ".gguf": "GGUF files (llama.cpp's format): merge or split them with llama.cpp's gguf-split",
    ".h5": "TensorFlow weights: shardkit reads only safetensors; convert them with transformers first",
    ".msgpack": "Flax weights: shardkit reads only safetensors; convert them with transformers first",
    ".onnx": "an ONNX model: shardkit reads only safetensors",
}
#: Mistral's own single-file format, published beside the Hugging Face shards.
MISTRAL_NAMES = ("consolidated.safetensors",)


def names(items: list[str], shown: int = SHOWN) -> str:
    """`a, b, c, … 47 more`: a few names of a long list, and how many were left out."""
    head = ", ".join(items[:shown])
    return head + (f", … {len(items) - shown} more" if len(items) > shown else "")


def contents(root: Location) -> str:
    """The model files of a folder in a few words: its indexes, its safetensors files
    (a shard set as first … last), its config."""
    try:
        files = sorted(p.name for p in root.iterdir() if p.is_file() and not p.name.startswith("."))
    except OSError:
        return "cannot be listed"
    indexes = [n for n in files if ".safetensors.index" in n]
    weights = [n for n in files if n.endswith(".safetensors")]
    parts = list(indexes)
    if len(weights) > 2:
        parts.append(f"{len(weights)} .safetensors files ({weights[0]} … {weights[-1]})")
    else:
        parts += weights
    parts += [n for n in files if n.endswith(tuple(_OTHER_FORMATS))][:SHOWN]
    parts += [n for n in ("config.json", "model_index.json") if n in files]
    return ", ".join(parts) if parts else "no model file"


def missing_path(path: Location) -> str:
    """`no such file or folder` plus, when `path`'s folder is a checkpoint, what is there
    (the caller puts the path in front)."""
    message = "no such file or folder"
    parent = path.parent
    try:
        is_model = parent.is_dir() and any(
            p.name.endswith(".safetensors") or ".safetensors.index" in p.name for p in parent.iterdir()
        )
    except OSError:
        is_model = False
    if is_model:
        message += f"; its folder holds {contents(parent)}: pass the folder {parent}"
    return message


def no_weights(root: Location) -> str:
    """A folder without safetensors weights: a diffusers pipeline root, other formats, or nothing."""
    pipeline = root / "model_index.json"
    if pipeline.is_file():
        components = sorted(f"{d.name}/" for d in root.iterdir() if d.is_dir() and any(d.glob("*.safetensors")))
        if components:
            return (
                f"{root}: a diffusers pipeline (model_index.json); its weights are in the components "
                f"{names(components, 6)}: pass one of them, e.g. {root / components[0].rstrip('/')}"
            )
    found: dict[str, list[str]] = {}
    entries: list[Location] = list(root.glob("*"))
    for path in sorted(entries, key=lambda p: p.name):
        suffix = next((s for s in _OTHER_FORMATS if path.name.endswith(s)), None)
        if suffix is not None and path.is_file():
            found.setdefault(_OTHER_FORMATS[suffix], []).append(path.name)
    if found:
        described = "; ".join(f"found {names(files)}: {hint}" for hint, files in found.items())
        return f"{root}: no .safetensors weights; {described}"
    return f"{root}: no .safetensors file, no torch .bin/.pt/.pth file and no index found ({contents(root)})"


def not_an_index(path: Location) -> str:
    """A .json that has no weight_map: config, tokenizer config, a pipeline's model_index.json."""
    folder = path.parent
    if path.name == "model_index.json":
        return no_weights(folder) if not any(folder.glob("*.safetensors")) else f"{path}: not a safetensors index"
    what = {
        "config.json": "the model's config",
        "generation_config.json": "the generation config",
        "tokenizer_config.json": "the tokenizer's config",
        "tokenizer.json": "the tokenizer",
    }.get(path.name, "JSON without a weight_map")
    return f"{path}: {what}, not a checkpoint; its folder holds {contents(folder)}: pass the folder {folder}"


def sibling_note(stray: Location, loaded: str) -> str | None:
    """A note for a weight file of a well-known layout that no index covers, or None
    when it is just stray. `loaded` names what transformers loads from the folder."""
    if stray.name in MISTRAL_NAMES:
        return (
            f"{stray}: Mistral's own single-file format (for mistral-inference and vLLM's mistral loader); "
            f"transformers loads {loaded}, and so does shardkit"
        )
    return None
