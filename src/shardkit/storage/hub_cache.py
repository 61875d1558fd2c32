"""Hugging Face cache snapshots: each file is a symlink to a blob named by its hash.

`huggingface_hub` stores `models--org--name/blobs/<hash>` once and links every
revision's `snapshots/<rev>/<file>` to it (`../../blobs/<hash>`). For Git LFS files
(every weight file) the hash is the SHA-256 of the content, so the cache carries a
checksum of every downloaded shard for free. Small files stored in git proper are
named by their 40-hex git blob id instead and are left alone here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

_SHA256_NAME = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class HubBlob:
    """A snapshot file and the SHA-256 its blob's name promises."""

    path: Path  # the file as the user sees it, in snapshots/<rev>/
    blob: Path  # where the bytes are, in blobs/
    sha256: str


def hub_blob(path: Path) -> HubBlob | None:
    """The blob behind `path` if it is an LFS file of a Hugging Face cache snapshot."""
    if not path.is_symlink():
        return None
    revision = _revision_folder(path)
    if revision is None:
        return None
    blob = path.resolve()
    blobs = (revision.parent.parent / "blobs").resolve()
    if blob.parent != blobs or not _SHA256_NAME.match(blob.name):
        return None
    return HubBlob(path, blob, blob.name)


def _revision_folder(path: Path) -> Path | None:
    """`…/snapshots/<rev>` containing `path` (files may sit in subfolders of the revision;
    the snapshot may be reached through a symlinked folder)."""
    real = path.parent.resolve()
    for folder in (real, *real.parents):
        if folder.parent.name == "snapshots":
            return folder
    return None


def repo_id(path: Path) -> str | None:
    """`org/name` of the cache folder `models--org--name` that holds `path`, if any:
    what to pass to `hf download` to fetch a broken file again."""
    for folder in path.parents:
        if folder.name.startswith("models--") and (folder / "snapshots").is_dir():
            return folder.name[len("models--") :].replace("--", "/")
    return None
