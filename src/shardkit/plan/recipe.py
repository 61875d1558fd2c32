"""Recipes: output tensors made from source tensors by renaming and re-cutting dimension 0.

For row-major data, concatenating along dim 0 (`fuse`) is concatenating bytes, a dim-0
chunk (`split`) is a byte range, and swapping the two halves of dim 0 (`swap`) is two
ranges: every recipe is a plan of copies, at disk speed and still server-side in S3.
Here a recipe turns the source's `name → tensor` map into the output's, where a chunk
is a narrower range of its source and a fused tensor lists its pieces; the planner lays
that out as it lays out any tensor.

A recipe is checked before anything is written, and every failure names tensors: each
source tensor is used exactly once or explicitly dropped, the pieces of a fuse agree in
dtype and trailing shape, a split's sizes add up, every output is produced once.

Format (JSON, or TOML read by tomllib), a list of rules under `rules`; `{i}` (any name
in braces) stands for one dot-separated part of a name (a layer number, `weight` or
`bias`) and binds the same text in every name of the rule; a rule that matches no tensor
is an error unless it says `"optional": true`::

    {"rules": [
      {"rename": "double_blocks.{i}.img_attn.proj.weight", "to": "transformer_blocks.{i}.attn.to_out.0.weight"},
      {"split": "double_blocks.{i}.img_attn.qkv.weight",
       "to": ["transformer_blocks.{i}.attn.to_q.weight", "…to_k.weight", "…to_v.weight"]},
      {"split": "single_blocks.{i}.linear1.weight", "to": ["…", "…", "…", "…"], "ratio": [1, 1, 1, 4]},
      {"fuse": ["a.{i}.q", "a.{i}.k", "a.{i}.v"], "to": "a.{i}.qkv"},
      {"swap": "final_layer.adaLN_modulation.1.weight", "to": "norm_out.linear.weight"},
      {"drop": "model.ema.{i}"}
    ]}

`split` takes `sizes` (rows of dim 0 each) or `ratio` (dim 0 shared in these
proportions); with neither, equal chunks.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..checkpoint.shards import Checkpoint, SourceTensor
from ..errors import BadInputError, option
from .selection import named

OPERATIONS = ("rename", "fuse", "split", "swap", "drop")
_PLACEHOLDER = re.compile(r"\{(\w+)\}")


@dataclass(frozen=True)
class Rule:
    op: str
    sources: tuple[str, ...]
    outputs: tuple[str, ...]
    sizes: tuple[int, ...] = ()
    ratio: tuple[int, ...] = ()
    optional: bool = False  # matching no tensor is fine (FLUX.1-schnell has no guidance_in)

    def describe(self) -> str:
        return f"{self.op} {' + '.join(self.sources)}"


@dataclass(frozen=True)
class Recipe:
    name: str
    rules: tuple[Rule, ...]


def load_recipe(spec: str) -> Recipe:
    """A built-in recipe by name, or a .json/.toml recipe file."""
    from .flux_recipes import BUILTIN

    if spec in BUILTIN:
        return parse_recipe(spec, BUILTIN[spec])
    path = Path(spec)
    if not path.is_file():
        raise BadInputError(
            f"{option('recipe', spec)}: neither a recipe file nor a built-in recipe ({', '.join(sorted(BUILTIN))})"
        )
    text = path.read_bytes()
    try:
        data = _toml_loads(text.decode("utf-8")) if path.suffix == ".toml" else json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadInputError(f"{path}: not a valid recipe file ({exc})") from None
    return parse_recipe(str(path), data)


def _toml_loads(text: str) -> object:
    try:
        import tomllib  # type: ignore[import-not-found,unused-ignore]
    except ImportError:  # Python 3.10
        raise BadInputError("a TOML recipe needs Python 3.11 or later (tomllib); write it as JSON") from None
    loaded: object = tomllib.loads(text)
    return loaded


def parse_recipe(name: str, data: object) -> Recipe:
    rules = data.get("rules") if isinstance(data, Mapping) else None
    if not isinstance(rules, list) or not rules:
        raise BadInputError(f"{name}: a recipe is an object with a non-empty list 'rules'")
    return Recipe(name, tuple(_rule(name, number, rule) for number, rule in enumerate(rules, 1)))


def _rule(name: str, number: int, rule: object) -> Rule:
    where = f"{name}: rule {number}"
    ops = [op for op in OPERATIONS if isinstance(rule, Mapping) and op in rule]
    if not isinstance(rule, Mapping) or len(ops) != 1:
        raise BadInputError(f"{where}: give exactly one of {', '.join(OPERATIONS)}")
    op = ops[0]
    sources = _names(where, rule[op])
    outputs = () if op == "drop" else _names(where, rule.get("to"))
    counts = {"rename": (1, 1), "swap": (1, 1), "fuse": (None, 1), "split": (1, None), "drop": (1, 0)}[op]
    if (counts[0] and len(sources) != counts[0]) or (counts[1] is not None and len(outputs) != counts[1]):
        raise BadInputError(f"{where}: {op} takes {_count(counts[0])} source(s) and {_count(counts[1])} 'to' name(s)")
    sizes, ratio = tuple(rule.get("sizes", ())), tuple(rule.get("ratio", ()))
    for parts in (sizes, ratio):
        if parts and (len(parts) != len(outputs) or not all(isinstance(p, int) and p > 0 for p in parts)):
            raise BadInputError(f"{where}: sizes/ratio need one positive integer per output")
    return Rule(op, sources, outputs, sizes, ratio, rule.get("optional") is True)


def _count(n: int | None) -> str:
    return "several" if n is None else str(n)


def _names(where: str, value: object) -> tuple[str, ...]:
    names = (value,) if isinstance(value, str) else tuple(value) if isinstance(value, list) else ()
    if not names or not all(isinstance(n, str) and n for n in names):
        raise BadInputError(f"{where}: tensor names must be non-empty strings")
    return names


def _pattern(template: str) -> re.Pattern[str]:
    parts = _PLACEHOLDER.split(template)
    regex = "".join(re.escape(p) if i % 2 == 0 else f"(?P<{p}>[^.]+)" for i, p in enumerate(parts))
    return re.compile(regex)


def apply_recipe(checkpoint: Checkpoint, recipe: Recipe) -> Checkpoint:
    """The checkpoint as the recipe's output holds it; raises BadInputError naming the
    tensors when the recipe does not account for every source tensor exactly once,
    when pieces disagree, or when two rules produce one name."""
    used: dict[str, str] = {}
    outputs: dict[str, SourceTensor] = {}
    for rule in recipe.rules:
        pattern = _pattern(rule.sources[0])
        bindings = [m.groupdict() for name in checkpoint.tensors if (m := pattern.fullmatch(name))]
        if not bindings and not rule.optional:
            raise BadInputError(f"{recipe.name}: {rule.describe()}: matches no tensor")
        for binding in bindings:
            sources = [_take(checkpoint, recipe, rule, template.format(**binding), used) for template in rule.sources]
            for made in _made(recipe.name, rule, sources, [t.format(**binding) for t in rule.outputs]):
                if made.name in outputs:
                    raise BadInputError(f"{recipe.name}: two rules produce {made.name!r}")
                outputs[made.name] = made
    unused = [n for n in checkpoint.tensors if n not in used]
    if unused:
        shown = ", ".join(repr(n) for n in unused[:5]) + (f" and {len(unused) - 5} more" if len(unused) > 5 else "")
        raise BadInputError(
            f"{recipe.name}: {len(unused)} source tensor(s) used by no rule: {shown}; map them or drop them"
        )
    return dataclasses.replace(checkpoint, tensors=dict(sorted(outputs.items())))


def _take(checkpoint: Checkpoint, recipe: Recipe, rule: Rule, name: str, used: dict[str, str]) -> SourceTensor:
    tensor = checkpoint.tensors.get(name)
    if tensor is None:
        raise BadInputError(f"{recipe.name}: {rule.describe()}: no tensor {name!r} in the source")
    if name in used:
        raise BadInputError(f"{recipe.name}: {name!r} is used twice ({used[name]}; {rule.describe()})")
    if tensor.view is not None or tensor.pieces:
        raise BadInputError(f"{recipe.name}: {name!r} is a strided view; convert the checkpoint first")
    used[name] = rule.describe()
    return tensor


def _made(where: str, rule: Rule, sources: Sequence[SourceTensor], names: Sequence[str]) -> list[SourceTensor]:
    if rule.op == "drop":
        return []
    if rule.op == "rename":
        return [named(sources[0], names[0])]
    if rule.op == "fuse":
        first = sources[0]
        for other in sources[1:]:
            same = other.info.dtype == first.info.dtype and other.info.shape[1:] == first.info.shape[1:]
            if not same or not other.info.shape:
                raise BadInputError(
                    f"{where}: cannot fuse {first.name!r} ({first.info.dtype} {list(first.info.shape)}) and "
                    f"{other.name!r} ({other.info.dtype} {list(other.info.shape)}): dtypes and all but dim 0 must agree"
                )
        rows = sum(s.info.shape[0] for s in sources)
        return [_composite(names[0], [named(s, names[0]) for s in sources], (rows, *first.info.shape[1:]))]
    source = sources[0]
    rows = source.info.shape[0] if source.info.shape else 0
    if rule.op == "swap":
        if rows % 2:
            raise BadInputError(f"{where}: cannot swap the halves of {source.name!r}: dim 0 is {rows}, odd")
        first, second = _chunks(source, [rows // 2, rows // 2], [names[0], names[0]])
        return [_composite(names[0], [second, first], source.info.shape)]
    sizes = list(rule.sizes)
    if not sizes:
        ratio = rule.ratio or (1,) * len(names)
        if rows % sum(ratio):
            raise BadInputError(
                f"{where}: dim 0 of {source.name!r} ({rows}) does not divide in the ratio {list(ratio)}"
            )
        sizes = [rows // sum(ratio) * r for r in ratio]
    if sum(sizes) != rows:
        raise BadInputError(f"{where}: sizes {sizes} of {source.name!r} add up to {sum(sizes)}, dim 0 is {rows}")
    return _chunks(source, sizes, names)


def _chunks(source: SourceTensor, sizes: Sequence[int], names: Sequence[str]) -> list[SourceTensor]:
    """Dim-0 chunks of `source`: each a narrower byte range of the same file."""
    info = source.info
    row = info.nbytes // info.shape[0]
    chunks, start = [], info.begin
    for rows, name in zip(sizes, names):
        chunk = info._replace(name=name, shape=(rows, *info.shape[1:]), begin=start, end=start + rows * row)
        chunks.append(source._replace(info=chunk, shard_name=source.shard_name or source.name))
        start += rows * row
    return chunks


def _composite(name: str, pieces: Sequence[SourceTensor], shape: tuple[int, ...]) -> SourceTensor:
    first = pieces[0]
    nbytes = sum(p.info.nbytes for p in pieces)
    info = first.info._replace(name=name, shape=tuple(shape), begin=0, end=nbytes)
    return first._replace(info=info, pieces=tuple(pieces))
