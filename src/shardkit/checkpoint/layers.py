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


#: A number written with a leading zero (`01`, `007`): int() reads it as `1` reads. The
#: pattern starts with its literal `0` so the search skips to each 0 (a look-behind
#: first tries every position: 40 times slower over 500,000 names).
_LEADING_ZERO = re.compile(r"0(?<=[^0-9]0)[0-9]")


def natural_keys_distinct(names: Iterable[str]) -> bool:
    """True when no two of `names` can have one natural_key, so that a natural sort of
    them is the same whatever order they come in. Keys are equal only for names that
    write a number differently (`a.01` and `a.1`, or a digit other than 0-9: `٣` is 3);
    one search over all the names at once rules that out, instead of a key per name.
    Any name beyond ASCII counts as a possible tie."""
    joined = "\n" + "\n".join(names)
    return joined.isascii() and _LEADING_ZERO.search(joined) is None


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


#: Every ASCII digit to 0, in the UTF-8 bytes of a name (where no other character has
#: a byte below 0x80): names equal under it fold at the same places, since each part of
#: _INDEXED treats all digits alike (\\d, \\w) and its words hold none. bytes.translate
#: is a table lookup per byte, a tenth of the time of str.translate.
_ZERO_DIGITS = bytes.maketrans(b"123456789", b"000000000")


_ASCII_DIGIT = re.compile("[0-9]")


def _skeleton(name: str) -> bytes:
    return name.encode("utf-8", "surrogatepass").translate(_ZERO_DIGITS)


@dataclass(frozen=True)
class _Where:
    """Where the names of one digit skeleton fold: the slices of their literal pieces
    and of their layer numbers, the same for every such name."""

    pieces: tuple[slice, ...]
    numbers: tuple[slice, ...]
    #: No digit outside the folded numbers: every name of the skeleton has the same pieces.
    shared: bool

    @classmethod
    def of(cls, name: str) -> _Where:
        edges = [0, *(edge for match in _INDEXED.finditer(name) for edge in match.span(2)), None]
        pieces = tuple(slice(a, b) for a, b in zip(edges[0::2], edges[1::2]))
        numbers = tuple(slice(a, b) for a, b in zip(edges[1:-1:2], edges[2::2]))
        return cls(pieces, numbers, not any(_ASCII_DIGIT.search(name[piece]) for piece in pieces))

    def pieces_of(self, names: list[str]) -> Iterable[tuple[str, ...]]:
        return zip(*(map(itemgetter(piece), names) for piece in self.pieces))

    def numbers_of(self, names: list[str]) -> list[tuple[int, ...]]:
        if not self.numbers:
            return [()] * len(names)
        return list(zip(*(map(int, map(itemgetter(number), names)) for number in self.numbers)))


def _cut(name: str, cuts: dict[bytes, _Where]) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """`_pieces(name)`, with the regex run once per digit skeleton (`layers.00.experts.0.w`)
    instead of once per name: a million MoE names have a few hundred skeletons."""
    skeleton = _skeleton(name)
    where = cuts.get(skeleton) or cuts.setdefault(skeleton, _Where.of(name))
    return next(iter(where.pieces_of([name]))), where.numbers_of([name])[0]


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
    Neither order depends on the order the triples come in.

    Names are first bucketed by digit skeleton, dtype and shape (one bytes.translate
    each); the regex runs once per skeleton, and the pieces and numbers of a bucket's
    names are cut by slicing, a column at a time."""
    buckets: dict[tuple[bytes, str, tuple[int, ...]], list[str]] = {}
    zero = _ZERO_DIGITS
    for name, dtype, shape in tensors:  # _skeleton(name), inlined: this loop sees every tensor
        buckets.setdefault((name.encode("utf-8", "surrogatepass").translate(zero), dtype, shape), []).append(name)
    groups: dict[tuple[tuple[str, ...], str, tuple[int, ...]], list[tuple[tuple[int, ...], str]]] = {}
    cuts: dict[bytes, _Where] = {}
    for (skeleton, dtype, shape), names in buckets.items():
        where = cuts.get(skeleton) or cuts.setdefault(skeleton, _Where.of(names[0]))
        numbers = where.numbers_of(names)
        if where.shared:
            pieces = next(iter(where.pieces_of(names[:1])))
            groups.setdefault((pieces, dtype, shape), []).extend(zip(numbers, names))
            continue
        for pieces, indices, name in zip(where.pieces_of(names), numbers, names):
            groups.setdefault((pieces, dtype, shape), []).append((indices, name))
    result = []
    for (pieces, dtype, shape), members in groups.items():
        # Members differ only in their numbers, so natural order is the numbers' order
        # (then the name: `layers.07` and `layers.7` have the same number).
        members.sort()
        numbers = list(map(itemgetter(0), members))
        ranges = [format_indices(map(itemgetter(position), numbers)) for position in range(len(pieces) - 1)]
        pattern = "".join(piece + text for piece, text in zip(pieces, [*ranges, ""]))
        result.append(LayerGroup(pattern, dtype, shape, tuple(map(itemgetter(1), members))))
    result.sort(key=lambda group: (natural_key(group.names[0]), group.names[0]))
    return result
