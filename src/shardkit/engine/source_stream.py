"""The sources of converted blocks, read as one ordered O_DIRECT stream ahead of the
block writer's workers.

Why: a block the block writer copies is read through the page cache, which costs
this process little. A block that converts tensors is CPU work, and on this
project's benchmark machine copying freshly read page-cache pages into the process
was most of it: 64% of an F32 → BF16 merge's CPU time was the kernel's
`_copy_to_iter` (perf), at about 1.5 GB/s per core. Read with O_DIRECT, the device
writes the bytes straight into this process's buffer and that copy is gone (7.7 s of
CPU became 2.9 s).

Why a stream and one reader thread: read by each worker for its own block, the two
workers fell into step, both reading (and sharing the disk) and then both writing,
with the disk idle for reads meanwhile. One thread reading every converted block's
sources front to back, a few pieces ahead, keeps one read in flight all the time,
beside the workers' writes: what `fio` measures as the device's floor for reading
and writing at once.

How: at the start, each block that holds a transform (a block of plain copies keeps
the page cache and its read-ahead) is cut into pieces whose source bytes, as
4096-aligned spans, fit one slot buffer (:data:`SLOT`). The reader fills
:data:`SLOTS` slots in piece order; a worker takes the pieces of its block in
order, makes the bytes of each from the slot (:meth:`SourceStream.fill`), and gives
the slot back. Whatever a piece's steps read outside its spans is read as before,
so the bytes never depend on how the pieces were cut. Memory: SLOTS × SLOT, whatever
the model size. Where O_DIRECT is refused (tmpfs on older kernels, some FUSE
filesystems), the same stream reads through the page cache.
"""

from __future__ import annotations

import errno
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from ..plan.files import PlannedFile, Transform
from ..plan.fill import Read
from .block_writer import ALIGN, Stopped, block_buffer, uninterruptible
from .source_files import SourceFiles

#: Bytes of one slot, a multiple of ALIGN: the device's largest request here (4 MiB,
#: `max_sectors_kb`), at which fio reads this disk at its O_DIRECT rate.
SLOT = 4 * 1024 * 1024
#: Slots: the readers stay this far ahead of the workers (48 MiB, a block and a half).
SLOTS = 12
#: Reader threads, each with one request in flight. One alone, beside the block
#: writer's writes, read this disk at 0.92 GB/s, as fio does with one request: a BF16
#: → FP16 merge then took 1.29x a plain merge; with three readers and 12 slots, 1.01x.
READERS = 3
#: Spans of one source closer than this are read as one (the gap is read too): a
#: tensor's neighbours are usually its neighbours in the file, and fewer requests are
#: faster than the few bytes between them.
GAP = 256 * 1024
#: Spans of one source a range may join in a piece (its latest few): a file read in
#: name order is a few interleaved runs, one per dtype region.
JOINED_KEPT = 4
#: Blocks whose pieces are remembered: the few the workers and the readers are at.
CUTS_KEPT = 64
#: O_DIRECT descriptors each reader keeps open: sources are read front to back, one
#: after another, and a piece rarely spans more than two; few, because they come on top
#: of SourceFiles' own under the same RLIMIT_NOFILE.
OPEN_DIRECT = 2
#: Descriptors a process needs beside SourceFiles' and the readers' (the standard
#: streams, the output, what an import opens): under a soft RLIMIT_NOFILE without room
#: for all three, the readers read through SourceFiles' descriptors, without O_DIRECT.
SPARE_DESCRIPTORS = 16


@dataclass(frozen=True)
class _Span:
    """Source bytes [start, end) of `source`, read as [aligned_start, aligned_end) into
    a slot from `at`."""

    source: str
    start: int
    end: int
    at: int

    @property
    def aligned_start(self) -> int:
        return self.start // ALIGN * ALIGN

    @property
    def aligned_end(self) -> int:
        return -(-self.end // ALIGN) * ALIGN


@dataclass(frozen=True)
class _Piece:
    """Output bytes [start, start + length) of output `which`, made from `spans`."""

    which: int
    start: int
    length: int
    spans: tuple[_Span, ...]


class SourceStream:
    """Reads the sources of the converted blocks of `files` (blocks of `block` bytes,
    numbered across the files as the block writer numbers them) ahead of their use.

    Use as a context manager: leaving it stops the reader thread and closes its
    descriptors, before `sources` is closed.
    """

    def __init__(
        self, files: Sequence[PlannedFile], block: int, sources: SourceFiles, *, slot: int | None = None,
        slots: int | None = None,
    ) -> None:
        self.files = files
        self.block = block
        self.sources = sources
        self.slot = SLOT if slot is None else slot
        self._cuts: OrderedDict[tuple[int, int], tuple[_Piece, ...]] = OrderedDict()
        self._lock = threading.RLock()  # re-entered: a reader cuts blocks while it holds it
        #: workers wait here for their pieces, readers for a free slot: each wakes only its own
        self._piece_ready = threading.Condition(self._lock)
        self._slot_free = threading.Condition(self._lock)
        self._free: list[memoryview] = []
        self._buffers_made = 0
        self._slots = SLOTS if slots is None else slots
        self._ready: dict[tuple[int, int], memoryview] = {}
        self._failure: BaseException | None = None
        self._stopped = False
        #: what the readers read, in order; pieces are cut as they are reached, so memory
        #: does not grow with the model (a 1.3 TB output would be 300,000 pieces)
        self._order = (piece for which, start in self._blocks() for piece in self.pieces_of(which, start))
        converts = any(isinstance(step, Transform) for planned in files for step in planned.steps)
        self._readers = [
            threading.Thread(target=self._read_all, name=f"shardkit-source-reader-{n}", daemon=True)
            for n in range(READERS if converts else 0)
        ]
        for reader in self._readers:
            reader.start()

    def __enter__(self) -> SourceStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def streams(self, which: int, start: int) -> bool:
        """Whether the block at `start` of output `which` is made from this stream."""
        return bool(self.pieces_of(which, start))

    def pieces_of(self, which: int, start: int) -> tuple[_Piece, ...]:
        """The pieces of a block (none where it is not streamed), cut once: the readers,
        the worker and the read-ahead hint all ask."""
        key = (which, start)
        with self._lock:
            cut = self._cuts.get(key)
        if cut is None:
            planned = self.files[which]
            cut = _cut(planned, which, start, min(start + self.block, planned.size), self.slot)
            with self._lock:
                self._cuts[key] = cut
                while len(self._cuts) > CUTS_KEPT:
                    self._cuts.popitem(last=False)
        return cut

    def fill(self, which: int, start: int, into: memoryview, make: Callable[[int, memoryview, Read], None]) -> None:
        """Make the block at `start` of output `which` into `into`, piece by piece:
        `make(piece_start, piece_bytes, read)` with a `read` that serves the piece's
        source bytes from its slot."""
        for piece in self.pieces_of(which, start):
            buffer = self._take((which, piece.start))
            try:
                make(piece.start, into[piece.start - start : piece.start - start + piece.length],
                     _SlotRead(piece, buffer, self.sources.read_into))
            finally:
                self._give_back(buffer)

    def abort(self) -> None:
        """Wake every worker waiting for a piece (they raise) and stop the reader: the
        block writer calls this when one of its workers fails."""
        with self._lock:
            self._stopped = True
            self._piece_ready.notify_all()
            self._slot_free.notify_all()

    def close(self) -> None:
        self.abort()
        for reader in self._readers:
            uninterruptible(reader.join)

    # ------------------------------------------------------------------ workers' side

    def _take(self, key: tuple[int, int]) -> memoryview:
        with self._lock:
            while key not in self._ready:
                if self._failure is not None:
                    raise self._failure
                if self._stopped:
                    raise Stopped
                self._piece_ready.wait()
            return self._ready.pop(key)

    def _give_back(self, buffer: memoryview) -> None:
        with self._lock:
            self._free.append(buffer)
            self._slot_free.notify()

    # ------------------------------------------------------------------ the reader

    def _read_all(self) -> None:
        direct = _DirectFiles(self.sources)
        try:
            while (taken := self._next_piece()) is not None:
                piece, buffer = taken
                for span in piece.spans:
                    self._read_span(span, buffer, direct)
                with self._lock:
                    self._ready[piece.which, piece.start] = buffer
                    self._piece_ready.notify_all()
        except BaseException as exc:  # handed to the worker that needs the piece
            with self._lock:
                self._failure = self._failure or exc
                self._piece_ready.notify_all()
                self._slot_free.notify_all()
        finally:
            direct.close()

    def _blocks(self) -> Iterator[tuple[int, int]]:
        """(output, start) of every block, in the block writer's order."""
        for which, planned in enumerate(self.files):
            for start in range(0, planned.size, self.block):
                yield which, start

    def _next_piece(self) -> tuple[_Piece, memoryview] | None:
        """The next piece nobody reads yet, with a free slot for it; None once every piece
        is taken or the stream stops. A slot is found before the piece is taken, so the
        pieces being read are always the first ones not yet read: the piece a worker
        waits for never waits for a slot that later pieces hold."""
        with self._lock:
            while not self._free and self._buffers_made == self._slots and not self._stopped and not self._failure:
                self._slot_free.wait()
            if self._stopped or self._failure is not None:
                return None
            piece = next(self._order, None)  # cut under the lock: one reader at a time
            if piece is None:
                return None
            if self._free:
                return piece, self._free.pop()
            self._buffers_made += 1
        return piece, block_buffer(self.slot)

    def _read_span(self, span: _Span, buffer: memoryview, direct: _DirectFiles) -> None:
        """Read `span` into its place in `buffer`; a source that ends before the span
        does has shrunk."""
        start, end = span.aligned_start, span.aligned_end
        target = buffer[span.at : span.at + end - start]
        fd = direct.get(span.source)
        with self.sources.use(span.source) as cached:
            filled = 0
            while filled < len(target):
                try:
                    got = os.preadv(cached if fd is None else fd, [target[filled:]], start + filled)
                except OSError as exc:
                    if fd is None or exc.errno != errno.EINVAL:
                        raise
                    direct.refuse(span.source)  # the device wants a larger alignment
                    fd = None
                    continue
                if got == 0:
                    break
                filled += got
        if start + filled < span.end:
            raise OSError(errno.EIO, f"source ended early at offset {start + filled} (file shrank?)", span.source)


class _DirectFiles:
    """One reader's O_DIRECT descriptors of the sources, the last few used kept open
    (sources are read front to back, one after another)."""

    def __init__(self, sources: SourceFiles) -> None:
        self.sources = sources
        self.fds: OrderedDict[str, int | None] = OrderedDict()
        self.allowed = _room_for_direct(sources.limit)

    def get(self, source: str) -> int | None:
        """An O_DIRECT descriptor of `source`, or None where O_DIRECT is refused."""
        if not self.allowed:
            return None
        if source in self.fds:
            self.fds.move_to_end(source)
            return self.fds[source]
        with self.sources.use(source) as cached:
            fd = self.fds[source] = open_direct(cached)
        while len(self.fds) > OPEN_DIRECT:
            self._close(self.fds.popitem(last=False)[1])
        return fd

    def refuse(self, source: str) -> None:
        """Read `source` through the page cache from now on."""
        self._close(self.fds.get(source))
        self.fds[source] = None

    def close(self) -> None:
        while self.fds:
            self._close(self.fds.popitem()[1])

    @staticmethod
    def _close(fd: int | None) -> None:
        if fd is not None:
            os.close(fd)


def _room_for_direct(source_files: int) -> bool:
    """Whether the soft RLIMIT_NOFILE leaves room for the readers' O_DIRECT descriptors
    beside `source_files` of SourceFiles and SPARE_DESCRIPTORS. Why: under `ulimit -n 12`
    (SourceFiles keeps 4) the readers' six took the room the output and numpy's import
    needed, and a conversion the page cache did fine failed with "Too many open files"."""
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, OSError, ValueError):
        return True
    if soft < 0 or soft == getattr(resource, "RLIM_INFINITY", -1):
        return True
    return soft >= source_files + READERS * OPEN_DIRECT + SPARE_DESCRIPTORS


def open_direct(fd: int) -> int | None:
    """A second descriptor of the file open as `fd`, with O_DIRECT (reopened through
    /proc, so it is the same inode whatever its path became), or None where the
    filesystem, the platform or a missing /proc refuses it."""
    if not hasattr(os, "O_DIRECT"):
        return None
    try:
        return os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_DIRECT | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None


class _SlotRead:
    """The `read` of one piece: its source bytes from the slot, anything else through
    `fallback`; :meth:`view` lends them without a copy (a cast converts straight from
    the slot, the copy into its scratch was an eighth of a BF16 → FP16 merge's CPU)."""

    def __init__(self, piece: _Piece, buffer: memoryview, fallback: Read) -> None:
        self.piece, self.buffer, self.fallback = piece, buffer, fallback

    def __call__(self, source: str, offset: int, into: memoryview) -> None:
        view = self.view(source, offset, len(into))
        if view is None:
            self.fallback(source, offset, into)
        else:
            into[:] = view

    def view(self, source: str, offset: int, length: int) -> memoryview | None:
        """Bytes [offset, offset + length) of `source` as they sit in the slot, or None."""
        for span in self.piece.spans:
            if span.source == source and span.start <= offset and offset + length <= span.end:
                at = span.at + offset - span.aligned_start
                return self.buffer[at : at + length]
        return None


def _cut(planned: PlannedFile, which: int, start: int, end: int, slot: int) -> tuple[_Piece, ...]:
    """The pieces of block [start, end) of `planned`, or none where it transforms
    nothing (plain copies stay on the page-cache path), quantises (each piece would make
    every band of block rows it touches whole again: cut into slot-sized pieces, a
    BF16 → FP8 merge did a third more work, 38 s against 26 s) or a piece would not fit
    a slot (a strided view's source span may be the whole tensor)."""
    steps = planned.steps_in(start, end)
    transforms = [step for step in steps if isinstance(step, Transform)]
    if not transforms or any(step.quantise is not None for step in transforms):
        return ()
    pieces: list[_Piece] = []
    at = start
    guess = end - start
    while at < end:
        # at most twice the last piece: starting each piece from the rest of the block
        # scanned the block's steps once per piece (60,000 small tensors: 8 s of cutting)
        length = min(end - at, guess)
        while True:
            spans = _spans(planned, at, at + length)
            need = spans[-1].at + spans[-1].aligned_end - spans[-1].aligned_start if spans else 0
            if need <= slot:
                break
            if length <= ALIGN:
                return ()
            length = max(ALIGN, length * slot // need // ALIGN * ALIGN)
        pieces.append(_Piece(which, at, length, tuple(spans)))
        at += length
        guess = 2 * length
    return tuple(pieces)


def _spans(planned: PlannedFile, start: int, end: int) -> list[_Span]:
    """The source bytes of output bytes [start, end), neighbours joined, laid out one
    after the other in a slot.

    A range joins the last span of its own source, not only the span just before it:
    where the output takes its tensors from two or more sources in turn (names sorted
    across shards that each hold every other one), joining only the previous span
    joined nothing, and each small tensor became a request of its own, rounded up to
    4096 bytes (60,000 tensors of 256 bytes: 16x the bytes read, 4x a page-cache merge's
    time). It joins on either side of that span (a file holding its tensors in the
    reverse of the output's order is read in one request too), and any of the source's
    JOINED_KEPT latest spans: safetensors files hold their tensors by dtype, then name,
    so a model's F32 norms sit apart from its BF16 weights, and a merge taking them in
    name order goes back and forth between the two regions of one file.
    """
    joined: list[tuple[str, int, int]] = []
    latest: dict[str, list[int]] = {}  # source -> indexes in `joined` of its JOINED_KEPT latest spans
    for source, offset, length in planned.source_spans(start, end):
        if length <= 0:
            continue
        mine = latest.setdefault(source, [])
        for index in reversed(mine):
            _, begin, finish = joined[index]
            if begin - GAP <= offset + length and offset <= finish + GAP:
                joined[index] = (source, min(begin, offset), max(finish, offset + length))
                break
        else:
            mine.append(len(joined))
            del mine[:-JOINED_KEPT]
            joined.append((source, offset, offset + length))
    spans: list[_Span] = []
    at = 0
    for source, begin, finish in joined:
        spans.append(_Span(source, begin, finish, at))
        at += spans[-1].aligned_end - spans[-1].aligned_start
    return spans
