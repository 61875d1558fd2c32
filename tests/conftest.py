"""Shared test helpers: build real checkpoints, run the real CLI, snapshot sources."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from shardkit.engine.atomic import TEMP_MARK
from shardkit.synthetic import SyntheticCheckpoint, write_checkpoint


@dataclass
class CliResult:
    exit_code: int
    stdout: str
    stderr: str


def run_cli(*args: object, cwd: Path | None = None, env: dict[str, str] | None = None) -> CliResult:
    """Run `python -m shardkit ARGS` as a user would (no TTY, real exit code)."""
    completed = subprocess.run(
        [sys.executable, "-m", "shardkit", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
        timeout=300,
    )
    return CliResult(completed.returncode, completed.stdout, completed.stderr)


def sigint_as_in_a_terminal() -> None:
    """Popen preexec_fn: the child starts with SIGINT (and SIGHUP, SIGQUIT, SIGTERM) at
    their defaults, as under a terminal.

    A test runner started in the background (a CI job, `nohup … &`) may ignore SIGINT
    or SIGHUP, and children inherit that; Python then installs no KeyboardInterrupt
    handler (shardkit leaves an ignored SIGHUP ignored) and a signal test would see its
    run finish instead of being interrupted.
    """
    import signal

    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)


def kill_while_writing(args: list[object], folder: Path) -> None:
    """Run `python -m shardkit ARGS` and SIGKILL it once it has a temporary in `folder`
    (mid-write: nothing can clean up after a SIGKILL but the next run)."""
    import signal
    import time

    process = subprocess.Popen(
        [sys.executable, "-m", "shardkit", *map(str, args)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=sigint_as_in_a_terminal,
    )
    deadline = time.monotonic() + 60
    while not temporaries(folder) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.0005)
    assert temporaries(folder) and process.poll() is None, "the run ended before it could be killed"
    time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.communicate()


def snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` (names relative), to prove sources are untouched."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.startswith(TEMP_MARK)]


def assert_clean_failure(result: CliResult, code: int, message: str) -> None:
    """One clear line on stderr naming the problem, the right exit code, no traceback."""
    assert result.exit_code == code, (result.exit_code, result.stderr)
    assert message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1, result.stderr


@pytest.fixture
def checkpoint(tmp_path: Path) -> SyntheticCheckpoint:
    """A tiny Qwen2-layout model folder: 4 shards, index, config and tokenizer files,
    plus tensors of the format's corner cases (F8, F4, BOOL, scalar, zero-size)."""
    return write_checkpoint(tmp_path / "qwen-tiny", edge_tensors=True)


@pytest.fixture(scope="session")
def s3_server():
    """A real SeaweedFS S3 server on 127.0.0.1 for the whole session (see s3_server.py)."""
    from s3_server import seaweed_s3_fixture

    yield from seaweed_s3_fixture()
