"""Which source tensors a run writes, and under which names: `--select`, `--drop`, `--rename`.

Re-labelling is not arithmetic: a renamed tensor is the same byte range of the same
source under another name in the header, so the planner is simply handed the renamed
`name → source tensor` map and lays the output out as it would any other. The rules
here run before anything is planned, in a fixed order (every `select` glob, then every
`drop` glob, then each `rename` in the order given), and refuse what scripts doing this
by hand get silently wrong: a glob that matches nothing, a selection that leaves
nothing, two tensors renamed to one name. Every refusal names the tensors.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ..checkpoint.shards import Checkpoint, SourceTensor
from ..errors import BadInputError, option, option_name

#: How many tensor names a message lists before it says "and N more".
SHOWN = 5


@dataclass(frozen=True)
class Selection:
    """The `select`, `drop` and `rename` of one run, checked and compiled."""

    select: tuple[str, ...] = ()
    drop: tuple[str, ...] = ()
    rename: tuple[tuple[re.Pattern[str], str], ...] = ()

    def __bool__(self) -> bool:
        return bool(self.select or self.drop or self.rename)


@dataclass(frozen=True)
class Selected:
    """A checkpoint after a selection: `checkpoint.tensors` holds the output names,
    each pointing at its source bytes; `renamed` is (old, new) for each renamed tensor
    and `dropped` the source tensors left out, both in source name order."""

    checkpoint: Checkpoint
    renamed: tuple[tuple[str, str], ...] = ()
    dropped: tuple[str, ...] = ()


def as_globs(value: Sequence[str]) -> tuple[str, ...]:
    """The globs a Python caller gave: `select="model.*"` is one glob (a str is a
    sequence too, and iterating it gave `select='m' matches no tensor`)."""
    return (value,) if isinstance(value, str) else tuple(value)


def parse_selection(
    select: Sequence[str] = (), drop: Sequence[str] = (), rename: Sequence[Sequence[str]] = ()
) -> Selection:
    """Check the options themselves (before any checkpoint is read): globs non-empty,
    each rename a valid regular expression and a replacement."""
    select, drop = as_globs(select), as_globs(drop)
    for keyword, globs in (("select", select), ("drop", drop)):
        for glob in globs:
            if not glob:
                raise BadInputError(
                    f"{option(keyword, '')}: give a glob of tensor names, e.g. {option(keyword, 'model.layers.*')}"
                )
    compiled = []
    for pair in rename:
        if isinstance(pair, str) or not isinstance(pair, Sequence) or len(pair) != 2:
            example = option("rename", (r"^model\.(.*)", r"\1"))
            raise BadInputError(f"{option('rename', pair)}: give a pattern and its replacement, e.g. {example}")
        source, target = pair
        try:
            compiled.append((re.compile(source), target))
        except re.error as exc:
            raise BadInputError(f"{option('rename', source)}: not a regular expression ({exc})") from None
    return Selection(select, drop, tuple(compiled))


def apply_selection(checkpoint: Checkpoint, selection: Selection) -> Selected:
    """The checkpoint as the output will hold it; raises BadInputError, naming the
    tensors, on a glob that matches nothing, a selection that leaves nothing, a
    rename that matches nothing or maps two tensors to one name."""
    if not selection:
        return Selected(checkpoint)
    where = checkpoint.index_path or checkpoint.root
    names = list(checkpoint.tensors)
    if selection.select:
        _each_matches(where, "select", selection.select, names)
        names = [n for n in names if any(fnmatch.fnmatchcase(n, g) for g in selection.select)]
    if selection.drop:
        _each_matches(where, "drop", selection.drop, names)
        names = [n for n in names if not any(fnmatch.fnmatchcase(n, g) for g in selection.drop)]
    if not names:
        asked = (("select", selection.select), ("drop", selection.drop))
        given = (option(keyword, list(globs)) for keyword, globs in asked if globs)
        raise BadInputError(
            f"{where}: the selection leaves no tensor ({', '.join(given)}); "
            f"check the globs against the names `shardkit inspect` lists with {option('tensors')}"
        )
    new_names = _renamed(where, names, selection.rename)
    tensors = {
        new: named(checkpoint.tensors[old], new) for old, new in sorted(zip(names, new_names), key=lambda p: p[1])
    }
    kept = set(names)
    return Selected(
        dataclasses.replace(checkpoint, tensors=tensors),
        tuple((old, new) for old, new in zip(names, new_names) if old != new),
        tuple(n for n in checkpoint.tensors if n not in kept),
    )


def _each_matches(where: object, keyword: str, globs: Iterable[str], names: Sequence[str]) -> None:
    for glob in globs:
        if not any(fnmatch.fnmatchcase(n, glob) for n in names):
            raise BadInputError(
                f"{where}: {option(keyword, glob)} matches no tensor (of {len(names)}, e.g. {_listed(names[:3])}); "
                "globs match whole names, e.g. 'model.layers.*'"
            )


def _renamed(where: object, names: Sequence[str], rules: Sequence[tuple[re.Pattern[str], str]]) -> list[str]:
    """Each name through every rule in turn; a rule applies to names it matches whole."""
    current = list(names)
    for pattern, target in rules:
        hits = 0
        for i, name in enumerate(current):
            match = pattern.fullmatch(name)
            if match is None:
                continue
            hits += 1
            try:
                current[i] = match.expand(target)
            except (re.error, IndexError) as exc:
                raise BadInputError(f"{option('rename', (pattern.pattern, target))}: bad replacement ({exc})") from None
            if not current[i]:
                raise BadInputError(
                    f"{where}: {option('rename', (pattern.pattern, target))} renames {names[i]!r} to an empty name"
                )
        if not hits:
            raise BadInputError(
                f"{where}: {option('rename', (pattern.pattern, target))} matches no tensor name whole "
                f"(e.g. {_listed(current[:3])}); the pattern must match the entire name, e.g. '^model\\.(.*)'"
            )
    _refuse_collisions(where, names, current)
    return current


def _refuse_collisions(where: object, old: Sequence[str], new: Sequence[str]) -> None:
    sources: dict[str, list[str]] = {}
    for before, after in zip(old, new):
        sources.setdefault(after, []).append(before)
    clashes = {after: befores for after, befores in sources.items() if len(befores) > 1}
    if clashes:
        shown = "; ".join(f"{_listed(b)} → {a!r}" for a, b in list(clashes.items())[:SHOWN])
        more = f" (and {len(clashes) - SHOWN} more names)" if len(clashes) > SHOWN else ""
        raise BadInputError(f"{where}: {option_name('rename')} gives several tensors one name: {shown}{more}")


def named(tensor: SourceTensor, name: str) -> SourceTensor:
    if tensor.name == name:
        return tensor
    # The shard's own name stays known: a torch file's strided views are found by it.
    return tensor._replace(info=tensor.info._replace(name=name), shard_name=tensor.shard_name or tensor.name)


def _listed(names: Sequence[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:SHOWN])
    return shown + (f" and {len(names) - SHOWN} more" if len(names) > SHOWN else "")

