"""Which tensors `--dtype fp8` quantises, in which blocks, and the config that says so.

Planning only, from the headers and config.json. The rule is transformers' own FP8
quantiser (`FineGrainedFP8HfQuantizer` with `replace_with_fp8_linear`, and
`Fp8Quantize._quantize_one`), read from its source and checked against it on every
architecture the tests build:

- only the weights of `nn.Linear` layers (and of MoE experts, which are Linear
  layers on disk) are quantised; transformers finds them by module type, shardkit
  by name: a 2-D `….weight` whose module is not an embedding (`embed_tokens`,
  `wte`, `wpe`, any name with `embed`), not `lm_head` (transformers leaves the
  output embedding out), not an MoE router (a module called `gate`: DeepSeek's,
  Qwen-MoE's and Mixtral's routers are not Linear layers) and not GPT-2's `Conv1D`
  (`c_attn`, `c_proj`, `c_fc`, `q_attn` in the models that use it);
- a weight whose rows and columns do not divide into whole blocks stays as it is
  (`Fp8Quantize` passes it through), and so do biases, norms and every 1-D tensor;
- `--keep GLOB` leaves matching weights unquantised and names their modules in
  `modules_to_not_convert`, so that transformers does not expect FP8 there.

Each quantised `X.weight` becomes F8_E4M3 of the same shape and gains
`X.weight_scale_inv`, F32 of shape [rows / block_rows, columns / block_columns];
the arithmetic is in :mod:`shardkit.format.fp8`.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping, Sequence

from ..checkpoint.shards import Checkpoint, SourceTensor
from ..errors import BadInputError, option, option_name
from .files import QuantiseAs
from .fp8_layout import DEFAULT_BLOCK, find_layout, quantization_config

#: --dtype spellings of E4M3 quantisation.
FP8_NAMES = frozenset({"fp8", "float8", "f8_e4m3", "float8_e4m3fn", "e4m3"})
#: The float dtypes a weight is quantised from (transformers widens each to float32).
QUANTISED_FROM = frozenset({"F64", "F32", "F16", "BF16"})
#: Model types whose c_attn/c_proj/c_fc/q_attn are transformers' Conv1D, not Linear.
CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer", "clvp"})
CONV1D_MODULES = frozenset({"c_attn", "c_proj", "c_fc", "q_attn"})
NOT_LINEAR = frozenset({"lm_head", "wte", "wpe", "gate"})

_BLOCK_SIZE = re.compile(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*")


def is_fp8_target(name: str) -> bool:
    return name.strip().lower() in FP8_NAMES


def parse_block_size(text: str | None) -> tuple[int, int]:
    """`--block-size ROWSxCOLUMNS` (e.g. 128x128); the default is transformers' 128x128."""
    if text is None:
        return DEFAULT_BLOCK
    # A Python caller may pass (128, 128) or 128: refused as the text it is not, not a TypeError.
    match = _BLOCK_SIZE.fullmatch(text) if isinstance(text, str) else None
    block = (int(match[1]), int(match[2])) if match else (0, 0)
    if not all(0 < side <= 1 << 20 for side in block):
        raise BadInputError(
            f"{option('block_size', text)}: expected ROWSxCOLUMNS, two positive integers such as "
            f"{option('block_size', '128x128')}"
        )
    return block


def choose_quantised(
    checkpoint: Checkpoint,
    block: tuple[int, int],
    keep: Sequence[str],
    config: Mapping[str, object] | None,
) -> tuple[dict[str, QuantiseAs], list[str]]:
    """(weight name -> how it is quantised, weights a `keep` glob left unquantised)."""
    _refuse_quantised(checkpoint, config)
    conv1d = _model_type(config) in CONV1D_MODEL_TYPES or config is None
    quantised: dict[str, QuantiseAs] = {}
    kept: list[str] = []
    for name, tensor in checkpoint.tensors.items():
        if not _is_linear_weight(name, tensor, conv1d):
            continue
        rows, columns = tensor.info.shape
        if rows % block[0] or columns % block[1]:
            continue
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in keep):
            kept.append(name)
            continue
        quantised[name] = QuantiseAs(block, name)
    if not quantised:
        left_out = f" (or {option_name('keep')} left them out)" if kept else ""
        raise BadInputError(
            f"{checkpoint.root}: {option('dtype', 'fp8')} found no Linear weight whose shape divides into "
            f"{block[0]}x{block[1]} blocks{left_out}; nothing to quantise (try a smaller {option_name('block_size')})"
        )
    return quantised, kept


def _is_linear_weight(name: str, tensor: SourceTensor, conv1d: bool) -> bool:
    if not name.endswith(".weight") or len(tensor.info.shape) != 2 or tensor.info.dtype not in QUANTISED_FROM:
        return False
    module = name[: -len(".weight")].rsplit(".", 1)[-1]
    if module in NOT_LINEAR or "embed" in module:
        return False
    return not (conv1d and module in CONV1D_MODULES)


def _model_type(config: Mapping[str, object] | None) -> object:
    if config is None:
        return None
    text = config.get("text_config")
    if isinstance(text, Mapping) and "model_type" in text:
        return text["model_type"]
    return config.get("model_type")


def _refuse_quantised(checkpoint: Checkpoint, config: Mapping[str, object] | None) -> None:
    section = quantization_config(config)
    if section is not None:
        fp8 = find_layout(checkpoint, config) is not None
        raise BadInputError(
            f"{checkpoint.root / 'config.json'}: the checkpoint is already quantised (quantization_config."
            f"quant_method {section.get('quant_method')!r}); {option('dtype', 'fp8')} quantises a BF16, F16 or F32 "
            "checkpoint"
            + (f"; dequantise it first with {option('dtype', 'bf16')}" if fp8 else "")
        )
    for name, tensor in checkpoint.tensors.items():
        if tensor.info.dtype.startswith("F8_") or name.endswith(("_scale_inv", ".weight_scale")):
            raise BadInputError(
                f"{checkpoint.root}: tensor {name!r} is {tensor.info.dtype}: the checkpoint is already "
                f"quantised; {option('dtype', 'fp8')} quantises a BF16, F16 or F32 checkpoint (dequantise it first "
                f"with {option('dtype', 'bf16')})"
            )


def quantised_config(config: dict[str, object], block: tuple[int, int], kept: Sequence[str]) -> dict[str, object]:
    """config.json as transformers' save_pretrained writes it for a model quantised with
    `FineGrainedFP8Config(weight_block_size=block)`: its `quantization_config`
    (`to_dict()`, keys sorted as its JSON writer sorts them), placed among the other
    keys in order if they were sorted. Kept weights' modules go in `modules_to_not_convert`."""
    section = {
        "activation_scheme": "dynamic",
        "dequantize": False,
        "expert_dtype": "fp8",
        "modules_to_convert": None,
        "modules_to_not_convert": sorted(name[: -len(".weight")] for name in kept) or None,
        "quant_method": "fp8",
        "scale_fmt": "float",
        "weight_block_size": [block[0], block[1]],
    }
    keys = list(config)
    rewritten = {**config, "quantization_config": section}
    if keys == sorted(keys):
        rewritten = dict(sorted(rewritten.items()))
    return rewritten

