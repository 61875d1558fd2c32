"""`hf://org/name[@revision][/subfolder]`: a Hugging Face Hub repository, as its local cache snapshot.

Resolution is one call to `huggingface_hub.snapshot_download`: with `HF_HUB_OFFLINE=1`
(or no network) it answers with what the cache holds, online it downloads what is
missing first. Pickle weights and other formats shardkit never reads are not fetched.
The result is a plain local folder, so everything else treats it as one (and `verify`
checks each shard against the SHA-256 its cache blob is named by).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import BadInputError, MissingExtraError

#: Weight formats a safetensors tool has no use for: never downloaded.
IGNORED = ["*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.pickle", "*.h5", "*.msgpack", "*.onnx", "*.gguf", "*.ot"]


def parse_hf(text: str) -> tuple[str, str | None, str]:
    """`hf://org/name@rev/sub/dir` → ("org/name", "rev", "sub/dir")."""
    spec = text[len("hf://") :].strip("/")
    parts = spec.split("/")
    if len(parts) < 2 or not parts[0] or not parts[1]:
        raise BadInputError(f"{text}: a Hub path is hf://org/name, hf://org/name@revision or hf://org/name/subfolder")
    name, _, revision = parts[1].partition("@")
    return f"{parts[0]}/{name}", revision or None, "/".join(parts[2:])


def resolve_hf(text: str) -> Path:
    repo_id, revision, subfolder = parse_hf(text)
    try:
        from huggingface_hub import constants, snapshot_download
        from huggingface_hub import errors as hub_errors
    except ImportError:
        raise MissingExtraError("hf:// paths", "hub") from None
    offline = bool(constants.HF_HUB_OFFLINE)
    try:
        folder = snapshot_download(
            repo_id, revision=revision, local_files_only=offline, ignore_patterns=IGNORED
        )
    except hub_errors.LocalEntryNotFoundError:
        where = " and HF_HUB_OFFLINE is set" if offline else " and the Hub cannot be reached"
        raise BadInputError(
            f"{text}: not in the local Hugging Face cache ({constants.HF_HUB_CACHE}){where}"
        ) from None
    except hub_errors.RevisionNotFoundError:
        raise BadInputError(f"{text}: revision {revision!r} not found on the Hub") from None
    except (hub_errors.RepositoryNotFoundError, hub_errors.GatedRepoError):
        raise BadInputError(f"{text}: repository not found, or gated and no access token given (HF_TOKEN)") from None
    except hub_errors.HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        raise BadInputError(f"{text}: the Hub refused the request (HTTP {status})") from None
    except Exception as exc:  # noqa: BLE001 - e.g. an incomplete cached snapshot
        raise BadInputError(f"{text}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from None
    return Path(folder) / subfolder if subfolder else Path(folder)
