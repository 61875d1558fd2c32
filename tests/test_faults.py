"""Crashes and faults: the destination never holds a partial output, whatever happens.

The kill tests run the real CLI on a checkpoint big enough for the copy to take a
second or two, stop it (SIGSTOP) at a chosen moment — as soon as its temporary file
appears, at random times, once its data is complete, right after the rename — look at
the disk while it is frozen to record the phase it was in, then SIGKILL it. The
destination must then be absent or complete and equal to the reference output; any
leftover must carry the `.shardkit-tmp-` mark and the killed pid, and must be gone
once the next run on the same destination gets going, or after `shardkit clean`.

The other faults are real too: tmpfs mounts for a full disk and a read-only
destination (skipped with the reason where mounting is not allowed), an unprivileged
user for missing permissions, a shard touched or grown while it is being copied, and
a destination on another filesystem, where copy_file_range fails with EXDEV.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import shardkit
import shardkit.engine.execute  # monkeypatched below: loaded whatever ran first
from conftest import assert_clean_failure, run_cli, sigint_as_in_a_terminal, snapshot, temporaries
from shardkit.engine.atomic import TEMP_MARK
from shardkit.engine.byte_copy import RangeCopier
from shardkit.synthetic import ByteSource, Qwen2Shape, SyntheticTensor, write_checkpoint, write_safetensors

#: ≈ 190 MB of BF16 in Qwen2 layout: big enough that a copy takes a second or two here.
FAULT_SHAPE = Qwen2Shape(896, 4864, 6, 14, 2, 16000, True)
SEED = int(os.environ.get("SHARDKIT_FAULT_SEED", "20240605"))
BLOCK = 64 * 1024


@dataclass
class Timing:
    total: float  # the whole CLI process, start-up included
    writing: float  # from the temporary's creation to the exit


@dataclass
class Big:
    source: Path
    merged: Path  # the reference merge
    split: Path  # the reference split (folder)
    merge: Timing
    split_timing: Timing


def timed_run(folder: Path, *args: object) -> Timing:
    started = time.perf_counter()
    process = start_cli(*args)
    assert wait_until(lambda: any(p.name.startswith(TEMP_MARK) for p in folder.iterdir()), process)
    writing = time.perf_counter()
    _, stderr = process.communicate()
    assert process.returncode == 0, stderr
    ended = time.perf_counter()
    return Timing(ended - started, ended - writing)


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Big]:
    """About 600 MB of source and references: removed after the module, pass or fail
    (a failing test keeps its own tmp_path, which holds what it wrote)."""
    root = tmp_path_factory.mktemp("faults")
    source = write_checkpoint(root / "source", FAULT_SHAPE, max_shard_size=70_000_000).folder
    merged, split = root / "reference.safetensors", root / "reference-split"
    merge_timing = timed_run(root, "merge", source, "-o", merged)
    split_timing = timed_run(root, "split", source, "-o", split, "--max-shard-size", "60MB")
    yield Big(source, merged, split, merge_timing, split_timing)
    shutil.rmtree(root, ignore_errors=True)


# ----------------------------------------------------------------- freezing and killing the CLI


def start_cli(*args: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "shardkit", *map(str, args)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=sigint_as_in_a_terminal,
    )


def wait_until(condition: Callable[[], bool], process: subprocess.Popen[str], timeout: float = 60) -> bool:
    """Poll `condition` every half millisecond; False if the process ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if process.poll() is not None:
            return condition()
        time.sleep(0.0005)
    raise AssertionError("condition not reached in time")


def own_temporaries(folder: Path, pid: int) -> list[Path]:
    return [p for p in folder.iterdir() if p.name.startswith(TEMP_MARK) and f".{pid}." in p.name]


def same_bytes(a: Path, b: Path) -> bool:
    if a.stat().st_size != b.stat().st_size:
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            left, right = fa.read(8 << 20), fb.read(8 << 20)
            if left != right:
                return False
            if not left:
                return True


def block(path: Path, index: int) -> bytes | None:
    try:
        with open(path, "rb") as handle:
            handle.seek(index * BLOCK)
            return handle.read(BLOCK)
    except FileNotFoundError:
        return None


def written_blocks(temp: Path, reference: Path) -> int:
    """How many leading blocks of `temp` already hold the reference bytes.

    The file is filled front to back (unwritten parts read as short or as zeros; the two
    O_DIRECT workers are at most one 32 MiB block apart), and the data is pseudo-random,
    so the written part is about the longest prefix of matching blocks: good enough to
    choose a moment to kill at, which is all it is used for.
    """
    low, high = 0, -(-reference.stat().st_size // BLOCK)
    while low < high:
        middle = (low + high + 1) // 2
        if block(temp, middle - 1) == block(reference, middle - 1):
            low = middle
        else:
            high = middle - 1
    return low


def identity(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


@dataclass
class KillLog:
    """What each kill saw, and what the next runs must have cleaned."""

    phases: list[str] = field(default_factory=list)
    pending: set[Path] = field(default_factory=set)  # leftovers a later run must remove
    verified: set[tuple[int, int]] = field(default_factory=set)


def kill_run(
    args: list[object],
    dest: Path,
    trigger: Callable[[subprocess.Popen[str]], None],
    classify: Callable[[int, tuple[int, int] | None], str],
    is_complete: Callable[[], bool],
    log: KillLog,
) -> str:
    """One run, frozen when `trigger` returns, inspected, killed; returns the phase it was in."""
    before = identity(dest)
    process = start_cli(*args)
    trigger(process)
    signal_if_running(process, signal.SIGSTOP)
    try:
        phase = classify(process.pid, before) if process.poll() is None else "finished"
    finally:
        signal_if_running(process, signal.SIGKILL)
        _, stderr = process.communicate()
    if phase == "finished":
        assert process.returncode == 0, stderr
    log.phases.append(phase)

    # the destination is absent or complete, never partial
    now = identity(dest)
    if now is not None and now not in log.verified:
        assert is_complete(), f"partial destination after a kill in phase {phase}"
        log.verified.add(now)
    # every leftover is recognisable and belongs to a killed writer
    left = {p for p in dest.parent.iterdir() if p.name.startswith(TEMP_MARK)}
    assert {p.name for p in dest.parent.iterdir()} - {p.name for p in left} <= {dest.name}
    for entry in left - log.pending:
        assert f".{process.pid}." in entry.name, entry
    # once a run created its own temporary, it had already removed the older ones
    if phase != "startup":
        assert not (log.pending & left), f"stale temporaries survived a later run: {log.pending & left}"
        log.pending = set(left)
    else:
        log.pending |= left
    return phase


def signal_if_running(process: subprocess.Popen[str], sig: int) -> None:
    try:
        os.kill(process.pid, sig)
    except ProcessLookupError:  # it finished and was reaped
        pass


def at_random_time(delay: float) -> Callable[[subprocess.Popen[str]], None]:
    def trigger(process: subprocess.Popen[str]) -> None:
        time.sleep(delay)

    return trigger


def finish_and_clean(folder: Path, dest: Path, log: KillLog, rerun: list[object], is_complete: Callable[[], bool]):
    """`shardkit clean` removes what the kills left; a rerun then succeeds."""
    leftovers = sorted(p.name for p in folder.iterdir() if p.name.startswith(TEMP_MARK))
    assert leftovers, "the last kill should have left a temporary for clean to remove"
    result = run_cli("clean", folder, "--json")
    assert result.exit_code == 0, result.stderr
    assert sorted(json.loads(result.stdout)["removed"]) == leftovers
    assert temporaries(folder) == []
    result = run_cli(*rerun)
    assert result.exit_code == 0, result.stderr
    assert is_complete()
    assert temporaries(folder) == []


def test_sigkill_during_merge_never_leaves_a_partial_file(big: Big, tmp_path: Path) -> None:
    dest = tmp_path / "merged.safetensors"
    args: list[object] = ["merge", big.source, "-o", dest, "--force"]
    log = KillLog()
    size = big.merged.stat().st_size
    last = -(-size // BLOCK) - 1

    def temp_of(pid: int) -> Path | None:
        found = own_temporaries(tmp_path, pid)
        return found[0] if found else None

    def classify(pid: int, before: tuple[int, int] | None) -> str:
        if identity(dest) != before:
            return "renamed"
        temp = temp_of(pid)
        if temp is None:
            return "startup"
        done = written_blocks(temp, big.merged)
        return "header" if done == 0 else "data" if done <= last else "commit"

    def complete() -> bool:
        return same_bytes(dest, big.merged)

    def appeared(process: subprocess.Popen[str]) -> Callable[[], bool]:
        return lambda: temp_of(process.pid) is not None

    def copied(process: subprocess.Popen[str], at: int) -> Callable[[], bool]:
        """Block `at` of the output holds its final bytes: the copy got that far."""

        def check() -> bool:
            temp = temp_of(process.pid)
            return temp is not None and block(temp, at) == block(big.merged, at)

        return check

    def renamed(before: tuple[int, int] | None) -> Callable[[], bool]:
        return lambda: identity(dest) not in (None, before)

    rng = random.Random(SEED)
    for _ in range(3):  # header: the temporary was just created; retried if the copy got ahead of us
        if kill_run(args, dest, lambda p: wait_until(appeared(p), p), classify, complete, log) == "header":
            break
    triggers: list[Callable[[subprocess.Popen[str]], None]] = [
        lambda p: wait_until(copied(p, last), p),  # every byte copied: fsync, source check and rename remain
    ]
    # random moments: two in time (any phase, start-up included), six at random points of the data
    triggers += [at_random_time(rng.uniform(0, 1) * big.merge.total) for _ in range(2)]
    triggers += [
        lambda p, at=rng.randrange(1, last): wait_until(copied(p, at), p) for _ in range(6)
    ]
    for trigger in triggers:
        kill_run(args, dest, trigger, classify, complete, log)
    for _ in range(3):  # right after the rename; on a busy machine the run may exit first, so retry
        before = identity(dest)
        if kill_run(args, dest, lambda p, b=before: wait_until(renamed(b), p), classify, complete, log) == "renamed":
            break
    kill_run(args, dest, lambda p: wait_until(appeared(p), p), classify, complete, log)  # leave one for `clean`

    print(f"merge kill phases ({big.merge}):", log.phases)
    assert len(log.phases) >= 10
    assert {"header", "data", "renamed"} <= set(log.phases), log.phases
    finish_and_clean(tmp_path, dest, log, args, complete)


def test_sigkill_during_split_never_leaves_a_partial_folder(big: Big, tmp_path: Path) -> None:
    dest = tmp_path / "split"
    args: list[object] = ["split", big.source, "-o", dest, "--max-shard-size", "60MB", "--force"]
    log = KillLog()
    names = sorted(p.name for p in big.split.iterdir())
    shards = sorted(n for n in names if n.endswith(".safetensors"))
    index = next(n for n in names if n.endswith(".index.json"))

    def staged_of(pid: int) -> Path | None:
        found = own_temporaries(tmp_path, pid)
        return found[0] if found else None

    def classify(pid: int, before: tuple[int, int] | None) -> str:
        if identity(dest) != before:
            return "renamed"  # (the staged name may now hold the old folder, being removed)
        staged = staged_of(pid)
        if staged is None:
            return "startup"
        present = {p.name for p in staged.iterdir()} if staged.is_dir() else set()
        if index in present:
            return "commit"  # every shard written: index, companions, fsync and rename remain
        started = [s for s in shards if s in present]  # the shards of one block stream are created together
        if not started:
            return "staging"
        done = sum(written_blocks(staged / s, big.split / s) for s in started)
        return "header" if done == 0 else "data"

    def complete() -> bool:
        return sorted(p.name for p in dest.iterdir()) == names and all(
            same_bytes(dest / n, big.split / n) for n in names
        )

    def first_shard_created(process: subprocess.Popen[str]) -> Callable[[], bool]:
        def check() -> bool:
            staged = staged_of(process.pid)
            return staged is not None and (staged / shards[0]).exists()

        return check

    def copied(process: subprocess.Popen[str], shard: str, at: int) -> Callable[[], bool]:
        def check() -> bool:
            staged = staged_of(process.pid)
            return staged is not None and block(staged / shard, at) == block(big.split / shard, at)

        return check

    def random_point(rng: random.Random) -> Callable[[subprocess.Popen[str]], None]:
        shard = rng.choice(shards)
        at = rng.randrange(1, -(-(big.split / shard).stat().st_size // BLOCK))
        return lambda p: wait_until(copied(p, shard, at), p)

    def index_written(process: subprocess.Popen[str]) -> Callable[[], bool]:
        def check() -> bool:
            staged = staged_of(process.pid)
            return staged is not None and (staged / index).exists()

        return check

    rng = random.Random(SEED + 1)
    triggers: list[Callable[[subprocess.Popen[str]], None]] = [
        lambda p: wait_until(lambda: staged_of(p.pid) is not None, p),  # the staged folder was just made
        lambda p: wait_until(first_shard_created(p), p),
        lambda p: wait_until(index_written(p), p),
    ]
    triggers += [at_random_time(rng.uniform(0, 1) * big.split_timing.total) for _ in range(2)]
    triggers += [random_point(rng) for _ in range(5)]
    for trigger in triggers:
        kill_run(args, dest, trigger, classify, complete, log)
    for _ in range(3):  # right after the rename (exchange); retried if the run exits first
        before = identity(dest)
        trigger = lambda p, b=before: wait_until(lambda: identity(dest) not in (None, b), p)  # noqa: E731
        if kill_run(args, dest, trigger, classify, complete, log) == "renamed":
            break
    kill_run(args, dest, lambda p: wait_until(first_shard_created(p), p), classify, complete, log)

    print(f"split kill phases ({big.split_timing}):", log.phases)
    assert len(log.phases) >= 10
    assert {"staging", "header"} & set(log.phases), log.phases
    assert {"data", "renamed"} <= set(log.phases), log.phases
    finish_and_clean(tmp_path, dest, log, args, complete)


def test_clean_keeps_the_temporary_of_a_running_writer(big: Big, tmp_path: Path) -> None:
    dest = tmp_path / "merged.safetensors"
    process = start_cli("merge", big.source, "-o", dest)
    wait_until(lambda: bool(own_temporaries(tmp_path, process.pid)), process)
    os.kill(process.pid, signal.SIGSTOP)
    try:
        result = run_cli("clean", tmp_path)
        assert result.exit_code == 0, result.stderr
        assert "its writer is still running" in result.stdout
        assert "removed 0 temporary entries" in result.stdout
        assert own_temporaries(tmp_path, process.pid)
    finally:
        os.kill(process.pid, signal.SIGCONT)
    assert process.wait() == 0
    assert same_bytes(dest, big.merged)
    assert temporaries(tmp_path) == []


# ----------------------------------------------------------------- Ctrl-C, SIGTERM, SIGHUP, SIGQUIT


INT, TERM, HUP, QUIT = signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT


@pytest.mark.parametrize(("command", "signals"), [
    ("merge", [INT]), ("merge", [TERM]), ("split", [INT]),
    # a closed terminal or a dropped ssh session, and Ctrl-\: killed the run and left its temporary
    ("merge", [HUP]), ("split", [HUP]), ("merge", [QUIT]), ("split", [QUIT]),
    # Ctrl-C pressed twice, or a supervisor's SIGTERM right after it: pending together, the later
    # ones arrived while the temporary was being removed and left it behind
    ("merge", [INT, TERM, HUP]), ("split", [INT, TERM, HUP]),
    # converting: the workers wait on the source stream's reader, which must let them go
    ("merge --dtype fp16", [INT]), ("split --dtype fp16", [TERM]),
], ids=lambda v: v.replace(" ", "") if isinstance(v, str) else "+".join(signal.Signals(s).name for s in v))
def test_interrupt_removes_temporaries_and_exits_130(big: Big, tmp_path: Path, command: str, signals) -> None:
    name, *options = command.split()
    dest = tmp_path / ("merged.safetensors" if name == "merge" else "split")
    process = start_cli(name, big.source, "-o", dest, *options)
    # frozen while its temporary exists, so the signal lands mid-copy on any machine
    assert wait_until(lambda: bool(own_temporaries(tmp_path, process.pid)), process)
    os.kill(process.pid, signal.SIGSTOP)
    for sig in signals:
        os.kill(process.pid, sig)
    os.kill(process.pid, signal.SIGCONT)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert stderr == "shardkit: error: interrupted; temporary files removed\n"
    assert stdout == ""
    assert not dest.exists()
    assert list(tmp_path.iterdir()) == []


def test_an_ignored_sighup_stays_ignored(big: Big, tmp_path: Path) -> None:
    """Under `nohup` SIGHUP is ignored on purpose: the run goes on and completes."""

    def as_under_nohup() -> None:
        sigint_as_in_a_terminal()
        signal.signal(signal.SIGHUP, signal.SIG_IGN)

    dest = tmp_path / "merged.safetensors"
    process = subprocess.Popen(
        [sys.executable, "-m", "shardkit", "merge", big.source, "-o", dest],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=as_under_nohup,
    )
    assert wait_until(lambda: bool(own_temporaries(tmp_path, process.pid)), process)
    os.kill(process.pid, signal.SIGHUP)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    assert same_bytes(dest, big.merged)
    assert temporaries(tmp_path) == []


def test_force_keeps_a_file_added_to_the_old_folder_during_the_copy(big: Big, tmp_path: Path) -> None:
    """The old folder held only an earlier output when the run started; a file added to it
    while the new one was being written must not be deleted with it: the swap is undone."""
    dest = tmp_path / "split"
    shutil.copytree(big.split, dest)
    before = snapshot(dest)
    process = start_cli("split", big.source, "-o", dest, "--max-shard-size", "60MB", "--force")
    assert wait_until(lambda: bool(own_temporaries(tmp_path, process.pid)), process)
    os.kill(process.pid, signal.SIGSTOP)
    (dest / "optimizer.pt").write_bytes(b"saved while the split ran")
    os.kill(process.pid, signal.SIGCONT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 2, stderr
    assert stderr == (
        f"shardkit: error: {dest}: --force replaces only an earlier output (weight, index, config, tokenizer and "
        "checksum files), but the folder also holds optimizer.pt; move those away or choose another output\n"
    )
    assert stdout == ""
    assert snapshot(dest) == {**before, "optimizer.pt": hashlib.sha256(b"saved while the split ran").hexdigest()}
    assert {p.name for p in tmp_path.iterdir()} == {dest.name}


# ----------------------------------------------------------------- --verify: the staged output, before the commit


def _earlier_output(dest: Path) -> bytes:
    data = b"an earlier merge, still good"
    dest.write_bytes(data)
    return data


def _bytes_read(pid: int) -> int:
    """Bytes the process read so far (rchar: read and pread calls, page cache or not)."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/<pid>/io")


def _corrupt_last_byte_once_written(process: subprocess.Popen[str], folder: Path, reference: Path) -> None:
    """Flip the staged output's last byte as soon as the copy has written it, the run frozen."""
    size = reference.stat().st_size
    last = -(-size // BLOCK) - 1

    def written() -> bool:
        staged = own_temporaries(folder, process.pid)
        return bool(staged) and block(staged[0], last) == block(reference, last)

    assert wait_until(written, process)
    os.kill(process.pid, signal.SIGSTOP)
    try:
        flip_byte(own_temporaries(folder, process.pid)[0], size - 1)
    except (FileNotFoundError, IndexError):
        pass  # committed already
    finally:
        os.kill(process.pid, signal.SIGCONT)


def test_failed_verification_leaves_the_earlier_output(big: Big, tmp_path: Path) -> None:
    """--force --verify: the new output replaced the old one, failed verification and
    was removed, leaving nothing. Now the staged output is verified before the commit."""
    dest = tmp_path / "merged.safetensors"
    earlier = _earlier_output(dest)
    for _ in range(3):  # the corruption must land before verification reaches it; retried if too late
        process = start_cli("merge", big.source, "-o", dest, "--force", "--verify")
        _corrupt_last_byte_once_written(process, tmp_path, big.merged)
        stdout, stderr = process.communicate(timeout=120)
        if process.returncode != 0:
            break
        dest.write_bytes(earlier)  # verified (that tensor, or all) before the corruption landed: again
    else:
        pytest.fail("three runs verified their output before the test could corrupt it")
    assert process.returncode == 1, stderr
    assert stderr.startswith(f"shardkit: error: {dest}: verification failed, nothing was committed (an earlier "
                             "output there is left as it was): tensor "), stderr
    assert stderr.count("\n") == 1 and stdout == ""
    assert dest.read_bytes() == earlier
    assert {p.name for p in tmp_path.iterdir()} == {dest.name}


def test_ctrl_c_during_verification_leaves_the_earlier_output(big: Big, tmp_path: Path) -> None:
    """It used to exit 130 saying 'temporary files removed' with the unverified new output in place."""
    dest = tmp_path / "merged.safetensors"
    earlier = _earlier_output(dest)
    size = big.merged.stat().st_size
    process = start_cli("merge", big.source, "-o", dest, "--force", "--verify")
    # verification reads the output and the sources: past 1.6x the output's size, it is well under way
    assert wait_until(lambda: _bytes_read(process.pid) > 1.6 * size, process)
    os.kill(process.pid, signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert stderr == "shardkit: error: interrupted; temporary files removed\n"
    assert stdout == ""
    assert dest.read_bytes() == earlier
    assert {p.name for p in tmp_path.iterdir()} == {dest.name}


def test_verify_report_keeps_copy_and_verify_time_apart(big: Big, tmp_path: Path) -> None:
    dest = tmp_path / "merged.safetensors"
    result = run_cli("merge", big.source, "-o", dest, "--verify", "--json")
    assert result.exit_code == 0, result.stderr
    assert result.stderr == ""  # no progress bars when not a terminal
    report = json.loads(result.stdout)
    assert report["verified"] is True
    assert report["copy_seconds"] > 0 and report["verify_seconds"] > 0
    assert report["copy_seconds"] + report["verify_seconds"] <= report["seconds"]
    plain = json.loads(run_cli("merge", big.source, "-o", tmp_path / "plain.safetensors", "--json").stdout)
    assert plain["copy_seconds"] > 0 and plain["verify_seconds"] is None


def test_verify_shows_its_own_progress_bar_on_a_terminal(big: Big, tmp_path: Path) -> None:
    import pty

    leader, follower = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "shardkit", "merge", big.source, "-o", tmp_path / "m.safetensors", "--verify"],
        stdin=follower, stdout=follower, stderr=follower, env={**os.environ, "TERM": "xterm", "COLUMNS": "120"},
        preexec_fn=sigint_as_in_a_terminal,
    )
    os.close(follower)
    seen = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        seen += chunk
    os.close(leader)
    assert process.wait(timeout=60) == 0, seen
    assert b"merging" in seen and b"verifying" in seen, seen[-2000:]


# ----------------------------------------------------------------- full disk


@contextmanager
def mounted_tmpfs(path: Path, options: str) -> Iterator[Path]:
    path.mkdir(exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root on Linux): {result.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_free_space_precheck_refuses_early(big: Big, tmp_path: Path) -> None:
    with mounted_tmpfs(tmp_path / "small", "size=4m") as small:
        dest = small / "merged.safetensors"
        before = snapshot(big.source)
        result = run_cli("merge", big.source, "-o", dest)
        assert_clean_failure(result, 1, f"{small}: not enough free space: the output needs {big.merged.stat().st_size}")
        assert list(small.iterdir()) == []
        assert snapshot(big.source) == before


@pytest.mark.parametrize("output", ["merged.safetensors", "folder"])
def test_no_space_left_names_the_destination_and_leaves_nothing(tmp_path: Path, output: str) -> None:
    """Out of inodes on a tmpfs: ENOSPC for real, after the weight file was written in the folder case.

    nr_inodes=4 holds the root, the staged folder, model.safetensors and config.json;
    the next companion file fails with ENOSPC once every tensor byte is on disk.
    """
    made = write_checkpoint(tmp_path / "source")
    before = snapshot(made.folder)
    inodes = 1 if output.endswith(".safetensors") else 4
    with mounted_tmpfs(tmp_path / "full", f"size=64m,nr_inodes={inodes}") as full:
        dest = full / output
        result = run_cli("merge", made.folder, "-o", dest)
        assert_clean_failure(result, 1, f"{dest}: no space left on device; nothing was written")
        assert list(full.iterdir()) == []
    assert snapshot(made.folder) == before


def test_two_merges_racing_for_too_little_space(tmp_path: Path) -> None:
    """Two 30 MB outputs into a 50 MB tmpfs: each passes the free-space check alone, both
    cannot fit. At least one fails, cleanly (no space left, or the pre-check); a run that
    succeeds wrote every byte. Both may fail: each writes its file as one 30 MB block, so
    both can be half-way when the space runs out."""
    source = tmp_path / "thirty.safetensors"
    tensors = [SyntheticTensor(f"w{i}", "F32", (2_500_000,)) for i in range(3)]
    write_safetensors(source, tensors, ByteSource(2), {"format": "pt"})
    reference = tmp_path / "reference.safetensors"
    shardkit.merge(source, reference)
    with mounted_tmpfs(tmp_path / "race", "size=50m") as race:
        runs = [start_cli("merge", source, "-o", race / f"out{i}.safetensors") for i in range(2)]
        results = [(p.pid, *p.communicate(timeout=120), p.returncode) for p in runs]
        codes = sorted(code for *_, code in results)
        assert codes in ([0, 1], [1, 1]), results
        for i, (_pid, stdout, stderr, code) in enumerate(results):
            dest = race / f"out{i}.safetensors"
            if code == 0:
                assert same_bytes(dest, reference)
            else:
                assert stdout == "" and stderr.count("\n") == 1 and "Traceback" not in stderr
                assert f"{dest}: no space left on device" in stderr or f"{race}: not enough free space" in stderr
                assert not dest.exists()
        assert temporaries(race) == []


@pytest.mark.parametrize("method", ["direct", "kernel"])
@pytest.mark.parametrize("output", ["merged.safetensors", "folder"])
def test_disk_filling_up_during_the_data_copy(tmp_path: Path, monkeypatch, method: str, output: str) -> None:
    """The free-space check passed (here: skipped) but the disk fills while tensor bytes are
    being written: a clear error, nothing left on the small disk, the source untouched."""
    source = tmp_path / "thirty.safetensors"
    tensors = [SyntheticTensor(f"w{i}", "F32", (2_500_000,)) for i in range(3)]
    write_safetensors(source, tensors, ByteSource(3), {"format": "pt"})
    before = snapshot(tmp_path)
    monkeypatch.setenv("SHARDKIT_COPY_METHOD", method)
    monkeypatch.setattr(shardkit.engine.execute, "check_free_space", lambda folder, needed: None)
    monkeypatch.setattr(shardkit.engine.block_writer, "BLOCK", 1 << 20)  # many blocks: both workers run
    with mounted_tmpfs(tmp_path / "full", "size=12m") as full:
        dest = full / output
        with pytest.raises(shardkit.errors.WriteError, match=f"{dest}: no space left on device; nothing was written"):
            shardkit.merge(source, dest)
        assert list(full.iterdir()) == []
    assert snapshot(tmp_path) == before


# ----------------------------------------------------------------- a source that changes mid-copy


def _freeze_when_copying(process: subprocess.Popen[str], folder: Path) -> None:
    assert wait_until(lambda: bool(own_temporaries(folder, process.pid)), process)
    os.kill(process.pid, signal.SIGSTOP)


def flip_byte(path: Path, offset: int) -> bytes:
    """Invert one byte of `path` in place; returns the byte it held."""
    with open(path, "r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([byte[0] ^ 0xFF]))
    return byte


@pytest.mark.parametrize(("change", "options"), [
    ("touch", ()), ("append", ()), ("replace", ()), ("truncate", ()), ("rsync-inplace", ()),
    # a conversion reads its sources through the O_DIRECT stream, not the page cache
    ("truncate", ("--dtype", "fp16")), ("replace", ("--dtype", "fp16")),
], ids=lambda v: v if isinstance(v, str) else "".join(v))
def test_source_changed_during_copy_discards_the_output(big: Big, tmp_path: Path, change: str, options) -> None:
    """rsync-inplace is `rsync --inplace -t`: same inode and size, bytes rewritten, the
    modification time put back; only the change time tells, and no one can set it back."""
    shard = sorted(big.source.glob("*.safetensors"))[-1]
    original = shard.stat()
    dest = tmp_path / "merged.safetensors"
    process = start_cli("merge", big.source, "-o", dest, *options)
    _freeze_when_copying(process, tmp_path)
    try:
        if change == "touch":
            os.utime(shard, ns=(original.st_atime_ns, original.st_mtime_ns + 1_000_000_000))
        elif change == "append":
            with open(shard, "ab") as handle:
                handle.write(b"\0")
        elif change == "truncate":  # the copy runs into the new end of file
            saved = shard.with_name(".saved")
            shutil.copy2(shard, saved)
            os.truncate(shard, original.st_size // 2)
        elif change == "rsync-inplace":
            flipped = flip_byte(shard, original.st_size - 1)
            os.utime(shard, ns=(original.st_atime_ns, original.st_mtime_ns))
            now = shard.stat()
            assert (now.st_ino, now.st_size, now.st_mtime_ns) == (original.st_ino, original.st_size,
                                                                   original.st_mtime_ns)
        else:  # a re-download renamed over the shard: same bytes, another file
            copy = shard.with_name(".incoming")
            shutil.copy2(shard, copy)
            os.replace(copy, shard)
    finally:
        os.kill(process.pid, signal.SIGCONT)
    try:
        stdout, stderr = process.communicate(timeout=120)
        assert process.returncode == 1, stderr
        assert stderr == (
            f"shardkit: error: {shard}: source changed (size, modification or change time) during the copy; "
            "output discarded\n"
        )
        assert not dest.exists()
        assert list(tmp_path.iterdir()) == []
    finally:
        if change == "append":
            os.truncate(shard, original.st_size)
        if change == "truncate":
            os.replace(shard.with_name(".saved"), shard)
        if change == "rsync-inplace":
            flip_byte(shard, original.st_size - 1)
            assert shard.read_bytes()[-1:] == flipped
        os.utime(shard, ns=(original.st_atime_ns, original.st_mtime_ns))


# ----------------------------------------------------------------- read-only, permissions, another filesystem


def test_read_only_destination(tmp_path: Path) -> None:
    made = write_checkpoint(tmp_path / "source")
    before = snapshot(made.folder)
    with mounted_tmpfs(tmp_path / "ro", "ro,size=1g") as read_only:
        for output in ("merged.safetensors", "folder"):
            result = run_cli("merge", made.folder, "-o", read_only / output)
            assert_clean_failure(result, 1, f"{read_only / output}: cannot write there: Read-only file system")
        assert list(read_only.iterdir()) == []
    assert snapshot(made.folder) == before


@pytest.fixture
def world_readable() -> Iterator[Path]:
    """A folder an unprivileged user can reach (pytest's tmp_path is private to root)."""
    folder = Path(tempfile.mkdtemp(prefix="shardkit-perm-", dir="/tmp"))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        shutil.rmtree(folder)


NOBODY = 65534


def _as_nobody(command: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    setpriv = shutil.which("setpriv")
    assert setpriv is not None
    prefix = [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    return subprocess.run([*prefix, *command], capture_output=True, text=True, cwd="/", env=env, timeout=120)


def _runtime_distributions() -> list[str]:
    """shardkit and what its CLI imports at run time (no extras), found from the metadata."""
    from importlib import metadata

    found, pending = [], ["shardkit"]
    while pending:
        name = pending.pop()
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        if dist.metadata["Name"].lower() in {n.lower() for n in found}:
            continue
        found.append(dist.metadata["Name"])
        for requirement in dist.requires or []:
            if "extra ==" not in requirement.replace("extra==", "extra =="):
                pending.append(re.match(r"[A-Za-z0-9._-]+", requirement).group(0))
    return found


@pytest.fixture(scope="session")
def unprivileged_runtime() -> Iterator[tuple[str, dict[str, str]]]:
    """An interpreter and an environment with which `nobody` runs THIS tree's CLI.

    The clone (its `src/` and its `.venv`) may sit in a folder only root can enter
    (`mktemp -d` is mode 700), so the code under test and its run-time dependencies
    are copied to a world-readable folder and the venv's real interpreter (the
    venv's `bin/python` is only a link, inside the clone) runs them from there.
    """
    if shutil.which("setpriv") is None or os.geteuid() != 0:
        pytest.skip("needs root and setpriv to run the CLI as an unprivileged user (root bypasses permissions)")
    from importlib import metadata

    folder = Path(tempfile.mkdtemp(prefix="shardkit-nobody-", dir="/tmp"))
    try:
        package = Path(shardkit.__file__).parent
        shutil.copytree(package, folder / "shardkit", ignore=shutil.ignore_patterns("__pycache__"))
        for name in _runtime_distributions():
            dist = metadata.distribution(name)
            for file in dist.files or []:
                parts = Path(file).parts
                if parts[0] in ("..", "shardkit") or "__pycache__" in parts or str(file).endswith(".pth"):
                    continue
                target = folder / file
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(dist.locate_file(file), target)
        for path in [folder, *folder.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        interpreter = os.path.realpath(sys.executable)
        env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(folder), "PYTHONNOUSERSITE": "1", "LANG": "C.UTF-8"}
        probe = _as_nobody([interpreter, "-c", "import shardkit, sys; print(shardkit.__file__)"], env)
        if probe.returncode != 0:
            pytest.skip(
                f"user nobody cannot run {interpreter} with shardkit copied to {folder} "
                f"({probe.stderr.strip().splitlines()[-1] if probe.stderr.strip() else probe.returncode}); "
                "install Python where every user can execute it"
            )
        assert probe.stdout.strip() == str(folder / "shardkit" / "__init__.py"), probe.stdout
        yield interpreter, env
    finally:
        shutil.rmtree(folder)


@pytest.fixture
def run_as_nobody(unprivileged_runtime: tuple[str, dict[str, str]]) -> Callable[..., subprocess.CompletedProcess[str]]:
    interpreter, env = unprivileged_runtime
    return lambda *args: _as_nobody([interpreter, "-m", "shardkit", *map(str, args)], env)


def test_destination_without_write_permission(world_readable: Path, run_as_nobody: Callable[..., object]) -> None:
    made = write_checkpoint(world_readable / "source")
    locked = world_readable / "locked"
    locked.mkdir(mode=0o755)  # owned by root: nobody may not create entries in it
    before = snapshot(made.folder)
    for output in ("merged.safetensors", "folder"):
        completed = run_as_nobody("merge", made.folder, "-o", locked / output)
        result_line = completed.stderr
        assert completed.returncode == 1, result_line
        assert result_line == f"shardkit: error: {locked / output}: cannot write there: Permission denied\n"
    assert list(locked.iterdir()) == []
    assert snapshot(made.folder) == before


def test_unreadable_source_shard(world_readable: Path, run_as_nobody: Callable[..., object]) -> None:
    made = write_checkpoint(world_readable / "source")
    shard = made.folder / made.shard_files[1]
    shard.chmod(0o600)
    out = world_readable / "out"
    out.mkdir(mode=0o777)
    completed = run_as_nobody("merge", made.folder, "-o", out / "merged.safetensors")
    assert completed.returncode == 1, completed.stderr
    assert completed.stderr == f"shardkit: error: {shard}: Permission denied\n"
    assert list(out.iterdir()) == []


def test_range_copier_falls_back_when_copy_file_range_says_exdev(big: Big, tmp_path: Path) -> None:
    """ext4 source, tmpfs destination: the kernel refuses copy_file_range across
    filesystems (EXDEV since Linux 5.19); the copier falls back and the bytes match."""
    source = big.merged
    length = 70 * 1024 * 1024 + 12345
    with mounted_tmpfs(tmp_path / "other", "size=512m") as other:
        src = os.open(source, os.O_RDONLY)
        try:
            for folder, expected in ((tmp_path, "copy_file_range"), (other, "sendfile")):
                dst = os.open(folder / "copy", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                try:
                    if folder is other:
                        with pytest.raises(OSError) as refused:
                            os.copy_file_range(src, dst, 1, 0, 0)
                        assert refused.value.errno == errno.EXDEV
                    copier = RangeCopier(dst)
                    copier.copy(src, 1000, 0, length)  # odd offsets, like a tensor range; more than one chunk
                    copier.close()
                    assert copier.method == expected
                finally:
                    os.close(dst)
                with open(folder / "copy", "rb") as copied, open(source, "rb") as original:
                    original.seek(1000)
                    assert copied.read() == original.read(length)
                (folder / "copy").unlink()
        finally:
            os.close(src)


def test_merge_onto_another_filesystem_is_byte_identical(big: Big, tmp_path: Path) -> None:
    with mounted_tmpfs(tmp_path / "other", "size=512m") as other:
        dest = other / "merged.safetensors"
        result = run_cli("merge", big.source, "-o", dest)
        assert result.exit_code == 0, result.stderr
        assert same_bytes(dest, big.merged)
        assert sorted(p.name for p in other.iterdir()) == ["merged.safetensors"]
