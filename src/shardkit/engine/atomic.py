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
import hashlib
import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path

from ..errors import OutputExistsError

TEMP_MARK = ".shardkit-tmp-"
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
#: Room a temporary name needs beyond its name part: the mark, `.<pid>.<random>`
#: (pids up to 4,194,304 on Linux, 8 hex digits).
_TEMP_OVERHEAD = len(TEMP_MARK) + 1 + 7 + 1 + 8
_DEFAULT_NAME_MAX = 255


def temp_name(dest: Path) -> Path:
    """`dir/.shardkit-tmp-<name>.<pid>.<random>`: recognisable, and unique per run."""
    return dest.parent / f"{TEMP_MARK}{temp_name_part(dest.parent, dest.name)}.{os.getpid()}.{secrets.token_hex(4)}"


def temp_name_part(folder: Path, dest_name: str) -> str:
    """The destination's name as it appears in its temporaries.

    The name itself where it fits; a destination name close to the filesystem's limit
    (NAME_MAX, 255 bytes on most) would make the temporary too long, so it is cut and
    a digest of the whole name appended: still recognisable, still one per destination.
    """
    room = name_max(folder) - _TEMP_OVERHEAD
    encoded = os.fsencode(dest_name)
    if len(encoded) <= room:
        return dest_name
    digest = "~" + hashlib.sha256(encoded).hexdigest()[:16]
    cut = encoded[: room - len(digest)]
    return cut.decode("utf-8", "ignore") + digest if _is_utf8(encoded) else os.fsdecode(cut) + digest


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def name_max(folder: Path) -> int:
    """The longest file name, in bytes, the filesystem of `folder` allows (NAME_MAX)."""
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return _DEFAULT_NAME_MAX


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
    prefix = TEMP_MARK + (f"{temp_name_part(folder, dest_name)}." if dest_name else "")
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


def _renameat2(a: Path, b: Path, flags: int) -> bool:
    """renameat2(2) with `flags`; False where the C library or the filesystem lacks it.

    Any other failure (EEXIST for RENAME_NOREPLACE, ENOENT, ...) raises OSError.
    """
    function = _renameat2_function()
    if function is None:
        return False
    at_fdcwd = -100
    if function(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), flags) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False  # an old kernel, or a filesystem that does not offer this flag
    raise OSError(code, os.strerror(code), str(b))


def _renameat2_function():  # noqa: ANN202 - a ctypes function pointer, or None
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        return ctypes.CDLL(name, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None


def _rename_exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with renameat2(RENAME_EXCHANGE) where Linux offers it."""
    try:
        return _renameat2(a, b, _RENAME_EXCHANGE)
    except OSError:
        return False


def rename_no_replace(staged: Path, dest: Path) -> None:
    """Move `staged` to `dest` in one step that fails (FileExistsError) if `dest` exists.

    Checking for `dest` and then renaming would be two steps: two runs writing the same
    output could both pass the check and the second rename would silently replace the
    first output. renameat2(RENAME_NOREPLACE) is one step; where the kernel or the
    filesystem lacks it, a file is hard-linked to `dest` (link(2) never replaces either)
    and its temporary name removed. A folder cannot be hard-linked, but rename(2) of a
    folder never replaces a non-empty one, and an empty one (a user's `mkdir out`)
    holds nothing to lose.
    """
    if _renameat2(staged, dest, _RENAME_NOREPLACE):
        return
    if staged.is_dir():
        if dest.is_symlink() or (dest.exists() and not dest.is_dir()):
            raise FileExistsError(errno.EEXIST, "already exists", str(dest))
        os.rename(staged, dest)
        return
    try:
        os.link(staged, dest, follow_symlinks=False)
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
            raise
        # No hard links here either (FAT, some FUSE filesystems): the best left is a
        # check right before the rename.
        if os.path.lexists(dest):
            raise FileExistsError(errno.EEXIST, "already exists", str(dest)) from None
        os.rename(staged, dest)
        return
    os.unlink(staged)


def commit(
    staged: Path, dest: Path, *, replace: bool, check_old: Callable[[Path], None] | None = None
) -> None:
    """Move a fully written and fsynced `staged` file or folder to `dest`.

    Without `replace`, `dest` must not exist (an empty folder aside): the move fails
    with OutputExistsError (a FileExistsError), atomically, if anything appeared there
    meanwhile. With
    `replace`, a file replaces an existing one atomically (rename); a folder replaces
    an existing one by an atomic exchange where the kernel supports it, otherwise the
    old folder is first renamed aside under a temporary name, so `dest` never holds a
    mixture. `check_old` is called with the replaced folder before it is deleted: if it
    raises (something was added to it since it was checked), the swap is undone and
    `staged` holds the new output again.
    """
    if not replace:
        try:
            _commit_new(staged, dest)
        except FileExistsError:  # another run wrote it since the check: the one error for it
            raise OutputExistsError(dest) from None
    elif staged.is_dir() and dest.is_dir() and not dest.is_symlink():
        exchanged = _rename_exchange(staged, dest)
        old = staged if exchanged else temp_name(dest)
        if not exchanged:
            os.rename(dest, old)
            os.rename(staged, dest)
        try:
            if check_old is not None:
                check_old(old)
        except BaseException:
            if not (exchanged and _rename_exchange(staged, dest)):
                os.rename(dest, staged)
                os.rename(old, dest)
            raise
        remove(old)
    else:
        os.replace(staged, dest)
    fsync_path(dest.parent)


def write_synced(path: Path, text: str) -> None:
    """Write `text` to `path` and fsync it: a small file (index, manifest) in a staged output."""
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def write_small_file(dest: Path, text: str, *, replace: bool) -> None:
    """A small file (a checksum manifest) written whole beside `dest` and committed: a
    reader sees the old file or the new one, never a part. Without `replace` it never
    replaces a file that appeared meanwhile (see :func:`commit`)."""
    staged = temp_name(dest)
    try:
        write_synced(staged, text)
        commit(staged, dest, replace=replace)
    except BaseException:
        remove(staged)
        raise


def _commit_new(staged: Path, dest: Path) -> None:
    try:
        rename_no_replace(staged, dest)
        return
    except FileExistsError:
        if not (staged.is_dir() and dest.is_dir() and not dest.is_symlink()):
            raise
    # An empty folder at `dest`: rename(2) replaces it atomically, and fails with
    # ENOTEMPTY if anything (another run's output) appeared in it meanwhile.
    try:
        os.rename(staged, dest)
    except OSError as exc:
        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise FileExistsError(errno.EEXIST, "already exists", str(dest)) from None
        raise
