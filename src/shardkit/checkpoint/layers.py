"""Fold the repeated layers of a transformer into one row per distinct layer tensor.

A 7B model has 28 layers of 12 tensors each: people want to read
`model.layers.{0..27}.mlp.up_proj.weight  BF16 [18944, 3584] ×28`, not 336 rows.
A name is folded at every `layers.N`, `layer.N`, `h.N`, `blocks.N`, `block.N`
(also `transformer_blocks.N`, `down_blocks.N`, ...) and `experts.N` segment, so a
mixture-of-experts model folds on both axes. Tensors fold together only when their
dtype and shape agree too, so a layer that differs from the others shows on its own row.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from operator import itemgetter

_DIGITS = re.compile(r"(\d+)")


def natural_key(name: str) -> list[object]:
    """`model.layers.2.x` before `model.layers.10.x`: digits compare as numbers."""
    parts: list[object] = _DIGITS.split(name)
    parts[1::2] = map(int, parts[1::2])  # type: ignore[arg-type]
    return parts


#: Split on, it gives [text, "layers.", "3", text, "experts.", "7", text]: the folded
#: segment (dot included) and its number, between the literal text.
_INDEXED = re.compile(r"(?:^|(?<=\.))((?:(?:\w*_)?(?:layers|layer|blocks|block)|h|experts)\.)(\d+)(?=\.|$)")
PLACEHOLDER = "{}"


def _pieces(name: str) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """The literal text around each folded layer number, and the numbers.

    Keeping the text as pieces (never as a string with placeholders) means a tensor
    name that itself contains `{}` cannot be mistaken for a folded one.
    """
    parts = _INDEXED.split(name)
    if len(parts) == 1:
        return (name,), ()
    pieces = tuple(map(str.__add__, parts[0:-1:3], parts[1::3])) + (parts[-1],)
    return pieces, tuple(map(int, parts[2::3]))


#: Every ASCII digit to 0: names equal under it fold at the same places, since each
#: part of _INDEXED treats all digits alike (\\d, \\w) and its words hold none.
_ZERO_DIGITS = str.maketrans("123456789", "000000000")


_Cuts = dict[str, tuple[tuple[slice, ...], tuple[slice, ...]]]


def _cut(name: str, cuts: _Cuts) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """`_pieces(name)`, with the regex run once per digit skeleton (`layers.00.experts.0.w`)
    instead of once per name: a million MoE names have a few hundred skeletons."""
    skeleton = name.translate(_ZERO_DIGITS)
    found = cuts.get(skeleton)
    if found is None:
        edges = [0, *(edge for match in _INDEXED.finditer(name) for edge in match.span(2)), None]
        pieces = tuple(slice(a, b) for a, b in zip(edges[0::2], edges[1::2]))
        found = cuts[skeleton] = (pieces, tuple(slice(a, b) for a, b in zip(edges[1:-1:2], edges[2::2])))
    pieces, numbers = found
    return tuple(map(name.__getitem__, pieces)), tuple(map(int, map(name.__getitem__, numbers)))


def split_name(name: str) -> tuple[str, tuple[int, ...]]:
    """`model.layers.3.mlp.experts.7.w1` → (`model.layers.{}.mlp.experts.{}.w1`, (3, 7))."""
    pieces, indices = _pieces(name)
    return PLACEHOLDER.join(pieces), indices


def format_indices(values: Iterable[int]) -> str:
    """{0, 1, 2, 5, 7, 8} → "0..2,5,7..8"; a single value stays a plain number."""
    ordered = sorted(set(values))
    runs: list[str] = []
    start = previous = ordered[0]
    for value in [*ordered[1:], None]:
        if value is not None and value == previous + 1:
            previous = value
            continue
        runs.append(str(start) if start == previous else f"{start}..{previous}")
        if value is not None:
            start = previous = value
    return runs[0] if len(runs) == 1 and ".." not in runs[0] else "{" + ",".join(runs) + "}"


@dataclass(frozen=True)
class LayerGroup:
    """Tensors that differ only in their layer (or expert) numbers."""

    pattern: str  # e.g. model.layers.{0..27}.mlp.up_proj.weight
    dtype: str
    shape: tuple[int, ...]
    names: tuple[str, ...]  # in natural order

    @property
    def count(self) -> int:
        return len(self.names)


def group_layers(tensors: Iterable[tuple[str, str, tuple[int, ...]]]) -> list[LayerGroup]:
    """Fold (name, dtype, shape) triples; groups come in the natural order of their
    first tensor (then in name order), so the view reads top to bottom like the model.
    Neither order depends on the order the triples come in."""
    groups: dict[tuple[tuple[str, ...], str, tuple[int, ...]], list[tuple[str, tuple[int, ...]]]] = {}
    cuts: _Cuts = {}
    for name, dtype, shape in tensors:
        pieces, indices = _cut(name, cuts)
        groups.setdefault((pieces, dtype, shape), []).append((name, indices))
    result = []
    for (pieces, dtype, shape), members in groups.items():
        # Members differ only in their numbers, so natural order is the numbers' order.
        members.sort(key=itemgetter(1))
        ranges = [format_indices(m[1][position] for m in members) for position in range(len(pieces) - 1)]
        pattern = "".join(piece + text for piece, text in zip(pieces, [*ranges, ""]))
        result.append(LayerGroup(pattern, dtype, shape, tuple(m[0] for m in members)))
    result.sort(key=lambda group: (natural_key(group.names[0]), group.names[0]))
    return result
