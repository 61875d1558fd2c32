"""Hold off the signals that interrupt a run while a commit that cannot be undone runs.

A local commit is one rename, but an S3 folder is committed by one server-side copy per
object: a Ctrl-C between two of them would leave the folder half old, half new. The
signals that would interrupt the run (those with a Python handler: the CLI turns SIGINT,
SIGTERM, SIGHUP and SIGQUIT into KeyboardInterrupt) are recorded instead, and the first
one is handled as usual once the commit is done.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

_HELD = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT") if hasattr(signal, name))


@contextmanager
def held_signals() -> Iterator[None]:
    """Run the block with interrupting signals held; the first that came is handled after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    arrived: list[int] = []
    saved: dict[int, Any] = {}
    for number in _HELD:
        handler = signal.getsignal(number)
        if callable(handler):
            saved[number] = handler
            signal.signal(number, lambda signum, frame: arrived.append(signum))
    try:
        yield
    finally:
        for number, handler in saved.items():
            signal.signal(number, handler)
    if arrived:
        saved[arrived[0]](arrived[0], None)
