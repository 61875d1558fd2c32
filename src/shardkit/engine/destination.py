"""Where an output may go, and what `--force` may delete there.

Two rules, checked before the first byte is written:

- An output never touches a source. It may not be a source file (shard, index,
  companion file), the source folder, lie inside the source folder, or contain any of
  them. Sources and outputs are compared by identity (device and inode), not by path:
  a shard reached through a symlink (the Hugging Face cache links `snapshots/<rev>/`
  to `blobs/`), a symlinked folder alias or a bind mount of the source folder is the
  same file or folder, whatever the path says. The folder of a single-file source is
  not a source folder: `split model.safetensors -o sharded/` writes beside it.
- `--force` deletes only what shardkit would have written itself: an old output of
  a previous run (weight files, indexes, companion files, checksum files). A folder
  holding anything else (subfolders, other files: `optimizer.pt`, `.git/`, notes) is
  refused, naming those entries, so a mistyped `-o` cannot delete a user's work.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import OutputError, OutputExistsError, option_name
from . import atomic

if TYPE_CHECKING:
    from ..storage import Location

Identity = tuple[int, int]

#: Non-weight files a model folder written by shardkit usually holds (copied from a
#: source: what save_pretrained and the tokenizers write). Any other name must be one
#: this run writes itself before --force may replace it.
COMPANION_NAMES = frozenset({
    "config.json", "generation_config.json", "model_index.json", "scheduler_config.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
    "chat_template.json", "chat_template.jinja", "preprocessor_config.json", "processor_config.json",
    "video_preprocessor_config.json", "adapter_config.json", "quantize_config.json", "params.json",
    "README.md", "LICENSE", "LICENSE.md", "LICENSE.txt", "NOTICE", "USE_POLICY.md",
})
#: How many unexpected entries a refusal names before it says "and N more".
_NAMED = 5


@dataclass(frozen=True)
class Sources:
    """What a run reads, and so must never overwrite, delete or write into.

    `files` are the shards (as named: a cache symlink protects both itself and its
    blob), the index and the companion files; `folder` is the source folder, when the
    source was given as a folder or an index (None for a single file). Locations are
    local paths, or `s3://` ones, which the S3 executor compares by bucket and key.
    """

    files: tuple[Location, ...] = ()
    folder: Location | None = None
    _ids: dict[str, Identity | None] = field(default_factory=dict, compare=False, repr=False)

    def identity(self, path: Location) -> Identity | None:
        """(st_dev, st_ino) of what the local `path` names, following symlinks; None if it
        is not there (or is remote)."""
        if not isinstance(path, Path):
            return None
        key = os.fspath(path)
        if key not in self._ids:
            try:
                st = os.stat(path)
            except (OSError, ValueError):
                self._ids[key] = None
            else:
                self._ids[key] = (st.st_dev, st.st_ino)
        return self._ids[key]

    def folders_above(self, path: Location) -> set[Identity]:
        """Identities of every folder holding the local `path`, by its own path and by its
        resolved one."""
        found: set[Identity] = set()
        if not isinstance(path, Path):
            return found
        for folder in _ancestors(path):
            ident = self.identity(folder)
            if ident is not None:
                found.add(ident)
        return found


def _ancestors(path: Path) -> Iterator[Path]:
    yield from Path(os.path.abspath(path)).parents
    yield from Path(os.path.realpath(path)).parents


def check_destination(
    dest: Path, sources: Sources, *, force: bool, as_folder: bool, writes: Collection[str] = ()
) -> None:
    """Refuse an output that would touch a source, or that exists (unless forced and
    holding only what shardkit writes). `writes` are the names this run writes inside a
    folder output (relative paths)."""
    check_name_fits(dest)
    check_not_a_source(dest, sources)
    if dest.is_symlink() or dest.exists():
        if as_folder and dest.is_dir() and not dest.is_symlink() and not any(dest.iterdir()):
            return
        refuse_existing(dest, force=force, exists=True)
        if as_folder != (dest.is_dir() and not dest.is_symlink()):
            kind = "a folder" if dest.is_dir() else "a file"
            raise OutputError(f"{dest}: already exists and is {kind}; refusing to replace it with the other kind")
        if as_folder:
            check_only_shardkit_files(dest, writes)
    if not dest.parent.is_dir():
        raise OutputError(f"{dest}: parent folder {dest.parent} does not exist")


def refuse_existing(dest: Location, *, force: bool, exists: bool | None = None) -> None:
    """The one `--force` rule for what is there already: an existing output (local or
    remote, a dangling symlink included) is replaced only when forced. `exists` is what
    the caller found already (asking a store again costs requests)."""
    if force:
        return
    if exists if exists is not None else (dest.is_symlink() or dest.exists()):
        raise OutputExistsError(dest)


def check_name_fits(path: Path, what: str = "output") -> None:
    """A name longer than the filesystem allows fails at the first write; say so up front."""
    length, limit = len(os.fsencode(path.name)), atomic.name_max(path.parent)
    if length > limit:
        raise OutputError(
            f"{path}: the {what} name is {length} bytes, longer than the filesystem allows ({limit}); "
            "choose a shorter name"
        )


def check_not_a_source(dest: Path, sources: Sources) -> None:
    """The output is no source file or folder, is not inside the source folder, and holds none."""
    folder_id = sources.identity(sources.folder) if sources.folder is not None else None
    dest_id = sources.identity(dest)
    if dest_id is not None:
        if dest_id == folder_id:
            raise OutputError(
                f"{dest}: output is the source folder {sources.folder}; it would overwrite the source; "
                "choose another path"
            )
        for source in sources.files:
            if sources.identity(source) == dest_id:
                raise OutputError(f"{dest}: output would overwrite the source {source}; choose another path")
    if folder_id is not None and folder_id in sources.folders_above(dest):
        raise OutputError(
            f"{dest}: output lies inside the source folder {sources.folder}; write it outside that folder"
        )
    if dest_id is not None and dest.is_dir():
        protected: Iterable[Location] = (*((sources.folder,) if sources.folder is not None else ()), *sources.files)
        for source in protected:
            if dest_id in sources.folders_above(source):
                raise OutputError(
                    f"{dest}: output would overwrite the source: it contains {source}; choose another path"
                )


def check_only_shardkit_files(folder: Path, writes: Collection[str]) -> None:
    """Refuse to replace `folder` if it holds anything shardkit would not have written."""
    refuse_unexpected(folder, unexpected_entries(folder, writes))


def refuse_unexpected(folder: object, unexpected: list[str]) -> None:
    """The refusal of --force on a folder holding `unexpected` entries, naming them."""
    if unexpected:
        more = len(unexpected) - _NAMED
        named = ", ".join(unexpected[:_NAMED]) + (f" and {more} more" if more > 0 else "")
        raise OutputError(
            f"{folder}: {option_name('force')} replaces only an earlier output (weight, index, config, tokenizer and "
            f"checksum files), but the folder also holds {named}; move those away or choose another output"
        )


def unexpected_entries(folder: Path, writes: Collection[str]) -> list[str]:
    """Entries of a local `folder` that are no part of a checkpoint shardkit writes (see
    :func:`unexpected_names`); a subfolder shardkit does not write is named, not walked."""
    folders = written_folders(writes)
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        base = Path(dirpath).relative_to(folder).as_posix()
        prefix = "" if base == "." else base + "/"
        keep = []
        for name in dirnames:
            if prefix + name in folders and not (Path(dirpath) / name).is_symlink():
                keep.append(name)
            else:
                found.append(prefix + name + "/")
        dirnames[:] = keep
        found += (prefix + name for name in filenames if not is_replaceable(prefix + name, writes))
    return sorted(found)


def unexpected_names(names: Iterable[str], writes: Collection[str]) -> list[str]:
    """Which of `names` (files relative to an old output folder, e.g. the keys under an
    S3 prefix) are no part of a checkpoint shardkit writes: sorted, a subfolder
    shardkit does not write named once with a trailing `/`."""
    folders = written_folders(writes)
    found = set()
    for name in names:
        parts = name.split("/")
        outside = next(("/".join(parts[: end + 1]) for end in range(len(parts) - 1)
                        if "/".join(parts[: end + 1]) not in folders), None)
        if outside is not None:
            found.add(outside + "/")
        elif not is_replaceable(name, writes):
            found.add(name)
    return sorted(found)


def is_replaceable(relative: str, writes: Collection[str]) -> bool:
    """Whether the file `relative` (inside an old output folder, at its top or in a
    subfolder this run writes, such as a pipeline's `unet/`) is something shardkit
    writes: a name this run writes, or a weight, index, checksum or usual companion file."""
    if relative in writes:
        return True
    if any(part.startswith(".") for part in relative.split("/")):
        return False
    name = relative.rsplit("/", 1)[-1]
    return (
        name.endswith(".safetensors")
        or (".safetensors.index" in name and name.endswith(".json"))
        or name == "SHA256SUMS"
        or name.endswith(".sha256")
        or name in COMPANION_NAMES
    )


def written_folders(writes: Collection[str]) -> set[str]:
    """The subfolders (relative) that the names a run writes live in."""
    folders: set[str] = set()
    for name in writes:
        parts = name.split("/")[:-1]
        folders.update("/".join(parts[: end + 1]) for end in range(len(parts)))
    return folders
