"""One table from exception to the line the user reads and the exit code.

Every command runs through :meth:`shardkit.cli.output.Output.run`, which looks the
exception up here: the first row whose type matches wins, so the more specific rows
come first (a `PathNotFoundError` is a ShardkitError before it is a FileNotFoundError).
An exception no row matches is a bug and keeps its traceback.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..errors import EXIT_BAD_INPUT, EXIT_FAILURE, EXIT_INTERRUPTED, ShardkitError


def _os_error(exc: OSError) -> str:
    where = f"{exc.filename}: " if exc.filename else ""
    return f"{where}{exc.strerror or exc}"


#: (exception type, its one-line message, its exit code), most specific first.
ERRORS: tuple[tuple[type[BaseException], Callable[[Any], str], Callable[[Any], int]], ...] = (
    (ShardkitError, str, lambda exc: exc.exit_code),
    (KeyboardInterrupt, lambda exc: "interrupted; temporary files removed", lambda exc: EXIT_INTERRUPTED),
    (FileNotFoundError, lambda exc: f"{exc.filename}: {exc.strerror}", lambda exc: EXIT_BAD_INPUT),
    (OSError, _os_error, lambda exc: EXIT_FAILURE),
)


def describe(exc: BaseException) -> tuple[str, int] | None:
    """The message and exit code for `exc`, or None when it is not an expected failure."""
    for kind, message, code in ERRORS:
        if isinstance(exc, kind):
            return message(exc), code(exc)
    return None
