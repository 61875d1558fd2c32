"""`hf://org/name[@revision][/subfolder]`: a Hugging Face Hub repository, read file by file.

Online, one `model_info` call (huggingface_hub's own API) pins the revision to a commit
and lists the files with their sizes. Headers are then read with ranged GETs of each
file's resolve URL, exactly as for any `http(s)://` file (every answer checked, the
access token kept off the CDN a redirect leads to), so `inspect` of a 15 GB model costs
a few requests and about 64 KiB per shard. A merge or split streams the tensor bytes
it copies the same way, and fetches the small files it copies (config, tokenizer …)
with `hf_hub_download`, which leaves them in the cache. Nothing else is downloaded:
no pickle weights, no other variant, no file the command does not read. A file already
in the local cache at that commit is read from there.

Offline (`HF_HUB_OFFLINE=1`), or when the Hub cannot be reached, the repository is the
cache snapshot `snapshot_download(local_files_only=True)` names: a plain local folder,
so `verify` also checks each shard against the SHA-256 its blob is named by.

Files at a commit never change, so the version of a file is its LFS SHA-256 (or git
blob id) from the listing; the CDN's own answers are still held to the first one seen.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from ..errors import BadInputError, MissingExtraError, TransportError
from .http import HttpPath, HttpReader
from .location import LocalReader
from .remote import RemotePath, RemoteStat

#: Weight formats a safetensors tool has no use for: never downloaded.
IGNORED = ["*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.pickle", "*.h5", "*.msgpack", "*.onnx", "*.gguf", "*.ot"]


def parse_hf(text: str) -> tuple[str, str | None, str]:
    """`hf://org/name@rev/sub/dir` → ("org/name", "rev", "sub/dir")."""
    spec = text[len("hf://") :].strip("/")
    parts = spec.split("/")
    if len(parts) < 2 or not parts[0] or not parts[1]:
        raise BadInputError(f"{text}: a Hub path is hf://org/name, hf://org/name@revision or hf://org/name/subfolder")
    name, _, revision = parts[1].partition("@")
    # Offline the subfolder is joined to the cache snapshot's path: `..` would leave it
    # (and the repository) for any folder on the machine.
    if any(part in (".", "..") for part in (parts[0], name, revision, *parts[2:])):
        raise BadInputError(f"{text}: '.' and '..' are not names in a Hub path; name the repository's folder itself")
    return f"{parts[0]}/{name}", revision or None, "/".join(parts[2:])


def _hub() -> Any:
    try:
        import huggingface_hub
        import huggingface_hub.constants
        import huggingface_hub.errors
        import huggingface_hub.utils
    except ImportError:
        raise MissingExtraError("hf:// paths", "hub") from None
    return huggingface_hub


def resolve_hf(text: str) -> RemotePath | Path:
    """The repository (or its subfolder) `text` names: a Hub location online, the cache
    snapshot offline or when the Hub cannot be reached."""
    repo_id, revision, subfolder = parse_hf(text)
    hub = _hub()
    if not hub.constants.HF_HUB_OFFLINE:
        try:
            info = hub.HfApi().model_info(repo_id, revision=revision, files_metadata=True)
        except Exception as exc:  # noqa: BLE001 - huggingface_hub's and httpx's failures, translated below
            if not _unreachable(exc):
                raise hub_error(text, exc, revision) from None
        else:
            files = {s.rfilename: _stat_of(s) for s in info.siblings or []}
            repo = HubRepo(repo_id, revision, info.sha, files)
            return HfPath(repo, subfolder.strip("/"))
    return _cached_snapshot(text, repo_id, revision, subfolder)


def _cached_snapshot(text: str, repo_id: str, revision: str | None, subfolder: str) -> Path:
    hub = _hub()
    try:
        folder = hub.snapshot_download(repo_id, revision=revision, local_files_only=True, ignore_patterns=IGNORED)
    except hub.errors.LocalEntryNotFoundError:
        where = " and HF_HUB_OFFLINE is set" if hub.constants.HF_HUB_OFFLINE else " and the Hub cannot be reached"
        raise BadInputError(
            f"{text}: not in the local Hugging Face cache ({hub.constants.HF_HUB_CACHE}){where}"
        ) from None
    except Exception as exc:  # noqa: BLE001 - e.g. an incomplete cached snapshot
        raise hub_error(text, exc, revision) from None
    return Path(folder) / subfolder if subfolder else Path(folder)


def _unreachable(exc: Exception) -> bool:
    """A connection failure (no network, Hub down): the cache may still answer."""
    # By name: huggingface_hub speaks through httpx or requests depending on its version.
    kinds = {kind.__name__ for kind in type(exc).__mro__}
    connection = {"ConnectError", "ConnectionError", "TimeoutException", "Timeout"}
    return bool(kinds & connection) and "ProxyError" not in kinds


def hub_error(what: str, exc: Exception, revision: str | None = None) -> BadInputError | TransportError:
    """huggingface_hub's exception as one line naming `what`."""
    errors = _hub().errors
    if isinstance(exc, errors.RevisionNotFoundError):
        return BadInputError(f"{what}: revision {revision!r} not found on the Hub")
    if isinstance(exc, (errors.RepositoryNotFoundError, errors.GatedRepoError)):
        return BadInputError(f"{what}: repository not found, or gated and no access token given (HF_TOKEN)")
    if isinstance(exc, errors.RemoteEntryNotFoundError):
        return BadInputError(f"{what}: no such file in the repository")
    if isinstance(exc, errors.HfHubHTTPError):
        status = getattr(getattr(exc, "response", None), "status_code", None)
        return BadInputError(f"{what}: the Hub refused the request (HTTP {status})")
    if _unreachable(exc):
        return TransportError(f"{what}: cannot reach the Hub ({type(exc).__name__})")
    return BadInputError(f"{what}: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}")


def _stat_of(sibling: Any) -> RemoteStat:
    """A listed file's size and immutable version: the LFS SHA-256, else the git blob id."""
    if sibling.lfs is not None:
        return RemoteStat(sibling.lfs.size, sibling.lfs.sha256)
    return RemoteStat(sibling.size or 0, sibling.blob_id)


@dataclass
class HubRepo:
    """One repository at one commit: its file listing and the web files opened so far
    (one `HttpPath` per file, so every reader of a file checks the same first answer)."""

    repo_id: str
    revision: str | None  # as typed, for display
    commit: str
    files: dict[str, RemoteStat]
    _web: dict[str, HttpPath] = field(default_factory=dict)

    def display(self, path: str) -> str:
        at = f"@{self.revision}" if self.revision else ""
        return f"hf://{self.repo_id}{at}" + (f"/{path}" if path else "")

    def web(self, path: str) -> HttpPath:
        if path not in self._web:
            hub = _hub()
            url = hub.hf_hub_url(self.repo_id, path, revision=self.commit)
            self._web[path] = HttpPath(url, headers=hub.utils.build_hf_headers(), label=self.display(path))
        return self._web[path]

    def cached(self, path: str) -> str | None:
        """The local cache's copy of `path` at this commit, if there is one."""
        found = _hub().try_to_load_from_cache(self.repo_id, path, revision=self.commit)
        return found if isinstance(found, str) else None


class HfPath(RemotePath):
    """A file or folder of a Hub repository at one commit."""

    def __init__(self, repo: HubRepo, path: str) -> None:
        self.repo = repo
        self.path = path
        self.url = repo.display(path)

    @property
    def store_key(self) -> object:
        return ("hf", self.repo.repo_id, self.repo.commit)

    def _child(self, name: str) -> HfPath:
        return HfPath(self.repo, f"{self.path}/{name}" if self.path else name)

    def _parent(self) -> HfPath:
        return HfPath(self.repo, self.path.rpartition("/")[0])

    @property
    def name(self) -> str:
        return PurePosixPath(self.path).name or self.repo.repo_id.rpartition("/")[2]

    def file_stat(self) -> RemoteStat | None:
        return self.repo.files.get(self.path)

    def is_dir(self) -> bool:
        prefix = f"{self.path}/" if self.path else ""
        return any(name.startswith(prefix) for name in self.repo.files)

    def _under(self) -> Iterator[tuple[str, str]]:
        prefix = f"{self.path}/" if self.path else ""
        for name in sorted(self.repo.files):
            if name.startswith(prefix):
                yield name, name[len(prefix) :]

    def _list(self) -> list[RemotePath]:
        return [HfPath(self.repo, name) for name, relative in self._under() if "/" not in relative]

    def walk_files(self) -> Iterator[tuple[RemotePath, str]]:
        for name, relative in self._under():
            if not any(part.startswith(".") for part in relative.split("/")):
                yield HfPath(self.repo, name), relative

    def read_bytes(self) -> bytes:
        """A small file (config, tokenizer, index), through `hf_hub_download` and the cache."""
        hub = _hub()
        try:
            local = hub.hf_hub_download(self.repo.repo_id, self.path, revision=self.repo.commit)
        except Exception as exc:  # noqa: BLE001
            raise hub_error(str(self), exc, self.repo.revision) from None
        return Path(local).read_bytes()

    def open_reader(self) -> CachedReader | HttpReader:
        cached = self.repo.cached(self.path)
        if cached is not None:
            stat = self.stat()
            return CachedReader(cached, stat)
        return self.repo.web(self.path).open_reader()

    def forget(self) -> None:
        """Nothing to forget: the listing is of one commit, whose files never change."""

    def changed_since(self, header: object) -> str | None:
        """Never: a file at a commit is immutable. What the CDN sends is still held by the
        web reader to the size and validators of its first answer."""
        return None


class CachedReader(LocalReader):
    """A Hub file already in the local cache, read as the web reader would be."""

    def __init__(self, path: str | os.PathLike[str], stat: RemoteStat) -> None:
        super().__init__(path)
        self._stat = stat

    def stat(self) -> RemoteStat:
        return self._stat

    def read_prefix(self, length: int) -> bytes:
        return self.read(0, min(length, self._stat.st_size))
