"""shardkit: merge, split, verify, inspect and diff safetensors checkpoints.

The public API mirrors the CLI, one function per command, each returning a report
dataclass. Submodules load on first use so that `import shardkit` stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import ShardkitError
from .version import __version__

_API = {
    "merge": "shardkit.commands.merge",
    "convert": "shardkit.commands.convert",
    "split": "shardkit.commands.split",
    "inspect": "shardkit.commands.inspect",
    "diff": "shardkit.commands.diff",
    "verify": "shardkit.commands.verify",
    "checksum": "shardkit.commands.checksum",
    "clean": "shardkit.commands.clean",
}

if TYPE_CHECKING:
    from .commands.checksum import checksum
    from .commands.clean import clean
    from .commands.convert import convert
    from .commands.diff import diff
    from .commands.inspect import inspect
    from .commands.merge import merge
    from .commands.split import split
    from .commands.verify import verify


def __getattr__(name: str) -> object:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'shardkit' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


__all__ = ["ShardkitError", "__version__", *_API]
