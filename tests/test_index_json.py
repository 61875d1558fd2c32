"""Differential fuzzing of the index reader's fast path against header_json.

`index_json.loads` reads a usual weight_map by one regex pass and the rest of the
document by `header_json.loads`; for any text it must give exactly what
`header_json.loads` gives (the same values, as the same types: Pairs, JsonFloat), or
raise the same JsonSyntaxError with the same words. Hypothesis writes indexes as
json.dumps writes them (indent 2 as save_pretrained does, compact, default spacing),
with odd names and metadata, members before or after weight_map, repeated keys, and
then mutates their characters.
"""

from __future__ import annotations

import json
import os
from datetime import timedelta

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from shardkit.checkpoint import index_json
from shardkit.format import header_json

EXAMPLES = int(os.environ.get("SHARDKIT_FUZZ_EXAMPLES", "300"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=timedelta(seconds=10),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
)


def outcome(text: str) -> tuple[str, object]:
    """What a reader makes of `text`, with the type of every value spelled out."""
    def typed(value: object) -> object:
        if isinstance(value, list):
            return (type(value).__name__, [typed(v) for v in value])
        if isinstance(value, tuple):
            return tuple(typed(v) for v in value)
        return (type(value).__name__, value)

    def read(loads) -> object:  # noqa: ANN001
        try:
            return typed(loads(text))
        except header_json.JsonSyntaxError as exc:
            return ("error", str(exc))

    return read(index_json.loads), read(header_json.loads)


def agree(text: str) -> None:
    fast, exact = outcome(text)
    assert fast == exact, text[:300]


#: Names json.dumps writes as they are (the fast path's), and any names.
PLAIN_NAMES = st.one_of(
    st.text(st.characters(blacklist_characters='"\\', min_codepoint=32), max_size=10),
    st.sampled_from(["model.layers.0.mlp.experts.1.up_proj.weight", "a", "", "é", "🤗", "}", "{", "]", ",",
                     ":", "weight_map", " ", "\ud800", "\x7f"]),
)
NAMES = st.one_of(PLAIN_NAMES, st.text(max_size=10), st.sampled_from(['q"', "b\\s", "n\nl"]))
JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False), st.text(max_size=6)),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=8,
)


@st.composite
def index_texts(draw: st.DrawFn) -> str:
    usual = draw(st.sampled_from([True, True, True, False]))  # mostly what the fast path reads
    names = PLAIN_NAMES if usual else NAMES
    weight_map = draw(st.dictionaries(names, names, max_size=8))
    document: dict[str, object] = {}
    if draw(st.booleans()):
        values = st.integers(0, 2**40) if usual else JSON_VALUES
        document["metadata"] = draw(st.dictionaries(st.sampled_from(["total_size", "format", "x"]), values))
    for key in draw(st.lists(st.sampled_from(["other", "weight_map_", "z"]), max_size=1 if usual else 2)):
        document[key] = draw(st.integers() if usual else JSON_VALUES)
    document["weight_map"] = weight_map
    if draw(st.sampled_from([False, False, False, True])):
        document["zz"] = draw(JSON_VALUES)  # a member after weight_map: the fast path must stand aside
    layout = draw(st.sampled_from([{"indent": 2, "sort_keys": True}, {}, {"separators": (",", ":")},
                                   {"indent": 4}, {"indent": "\t"}, {"indent": 2, "ensure_ascii": True}]))
    text = json.dumps(document, **{"ensure_ascii": False, **layout})
    if draw(st.sampled_from([False, False, True])):
        text += draw(st.sampled_from(["\n", " ", "\r\n", "x", "}", ",", "\n\n"]))
    return text


@st.composite
def mutated(draw: st.DrawFn) -> str:
    text = draw(index_texts())
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(text)))
        kind = draw(st.sampled_from(["insert", "delete", "replace"]))
        piece = draw(st.sampled_from(['"', "\\", ",", ":", "{", "}", "[", "]", " ", "\n", "\x01", "a", "0", "é",
                                      '"weight_map": {', '"a": "b"', ', "a": "b"', ',\n    "a": "b"', '"a":"b",',
                                      "\\u0041", "\\ud800", '"', '", "']))
        if kind == "insert":
            text = text[:at] + piece + text[at:]
        elif kind == "delete":
            text = text[:at] + text[at + len(piece):]
        else:
            text = text[:at] + piece + text[at + 1:]
    return text


@FUZZ
@given(index_texts())
@example('{"weight_map": {"a": "b", "a": "c"}}')
@example('{"metadata": {"w": "\\"weight_map\\": {"}, "weight_map": {"a": "b"}}')
@example('{"x": {"weight_map": {"a": "b"}}}')
@example('["weight_map": {"a": "b"}]')
@example('{"weight_map": {"a": "b", "c": "d"}, "weight_map": {"e": "f"}}')
def test_indexes_are_read_as_header_json_reads_them(text: str) -> None:
    agree(text)


@FUZZ
@given(mutated())
def test_mutated_indexes_are_read_as_header_json_reads_them(text: str) -> None:
    agree(text)


def test_save_pretrained_index_takes_the_fast_path() -> None:
    """The layout transformers writes (json.dumps indent 2, keys sorted, a newline) is
    the one read by the regex pass: else the benchmark measures the slow one."""
    weight_map = {f"model.layers.{i}.mlp.experts.{j}.up_proj.weight": f"model-0000{i % 3 + 1}-of-00003.safetensors"
                  for i in range(3) for j in range(40)}
    text = json.dumps({"metadata": {"total_size": 123}, "weight_map": weight_map}, indent=2, sort_keys=True) + "\n"
    usual = index_json._usual_entries(text)
    assert usual is not None
    assert usual[1] == sorted(weight_map.items())
    agree(text)
