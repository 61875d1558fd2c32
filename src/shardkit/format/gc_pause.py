"""Pausing Python's cyclic garbage collector while headers turn into objects.

Parsing a header and cross-checking an index build several small objects per tensor
and free almost none of them, so every collection pass finds nothing to collect but
still scans everything built so far: the passes grow with the checkpoint. Measured
on one 200,000-tensor header: parsing 5.7 s with the collector running, 2.9 s
paused; inspect of an 18,867-tensor MoE index 1.11 s against 0.73 s. These objects
hold no reference cycles, so nothing is lost by collecting later.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def gc_paused() -> Iterator[None]:
    """Pause automatic collection inside the block (and any nested one), then resume it.

    Also usable as a decorator. A caller that had collection off keeps it off.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
