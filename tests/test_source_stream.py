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
    across shards are), 'reversed' (one file, back to front), 'shuffled', or
    'dtype-regions' (every other one a BF16 64x64 weight, the file holding the F32
    ones first and the BF16 ones after, as safetensors orders a file: by dtype, then name)."""
    import json
    import random

    folder.mkdir()
    entries = [(f"t.{i:06d}", "F32", (64,), random.Random(i).randbytes(256)) for i in range(count)]
    if layout == "dtype-regions":
        entries[1::2] = [(name, "BF16", (64, 64), random.Random(-i).randbytes(8192))
                         for i, (name, _, _, _) in enumerate(entries[1::2])]
        raw_safetensors(folder / "model.safetensors", entries, [*range(0, count, 2), *range(1, count, 2)])
        return folder
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


def same_as_the_page_cache_path(source: Path, tmp_path: Path, monkeypatch, command=None, **options) -> Path:
    """Convert `source` (shardkit.merge, or `command`) with the stream and through the
    page cache; the two outputs' bytes must be equal. Returns the streamed one."""
    run = shardkit.merge if command is None else command
    streamed, through_cache = tmp_path / "streamed.safetensors", tmp_path / "kernel.safetensors"
    run(source, streamed, **options)
    with monkeypatch.context() as kernel:
        kernel.setenv("SHARDKIT_COPY_METHOD", "kernel")
        run(source, through_cache, **options)
    assert streamed.read_bytes() == through_cache.read_bytes()
    return streamed


@pytest.mark.parametrize("layout", ["alternating", "reversed", "dtype-regions"])
def test_small_tensors_a_source_holds_near_each_other_are_read_as_one_span(
    tmp_path: Path, monkeypatch, layout: str
) -> None:
    """The output takes its small tensors from two shards in turn, from one file back
    to front, or from two regions of one file in turn: each source's bytes are still
    neighbours, read in a few requests.
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
    assert len(requests) < 3 * data // source_stream.SLOT + 10  # a few a slot, one a source region


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


ELEMENT = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "U8": 1, "BOOL": 1}


def odd_layout(folder: Path, shards: int, seed: int) -> Path:
    """`shards` shards of 1-6 tensors each, of every converted dtype and some that are
    not, zero-size ones among them, odd lengths (so no tensor starts on an element's
    or a page's boundary, and each file ends mid-page), laid out in a shuffled file order."""
    import json
    import random

    rng = random.Random(seed)
    folder.mkdir()
    weight_map = {}
    for shard in range(shards):
        entries = []
        for t in range(rng.randint(1, 6)):
            dtype = rng.choice(["F64", "F32", "F16", "BF16", "U8", "BOOL", "F32"])
            count = rng.choice([0, 1, 3, 7, 1001, 4097, 33_333, 300_001])
            entries.append((f"t.{shard}.{t}.{dtype}", dtype, (count,),
                            random.Random(shard * 100 + t).randbytes(count * ELEMENT[dtype])))
        name = f"model-{shard + 1:05d}-of-{shards:05d}.safetensors"
        raw_safetensors(folder / name, entries, rng.sample(range(len(entries)), len(entries)))
        weight_map.update({entry[0]: name for entry in entries})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def small_slots(monkeypatch, block: int, slot: int, slots: int, gap: int | None = None) -> None:
    monkeypatch.setattr(block_writer, "BLOCK", block)
    monkeypatch.setattr(source_stream, "SLOT", slot)
    monkeypatch.setattr(source_stream, "SLOTS", slots)
    if gap is not None:
        monkeypatch.setattr(source_stream, "GAP", gap)


@pytest.mark.parametrize(("sizes", "target"), [
    ((64 * 1024, 8 * 1024, 2, 0), "bf16"),  # nothing joined: a span per tensor, blocks too scattered to stream
    ((64 * 1024, 16 * 1024, 3, None), "fp16"),
    ((1 << 20, 96 * 1024, 3, 4096), "fp32"),
    (None, "bf16"),
], ids=["tiny-slots-no-gap", "small-slots", "small-gap", "defaults"])
def test_forty_shards_of_odd_layouts_convert_to_the_page_cache_paths_bytes(
    tmp_path: Path, monkeypatch, recorded: list[int], sizes, target: str
) -> None:
    source = odd_layout(tmp_path / "source", 40, seed=0)
    before = snapshot(source)
    if sizes is not None:
        small_slots(monkeypatch, *sizes)
    same_as_the_page_cache_path(source, tmp_path, monkeypatch, dtype=target)
    assert recorded[0] > 0
    assert snapshot(source) == before


def test_a_split_into_more_files_than_one_block_stream_takes(tmp_path: Path, monkeypatch) -> None:
    """One tensor a file: more outputs than FILES_PER_STREAM, so several streams, one
    after the other, each file the page-cache path's."""
    source = odd_layout(tmp_path / "source", 30, seed=9)
    small_slots(monkeypatch, 64 * 1024, 16 * 1024, 2)
    shardkit.split(source, tmp_path / "streamed", max_shard_size=1, dtype="fp16")
    monkeypatch.setenv("SHARDKIT_COPY_METHOD", "kernel")
    shardkit.split(source, tmp_path / "kernel", max_shard_size=1, dtype="fp16")
    names = sorted(p.name for p in (tmp_path / "streamed").iterdir())
    assert len(names) > shardkit.engine.execute.FILES_PER_STREAM
    assert names == sorted(p.name for p in (tmp_path / "kernel").iterdir())
    assert all((tmp_path / "streamed" / n).read_bytes() == (tmp_path / "kernel" / n).read_bytes() for n in names)


@pytest.mark.parametrize("sizes", [(64 * 1024, 16 * 1024, 2), (1 << 20, 600 * 1024, 3), None],
                         ids=["bands-larger-than-a-slot", "bands-in-a-slot", "defaults"])
def test_fp8_dequantise_and_quantise_stream_the_page_cache_paths_bytes(tmp_path: Path, monkeypatch, sizes) -> None:
    """Dequantised weights read their scales from the other shard; a quantised weight
    reads whole bands of block rows, and its scale grid all of them."""
    from test_fp8 import deepseek_fp8
    from test_fp8_quantise import crafted, quantise_source

    fp8 = tmp_path / "fp8"
    deepseek_fp8(fp8)
    wide = quantise_source(tmp_path / "wide", {
        "model.layers.0.mlp.down_proj.weight": crafted(768, 384, 1, torch.bfloat16),
        "model.layers.0.mlp.up_proj.weight": crafted(384, 1024, 2, torch.float32),
        "model.norm.weight": crafted(1, 333, 3, torch.bfloat16)[0],
    })
    if sizes is not None:
        small_slots(monkeypatch, *sizes)
    (tmp_path / "dequantised").mkdir()
    (tmp_path / "quantised").mkdir()
    same_as_the_page_cache_path(fp8, tmp_path / "dequantised", monkeypatch, dtype="bf16")
    same_as_the_page_cache_path(wide, tmp_path / "quantised", monkeypatch, dtype="fp8")


@pytest.mark.parametrize("sizes", [(64 * 1024, 16 * 1024, 2), (1 << 20, 256 * 1024, 2), None],
                         ids=["tiny-slots", "small-slots", "defaults"])
def test_views_of_a_torch_file_and_a_fusing_recipe_stream_the_page_cache_paths_bytes(
    tmp_path: Path, monkeypatch, sizes
) -> None:
    """A .bin's views are gathered (a transform even without --dtype: `convert`), some
    wider than a slot; a Flux recipe fuses and splits tensors while casting."""
    from test_recipes import bfl_flux
    from test_torch_bin import every_kind_of_tensor

    bin_file = tmp_path / "bin" / "pytorch_model.bin"
    bin_file.parent.mkdir()
    state = every_kind_of_tensor()
    wide = torch.randn(1500, 1100)
    state.update({"wide.t": wide.t(), "wide.rows": wide[::3], "wide.columns": wide[:, 5:900:7]})
    torch.save(state, bin_file)
    flux = tmp_path / "flux1-dev.safetensors"
    safetensors_torch.save_file({k: v.contiguous() for k, v in bfl_flux().items()}, flux)
    if sizes is not None:
        small_slots(monkeypatch, *sizes)
    (tmp_path / "converted").mkdir()
    (tmp_path / "cast").mkdir()
    same_as_the_page_cache_path(bin_file, tmp_path / "converted", monkeypatch, shardkit.convert)
    same_as_the_page_cache_path(bin_file, tmp_path / "cast", monkeypatch, dtype="bf16")
    shardkit.merge(flux, tmp_path / "flux-streamed", recipe="flux-bfl-to-diffusers", dtype="fp16")
    monkeypatch.setenv("SHARDKIT_COPY_METHOD", "kernel")
    shardkit.merge(flux, tmp_path / "flux-kernel", recipe="flux-bfl-to-diffusers", dtype="fp16")
    names = sorted(p.name for p in (tmp_path / "flux-streamed").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "flux-kernel").iterdir())
    assert all((tmp_path / "flux-streamed" / n).read_bytes() == (tmp_path / "flux-kernel" / n).read_bytes()
               for n in names)


def test_a_sparse_source_streams_its_holes_as_zeros(tmp_path: Path, monkeypatch) -> None:
    import json
    import struct

    source = tmp_path / "sparse"
    source.mkdir()
    header = {"a": {"dtype": "F32", "shape": [3_000_000], "data_offsets": [0, 12_000_000]},
              "b": {"dtype": "U8", "shape": [5], "data_offsets": [12_000_000, 12_000_005]},
              "c": {"dtype": "F32", "shape": [3_000_000], "data_offsets": [12_000_005, 24_000_005]}}
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    base = 8 + len(text)
    with open(source / "model.safetensors", "wb") as handle:
        handle.write(struct.pack("<Q", len(text)) + text)
        for offset, data in ((1_000_001, os.urandom(10_000)), (12_000_000, b"12345"), (17_000_003, os.urandom(99))):
            handle.seek(base + offset)
            handle.write(data)
        handle.truncate(base + 24_000_005)
    assert os.stat(source / "model.safetensors").st_blocks * 512 < 1_000_000  # holes, not written zeros
    small_slots(monkeypatch, 1 << 20, 128 * 1024, 3)
    same_as_the_page_cache_path(source, tmp_path, monkeypatch, dtype="bf16")


def test_a_destination_refusing_o_direct_at_the_first_write_falls_back_with_the_readers_ahead(
    mixed: Path, tmp_path: Path, monkeypatch
) -> None:
    """The readers have filled their slots when the first block's write is refused
    (EINVAL: the destination takes no O_DIRECT after all): the stream stops, the kernel
    copy writes the same bytes."""
    small_slots(monkeypatch, 64 * 1024, 16 * 1024, 3)
    real_write = block_writer._BlockWriter._write

    def refuse_the_first(self, which, view, offset):
        if offset == 0:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(self, which, view, offset)

    with monkeypatch.context() as refusing:
        refusing.setattr(block_writer._BlockWriter, "_write", refuse_the_first)
        shardkit.merge(mixed, tmp_path / "refused.safetensors", dtype="bf16")
    monkeypatch.setenv("SHARDKIT_COPY_METHOD", "kernel")
    shardkit.merge(mixed, tmp_path / "kernel.safetensors", dtype="bf16")
    assert (tmp_path / "refused.safetensors").read_bytes() == (tmp_path / "kernel.safetensors").read_bytes()


def test_sources_on_tmpfs_stream_the_page_cache_paths_bytes(tmp_path: Path, monkeypatch) -> None:
    """tmpfs takes O_DIRECT since Linux 6.6 (and refuses it before): either way, the same bytes."""
    from test_faults import mounted_tmpfs

    with mounted_tmpfs(tmp_path / "memory", "size=64m") as memory:
        source = odd_layout(memory / "source", 12, seed=1)
        small_slots(monkeypatch, 64 * 1024, 16 * 1024, 2)
        same_as_the_page_cache_path(source, tmp_path, monkeypatch, dtype="bf16")


def test_a_hub_cache_snapshot_by_a_relative_path_with_sha256_and_verify(tmp_path: Path) -> None:
    """Shards as symlinks into blobs/ (the Hugging Face cache), named by a relative
    path: the O_DIRECT descriptor is the file the link leads to; --sha256 hashes the
    bytes written, --verify accepts them."""
    import hashlib

    from conftest import run_cli

    plain = odd_layout(tmp_path / "plain", 6, seed=2)
    snapshot_folder = tmp_path / "hub" / "snapshots" / "0123abc"
    blobs = tmp_path / "hub" / "blobs"
    snapshot_folder.mkdir(parents=True)
    blobs.mkdir()
    for number, path in enumerate(sorted(plain.iterdir())):
        (blobs / f"blob{number}").write_bytes(path.read_bytes())
        (snapshot_folder / path.name).symlink_to(os.path.relpath(blobs / f"blob{number}", snapshot_folder))
    result = run_cli("merge", "hub/snapshots/0123abc", "-o", "streamed.safetensors", "--dtype", "bf16",
                     "--sha256", "--verify", cwd=tmp_path)
    assert result.exit_code == 0, result.stderr
    kernel = run_cli("merge", plain, "-o", tmp_path / "kernel.safetensors", "--dtype", "bf16",
                     env={"SHARDKIT_COPY_METHOD": "kernel"})
    assert kernel.exit_code == 0, kernel.stderr
    written = (tmp_path / "streamed.safetensors").read_bytes()
    assert written == (tmp_path / "kernel.safetensors").read_bytes()
    assert (tmp_path / "streamed.safetensors.sha256").read_text().split()[0] == hashlib.sha256(written).hexdigest()


def test_peak_memory_of_a_conversion_is_flat_in_the_models_size(tmp_path: Path) -> None:
    """Peak RSS of `merge --dtype bf16 --sha256` of 100 MB and of 300 MB of F32, measured
    by a launcher process (wait4 of its child): the slots and blocks, whatever the size."""
    peaks = []
    for size in (100, 300):
        source = tmp_path / f"f32-{size}"
        source.mkdir()
        write_safetensors(source / "model.safetensors",
                          [SyntheticTensor(f"w{i}", "F32", (1024, 1024)) for i in range(size)], ByteSource(size))
        launcher = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); "
                    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
        out = subprocess.run([sys.executable, "-c", launcher, sys.executable, "-m", "shardkit", "merge", source,
                              "-o", tmp_path / f"{size}.safetensors", "--dtype", "bf16", "--sha256", "--quiet"],
                             capture_output=True, text=True, check=True)
        peaks.append(int(out.stdout) // 1024)
    assert max(peaks) <= 200 and peaks[1] - peaks[0] <= 16, f"peak RSS {peaks} MB"


@pytest.mark.parametrize("nofile", [12, 64])
def test_more_shards_than_descriptors_under_a_low_ulimit(tmp_path: Path, nofile: int) -> None:
    """300 shards under `ulimit -n 64`: the readers' O_DIRECT descriptors come on top of
    SourceFiles' eight. Under `ulimit -n 12` there is no room for them (SourceFiles
    keeps 4; the page-cache path runs there): the readers do without O_DIRECT. Either
    way the output is the unlimited page-cache run's."""
    import resource

    from conftest import run_cli

    source = odd_layout(tmp_path / "source", 300, seed=5)
    limited = subprocess.run(
        [sys.executable, "-m", "shardkit", "merge", source, "-o", tmp_path / "limited.safetensors", "--dtype", "fp16"],
        capture_output=True, text=True,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile)),
    )
    assert limited.returncode == 0, limited.stderr
    kernel = run_cli("merge", source, "-o", tmp_path / "kernel.safetensors", "--dtype", "fp16",
                     env={"SHARDKIT_COPY_METHOD": "kernel"})
    assert kernel.exit_code == 0, kernel.stderr
    assert (tmp_path / "limited.safetensors").read_bytes() == (tmp_path / "kernel.safetensors").read_bytes()


def test_a_quantisation_reads_through_the_page_cache(tmp_path: Path, monkeypatch, recorded: list[int]) -> None:
    """A quantised weight's band of block rows is made whole from all of its rows: cut
    into slot-sized pieces, every piece made again each band it touched (bench_fp8: a
    BF16 → FP8 merge took 38 s against 26 s). Its blocks stay on the page-cache path,
    here with blocks of one band of codes each, which the stream would have taken."""
    from test_fp8_quantise import crafted, quantise_source

    source = quantise_source(tmp_path / "bf16", {
        "model.layers.0.mlp.down_proj.weight": crafted(2048, 1024, 1, torch.bfloat16),
        "model.norm.weight": crafted(1, 333, 3, torch.bfloat16)[0],
    })
    monkeypatch.setattr(block_writer, "BLOCK", 128 * 1024)
    same_as_the_page_cache_path(source, tmp_path, monkeypatch, dtype="fp8")
    assert recorded == [0]
