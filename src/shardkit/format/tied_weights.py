"""Which of several tied names the Hub's converter keeps.

safetensors' `convert.py` (`_remove_duplicate_names`) keeps, of the names that share one
storage and cover all of it, the first in sorted order that is not in `discard_names`
(the first in sorted order when all are). For a transformers model, `get_discard_names`
makes that the model class's `_tied_weights_keys`, found through config.json's
`architectures[0]` — the names the class ties again on load, e.g. Qwen2ForCausalLM's
`lm_head.weight` — and `[]` when anything fails or for another library's files. So the
Hub's model.safetensors of a tied causal LM holds `model.embed_tokens.weight`, where
sorted order alone would keep `lm_head.weight`.

Here a folder whose config.json names `architectures` is a transformers model. When
transformers imports, its class answers, exactly as in convert.py (this imports the
model's module and torch: seconds, paid only for a file that holds tied names). When it
does not import, :data:`FALLBACK` stands in: the names the most common tying classes list
(all of the 382 tying classes of transformers 5.24 but 54 list nothing else); for the
common case, an output head tied to the input embeddings, both give the same answer.
"""

from __future__ import annotations

import json
from functools import lru_cache

#: The tied names of causal LMs (`lm_head.weight`, 240 classes), BERT-style masked LMs
#: (`cls.predictions.decoder.*`, `lm_head.decoder.*`), encoder-decoders whose embeddings
#: are `shared.weight` (`encoder`/`decoder.embed_tokens.weight`) and Whisper (`proj_out.weight`).
FALLBACK = frozenset({
    "lm_head.weight", "cls.predictions.decoder.weight", "cls.predictions.decoder.bias", "lm_head.decoder.weight",
    "lm_head.decoder.bias", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "proj_out.weight",
})


@lru_cache(maxsize=8)
def discard_names(config: bytes | None) -> frozenset[str]:
    """convert.py's `discard_names` for the model whose config.json holds `config`
    (None: no config.json, so not a transformers model: nothing is discarded)."""
    architecture = _architecture(config)
    if architecture is None:
        return frozenset()
    try:
        import transformers

        keys = getattr(getattr(transformers, architecture), "_tied_weights_keys", None)
    except ImportError:  # transformers, or the torch its model classes need, is not installed
        return FALLBACK
    except Exception:  # noqa: BLE001 - convert.py's `except Exception: discard_names = []`
        return frozenset()
    try:
        return frozenset(keys or ())  # a list in transformers 4, a dict {tied: source} in 5
    except TypeError:
        return frozenset()


def kept_name(complete: list[str], discard: frozenset[str]) -> str:
    """The name written of a tied group's complete names (sorted): the first not discarded."""
    preferred = [name for name in complete if name not in discard]
    return (preferred or complete)[0]


def _architecture(config: bytes | None) -> str | None:
    if config is None:
        return None
    try:
        architectures = json.loads(config).get("architectures")
        architecture = architectures[0]
    except (ValueError, AttributeError, TypeError, IndexError, KeyError):
        return None
    return architecture if isinstance(architecture, str) else None
