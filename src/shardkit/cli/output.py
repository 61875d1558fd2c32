"""The output sink of every command: mode resolved once, results printed one way.

A command body is one call and one result::

    out = Output(json=json_output, quiet=quiet, debug=debug)
    report = out.call(lambda bar: merge(source, output, progress=bar("merging")))
    out.result(report, print_write_report)

The mode (`human`, `json` or `quiet`) is decided here, from the flags, once: progress
bars only in `human` mode on a terminal; notes and warnings on stderr only in `human`
mode (`--json` readers find them in the report); the report on stdout as a table, as
JSON, or not at all. Failures become one line on stderr and an exit code through the
table in :mod:`shardkit.cli.errors`.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NoReturn, Protocol, TypeVar

import typer

from ..errors import EXIT_BAD_INPUT, EXIT_FAILURE, use_cli_spelling
from .errors import describe


class Report(Protocol):
    def to_json(self) -> str: ...


T = TypeVar("T")
R = TypeVar("R", bound=Report)

#: An API progress callback `(advance, total)`, or None when no bar is shown.
Progress = Callable[[int, int], None] | None


def fail(message: str, code: int, *, debug: bool = False) -> NoReturn:
    """One line on stderr and the exit code; with `--debug`, the traceback first."""
    if debug:
        import traceback

        traceback.print_exc()
    print(f"shardkit: error: {message}", file=sys.stderr)
    raise typer.Exit(code)


def stderr_is_tty() -> bool:
    return sys.stderr.isatty() and os.environ.get("TERM") != "dumb"


class Output:
    """Where one command's results go.

    `verdict` marks the commands whose exit code 1 is their answer (`diff`: the inputs
    differ; `verify`: a problem was found): a failure to answer at all exits 2 there, so
    it cannot be mistaken for the answer.
    """

    def __init__(self, *, json: bool = False, quiet: bool = False, debug: bool = False, verdict: bool = False):
        self.mode = "json" if json else "quiet" if quiet else "human"
        self.debug = debug
        self.verdict = verdict

    # ------------------------------------------------------------------ running

    def run(self, action: Callable[[], T]) -> T:
        """Run an API call; every expected failure becomes one line and an exit code."""
        use_cli_spelling()
        _interrupt_on_signals()
        try:
            return action()
        except BaseException as exc:
            described = describe(exc)
            if described is None:
                raise
            message, code = described
            if self.verdict and code == EXIT_FAILURE:
                code = EXIT_BAD_INPUT
            fail(message, code, debug=self.debug)

    def call(self, action: Callable[[Callable[[str], Progress]], T], *, progress: bool = True) -> T:
        """`run`, handing `action` a `bar(description)` that makes progress callbacks
        (None unless the mode is human, `progress` is true and stderr is a terminal)."""
        with progress_bars(progress and self.mode == "human") as bar:
            return self.run(lambda: action(bar))

    # ------------------------------------------------------------------ results

    def result(
        self,
        report: R,
        render: Callable[[R], None] | None,
        *,
        quiet: Callable[[R], None] | None = None,
        exit_code: int | None = None,
    ) -> None:
        """Print `report` as the mode says: `render` it (after its notes and warnings)
        when human, as JSON, or through `quiet` (if given) when quiet. Exits with
        `exit_code` when one is given."""
        if self.mode == "json":
            print(report.to_json())
        elif self.mode == "human":
            self.notes(getattr(report, "notes", ()))
            self.warnings(getattr(report, "warnings", ()))
            if render is not None:
                render(report)
        elif quiet is not None:
            quiet(report)
        if exit_code is not None:
            raise typer.Exit(exit_code)

    def notes(self, messages: Any) -> None:
        if self.mode == "human":
            for message in messages:
                print(f"shardkit: note: {message}", file=sys.stderr)

    def warnings(self, messages: Any) -> None:
        if self.mode == "human":
            for message in messages:
                print(f"shardkit: warning: {message}", file=sys.stderr)


#: Signals that end a run as Ctrl-C does: temporaries removed, one line, exit 130.
#: SIGHUP is a closed terminal or a dropped ssh session, SIGQUIT is Ctrl-\; left at
#: their defaults they would kill the run and leave a temporary up to the output's size.
INTERRUPTING_SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT")


def _interrupt_on_signals() -> None:
    """The first of these signals stops the run; later ones are ignored, so a second
    Ctrl-C (or a supervisor's SIGTERM right after it) cannot cut the removal of the
    temporaries short and leave one behind."""
    stopping: list[int] = []

    def handler(signum: int, frame: object) -> None:
        if stopping:
            return
        stopping.append(signum)
        raise KeyboardInterrupt

    for name in INTERRUPTING_SIGNALS:
        number = getattr(signal, name, None)
        # A signal ignored on purpose (`nohup` ignores SIGHUP) stays ignored.
        if number is not None and signal.getsignal(number) is not signal.SIG_IGN:
            signal.signal(number, handler)


@contextmanager
def progress_bars(enabled: bool) -> Iterator[Callable[[str], Progress]]:
    """Several byte progress bars (bytes, speed, ETA) in one display (writing, then
    verifying), on stderr when it is a terminal. Yields `bar(description)`, which returns
    an API progress callback (None when there is no terminal); each bar appears on its
    callback's first call."""
    if not enabled or not stderr_is_tty():
        yield lambda description: None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TaskID,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    with Progress(
        TextColumn("{task.description}", markup=False),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as display:

        def bar(description: str) -> Callable[[int, int], None]:
            tasks: list[TaskID] = []

            def advance(step: int, total: int) -> None:
                if not tasks:
                    tasks.append(display.add_task(description, total=total))
                display.advance(tasks[0], step)

            return advance

        yield bar
