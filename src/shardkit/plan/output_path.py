"""What `-o` may say: name templates, and the rules an output path must obey.

The merge guides advise naming a merged file after the model, a version and a date
(`qwen2_5_7b_instruct_v20261201.safetensors`), so the output accepts placeholders:

- `{name}`: the source folder's name (`Qwen2.5-7B-Instruct`; for `hf://org/name` the
  repository's name, not the cache's snapshot hash);
- `{slug}`: that name lower-cased, every run of characters other than letters and
  digits turned into `_`, with none at either end (`qwen2_5_7b_instruct`);
- `{date}`: today in UTC as `YYYYMMDD`; `SOURCE_DATE_EPOCH` (the reproducible-builds
  convention) fixes it;
- `{dtype}`: the output's dominant dtype by bytes, lower-case (`bf16`).

`{{` and `}}` stand for literal braces, as in Python's format strings. A placeholder
not in that list is an error before anything is read: a typo must not become a file
named `{slgu}.safetensors`.

The path rules: an output ending in another weight format's extension (`out.bin`,
`.gguf`, ...) is refused, since anything not ending in `.safetensors` is written as a
folder and `out.bin/` would surprise everyone; missing parent folders are created, as
`save_pretrained` creates them, and removed again if the run fails.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
import string
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from ..checkpoint.shards import FOREIGN_WEIGHT_SUFFIXES
from ..errors import BadInputError, OutputError
from ..format.header import tensor_nbytes

if TYPE_CHECKING:
    from ..checkpoint.shards import Checkpoint
    from ..storage import Location
    from .conversion import DtypeChoice

PLACEHOLDERS = ("name", "slug", "date", "dtype")
#: Loader-given file names: a file called so is named after its folder, not itself.
_GENERIC_STEMS = ("model", "diffusion_pytorch_model", "consolidated", "adapter_model", "pytorch_model")
_SHARD = re.compile(r"-\d+-of-\d+$")


def placeholders(template: str) -> list[str]:
    """The placeholders `template` uses; a BadInputError for any it cannot expand."""
    try:
        fields = [(name, spec, conversion) for _, name, spec, conversion in string.Formatter().parse(template)]
    except ValueError as exc:
        raise BadInputError(f"output {template!r}: not a valid name template ({exc}); write {{{{ for a brace") from None
    used = []
    for name, spec, conversion in fields:
        if name is None:
            continue
        if name not in PLACEHOLDERS:
            known = ", ".join(f"{{{p}}}" for p in PLACEHOLDERS)
            raise BadInputError(f"output {template!r}: unknown placeholder {{{name}}}; the known ones are {known}")
        if spec or conversion:
            raise BadInputError(f"output {template!r}: placeholder {{{name}}} takes no format or conversion")
        used.append(name)
    return used


def expand(template: str, *, source: str | os.PathLike[str], tensors: Iterable[tuple[str, int]] = ()) -> str:
    """`template` with its placeholders filled in for `source` and the output's tensors."""
    used = placeholders(template)
    if not used:
        return template.replace("{{", "{").replace("}}", "}")
    name = source_name(source)
    values = {"name": name, "slug": slug(name), "date": _today(), "dtype": ""}
    if "dtype" in used:
        values["dtype"] = dominant_dtype(tensors, template)
    for placeholder in ("name", "slug"):
        if placeholder in used and not values[placeholder]:
            raise BadInputError(f"output {template!r}: {{{placeholder}}} is empty for source {source}")
    if "name" in used and not is_plain_name(name):
        # A URL's last segment may be `..` or `.`: `out/{name}/` would leave `out/`.
        raise BadInputError(
            f"output {template!r}: {{name}} of source {source} is {name!r}, not a folder name; "
            "write the output name instead"
        )
    return template.format(**values)


def resolve(
    output: str | os.PathLike[str],
    *,
    source: str | os.PathLike[str],
    tensors: Iterable[tuple[str, int]],
    endpoint_url: str | None = None,
) -> Location:
    """The location an output argument names: template expanded, suffix checked."""
    from .. import storage

    expanded = expand(os.fspath(output), source=source, tensors=tensors)
    check_suffix(expanded)
    return storage.as_path(expanded, endpoint_url=endpoint_url, output=True)


def source_name(source: str | os.PathLike[str]) -> str:
    """The model's name as `{name}` gives it: the source folder's name, the repository's
    for `hf://`, and a file's own name only when it is not a loader-given one."""
    text = os.fspath(source)
    if text.startswith("hf://"):
        from ..storage.hf import parse_hf

        return parse_hf(text)[0].split("/")[-1]
    if "://" in text:
        parts = [p for p in text.split("?")[0].split("://", 1)[1].split("/") if p]
    else:
        parts = list(Path(os.path.abspath(text)).parts)
    if len(parts) > 1 and parts[-1].endswith((".safetensors", ".json")):
        stem = parts[-1].removesuffix(".safetensors")
        if not (parts[-1].endswith(".json") or _SHARD.search(stem) or stem.split(".")[0] in _GENERIC_STEMS):
            return stem
        parts.pop()
    return parts[-1] if parts else ""


def is_plain_name(name: str) -> bool:
    """Whether `name` names one entry in a folder: not `.`, `..`, the root or a path."""
    return name not in ("", ".", "..") and "/" not in name and "\0" not in name


def slug(name: str) -> str:
    """`Qwen2.5-7B-Instruct` → `qwen2_5_7b_instruct`."""
    return re.sub(r"[^0-9a-z]+", "_", name.lower()).strip("_")


def output_dtypes(checkpoint: Checkpoint, converted: DtypeChoice | None = None) -> Iterator[tuple[str, int]]:
    """(dtype, bytes) of every tensor as written: after a `--dtype` conversion, if any."""
    for tensor in checkpoint.tensors.values():
        dtype = converted(tensor) if converted is not None else tensor.info.dtype
        yield dtype, tensor_nbytes(dtype, tensor.info.shape) if dtype != tensor.info.dtype else tensor.info.nbytes


def dominant_dtype(tensors: Iterable[tuple[str, int]], template: str = "") -> str:
    """The dtype holding the most bytes (ties: the name first in order), lower-case."""
    by_dtype: dict[str, int] = {}
    for dtype, nbytes in tensors:
        by_dtype[dtype] = by_dtype.get(dtype, 0) + nbytes
    if not by_dtype:
        raise BadInputError(f"output {template!r}: {{dtype}} needs tensors, and the checkpoint has none")
    return min(by_dtype, key=lambda dtype: (-by_dtype[dtype], dtype)).lower()


def _today() -> str:
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if epoch:
        try:
            moment = datetime.datetime.fromtimestamp(int(epoch), datetime.timezone.utc)
        except (ValueError, OverflowError, OSError):
            raise BadInputError(f"SOURCE_DATE_EPOCH={epoch!r}: not a number of seconds since 1970") from None
    else:
        moment = datetime.datetime.now(datetime.timezone.utc)
    return moment.strftime("%Y%m%d")


def check_suffix(output: str | os.PathLike[str]) -> None:
    """Refuse `-o out.bin` and the like: such a name would silently become a folder."""
    name = os.fspath(output).rstrip("/").rsplit("/", 1)[-1]
    suffix = next((s for s in FOREIGN_WEIGHT_SUFFIXES if name.lower().endswith(s)), None)
    if suffix is not None:
        raise OutputError(
            f"{output}: shardkit writes safetensors, not {suffix}; name a file ending in .safetensors, "
            "or a folder without an extension"
        )


@contextlib.contextmanager
def parents_created(output: object, *, enabled: bool = True) -> Iterator[None]:
    """Create the missing parent folders of a local `output` for the run inside, and
    remove the ones created here if that run fails, so a refusal leaves nothing behind."""
    if not enabled or not isinstance(output, Path):
        yield
        return
    missing = []
    parent = output.absolute().parent
    while not parent.exists() and parent != parent.parent:
        missing.append(parent)
        parent = parent.parent
    created: list[Path] = []  # only these are ours to remove: a folder another process made is not
    for folder in reversed(missing):
        try:
            folder.mkdir()
        except FileExistsError:
            continue  # made by someone else meanwhile
        except OSError as exc:
            _remove_empty(created[::-1])
            raise OutputError(f"{output}: cannot create the parent folder {folder}: {exc.strerror}") from None
        created.append(folder)
    try:
        yield
    except BaseException:
        _remove_empty(created[::-1])
        raise


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:  # deepest first
        with contextlib.suppress(OSError):
            folder.rmdir()
