"""Outputs appear whole or not at all.

Everything is written under a temporary name in the destination's own folder (same
filesystem, so the final rename is atomic), fsynced, then renamed into place and the
folder fsynced. A run killed at any moment leaves at most a temporary entry whose
name starts with `.shardkit-tmp-` and carries the writer's pid; the next run on the
same destination, or `shardkit clean`, removes those whose writer is gone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import secrets
import shutil
from pathlib import Path

TEMP_MARK = ".shardkit-tmp-"
_RENAME_EXCHANGE = 2


def temp_name(dest: Path) -> Path:
    """`dir/.shardkit-tmp-<name>.<pid>.<random>`: recognisable, and unique per run."""
    return dest.parent / f"{TEMP_MARK}{dest.name}.{os.getpid()}.{secrets.token_hex(4)}"


def _writer_pid(entry: Path) -> int | None:
    parts = entry.name.rsplit(".", 2)
    if len(parts) != 3 or not parts[1].isdigit():
        return None
    return int(parts[1])


def _is_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale_temporaries(folder: Path, dest_name: str | None = None) -> list[Path]:
    """Temporary entries in `folder` left by writers that no longer run."""
    prefix = TEMP_MARK + (f"{dest_name}." if dest_name else "")
    try:
        entries = sorted(folder.iterdir())
    except OSError:
        return []
    found = []
    for entry in entries:
        if not entry.name.startswith(prefix):
            continue
        pid = _writer_pid(entry)
        if pid is None or not _is_alive(pid):
            found.append(entry)
    return found


def remove(path: Path) -> None:
    """Remove a file or folder tree; missing is fine."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    except FileNotFoundError:
        pass
    except OSError:
        # A read-only filesystem refuses even to unlink a name that is not there
        # (EROFS): that must not hide the error that made us clean up.
        if os.path.lexists(path):
            raise


def clean(folder: Path, dest_name: str | None = None) -> list[Path]:
    """Remove stale temporaries (of one destination, or all) and return them."""
    removed = stale_temporaries(folder, dest_name)
    for entry in removed:
        remove(entry)
    return removed


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) if path.is_dir() else os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:  # some filesystems refuse fsync on folders
        if exc.errno not in (errno.EINVAL, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _rename_exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with renameat2(RENAME_EXCHANGE) where Linux offers it."""
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        renameat2 = ctypes.CDLL(name, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    result = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE)
    return result == 0


def commit(staged: Path, dest: Path, *, replace: bool) -> None:
    """Move a fully written and fsynced `staged` file or folder to `dest`.

    A file replaces an existing one atomically (rename). A folder replaces an existing
    one by an atomic exchange where the kernel supports it; otherwise the old folder
    is first renamed aside under a temporary name, so `dest` never holds a mixture.
    """
    if not replace and (dest.exists() or dest.is_symlink()):
        if staged.is_dir() and dest.is_dir() and not dest.is_symlink():
            # rename(2) atomically replaces an empty folder (a user's `mkdir out`
            # first) and fails with ENOTEMPTY if something appeared in it meanwhile.
            try:
                os.rename(staged, dest)
            except OSError as exc:
                if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                    raise FileExistsError(errno.EEXIST, "destination folder is no longer empty", str(dest)) from None
                raise
            fsync_path(dest.parent)
            return
        raise FileExistsError(errno.EEXIST, "destination appeared while writing", str(dest))
    if staged.is_dir() and dest.is_dir() and not dest.is_symlink():
        if _rename_exchange(staged, dest):
            remove(staged)  # now holds the old folder
        else:
            aside = temp_name(dest)
            os.rename(dest, aside)
            os.rename(staged, dest)
            remove(aside)
    else:
        os.replace(staged, dest)
    fsync_path(dest.parent)
