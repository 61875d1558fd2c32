"""An index file's JSON, read exactly as :func:`shardkit.format.header_json.loads` reads it.

A mixture-of-experts index lists hundreds of thousands of weight_map entries. As
json.dumps writes them (save_pretrained: `indent=2`, keys sorted) each is
`"name": "file"` with the same separator between any two, and a string with no
backslash and no control character reads as itself: such entries are read by one
regex pass, in half the time the JSON decoder takes to build them. The document
around them, with weight_map's entries cut out, is read by header_json, and so is
any index laid out otherwise, and any whose cut-out document could mean something
else (the whole text is then read by header_json, which also words every error).
"""

from __future__ import annotations

import re
from itertools import chain

from ..format import header_json
from ..format.header_json import Pairs

_WEIGHT_MAP = re.compile(r'"weight_map"[ \t\n\r]*:[ \t\n\r]*\{')
_SPACES = " \t\n\r"
_PLAIN = r'"([^"\\\x00-\x1f]*+)"'
_FIRST_ENTRY = re.compile(rf"{_PLAIN}([ \t\n\r]*:[ \t\n\r]*){_PLAIN}")
_SEPARATOR = re.compile(r"[ \t\n\r]*,[ \t\n\r]*")
#: A string of the text before weight_map, which holds no backslash: no escapes.
_QUOTED = re.compile(r'"[^"]*"')


def loads(text: str) -> object:
    """The index's JSON as `header_json.loads(text)` gives it, or its JsonSyntaxError."""
    usual = _usual_entries(text)
    if usual is not None:
        outside, entries = usual
        try:
            document = header_json.loads(outside)
        except header_json.JsonSyntaxError:
            document = None  # the whole text, read below, gets the error worded for it
        if isinstance(document, Pairs) and document and document[-1] == ("weight_map", []):
            document[-1] = ("weight_map", entries)
            return document
    return header_json.loads(text)


def _usual_entries(text: str) -> tuple[str, Pairs] | None:
    """The text with weight_map's entries cut out (`"weight_map": {}`), and the
    entries; None unless weight_map is the top-level object's last member and its
    entries are usual.

    Before weight_map there is no backslash, so every quote there opens or closes a
    string: an even count of them and one more opening bracket than closing ones
    outside strings put weight_map at the top level. After it comes only `}`. Its
    entries' matches never overlap, so they tile the text between its braces exactly
    when their lengths add up to its length.
    """
    head = _WEIGHT_MAP.search(text)
    if head is None:
        return None
    before = text[: head.start()]
    if "\\" in before or before.count('"') % 2:
        return None
    brackets = _QUOTED.sub("", before)
    if brackets.count("{") + brackets.count("[") - brackets.count("}") - brackets.count("]") != 1:
        return None
    close = _last_brace(text, _last_brace(text, len(text)))  # weight_map's, then the document's
    if close < head.end():
        return None
    end = close
    while end > head.end() and text[end - 1] in _SPACES:
        end -= 1
    start = head.end()
    while start < end and text[start] in _SPACES:
        start += 1
    first = _FIRST_ENTRY.match(text, start, end)
    if first is None:
        return None
    entries = Pairs([(first.group(1), first.group(3))])
    if first.end() < end:
        separator = _SEPARATOR.match(text, first.end(), end)
        if separator is None:
            return None
        entry = re.compile(re.escape(separator.group()) + _PLAIN + re.escape(first.group(2)) + _PLAIN)
        rows = entry.findall(text, first.end(), end)
        fixed = len(separator.group()) + len(first.group(2)) + 4  # the separators and four quotes
        if sum(map(len, chain.from_iterable(rows))) + fixed * len(rows) != end - first.end():
            return None
        entries.extend(rows)
    return text[: head.end()] + text[close:], entries


def _last_brace(text: str, stop: int) -> int:
    """Where the `}` before text[stop:] is, when only whitespace is between; else -1."""
    at = max(stop, 0)
    while at > 0 and text[at - 1] in _SPACES:
        at -= 1
    return at - 1 if at > 0 and text[at - 1] == "}" else -1
