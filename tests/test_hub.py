"""`hf://org/name` against a fake Hugging Face Hub on 127.0.0.1 (tests/web_server.py),
selected with `HF_ENDPOINT` as a user selects a mirror.

The Hub answers what huggingface_hub asks (model_info, resolve with HEAD, Range and a
302 to a CDN on another origin); the tests count the bytes each server sent to prove
that `inspect` reads headers only and `merge` reads only the files it copies, and
compare the output with the merge of the same files on disk.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import assert_clean_failure, run_cli, snapshot, temporaries
from shardkit.synthetic import SyntheticCheckpoint, write_checkpoint
from web_server import FakeHub, WebServer

pytest.importorskip("huggingface_hub")

COMMIT = "0123456789abcdef0123456789abcdef01234567"
TOKEN = "hf_notarealtoken0123456789"
HEADER_READ = 64 * 1024


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> SyntheticCheckpoint:
    """The repository's files: a 4-shard checkpoint with config and tokenizer, plus what
    a safetensors merge never needs (pickle weights, the `original/` consolidated copy)."""
    checkpoint = write_checkpoint(tmp_path_factory.mktemp("hub") / "tiny", edge_tensors=True)
    (checkpoint.folder / "pytorch_model.bin").write_bytes(b"\x80\x02" + bytes(2_000_000))
    import shardkit

    merged = tmp_path_factory.mktemp("hub-original") / "consolidated.safetensors"
    shardkit.merge(checkpoint.folder, merged)
    (checkpoint.folder / "original").mkdir()
    merged.rename(checkpoint.folder / "original" / merged.name)
    return checkpoint


@dataclass
class Hub:
    hub: WebServer
    cdn: WebServer
    repo: FakeHub
    env: dict[str, str]

    def served(self, name: str) -> int:
        """Body bytes sent for repository file `name`, by the Hub or the CDN."""
        data = self.repo.files[name]
        return (
            self.hub.bytes_served[f"/acme/tiny/resolve/{COMMIT}/{name}"]
            + self.hub.bytes_served[f"/acme/tiny/resolve/main/{name}"]
            + self.cdn.bytes_served[f"/blobs/{hashlib.sha256(data).hexdigest()}"]
        )

    def python(self, code: str) -> None:
        """Run `code` with huggingface_hub in this Hub's environment (its constants are
        read at import, so in a process of its own)."""
        done = subprocess.run([sys.executable, "-c", code], env={**os.environ, **self.env}, capture_output=True)
        assert done.returncode == 0, done.stderr.decode()


@pytest.fixture
def hub(tiny: SyntheticCheckpoint, tmp_path: Path) -> Iterator[Hub]:
    with WebServer() as hub, WebServer() as cdn:
        repo = FakeHub(hub, cdn, "acme/tiny", tiny.folder, COMMIT)
        env = {
            "HF_ENDPOINT": hub.origin,
            "HF_HUB_CACHE": str(tmp_path / "hub-cache"),
            "HF_HOME": str(tmp_path / "hf-home"),
            "HF_TOKEN": TOKEN,
            "HF_HUB_DISABLE_TELEMETRY": "1",
        }
        yield Hub(hub, cdn, repo, env)


def local_merge(tiny: SyntheticCheckpoint, out: Path) -> Path:
    result = run_cli("merge", tiny.folder, "-o", out)
    assert result.exit_code == 0, result.stderr
    return out


def test_inspect_reads_the_headers_only(hub: Hub, tiny: SyntheticCheckpoint) -> None:
    result = run_cli("inspect", "hf://acme/tiny", "--json", env=hub.env)

    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["tensors"] == len(tiny.tensors)
    for shard in tiny.shard_files:
        assert 0 < hub.served(shard) <= HEADER_READ, shard
    total = sum(len(data) for data in hub.repo.files.values())
    sent = sum(hub.served(name) for name in hub.repo.files)
    assert sent <= len(tiny.shard_files) * HEADER_READ + len(hub.repo.files["model.safetensors.index.json"])
    assert sent < total / 10
    assert hub.served("pytorch_model.bin") == hub.served("original/consolidated.safetensors") == 0


def test_merge_reads_only_the_files_it_copies_and_equals_the_local_merge(
    hub: Hub, tiny: SyntheticCheckpoint, tmp_path: Path
) -> None:
    expected = local_merge(tiny, tmp_path / "local")
    out = tmp_path / "from-hub"

    result = run_cli("merge", f"hf://acme/tiny@{COMMIT}", "-o", out, env=hub.env)

    assert result.exit_code == 0, result.stderr
    assert snapshot(out) == snapshot(expected)  # model.safetensors and every companion file
    for shard in tiny.shard_files:  # the data once, plus the header read
        assert hub.served(shard) <= len(hub.repo.files[shard]) + HEADER_READ, shard
    assert hub.served("pytorch_model.bin") == hub.served("original/consolidated.safetensors") == 0
    assert not any("authorization" in headers for _, _, headers in hub.cdn.requests)  # the token stays on the Hub
    assert all(headers.get("authorization") == f"Bearer {TOKEN}" for _, p, headers in hub.hub.requests
               if p.startswith("/acme/tiny/"))


def test_a_cached_shard_is_read_from_the_cache(hub: Hub, tiny: SyntheticCheckpoint, tmp_path: Path) -> None:
    """What the cache holds at the commit is not fetched again."""
    shard = tiny.shard_files[0]
    hub.python(f"import huggingface_hub as h; h.hf_hub_download('acme/tiny', {shard!r}, revision={COMMIT!r})")
    before = hub.served(shard)

    result = run_cli("merge", "hf://acme/tiny", "-o", tmp_path / "m.safetensors", env=hub.env)

    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "m.safetensors").read_bytes() == local_merge(tiny, tmp_path / "l.safetensors").read_bytes()
    assert hub.served(shard) == before
    assert all(hub.served(other) > HEADER_READ for other in tiny.shard_files[1:])


def test_split_from_the_hub_equals_the_local_split(
    hub: Hub, tiny: SyntheticCheckpoint, tmp_path: Path
) -> None:
    remote = run_cli("split", "hf://acme/tiny", "-o", tmp_path / "remote", "-s", "200kB", env=hub.env)
    local = run_cli("split", tiny.folder, "-o", tmp_path / "local", "-s", "200kB")

    assert remote.exit_code == 0, remote.stderr
    assert local.exit_code == 0, local.stderr
    assert snapshot(tmp_path / "remote") == snapshot(tmp_path / "local")


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("hf://acme/tiny@v9", "hf://acme/tiny@v9: revision 'v9' not found on the Hub"),
        ("hf://acme/missing", "hf://acme/missing: repository not found, or gated and no access token given"),
    ],
)
def test_a_missing_revision_or_repository_is_one_line(hub: Hub, tmp_path: Path, source: str, message: str) -> None:
    out = tmp_path / "out.safetensors"

    result = run_cli("merge", source, "-o", out, env=hub.env)

    assert_clean_failure(result, 2, message)
    assert not out.exists() and temporaries(tmp_path) == []
    assert TOKEN not in result.stderr


def test_a_shard_the_cdn_serves_wrong_fails_the_merge(hub: Hub, tiny: SyntheticCheckpoint, tmp_path: Path) -> None:
    """The CDN's answers are checked like any web server's (tests/test_http.py)."""
    hub.cdn.fault = "shifted-range"
    out = tmp_path / "out.safetensors"

    result = run_cli("merge", "hf://acme/tiny", "-o", out, env=hub.env)

    assert_clean_failure(result, 1, "the server answered Content-Range: bytes ")
    assert "hf://acme/tiny/model-0000" in result.stderr  # named as the user named it, not by its CDN URL
    assert not out.exists() and temporaries(tmp_path) == []


def test_an_unreachable_hub_falls_back_to_the_cache(hub: Hub, tiny: SyntheticCheckpoint, tmp_path: Path) -> None:
    """Online with a cached snapshot but no network: the cache answers, as huggingface_hub does;
    `HF_HUB_OFFLINE=1` goes there directly. Without a cached snapshot: one line."""
    hub.python("import huggingface_hub as h; h.snapshot_download('acme/tiny')")  # main, as a user downloads
    expected = local_merge(tiny, tmp_path / "local.safetensors").read_bytes()
    down = {**hub.env, "HF_ENDPOINT": "http://127.0.0.1:9"}

    unreachable = run_cli("merge", "hf://acme/tiny", "-o", tmp_path / "a.safetensors", env=down)
    offline = run_cli("merge", "hf://acme/tiny", "-o", tmp_path / "b.safetensors", env={**down, "HF_HUB_OFFLINE": "1"})
    missing = run_cli("inspect", "hf://acme/other", env=down)

    assert unreachable.exit_code == 0, unreachable.stderr
    assert offline.exit_code == 0, offline.stderr
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes() == expected
    assert_clean_failure(missing, 2, "hf://acme/other: not in the local Hugging Face cache")


def test_dot_dot_in_a_hub_path_is_refused(hub: Hub, tmp_path: Path) -> None:
    """Offline, the subfolder was joined to the cached snapshot's path, so
    `hf://acme/tiny/../../../../elsewhere` read a folder outside the cache, exit 0."""
    hub.python("import huggingface_hub as h; h.snapshot_download('acme/tiny')")
    elsewhere = write_checkpoint(tmp_path / "elsewhere")
    before = snapshot(elsewhere.folder)
    offline = {**hub.env, "HF_HUB_OFFLINE": "1"}
    for source in ("hf://acme/tiny/../../../../elsewhere", "hf://acme/tiny@../x", "hf://acme/../tiny"):
        for args in (("inspect", source), ("merge", source, tmp_path / "out.safetensors")):
            result = run_cli(*args, env=offline)
            assert_clean_failure(result, 2, f"{source}: '.' and '..' are not names in a Hub path")
    assert not (tmp_path / "out.safetensors").exists() and snapshot(elsewhere.folder) == before
