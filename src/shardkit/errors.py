"""One exception family for everything shardkit refuses or fails to do.

The contract of the public API (`shardkit.merge`, `shardkit.split`, … and the modules
below them): every error that leaves it is a :class:`ShardkitError`. Where the cause is
an operating-system error, the ShardkitError says what it meant (`no space left on
device`, `cannot write there`) and carries the OSError as its `__cause__`; a few are
also the matching built-in exception (`FileNotFoundError`, `FileExistsError`,
`ImportError`), so `except FileNotFoundError` keeps working. An exception of any other
kind escaping is a bug.

Every error carries a one-line message that names the file, the tensor and the rule
that was broken, plus the exit code the CLI maps it to: 2 for input or usage the user
has to fix, 1 for a failure while doing the work (disk full, a source changed, a
verification that did not hold), 130 for an interrupt.
"""

from __future__ import annotations

from collections.abc import Sequence

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130

#: How messages spell an option: as a keyword argument (`force=True`) for Python callers,
#: as a flag (`--force`) once the command line has said it is the caller.
_spelling = "python"


def use_cli_spelling() -> None:
    """Called by the CLI before it runs a command: messages then name flags, not keywords."""
    global _spelling
    _spelling = "cli"


def option(keyword: str, value: bool | str | Sequence[str] = True, *, metavar: str | None = None) -> str:
    """The option a message tells the user to pass, spelled for whoever called.

    `option("allow_unindexed")` is `--allow-unindexed` or `allow_unindexed=True`;
    `option("data", False)` is `--no-data` or `data=False`; `option("config", metavar="PATH")`
    is `--config PATH` or `config=…`. A value the user gave is quoted as each would type
    it: `option("select", "vision.*")` is `--select 'vision.*'` (a shell word) or
    `select='vision.*'` (a Python literal); a sequence is one flag with several words
    (`option("rename", ("a", "b"))` is `--rename a b` or `rename=('a', 'b')`).
    """
    flag = keyword.replace("_", "-")
    if _spelling == "cli":
        if metavar is not None:
            return f"--{flag} {metavar}"
        if isinstance(value, bool):
            return f"--{flag}" if value else f"--no-{flag}"
        import shlex  # here: only a failing run spells a value

        words = [value] if isinstance(value, str) else list(value)
        return " ".join([f"--{flag}", *(shlex.quote(str(word)) for word in words)])
    return f"{keyword}=…" if metavar is not None else f"{keyword}={value!r}"


def option_name(keyword: str) -> str:
    """An option named without a value, spelled for whoever called: `--dtype` or `dtype=…`."""
    return f"--{keyword.replace('_', '-')}" if _spelling == "cli" else f"{keyword}=…"


class ShardkitError(Exception):
    """Base class: a failure the CLI prints as one line, never as a traceback."""

    exit_code = EXIT_FAILURE

    def __str__(self) -> str:
        # The message alone, also for the subclasses that are OSErrors too (whose own
        # __str__ would print "[Errno None] None: …").
        return BaseException.__str__(self)


class BadInputError(ShardkitError):
    """The input (a file, an index, an option) is unusable as given."""

    exit_code = EXIT_BAD_INPUT


class FormatError(BadInputError):
    """A safetensors file breaks a rule of the format."""

    def __init__(self, path: object, rule: str, tensor: str | None = None) -> None:
        self.path = str(path)
        self.rule = rule
        self.tensor = tensor
        where = f"{self.path}: tensor {tensor!r}: " if tensor is not None else f"{self.path}: "
        super().__init__(where + rule)


class CheckpointError(BadInputError):
    """The files of a checkpoint disagree with each other or with their index."""


class MissingShardsError(CheckpointError):
    """Shards an index names are not in its folder; every one of them is listed."""

    def __init__(self, index: object, missing: list[str], total: int) -> None:
        self.index = str(index)
        self.missing = missing
        if len(missing) == 1:
            message = f"{index}: shard {missing[0]} named in weight_map does not exist; download it again"
        else:
            message = (
                f"{index}: shards {', '.join(missing)} named in weight_map do not exist "
                f"({len(missing)} of {total}); download them again"
            )
        super().__init__(message)


class OutputError(BadInputError):
    """The requested output cannot be written as asked (exists, is a source, ...)."""


class PathNotFoundError(BadInputError, FileNotFoundError):
    """A path the user named does not exist; also a FileNotFoundError for Python callers."""

    def __init__(self, path: object, what: str = "no such file or folder") -> None:
        BadInputError.__init__(self, f"{path}: {what}")
        self.filename = str(path)


class OutputExistsError(OutputError, FileExistsError):
    """The output exists and replacing it was not asked for; also a FileExistsError."""

    def __init__(self, path: object) -> None:
        OutputError.__init__(self, f"{path}: already exists; pass {option('force')} to replace it")
        self.filename = str(path)


class WriteError(ShardkitError):
    """Writing the output failed (no space left, permission denied, I/O error)."""


class SourceChangedError(ShardkitError):
    """A source file changed while it was being copied; the output was discarded."""


class VerificationError(ShardkitError):
    """The written output does not hold what the sources held."""


class TransportError(ShardkitError):
    """The store could not be reached or broke off (exit 1: the input may be fine)."""


class MissingExtraError(BadInputError, ImportError):
    """A feature needs an optional dependency that is not installed; also an ImportError."""

    def __init__(self, feature: str, extra: str) -> None:
        BadInputError.__init__(self, f"{feature} needs the optional extra: pip install 'shardkit[{extra}]'")


class Interrupted(ShardkitError):
    """The user interrupted the run (SIGINT/SIGTERM); temporary files were removed."""

    exit_code = EXIT_INTERRUPTED
