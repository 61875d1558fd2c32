"""Asking the kernel to read source bytes ahead, in pieces it will not cut short.

Why pieces: Linux serves one `POSIX_FADV_WILLNEED` by reading at most
max(`read_ahead_kb`, `max_sectors_kb`) of it (mm/readahead.c, `force_page_cache_ra`)
and silently drops the rest. Measured on this project's benchmark disk
(`read_ahead_kb` 8192): one hint for 128 MiB left 8 MiB in the page cache, the same
hint as 4 MiB pieces all 128 MiB. The block writer hints 32 MiB blocks ahead, so three
quarters of every block used to be read by the worker that needed it, while it
waited: in a 3.8 s BF16 → FP16 merge its two workers waited 2.4 s (together) in
those reads; with the hints in pieces, 0.8 s, and the merge took 2.9 s.
"""

from __future__ import annotations

import os
from functools import lru_cache

#: The piece where the device's limits cannot be read: the kernel's smallest default
#: read-ahead window (VM_READAHEAD_PAGES, 128 KiB), which no device lowers the cap below
#: unless its read-ahead was switched off.
FALLBACK_WINDOW = 128 * 1024


def will_need(fd: int, offset: int, length: int) -> None:
    """Hint that bytes [offset, offset + length) of `fd` will be read soon, all of them."""
    if not hasattr(os, "posix_fadvise") or length <= 0:
        return
    piece = window(os.fstat(fd).st_dev)
    for at in range(offset, offset + length, piece):
        os.posix_fadvise(fd, at, min(piece, offset + length - at), os.POSIX_FADV_WILLNEED)


@lru_cache(maxsize=64)
def window(device: int) -> int:
    """The most bytes one read-ahead hint reads on the block device `device` (st_dev):
    the larger of its read-ahead window and its largest request, from sysfs (a
    partition's limits are its disk's)."""
    base = f"/sys/dev/block/{os.major(device)}:{os.minor(device)}"
    for queue in (f"{base}/queue", f"{base}/../queue"):
        try:
            limits = [int(_read(f"{queue}/{name}")) for name in ("read_ahead_kb", "max_sectors_kb")]
        except (OSError, ValueError):
            continue
        if max(limits) > 0:
            return max(limits) * 1024
    return FALLBACK_WINDOW


def _read(path: str) -> str:
    with open(path) as file:
        return file.read().strip()
