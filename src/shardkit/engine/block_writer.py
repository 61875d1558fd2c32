"""Writing output files as large aligned blocks with O_DIRECT, from two workers.

Why not the kernel copy (:mod:`shardkit.engine.byte_copy`) everywhere: measured on this
project's benchmark disk, a copy through the page cache spends its time in write-back
(a 2 GB buffered write + fsync took 4.5-8.2 s, the same bytes written with O_DIRECT
4.0-4.4 s), while reads from the sources are cheap and can run at the same time.
So each output block is assembled in user memory (by the output's `fill` function:
the plan's header bytes, byte ranges of the shards read with `preadv`, converted
tensors), then written straight to the disk
while the other worker assembles the next block. The read of block N+2 is announced
ahead (`POSIX_FADV_WILLNEED`, :mod:`shardkit.engine.read_ahead`) so it is usually in
the page cache when its turn comes; a block that converts tensors gets its source
bytes from :mod:`shardkit.engine.source_stream` instead (O_DIRECT, read ahead in order).

Writes start in file order (a worker waits for the previous block's turn), so the
file grows front to back; the files of a split are one stream of blocks, so the next
file's first blocks are read while the previous file's last ones are written. Block
buffers sit on huge pages where the kernel allows (:func:`block_buffer`), so the disk
gets requests of `max_sectors_kb` rather than ~1 MB. Because the bytes pass through
this process anyway, `--sha256` hashes the same buffers on a third thread, in file
order, at no extra read. Memory stays constant: two blocks of :data:`BLOCK` bytes,
whatever the model size; the output never fills the page cache with dirty data, so
the rest of the machine keeps its cache.

Where the destination refuses O_DIRECT (tmpfs on older kernels, some FUSE and network
filesystems), :class:`DirectIOUnavailable` is raised before anything is reported
written, and the caller falls back to the kernel copy.
"""

from __future__ import annotations

import bisect
import errno
import fcntl
import mmap
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from .byte_copy import Hasher

BLOCK = 32 * 1024 * 1024
#: O_DIRECT needs offsets, lengths and buffers aligned to the logical block size;
#: 4096 covers 512- and 4096-byte devices. Buffers come from mmap, so page-aligned.
ALIGN = 4096
WORKERS = 2
#: Block buffers start on a transparent huge page boundary (x86-64 and arm64 PMD size).
HUGE_PAGE = 2 * 1024 * 1024


class DirectIOUnavailable(Exception):
    """The destination does not accept O_DIRECT writes; nothing was written."""


def enable(fd: int) -> bool:
    """Switch `fd` to O_DIRECT; False where the filesystem refuses it."""
    if not hasattr(os, "O_DIRECT"):
        return False
    try:
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_DIRECT)
    except OSError:
        return False
    return True


def disable(fd: int) -> None:
    if not hasattr(os, "O_DIRECT"):
        return
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~os.O_DIRECT)


#: `fill(start, into)`: put bytes [start, start + len(into)) of the output into `into`.
Fill = Callable[[int, memoryview], None]
#: `read_ahead(start, end)`: hint the kernel at the source bytes of output bytes [start, end).
ReadAhead = Callable[[int, int], None]


@dataclass(frozen=True)
class Output:
    """One output file: an empty file open with O_DIRECT, its size, and what makes its bytes."""

    fd: int
    size: int
    fill: Fill
    hasher: Hasher | None = None
    read_ahead: ReadAhead | None = None


def write_files(
    outputs: Sequence[Output],
    *,
    on_progress: Callable[[int], None] | None = None,
    on_stop: Callable[[], None] | None = None,
) -> None:
    """Write each output's bytes (from its `fill`) as one stream of blocks.

    Every `fd` must be open with O_DIRECT (:func:`enable`) on an empty file.
    `on_progress` is called from either worker thread, one call at a time. `on_stop`
    is called when a worker fails or is interrupted, before the other is waited for:
    whatever feeds the outputs' `fill` from another thread (a source stream) must then
    wake a worker it keeps waiting.

    Why one stream: started one after the other, every file paid for a pipeline that
    fills (its first block written alone) and drains (its last block with one worker
    idle); here the blocks of the next file are read while the last ones of the
    previous file are written.
    """
    _BlockWriter(outputs, on_progress, on_stop).run()


class Stopped(Exception):
    """Another worker failed; this one stops quietly and the failure is re-raised. What
    feeds a worker from another thread (a source stream) raises it once told to stop."""


class _BlockWriter:
    def __init__(
        self,
        outputs: Sequence[Output],
        on_progress: Callable[[int], None] | None,
        on_stop: Callable[[], None] | None = None,
    ) -> None:
        self.outputs = outputs
        #: global block number of each output's first block (blocks are numbered across outputs)
        self.first_blocks: list[int] = []
        self.blocks = 0
        for output in outputs:
            self.first_blocks.append(self.blocks)
            self.blocks += -(-output.size // BLOCK)
        self.on_progress = on_progress
        self.on_stop = on_stop
        self.lock = threading.Condition()
        self.next_block = 0
        self.next_turn = 0  # the block whose write (and hash) may start next
        self.stop = False
        self.failure: BaseException | None = None
        self.hash_pool: ThreadPoolExecutor | None = None

    def run(self) -> None:
        if any(output.hasher is not None for output in self.outputs):
            self.hash_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shardkit-hash")
        helper: threading.Thread | None = None
        try:
            if self.blocks:
                largest = max(output.size for output in self.outputs)
                buffer = block_buffer(min(BLOCK, _round_up(largest)))
                self._first_block(buffer)
                if self.blocks > 1:
                    helper = threading.Thread(target=self._helper, name="shardkit-writer", daemon=True)
                    try:
                        helper.start()
                    except RuntimeError:  # "can't start new thread": nothing to join
                        helper = None
                        raise
                self._work(buffer)
        except Stopped:
            pass  # the helper failed; its failure is raised below
        except BaseException as exc:  # Ctrl-C included: stop the helper before unwinding
            self._fail(exc)
            raise
        finally:
            # The threads write to and read from fds the caller closes once we return:
            # they must be gone first, even if a second Ctrl-C or SIGTERM arrives now.
            if helper is not None:
                uninterruptible(helper.join, self._fail)
            if self.hash_pool is not None:
                uninterruptible(self.hash_pool.shutdown, self._fail)
        if self.failure is not None:
            raise self.failure
        for output in self.outputs:
            os.ftruncate(output.fd, output.size)  # each last block was written padded to ALIGN

    def _locate(self, block: int) -> tuple[int, int]:
        """(output number, byte offset in that output) of global block `block`."""
        which = bisect.bisect_right(self.first_blocks, block) - 1  # the last of equals: empty outputs own no block
        return which, (block - self.first_blocks[which]) * BLOCK

    # ------------------------------------------------------------------ workers

    def _first_block(self, buffer: memoryview) -> None:
        """Block 0 alone, so a refusal of O_DIRECT surfaces before any progress."""
        self.next_block = 1
        which, start = self._locate(0)
        length = self._fill(buffer, which, start)
        hashed = self._take_turn(0, which, buffer[:length])
        try:
            self._write(which, buffer[: _round_up(length)], start)
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                self._wait(hashed)
                raise DirectIOUnavailable(str(exc)) from None
            raise
        self._wait(hashed)
        self._progress(length)

    def _helper(self) -> None:
        try:
            self._work(block_buffer(BLOCK))
        except Stopped:
            pass
        except BaseException as exc:
            self._fail(exc)

    def _work(self, buffer: memoryview) -> None:
        hashed: Future[None] | None = None
        while True:
            with self.lock:
                if self.stop:
                    raise Stopped
                index = self.next_block
                if index >= self.blocks:
                    break
                self.next_block += 1
            self._prefetch(index + WORKERS)
            self._wait(hashed)  # the hash of this buffer's last block must finish first
            which, start = self._locate(index)
            length = self._fill(buffer, which, start)
            hashed = self._take_turn(index, which, buffer[:length])
            self._write(which, buffer[: _round_up(length)], start)
            self._progress(length)
        self._wait(hashed)

    def _fail(self, exc: BaseException) -> None:
        with self.lock:
            if self.failure is None and not isinstance(exc, Stopped):
                self.failure = exc
            self.stop = True
            self.lock.notify_all()
        if self.on_stop is not None:
            self.on_stop()

    # ------------------------------------------------------------------ block bytes

    def _fill(self, buffer: memoryview, which: int, start: int) -> int:
        """Bytes [start, start + BLOCK) of output `which` into `buffer`; returns how many."""
        output = self.outputs[which]
        length = min(BLOCK, output.size - start)
        output.fill(start, buffer[:length])
        return length

    def _prefetch(self, index: int) -> None:
        """Ask the kernel to start reading block `index`'s sources now."""
        if index >= self.blocks:
            return
        which, start = self._locate(index)
        output = self.outputs[which]
        if output.read_ahead is not None:
            output.read_ahead(start, min(start + BLOCK, output.size))

    # ------------------------------------------------------------------ output

    def _write(self, which: int, view: memoryview, offset: int) -> None:
        """Write all of `view`; a short write usually means the disk filled up (tmpfs does that).

        An aligned remainder is retried, so the kernel reports the real error; an
        unaligned one cannot be written with O_DIRECT, so it is reported as ENOSPC.
        """
        while view:
            written = os.pwrite(self.outputs[which].fd, view, offset)
            if written != len(view) and (written == 0 or written % ALIGN):
                raise OSError(errno.ENOSPC, f"short write at offset {offset + written} (device full?)")
            view, offset = view[written:], offset + written

    def _take_turn(self, index: int, which: int, view: memoryview) -> Future[None] | None:
        """Wait until every earlier block's write has started; hand this block to the hasher.

        Writes therefore start in file order (two still run at once). Unordered, the
        second worker often extended the file past a hole the first was about to fill:
        the 7B merge then measured 1.10-1.26x `cat`+`sync`, while the same code with
        --sha256 (ordered by the hash) measured 0.91x in the same run.
        """
        with self.lock:
            self.lock.wait_for(lambda: self.next_turn == index or self.stop)
            if self.stop:
                raise Stopped
            future = None
            hasher = self.outputs[which].hasher
            if self.hash_pool is not None and hasher is not None:
                future = self.hash_pool.submit(hasher.update, view)
            self.next_turn += 1
            self.lock.notify_all()
        return future

    @staticmethod
    def _wait(future: Future[None] | None) -> None:
        if future is not None:
            future.result()

    def _progress(self, length: int) -> None:
        if self.on_progress is not None:
            with self.lock:
                self.on_progress(length)


def uninterruptible(wait: Callable[[], object], on_interrupt: Callable[[BaseException], None] | None = None) -> None:
    """Call `wait` (a join, a pool's shutdown) to completion: the threads it waits for use
    descriptors the caller closes next. A Ctrl-C meanwhile is passed to `on_interrupt`
    (the block writer stops its workers) and raised once `wait` has returned."""
    interrupted: BaseException | None = None
    while True:
        try:
            wait()
            break
        except KeyboardInterrupt as exc:
            interrupted = exc
            if on_interrupt is not None:
                on_interrupt(exc)
    if interrupted is not None:
        raise interrupted


def block_buffer(size: int) -> memoryview:
    """`size` bytes of private memory, backed by huge pages where the kernel allows.

    Why: a device request can hold at most `max_segments` (254 on virtio) physically
    contiguous runs; from 4 KiB pages an O_DIRECT write is therefore cut into ~1 MB
    requests, from 2 MiB pages into `max_sectors_kb` (4 MB) ones. Measured on the
    benchmark disk, 32 MiB writes from two workers: 3,617 requests of 869 KiB on
    average (459 MB/s) against 840 requests of 3,745 KiB (693 MB/s) for the same
    3 GiB. MAP_PRIVATE because shared anonymous memory is shmem, which follows
    `shmem_enabled` rather than MADV_HUGEPAGE. Without THP this is plain memory.
    """
    region = mmap.mmap(-1, size + HUGE_PAGE, flags=mmap.MAP_PRIVATE)
    start = (-_address(region)) % HUGE_PAGE
    if hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            region.madvise(mmap.MADV_HUGEPAGE, start, size)
        except OSError:
            pass  # a kernel built without THP: 4 KiB pages, the writes still work
    return memoryview(region)[start : start + size]


def _address(region: mmap.mmap) -> int:
    import ctypes

    return ctypes.addressof(ctypes.c_char.from_buffer(region))


def _round_up(length: int) -> int:
    return -(-length // ALIGN) * ALIGN
