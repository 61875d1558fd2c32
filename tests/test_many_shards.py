"""More shards than file descriptors: every command works within `ulimit -n`.

A checkpoint of 363 one-tensor shards is merged, split, diffed and verified by the
real CLI under a 256-descriptor limit (`RLIMIT_NOFILE` set in the child before it
starts), and every output must be byte-identical to the same run without the limit.
Before sources were opened as needed, each of these failed with "Too many open files".
The in-process tests show the fast path kept its shape: each source opened once.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import shardkit
from conftest import CliResult, run_cli, snapshot, temporaries
from shardkit.engine import block_writer, source_files
from shardkit.engine.source_files import SourceFiles
from shardkit.synthetic import Qwen2Shape, write_checkpoint

#: 30 layers of 12 tensors, plus embeddings, norm and head: 363 tensors, one per shard.
MANY = Qwen2Shape(8, 16, 30, 2, 1, 32, False)
SHARDS = 363
NOFILE = 256


def limit_descriptors() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, NOFILE))


def run_limited(*args: object, env: dict[str, str] | None = None) -> CliResult:
    """`run_cli` with at most NOFILE open descriptors, as under `ulimit -n 256`."""
    completed = subprocess.run(
        [sys.executable, "-m", "shardkit", *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
        preexec_fn=limit_descriptors,
        timeout=300,
    )
    return CliResult(completed.returncode, completed.stdout, completed.stderr)


@pytest.fixture(scope="module")
def many(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("many") / "moe-like"
    made = write_checkpoint(folder, MANY, max_shard_size=1)
    assert len(made.shard_files) == SHARDS > NOFILE
    return folder


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def without_timings(report: dict) -> dict:
    return {k: v for k, v in report.items() if k not in ("seconds", "read_seconds", "throughput")}


@pytest.mark.parametrize("method", ["auto", "kernel"])
@pytest.mark.parametrize("output", ["merged.safetensors", "merged"])
def test_merge_of_more_shards_than_descriptors(many: Path, tmp_path: Path, method: str, output: str) -> None:
    before = snapshot(many)
    env = {"SHARDKIT_COPY_METHOD": method}
    (tmp_path / "limited").mkdir()
    (tmp_path / "normal").mkdir()
    limited = run_limited("merge", many, "-o", tmp_path / "limited" / output, "--sha256", env=env)
    assert limited.exit_code == 0, limited.stderr
    normal = run_cli("merge", many, "-o", tmp_path / "normal" / output, "--sha256", env=env)
    assert normal.exit_code == 0, normal.stderr
    assert folder_bytes(tmp_path / "limited") == folder_bytes(tmp_path / "normal")
    assert f"from {SHARDS} source file(s)" in limited.stdout
    assert temporaries(tmp_path) == [] and snapshot(many) == before


@pytest.mark.parametrize("method", ["auto", "kernel"])
def test_split_of_more_shards_than_descriptors(many: Path, tmp_path: Path, method: str) -> None:
    """Into 2 shards (37.5 kB of tensors): each output file draws on ~180 sources at once."""
    before = snapshot(many)
    env = {"SHARDKIT_COPY_METHOD": method}
    args = ("--max-shard-size", "20kB", "--sha256")
    limited = run_limited("split", many, "-o", tmp_path / "limited", *args, env=env)
    assert limited.exit_code == 0, limited.stderr
    assert run_cli("split", many, "-o", tmp_path / "normal", *args, env=env).exit_code == 0
    written = folder_bytes(tmp_path / "limited")
    assert written == folder_bytes(tmp_path / "normal")
    assert sorted(n for n in written if n.endswith(".safetensors")) == [
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
    ]
    assert temporaries(tmp_path) == [] and snapshot(many) == before


def test_diff_and_verify_against_with_more_shards_than_descriptors(many: Path, tmp_path: Path) -> None:
    """Both sides of the comparison hold 363 shards; one tensor differs by one byte."""
    other = tmp_path / "other"
    shutil.copytree(many, other)
    index = json.loads((other / "model.safetensors.index.json").read_text())
    tensor = "model.layers.17.mlp.up_proj.weight"
    shard = other / index["weight_map"][tensor]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # the shard's one tensor ends the file
    shard.write_bytes(bytes(data))
    before = snapshot(many), snapshot(other)

    for args, code in (
        (("diff", many, other, "--json"), 1),
        (("diff", many, many, "--json"), 0),
        (("verify", other, "--against", many, "--no-architecture", "--json"), 1),
        (("verify", many, "--against", many, "--no-architecture", "--json"), 0),
    ):
        limited, normal = run_limited(*args), run_cli(*args)
        assert (limited.exit_code, normal.exit_code) == (code, code), limited.stderr
        assert without_timings(json.loads(limited.stdout)) == without_timings(json.loads(normal.stdout))
        if code == 1:
            report = json.loads(limited.stdout)
            named = report.get("data_different") or [p["tensor"] for p in report["problems"]]
            assert named == [tensor]
    assert (snapshot(many), snapshot(other)) == before


def test_human_diff_output_is_the_same_under_the_limit(many: Path) -> None:
    limited, normal = run_limited("diff", many, many), run_cli("diff", many, many)
    assert limited.exit_code == normal.exit_code == 0, limited.stderr
    assert limited.stdout == normal.stdout
    assert limited.stdout.startswith(f"identical: A has {SHARDS} tensors, B has {SHARDS};")


@pytest.mark.s3
def test_merge_of_more_local_shards_than_descriptors_into_s3(many: Path, tmp_path: Path, s3_server) -> None:
    from test_s3 import get_bytes, s3_env, unfinished_uploads

    bucket = s3_server.make_bucket("many-shards")
    local = tmp_path / "merged.safetensors"
    assert run_cli("merge", many, "-o", local).exit_code == 0
    result = run_limited("merge", many, "-o", f"s3://{bucket}/merged.safetensors", env=s3_env(s3_server))
    assert result.exit_code == 0, result.stderr
    assert get_bytes(s3_server, bucket, "merged.safetensors") == local.read_bytes()
    assert unfinished_uploads(s3_server, bucket) == []


# --------------------------------------------------------------------------- the fast path


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> list[SourceFiles]:
    """Every SourceFiles made while the test runs, to read how often each opened a file."""
    made: list[SourceFiles] = []
    real_init = SourceFiles.__init__

    def init(self: SourceFiles, limit: int | None = None) -> None:
        real_init(self, limit)
        made.append(self)

    monkeypatch.setattr(SourceFiles, "__init__", init)
    return made


@pytest.mark.parametrize("limit", [source_files.MIN_OPEN, None])
def test_each_source_is_opened_once_when_read_in_order(
    many: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, counted: list[SourceFiles], limit: int | None
) -> None:
    if limit is not None:
        monkeypatch.setattr(source_files, "default_limit", lambda: limit)
    shardkit.merge(many, tmp_path / "merged.safetensors")
    assert [(files.limit <= source_files.MAX_OPEN, files.opens) for files in counted] == [(True, SHARDS)]


def test_shards_spanning_many_blocks_are_opened_once_each(
    checkpoint, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, counted: list[SourceFiles]
) -> None:
    """4 shards of ~1 MB in 12 KiB blocks, two workers reading ahead, 4 descriptors:
    the LRU keeps what the workers are about to read, so nothing is reopened."""
    monkeypatch.setattr(block_writer, "BLOCK", 3 * block_writer.ALIGN)
    monkeypatch.setattr(source_files, "default_limit", lambda: source_files.MIN_OPEN)
    shardkit.merge(checkpoint.folder, tmp_path / "merged.safetensors")
    assert [files.opens for files in counted] == [len(checkpoint.shard_files)]
    monkeypatch.undo()
    shardkit.merge(checkpoint.folder, tmp_path / "reference.safetensors")
    assert (tmp_path / "merged.safetensors").read_bytes() == (tmp_path / "reference.safetensors").read_bytes()


def test_descriptors_stay_within_the_limit_and_are_all_closed(tmp_path: Path) -> None:
    paths = []
    for i in range(20):
        paths.append(tmp_path / f"s{i}")
        paths[-1].write_bytes(bytes([i]) * 100)
    before = set(os.listdir("/proc/self/fd"))
    with SourceFiles(limit=5) as files:
        for _ in range(3):
            for i, path in enumerate(paths):
                assert files.read(path, 10, 3) == bytes([i]) * 3
                assert len(set(os.listdir("/proc/self/fd")) - before) <= 5
        assert files.opens == 60  # 20 files in a cycle through 5 places: every read reopens
    assert set(os.listdir("/proc/self/fd")) == before


def test_a_descriptor_in_use_is_never_closed_for_another(tmp_path: Path) -> None:
    paths = [tmp_path / f"s{i}" for i in range(6)]
    for path in paths:
        path.write_bytes(b"x" * 10)
    with SourceFiles(limit=4) as files, files.use(paths[0]) as first:
        for path in paths[1:]:
            files.read(path, 0, 1)
        assert os.pread(first, 1, 0) == b"x"  # still open: it was in use


def test_a_source_replaced_before_it_is_reopened_is_refused(tmp_path: Path) -> None:
    paths = [tmp_path / f"s{i}" for i in range(5)]
    for path in paths:
        path.write_bytes(b"old bytes")
    with SourceFiles(limit=4) as files:
        for path in paths:
            files.read(path, 0, 3)  # s0 was closed to make room
        replacement = tmp_path / "new"
        replacement.write_bytes(b"new bytes")
        os.replace(replacement, paths[0])
        with pytest.raises(shardkit.errors.SourceChangedError, match="s0: replaced or modified while it was being"):
            files.read(paths[0], 0, 3)
