"""The O_DIRECT source stream of converted blocks, and read-ahead hints in pieces.

Real files on the test machine's disk, the real writer: the streamed bytes are compared
with the page-cache path's and with torch's conversion, the page cache is inspected
with mincore to show what was read through it, and the failure paths (a write that
fails while the reader is ahead, O_DIRECT refused, a source that ends early) are run
for real, not imitated.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import shardkit
import shardkit.engine.execute
from conftest import snapshot, temporaries
from shardkit.checkpoint.shards import open_checkpoint
from shardkit.engine import block_writer, read_ahead, source_stream
from shardkit.engine.source_files import SourceFiles
from shardkit.plan.conversion import choose_dtypes
from shardkit.plan.files import Transform, plan_merge
from shardkit.plan.fill import fill
from shardkit.synthetic import ByteSource, SyntheticTensor, write_safetensors

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")

_libc = ctypes.CDLL(None, use_errno=True)


def resident(path: Path) -> tuple[int, int]:
    """(pages of `path` in the page cache, pages in all), by mincore of a mapping of it."""
    size = path.stat().st_size
    pages = -(-size // mmap.PAGESIZE)
    vector = (ctypes.c_ubyte * pages)()
    with open(path, "rb") as handle:
        mapped = mmap.mmap(handle.fileno(), size, access=mmap.ACCESS_COPY)  # writable: ctypes takes its address
    try:
        anchor = ctypes.c_char.from_buffer(mapped)
        failed = _libc.mincore(ctypes.c_void_p(ctypes.addressof(anchor)), ctypes.c_size_t(size), vector)
        del anchor
        if failed:
            raise OSError(ctypes.get_errno(), "mincore")
    finally:
        mapped.close()
    return sum(v & 1 for v in vector), pages


def evict(path: Path) -> None:
    """Drop `path` from the page cache (its pages are clean: it was fsynced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def on_tmpfs(path: Path) -> bool:
    """tmpfs keeps every page resident: what the page cache holds cannot be seen there."""
    return os.statvfs(path).f_type == 0x01021994 if hasattr(os.statvfs(path), "f_type") else False


def raised_within(seconds: float, run: Callable[[], object]) -> list[BaseException]:
    """What `run` raised (nothing: []), run on a thread; a run still going after
    `seconds` fails the test instead of hanging it (a worker left waiting for a piece)."""
    outcome: list[BaseException] = []

    def target() -> None:
        try:
            run()
        except BaseException as exc:  # noqa: BLE001 - the caller examines it
            outcome.append(exc)

    worker = threading.Thread(target=target, daemon=True)
    worker.start()
    worker.join(timeout=seconds)
    assert not worker.is_alive(), f"still running after {seconds} s"
    return outcome


def can_see_the_page_cache(paths: list[Path]) -> bool:
    for path in paths:
        evict(path)
    return all(resident(path)[0] * 20 < resident(path)[1] for path in paths)


TENSORS = [  # odd lengths: no tensor starts or ends on a 4096-byte boundary
    [SyntheticTensor("a.w", "F32", (1_000_003,)), SyntheticTensor("a.ids", "I64", (777,)),
     SyntheticTensor("a.norm.weight", "F32", (4097,)), SyntheticTensor("a.h", "F16", (123_457,))],
    [SyntheticTensor("b.w", "F32", (3, 300_001)), SyntheticTensor("b.bf", "BF16", (250_001,)),
     SyntheticTensor("b.f64", "F64", (50_001,)), SyntheticTensor("b.mask", "BOOL", (9,))],
]


@pytest.fixture
def mixed(tmp_path: Path) -> Path:
    """Two shards of every floating-point dtype and some that are not, at unaligned offsets."""
    import json

    folder = tmp_path / "mixed"
    folder.mkdir()
    weight_map = {}
    for number, tensors in enumerate(TENSORS, 1):
        name = f"model-{number:05d}-of-{len(TENSORS):05d}.safetensors"
        write_safetensors(folder / name, tensors, ByteSource(number), {"format": "pt"})
        weight_map.update({t.name: name for t in tensors})
    total = sum(t.nbytes for group in TENSORS for t in group)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


class Recorded(source_stream.SourceStream):
    """The real stream, counting the pieces each run's workers took from it."""

    pieces_read: list[int] = []

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.run = len(Recorded.pieces_read)
        Recorded.pieces_read.append(0)

    def _take(self, key):
        taken = super()._take(key)
        Recorded.pieces_read[self.run] += 1
        return taken


@pytest.fixture
def recorded(monkeypatch) -> list[int]:
    Recorded.pieces_read = []
    monkeypatch.setattr(shardkit.engine.execute, "SourceStream", Recorded)
    return Recorded.pieces_read


def torch_conversion(folder: Path, dtype: torch.dtype, keep: str) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        for name, tensor in safetensors_torch.load_file(shard).items():
            state[name] = tensor if not tensor.is_floating_point() or keep in name else tensor.to(dtype)
    return state


def same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical, except that NaN only has to stay NaN (torch's own NaN bits vary)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if not a.is_floating_point():
        return torch.equal(a, b)
    nan = a.isnan()
    bits = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(nan, b.isnan()) and torch.equal(a[~nan].view(bits), b[~nan].view(bits))


@pytest.mark.parametrize(("block", "slot", "slots"), [
    (64 * 1024, 16 * 1024, 2),  # many pieces per block, spans cut at every few thousand elements
    (1 << 20, 96 * 1024, 3),
    (None, None, None),  # the defaults
], ids=["tiny-slots", "small-slots", "defaults"])
@pytest.mark.parametrize("target", ["bf16", "fp16"])
def test_a_streamed_conversion_is_the_page_cache_ones_bytes_and_torchs_values(
    mixed: Path, tmp_path: Path, monkeypatch, recorded: list[int], block, slot, slots, target: str
) -> None:
    if block is not None:
        monkeypatch.setattr(block_writer, "BLOCK", block)
        monkeypatch.setattr(source_stream, "SLOT", slot)
        monkeypatch.setattr(source_stream, "SLOTS", slots)
    before = snapshot(mixed)
    streamed = tmp_path / "streamed.safetensors"
    shardkit.merge(mixed, streamed, dtype=target, keep=["*norm*"])
    assert recorded and recorded[0] > (10 if block == 64 * 1024 else 0)
    monkeypatch.setenv("SHARDKIT_COPY_METHOD", "kernel")  # the page-cache path: no stream
    through_cache = tmp_path / "kernel.safetensors"
    shardkit.merge(mixed, through_cache, dtype=target, keep=["*norm*"])
    assert len(recorded) == 1
    assert streamed.read_bytes() == through_cache.read_bytes()
    wanted = torch_conversion(mixed, {"bf16": torch.bfloat16, "fp16": torch.float16}[target], "norm")
    written = safetensors_torch.load_file(streamed)
    assert written.keys() == wanted.keys()
    assert all(same_values(written[name], wanted[name]) for name in wanted)
    assert snapshot(mixed) == before


def test_converted_sources_are_read_once_around_the_page_cache(mixed: Path, tmp_path: Path) -> None:
    """The stream reads with O_DIRECT, and the read-ahead hints skip what it reads: the
    sources are not read a second time into the page cache. The same conversion through
    the kernel copy fills the cache, so the measurement sees what it should."""
    shards = sorted(mixed.glob("*.safetensors"))
    if not can_see_the_page_cache(shards):
        pytest.skip("this filesystem keeps every page resident (tmpfs)")
    shardkit.merge(mixed, tmp_path / "streamed.safetensors", dtype="bf16")
    cached, pages = map(sum, zip(*map(resident, shards)))
    assert cached * 20 < pages, f"{cached} of {pages} source pages went through the page cache"
    for shard in shards:
        evict(shard)
    env = dict(os.environ, SHARDKIT_COPY_METHOD="kernel")
    subprocess.run([sys.executable, "-m", "shardkit", "merge", mixed, "-o", tmp_path / "kernel.safetensors",
                    "--dtype", "bf16", "--quiet"], env=env, check=True)
    cached, pages = map(sum, zip(*map(resident, shards)))
    assert cached * 10 > pages * 9


def test_the_stream_reads_through_the_page_cache_where_o_direct_is_refused(
    mixed: Path, tmp_path: Path, monkeypatch, recorded: list[int]
) -> None:
    refused: list[int] = []
    monkeypatch.setattr(source_stream, "open_direct", lambda fd: refused.append(fd))  # returns None: refused
    monkeypatch.setattr(source_stream, "SLOT", 64 * 1024)
    shardkit.merge(mixed, tmp_path / "refused.safetensors", dtype="bf16")
    assert refused and recorded and recorded[0] > 0
    monkeypatch.setenv("SHARDKIT_COPY_METHOD", "kernel")
    shardkit.merge(mixed, tmp_path / "kernel.safetensors", dtype="bf16")
    assert (tmp_path / "refused.safetensors").read_bytes() == (tmp_path / "kernel.safetensors").read_bytes()


def test_a_write_failing_while_the_reader_is_ahead_ends_the_run_cleanly(tmp_path: Path, monkeypatch) -> None:
    """The disk fills while both workers convert and the reader holds pieces they will
    never take: the run must end (no worker left waiting for a piece), with the error,
    nothing on the small disk, the source untouched."""

    from test_faults import mounted_tmpfs

    source = tmp_path / "thirty.safetensors"
    write_safetensors(source, [SyntheticTensor(f"w{i}", "F32", (2_500_000,)) for i in range(3)], ByteSource(3))
    before = snapshot(tmp_path)
    monkeypatch.setattr(shardkit.engine.execute, "check_free_space", lambda folder, needed: None)
    monkeypatch.setattr(block_writer, "BLOCK", 1 << 20)
    monkeypatch.setattr(source_stream, "SLOT", 256 * 1024)
    with mounted_tmpfs(tmp_path / "full", "size=8m") as full:
        dest = full / "merged.safetensors"
        outcome = raised_within(60, lambda: shardkit.merge(source, dest, dtype="bf16"))
        assert len(outcome) == 1 and isinstance(outcome[0], shardkit.errors.WriteError), outcome
        assert str(outcome[0]) == f"{dest}: no space left on device; nothing was written"
        assert list(full.iterdir()) == []
    assert snapshot(tmp_path) == before
    assert temporaries(tmp_path) == []


def test_a_source_that_ends_before_a_streamed_span_is_an_error(tmp_path: Path) -> None:
    """Read by the stream directly: a file shorter than its planned spans gives EIO,
    raised in the worker that takes the piece, not a block of zeros."""
    source = tmp_path / "short.safetensors"
    write_safetensors(source, [SyntheticTensor("w", "F32", (300_000,))], ByteSource(1))
    opened = open_checkpoint(source)
    planned = plan_merge(opened, "out.safetensors", dtype_for=choose_dtypes(opened, "bf16")).files[0]
    assert any(isinstance(step, Transform) for step in planned.steps)
    os.truncate(source, source.stat().st_size - 100_000)
    with SourceFiles() as sources, source_stream.SourceStream([planned], 1 << 20, sources, slot=64 * 1024) as stream:
        out = memoryview(bytearray(min(1 << 20, planned.size)))
        with pytest.raises(OSError) as raised:
            stream.fill(0, 0, out, lambda start, into, read: fill(planned, start, into, read))
    assert raised.value.errno == errno.EIO and "ended early" in str(raised.value)


def test_a_read_ahead_hint_reaches_past_the_devices_window(tmp_path: Path) -> None:
    """Linux reads at most one read-ahead window of each WILLNEED hint; in pieces, all of
    it is read."""
    path = tmp_path / "forty-eight"
    with open(path, "wb") as handle:
        handle.write(os.urandom(1 << 20) * 48)
    if not can_see_the_page_cache([path]):
        pytest.skip("this filesystem keeps every page resident (tmpfs)")
    fd = os.open(path, os.O_RDONLY)
    try:
        assert read_ahead.window(os.fstat(fd).st_dev) >= read_ahead.FALLBACK_WINDOW
        read_ahead.will_need(fd, 0, 48 << 20)
        deadline = time.monotonic() + 20
        while resident(path)[0] < resident(path)[1] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert resident(path)[0] == resident(path)[1]
    finally:
        os.close(fd)


def test_a_worker_failing_mid_block_does_not_leave_the_other_waiting(tmp_path: Path, monkeypatch) -> None:
    """One worker fails half-way through its block's pieces: the pieces it leaves hold
    the reader's slots, so the other worker, waiting for the next block's pieces, must be
    woken (the block writer's on_stop), or the run never ends."""

    source = tmp_path / "thirty.safetensors"
    write_safetensors(source, [SyntheticTensor(f"w{i}", "F32", (2_500_000,)) for i in range(3)], ByteSource(3))
    monkeypatch.setattr(block_writer, "BLOCK", 1 << 20)
    monkeypatch.setattr(source_stream, "SLOT", 128 * 1024)
    monkeypatch.setattr(source_stream, "SLOTS", 2)  # the pieces left behind fill every slot
    real_fill, calls = shardkit.engine.execute.fill, []

    def failing_fill(*args, **kwargs):
        calls.append(threading.current_thread().name)
        if len(calls) == 37:  # the 5th piece of the 3rd block (16 pieces per block of 1 MiB)
            raise RuntimeError("failed in the middle of a block")
        return real_fill(*args, **kwargs)

    monkeypatch.setattr(shardkit.engine.execute, "fill", failing_fill)
    outcome = raised_within(60, lambda: shardkit.merge(source, tmp_path / "merged.safetensors", dtype="bf16"))
    assert [str(e) for e in outcome] == ["failed in the middle of a block"]
    assert len(set(calls)) == 2  # both workers converted
    assert temporaries(tmp_path) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["thirty.safetensors"]


def test_a_split_streams_every_output_in_one_order(
    mixed: Path, tmp_path: Path, monkeypatch, recorded: list[int]
) -> None:
    """A split's files are one stream of blocks: the stream numbers its pieces across
    them, and each file is the page-cache path's, byte for byte."""
    monkeypatch.setattr(block_writer, "BLOCK", 256 * 1024)
    monkeypatch.setattr(source_stream, "SLOT", 64 * 1024)
    shardkit.split(mixed, tmp_path / "streamed", max_shard_size=1_500_000, dtype="fp16")
    monkeypatch.setenv("SHARDKIT_COPY_METHOD", "kernel")
    shardkit.split(mixed, tmp_path / "kernel", max_shard_size=1_500_000, dtype="fp16")
    names = sorted(p.name for p in (tmp_path / "streamed").iterdir())
    assert len([n for n in names if n.endswith(".safetensors")]) >= 3
    assert names == sorted(p.name for p in (tmp_path / "kernel").iterdir())
    assert all((tmp_path / "streamed" / n).read_bytes() == (tmp_path / "kernel" / n).read_bytes() for n in names)
    assert len(recorded) == 1 and recorded[0] > 20


# ---------------------------------------------------------------------- adversarial layouts


def raw_safetensors(path: Path, entries: list[tuple[str, str, tuple[int, ...], bytes]], order: list[int]) -> None:
    """A safetensors file whose data holds `entries` in the file order `order` (indexes
    into entries), whatever order the header lists them in."""
    import json
    import struct

    placed, at = {}, 0
    for i in order:
        placed[i] = (at, at + len(entries[i][3]))
        at += len(entries[i][3])
    header = {name: {"dtype": dtype, "shape": list(shape), "data_offsets": list(placed[i])}
              for i, (name, dtype, shape, _) in enumerate(entries)}
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(text)) + text)
        for i in order:
            handle.write(entries[i][3])


def small_tensors(folder: Path, layout: str, count: int) -> Path:
    """`count` F32 tensors of 64 elements (256 bytes) named in output order, laid out
    in the sources: 'alternating' (two shards holding every other one, as names sorted
    across shards are), 'reversed' (one file, back to front) or 'shuffled'."""
    import json
    import random

    folder.mkdir()
    entries = [(f"t.{i:06d}", "F32", (64,), random.Random(i).randbytes(256)) for i in range(count)]
    if layout == "alternating":
        weight_map = {}
        for shard in range(2):
            name = f"model-{shard + 1:05d}-of-00002.safetensors"
            mine = entries[shard::2]
            raw_safetensors(folder / name, mine, list(range(len(mine))))
            weight_map.update({entry[0]: name for entry in mine})
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        return folder
    order = list(range(count))[::-1] if layout == "reversed" else random.Random(0).sample(range(count), count)
    raw_safetensors(folder / "model.safetensors", entries, order)
    return folder


def same_as_the_page_cache_path(source: Path, tmp_path: Path, monkeypatch, **options) -> Path:
    """Convert `source` with the stream and through the page cache; the two outputs'
    bytes must be equal. Returns the streamed one."""
    streamed, through_cache = tmp_path / "streamed.safetensors", tmp_path / "kernel.safetensors"
    shardkit.merge(source, streamed, **options)
    with monkeypatch.context() as kernel:
        kernel.setenv("SHARDKIT_COPY_METHOD", "kernel")
        shardkit.merge(source, through_cache, **options)
    assert streamed.read_bytes() == through_cache.read_bytes()
    return streamed


@pytest.mark.parametrize("layout", ["alternating", "reversed"])
def test_small_tensors_a_source_holds_near_each_other_are_read_as_one_span(
    tmp_path: Path, monkeypatch, layout: str
) -> None:
    """The output takes its small tensors from two shards in turn, or from one file
    back to front: each source's bytes are still neighbours, read in a few requests.
    Joined only with the span just before, every 256-byte tensor was a request of its
    own, rounded to 4096 bytes: 16x the sources read, 4x a page-cache merge's time."""
    source = small_tensors(tmp_path / "source", layout, 20_000)
    requests: list[int] = []
    real_read_span = source_stream.SourceStream._read_span

    def counted(self, span, buffer, direct) -> None:
        requests.append(span.aligned_end - span.aligned_start)
        real_read_span(self, span, buffer, direct)

    monkeypatch.setattr(source_stream.SourceStream, "_read_span", counted)
    same_as_the_page_cache_path(source, tmp_path, monkeypatch, dtype="bf16")
    data = sum(path.stat().st_size for path in source.glob("*.safetensors"))
    assert sum(requests) < data * 1.1, f"{sum(requests)} bytes read in {len(requests)} requests for {data}"
    assert len(requests) < 20


def test_cutting_a_block_of_scattered_small_tensors_scans_it_a_few_times(tmp_path: Path) -> None:
    """Small tensors scattered over their file (no two neighbours): a block takes many
    pieces. Each piece's cut started from the rest of the block, so the block's steps
    were scanned once per piece (60,000 such tensors: 8 s of cutting before a byte was
    read); from twice the last piece, a few times in all."""
    source = small_tensors(tmp_path / "source", "shuffled", 20_000)
    opened = open_checkpoint(source)
    planned = plan_merge(opened, "out.safetensors", dtype_for=choose_dtypes(opened, "bf16")).files[0]
    scanned: list[int] = []
    real_spans = source_stream._spans

    def counted(planned, start, end):
        scanned.append(end - start)
        return real_spans(planned, start, end)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(source_stream, "_spans", counted)
        pieces = source_stream._cut(planned, 0, 0, planned.size, source_stream.SLOT)
    assert len(pieces) > 10 and sum(p.length for p in pieces) == planned.size
    assert sum(scanned) < 4 * planned.size, f"{sum(scanned) / planned.size:.1f}x the block scanned"
