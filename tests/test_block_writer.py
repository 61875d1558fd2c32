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
import time
from pathlib import Path

import pytest

import shardkit
from conftest import assert_clean_failure, run_cli, snapshot, temporaries
from shardkit.engine import block_writer, execute
from shardkit.engine.source_files import SourceFiles
from shardkit.plan.files import Copy, Literal, PlannedFile
from shardkit.plan.fill import CastLog
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


def layout_output(layout, out: int, sources: SourceFiles, hasher=None) -> block_writer.Output:
    """One output of `random_layout` as the executor builds it: a planned file whose
    blocks `fill` makes from its steps, reading through `sources`."""
    ranges, header, _ = layout
    steps, position = [Literal(0, header)], len(header)
    for path, offset, length in ranges:
        if length:
            steps.append(Copy(position, length, str(path), offset))
        position += length
    planned = PlannedFile("out", tuple(steps), (), position, len(header))
    return execute.direct_output(out, planned, hasher, sources, CastLog())


def write_layout(dest: Path, ranges: list[tuple[Path, int, int]], header: bytes, hasher=None, on_progress=None) -> None:
    out = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    try:
        assert block_writer.enable(out)
        with SourceFiles() as sources:
            output = layout_output((ranges, header, b""), out, sources, hasher)
            block_writer.write_files([output], on_progress=on_progress)
    finally:
        os.close(out)


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


def test_a_failure_in_the_helper_thread_is_raised_in_the_caller(small_blocks, tmp_path: Path, monkeypatch) -> None:
    ranges, header, _ = random_layout(tmp_path, 5)
    real_preadv = os.preadv

    def failing_in_helper(fd, buffers, offset):
        if threading.current_thread().name == "shardkit-writer":
            raise OSError(errno.EIO, "helper read failed")
        return real_preadv(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", failing_in_helper)
    with pytest.raises(OSError, match="helper read failed"):
        write_layout(tmp_path / "out.bin", ranges, header, hasher=hashlib.sha256())
    assert not [t for t in threading.enumerate() if t.name == "shardkit-writer"]


def test_a_slow_hash_never_sees_a_refilled_buffer(small_blocks, tmp_path: Path) -> None:
    """If a buffer were refilled before its hash finished, the digest would be wrong."""
    ranges, header, expected = random_layout(tmp_path, 8)
    inner = hashlib.sha256()

    class SlowHasher:
        def update(self, data) -> None:
            time.sleep(0.003)
            inner.update(bytes(data))

    write_layout(tmp_path / "out.bin", ranges, header, hasher=SlowHasher())
    assert inner.hexdigest() == hashlib.sha256(expected).hexdigest()


@pytest.mark.parametrize("header_blocks", [0, 1, 2])
@pytest.mark.parametrize("tail", [1, -1, 0, 4095, 4096, 4097])
def test_boundary_sizes_and_headers_larger_than_a_block(small_blocks, tmp_path: Path, header_blocks, tail) -> None:
    """Totals just around the alignment and the block edge; headers spanning whole blocks."""
    header = os.urandom(header_blocks * small_blocks + 5)
    source = tmp_path / "s.bin"
    source.write_bytes(os.urandom(4 * small_blocks))
    length = max(small_blocks - len(header) % small_blocks + tail, 0)
    hasher = hashlib.sha256()
    write_layout(tmp_path / "out.bin", [(source, 3, length)], header, hasher=hasher)
    expected = header + source.read_bytes()[3 : 3 + length]
    assert (tmp_path / "out.bin").read_bytes() == expected
    assert hasher.hexdigest() == hashlib.sha256(expected).hexdigest()


def test_ctrl_c_during_the_copy_stops_the_helper_before_returning(small_blocks, tmp_path: Path, monkeypatch) -> None:
    """Ctrl-C in the main thread, then a second one while it waits for the helper: the
    helper is gone when the call unwinds, so it cannot write to an fd closed after it."""
    ranges, header, _ = random_layout(tmp_path, 11)
    real_join = threading.Thread.join
    joins: list[str] = []

    def join_interrupted_once(thread, timeout=None):
        joins.append(thread.name)
        if len(joins) == 1:
            raise KeyboardInterrupt
        return real_join(thread, timeout)

    main_calls: list[int] = []

    def interrupt(length: int) -> None:  # the 1st main-thread block is written before the helper starts
        if threading.current_thread() is threading.main_thread():
            main_calls.append(length)
            if len(main_calls) == 2:
                raise KeyboardInterrupt

    monkeypatch.setattr(threading.Thread, "join", join_interrupted_once)
    with pytest.raises(KeyboardInterrupt):
        write_layout(tmp_path / "out.bin", ranges, header, on_progress=interrupt)
    monkeypatch.undo()
    assert joins[:2] == ["shardkit-writer", "shardkit-writer"]
    assert not [t for t in threading.enumerate() if t.name == "shardkit-writer"]


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
    before = snapshot(made.folder)
    result = run_cli("merge", made.folder, "-o", tmp_path / "m.safetensors", env={"SHARDKIT_COPY_METHOD": "fast"})
    assert_clean_failure(result, 2, "SHARDKIT_COPY_METHOD='fast': expected auto, direct or kernel")
    assert not (tmp_path / "m.safetensors").exists() and temporaries(tmp_path) == []
    assert snapshot(made.folder) == before
    assert execute.copy_method() == "auto"


def test_direct_forced_on_a_refusing_filesystem_is_an_error(small_blocks, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("SHARDKIT_COPY_METHOD", "direct")
    monkeypatch.setattr(block_writer, "enable", lambda fd: False)
    made = write_checkpoint(tmp_path / "qwen-tiny")
    before = snapshot(made.folder)
    with pytest.raises(shardkit.errors.OutputError, match="refuses O_DIRECT"):
        shardkit.merge(made.folder, tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists() and temporaries(tmp_path) == []
    assert snapshot(made.folder) == before


def test_platform_without_o_direct_uses_the_kernel_copy(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delattr(os, "O_DIRECT")
    made = write_checkpoint(tmp_path / "qwen-tiny", edge_tensors=True)
    out = tmp_path / "merged.safetensors"
    shardkit.merge(made.folder, out)
    assert out.read_bytes() == reference_serialize(made, {"format": "pt"})


# --------------------------------------------------------------------------- several outputs


def test_several_outputs_are_one_stream_byte_exact_and_each_hashed(small_blocks, tmp_path: Path, monkeypatch) -> None:
    """The files of a split share one pipeline: one helper thread for all, every file
    byte-exact with its own digest, an empty output left empty, progress adding up."""
    layouts = []
    for seed in (21, None, 22, 23):
        if seed is None:
            layouts.append(None)
            continue
        (tmp_path / str(seed)).mkdir()
        layouts.append(random_layout(tmp_path / str(seed), seed))
    expected = [layout[2] if layout else b"" for layout in layouts]
    started: list[str] = []
    real_start = threading.Thread.start

    def recording_start(thread):
        started.append(thread.name)
        return real_start(thread)

    monkeypatch.setattr(threading.Thread, "start", recording_start)
    hashers = [hashlib.sha256() for _ in layouts]
    reported: list[int] = []
    fds: list[int] = []
    sources = SourceFiles()
    try:
        outputs = []
        for number, layout in enumerate(layouts):
            fd = os.open(tmp_path / f"out{number}.bin", os.O_WRONLY | os.O_CREAT | os.O_EXCL)
            fds.append(fd)
            assert block_writer.enable(fd)
            if layout:
                outputs.append(layout_output(layout, fd, sources, hashers[number]))
            else:
                empty = PlannedFile("empty", (), (), 0)
                outputs.append(execute.direct_output(fd, empty, hashers[number], sources, CastLog()))
        block_writer.write_files(outputs, on_progress=reported.append)
    finally:
        sources.close()
        for fd in fds:
            os.close(fd)
    monkeypatch.undo()
    for number, data in enumerate(expected):
        assert (tmp_path / f"out{number}.bin").read_bytes() == data
        assert hashers[number].hexdigest() == hashlib.sha256(data).hexdigest()
    assert sum(reported) == sum(map(len, expected))
    assert len(reported) == sum(-(-len(data) // small_blocks) for data in expected)
    assert started.count("shardkit-writer") == 1


@pytest.mark.parametrize("files_per_stream", [2, 64])
@pytest.mark.parametrize("sha256", [False, True])
def test_split_is_identical_whichever_copy_method(
    small_blocks, checkpoint, tmp_path: Path, monkeypatch, files_per_stream, sha256
) -> None:
    """A split into 8 shards, as streams of 2 files and as one stream, against the kernel copy."""
    monkeypatch.setattr(execute, "FILES_PER_STREAM", files_per_stream)
    outputs = {}
    for method in ("kernel", "direct"):
        monkeypatch.setenv("SHARDKIT_COPY_METHOD", method)
        report = shardkit.split(checkpoint.folder, tmp_path / method, max_shard_size="500KB", sha256=sha256)
        assert len(report.files) == 8
        outputs[method] = snapshot(tmp_path / method)
        if sha256:
            lines = (tmp_path / method / "SHA256SUMS").read_text().splitlines()
            listed = dict(line.split("  ")[::-1] for line in lines)
            assert listed == {name: digest for name, digest in outputs[method].items() if name in listed}
            assert len(listed) == 8
    assert outputs["direct"] == outputs["kernel"]
    assert sum(name.endswith(".safetensors") for name in outputs["direct"]) == 8


def test_block_buffers_start_on_a_huge_page_and_use_them_where_the_kernel_allows() -> None:
    import ctypes

    size = 4 * block_writer.HUGE_PAGE
    buffer = block_writer.block_buffer(size)
    assert len(buffer) == size
    address = ctypes.addressof(ctypes.c_char.from_buffer(buffer))
    assert address % block_writer.HUGE_PAGE == 0
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not thp.exists() or "[never]" in thp.read_text():
        pytest.skip("transparent huge pages are off on this kernel")
    buffer[:] = os.urandom(size)  # fault the pages in
    assert huge_kib_at(address) > 0


def huge_kib_at(address: int) -> int:
    """AnonHugePages of the mapping of /proc/self/smaps that holds `address`."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        first = line.split()[0]
        if "-" in first and ":" not in first:
            start, end = (int(x, 16) for x in first.split("-"))
            inside = start <= address < end
        elif inside and first == "AnonHugePages:":
            return int(line.split()[1])
    return 0


# --------------------------------------------------------------------------- resources on failure


def open_fds() -> set[int]:
    return {int(name) for name in os.listdir("/proc/self/fd")}


def test_a_failing_close_still_closes_every_other_descriptor(small_blocks, checkpoint, tmp_path, monkeypatch) -> None:
    """close() can fail (EIO on NFS or FUSE); the other 7 outputs and 4 sources must still be closed."""
    real_close, failed = os.close, []

    def close(fd: int) -> None:
        link = f"/proc/self/fd/{fd}"
        target = os.readlink(link) if os.path.exists(link) else ""
        if ".shardkit-tmp" in target and target.endswith(".safetensors") and not failed:
            failed.append(fd)
            real_close(fd)
            raise OSError(errno.EIO, "Input/output error")
        real_close(fd)

    sources = snapshot(checkpoint.folder)
    monkeypatch.setattr(os, "close", close)
    before = open_fds()
    with pytest.raises(shardkit.errors.WriteError, match="Input/output error"):
        shardkit.split(checkpoint.folder, tmp_path / "out", max_shard_size="500KB")
    monkeypatch.undo()
    leaked = open_fds() - before
    for fd in leaked:
        os.close(fd)
    assert failed and leaked == set()
    assert not (tmp_path / "out").exists() and temporaries(tmp_path) == []
    assert snapshot(checkpoint.folder) == sources


def test_a_helper_thread_that_cannot_start_raises_its_own_error_and_stops_the_hasher(
    small_blocks, tmp_path: Path, monkeypatch
) -> None:
    ranges, header, _ = random_layout(tmp_path, 31)
    real_start = threading.Thread.start

    def start(thread):
        if thread.name == "shardkit-writer":
            raise RuntimeError("can't start new thread")
        return real_start(thread)

    monkeypatch.setattr(threading.Thread, "start", start)
    with pytest.raises(RuntimeError, match="^can't start new thread$"):
        write_layout(tmp_path / "out.bin", ranges, header, hasher=hashlib.sha256())
    monkeypatch.undo()
    assert [t.name for t in threading.enumerate() if t.name.startswith("shardkit")] == []
