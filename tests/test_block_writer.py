"""The O_DIRECT block writer: bytes, hash order and failures across many small blocks.

Real outputs use 32 MiB blocks, so the small checkpoints of the other tests fit in one;
here the block is shrunk to a few pages so every file spans many blocks, pieces cross
block edges at unaligned offsets, and both workers and the hash ordering are exercised.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import random
import threading
from pathlib import Path

import pytest

import shardkit
from conftest import run_cli
from shardkit import block_writer, execute
from shardkit.block_writer import Piece
from shardkit.synthetic import write_checkpoint
from test_merge import reference_serialize


@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr(block_writer, "BLOCK", 3 * block_writer.ALIGN)
    return block_writer.BLOCK


def random_layout(folder: Path, seed: int) -> tuple[list[tuple[Path, int, int]], bytes, bytes]:
    """Source files of random bytes and a random list of (file, offset, length) ranges."""
    rng = random.Random(seed)
    sources = []
    for i in range(3):
        path = folder / f"source{i}.bin"
        path.write_bytes(rng.randbytes(rng.randrange(20_000, 90_000)))
        sources.append(path)
    ranges = []
    for _ in range(rng.randrange(5, 40)):
        path = rng.choice(sources)
        size = path.stat().st_size
        offset = rng.randrange(size)
        ranges.append((path, offset, rng.choice([0, 1, 7, rng.randrange(size - offset + 1)])))
    header = rng.randbytes(rng.randrange(8, 5000))
    expected = header + b"".join(p.read_bytes()[o : o + n] for p, o, n in ranges)
    return ranges, header, expected


def write_layout(dest: Path, ranges: list[tuple[Path, int, int]], header: bytes, **kwargs) -> None:
    fds = {p: os.open(p, os.O_RDONLY) for p, _, _ in ranges}
    out = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    try:
        assert block_writer.enable(out)
        pieces, position = [Piece(0, len(header), data=header)], len(header)
        for path, offset, length in ranges:
            if length:
                pieces.append(Piece(position, length, fds[path], offset))
            position += length
        block_writer.write_file(out, position, pieces, **kwargs)
    finally:
        os.close(out)
        for fd in fds.values():
            os.close(fd)


@pytest.mark.parametrize("seed", range(12))
def test_random_layouts_are_written_byte_exact_and_hashed_in_order(small_blocks, tmp_path: Path, seed: int) -> None:
    ranges, header, expected = random_layout(tmp_path, seed)
    reported: list[int] = []
    hasher = hashlib.sha256()
    write_layout(tmp_path / "out.bin", ranges, header, hasher=hasher, on_progress=reported.append)
    assert (tmp_path / "out.bin").read_bytes() == expected
    assert hasher.hexdigest() == hashlib.sha256(expected).hexdigest()
    assert sum(reported) == len(expected)
    assert len(reported) == -(-len(expected) // small_blocks)


def test_both_workers_write(small_blocks, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ranges, header, expected = random_layout(tmp_path, 99)
    writers: set[str] = set()
    real_pwrite = os.pwrite

    def recording_pwrite(fd, data, offset):
        writers.add(threading.current_thread().name)
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", recording_pwrite)
    write_layout(tmp_path / "out.bin", ranges, header)
    assert (tmp_path / "out.bin").read_bytes() == expected
    assert writers == {threading.main_thread().name, "shardkit-writer"}


def test_a_source_that_shrank_fails_with_its_offset_and_does_not_hang(small_blocks, tmp_path: Path) -> None:
    ranges, header, _ = random_layout(tmp_path, 3)
    victim, offset, length = max(ranges, key=lambda r: r[2])
    os.truncate(victim, offset + length // 2)
    with pytest.raises(OSError, match="source ended early at offset") as caught:
        write_layout(tmp_path / "out.bin", ranges, header, hasher=hashlib.sha256())
    assert caught.value.errno == errno.EIO


def test_a_failure_in_the_helper_thread_is_raised_in_the_caller(small_blocks, tmp_path: Path) -> None:
    """A source fd that is closed (EBADF) in a late block: whichever worker meets it, the caller sees it."""
    source = tmp_path / "s.bin"
    source.write_bytes(os.urandom(20 * small_blocks))
    good = os.open(source, os.O_RDONLY)
    closed = os.open(source, os.O_RDONLY)
    os.close(closed)
    out = os.open(tmp_path / "out.bin", os.O_WRONLY | os.O_CREAT)
    try:
        assert block_writer.enable(out)
        total = 20 * small_blocks
        pieces = [Piece(0, total - 100, good, 0), Piece(total - 100, 100, closed, 0)]
        with pytest.raises(OSError) as caught:
            block_writer.write_file(out, total, pieces, hasher=hashlib.sha256())
        assert caught.value.errno == errno.EBADF
    finally:
        os.close(out)
        os.close(good)


@pytest.mark.parametrize("method", ["direct", "kernel", "auto"])
@pytest.mark.parametrize("sha256", [False, True])
def test_merge_is_identical_whichever_copy_method(small_blocks, tmp_path: Path, monkeypatch, method, sha256) -> None:
    monkeypatch.setenv("SHARDKIT_COPY_METHOD", method)
    made = write_checkpoint(tmp_path / "qwen-tiny", edge_tensors=True)
    out = tmp_path / "merged.safetensors"
    report = shardkit.merge(made.folder, out, sha256=sha256)
    expected = reference_serialize(made, {"format": "pt"})
    assert out.read_bytes() == expected
    if sha256:
        assert report.sha256 == hashlib.sha256(expected).hexdigest()


def test_refused_o_direct_falls_back_to_the_kernel_copy(small_blocks, tmp_path: Path, monkeypatch) -> None:
    """A filesystem that accepts the O_DIRECT flag but rejects the first write (EINVAL)."""
    real_pwrite = os.pwrite
    refused = []

    def refusing_pwrite(fd, data, offset):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            refused.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", refusing_pwrite)
    made = write_checkpoint(tmp_path / "qwen-tiny", edge_tensors=True)
    out = tmp_path / "merged.safetensors"
    report = shardkit.merge(made.folder, out, sha256=True)
    expected = reference_serialize(made, {"format": "pt"})
    assert out.read_bytes() == expected
    assert report.sha256 == hashlib.sha256(expected).hexdigest()
    assert refused == [0]  # one refused first block, then the kernel copy did the rest


def test_unknown_copy_method_is_a_clear_cli_error(tmp_path: Path) -> None:
    made = write_checkpoint(tmp_path / "qwen-tiny")
    result = run_cli("merge", made.folder, "-o", tmp_path / "m.safetensors", env={"SHARDKIT_COPY_METHOD": "fast"})
    assert result.exit_code == 2, result.stderr
    assert "SHARDKIT_COPY_METHOD='fast': expected auto, direct or kernel" in result.stderr
    assert not (tmp_path / "m.safetensors").exists()
    assert execute.copy_method() == "auto"
