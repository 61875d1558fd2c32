"""Why a local file or folder cannot be read, said so that the user can act on it.

Python's path tests answer False for every kind of trouble: `is_file()` of a dangling
symlink, of a symlink loop and of a file in a folder one may not enter are all False,
and `glob()` of a folder one may not list finds nothing. Code that skips what is not
a file therefore turned "the tokenizer download did not finish" into a model folder
without a tokenizer, and "permission denied" into "no .safetensors file found". These
helpers name the real cause instead.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from ..errors import BadInputError
from ..storage.hub_cache import repo_id


def file_problem(path: Path) -> str | None:
    """Why `path` (an entry found in a folder) cannot be read as a file, or None if it
    can (or is not a file at all, like a FIFO, which callers skip as before)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "is a symlink loop (too many levels of symbolic links): fix or remove the link"
        if exc.errno == errno.ENOENT and path.is_symlink():
            return _dangling(path)
        if exc.errno in (errno.EACCES, errno.EPERM):
            return f"cannot be read: {exc.strerror}"
        return f"cannot be read: {exc.strerror or exc}"
    os.close(fd)
    return None


def _dangling(path: Path) -> str:
    target = Path(os.readlink(path))
    absolute = target if target.is_absolute() else path.parent / target
    repo = repo_id(path)
    again = f"download it again (`hf download {repo}`)" if repo else "download the model again"
    if Path(f"{absolute}.incomplete").exists():
        why = f"its download did not finish ({absolute.name}.incomplete is still there)"
    else:
        why = "the file it points to is gone"
    return f"is a symlink to {target}, which does not exist: {why}; {again}, or remove the link"


def check_folder_readable(folder: Path) -> None:
    """Refuse a folder that may not be listed or entered, naming it: otherwise it looks empty."""
    try:
        os.listdir(folder)
        os.stat(os.path.join(folder, "."))  # "." is looked up inside: needs search (x) permission
    except PermissionError as exc:
        raise unreadable_folder(folder, exc) from None


def unreadable_folder(folder: object, exc: OSError) -> BadInputError:
    return BadInputError(f"{folder}: {exc.strerror}: cannot read this folder")
