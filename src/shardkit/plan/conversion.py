"""Which tensors a `--dtype` run converts, and what its report says about them.

Planning only: which source dtype becomes which (a float tensor to the target unless
`--keep` names it; integers, bools and FP8/FP6/FP4 never, since a cast would not be
what the model expects), the config.json that names the new dtype, and after the
run the loss report (values that overflowed to ±inf or underflowed to zero). The
element-wise casts themselves are in :mod:`shardkit.format.dtype_cast`; the report of a run
is assembled by :func:`shardkit.commands.writing.dtype_report`.
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..checkpoint.shards import Checkpoint, SourceTensor
from ..errors import BadInputError, option, option_name
from ..format.gc_pause import gc_paused
from ..format.header import DTYPES
from .files import QuantiseAs, ScaleOf
from .fp8_layout import Fp8Layout, find_layout, quantization_config
from .selection import as_globs


@dataclass(frozen=True)
class DtypeChoice:
    """The output dtype of every tensor of a checkpoint for one `--dtype` run."""

    target: str  # a safetensors dtype code: BF16, F16, F32
    dtypes: Mapping[str, str]  # tensor name -> output dtype
    kept: tuple[str, ...]  # float tensors left as they are by --keep
    not_float: tuple[str, ...]  # integer, bool and unscaled FP8/FP6/FP4 tensors, copied unchanged
    fp8: Fp8Layout | None = None  # the FP8 weights dequantised (their scales are not written)
    quantised: Mapping[str, QuantiseAs] | None = None  # --dtype fp8: the weights quantised, by name
    block: tuple[int, int] | None = None  # --dtype fp8: the block size

    @property
    def scales(self) -> Mapping[str, ScaleOf | QuantiseAs] | None:
        if self.quantised is not None:
            return self.quantised
        return self.fp8.weights if self.fp8 is not None else None

    def rewrite_config(self, text: bytes, where: object) -> bytes:
        """The output's config.json: for a quantisation, transformers' quantization_config
        added; otherwise the new dtype named (and a dequantised FP8 model's
        quantization_config removed)."""
        if self.quantised is None:
            return config_with_dtype(text, self.target, where, self.fp8 is not None)
        from .fp8_quantise import quantised_config

        assert self.block is not None
        config = quantised_config(parse_config(text, where), self.block, self.kept)
        return (json.dumps(config, indent=2, ensure_ascii=False) + "\n").encode("utf-8")

    def __call__(self, tensor: SourceTensor) -> str:
        return self.dtypes[tensor.name]

    def converted(self, checkpoint: Checkpoint) -> list[str]:
        return [n for n, t in checkpoint.tensors.items() if self.dtypes[n] != t.info.dtype]


@gc_paused()  # a dtype per tensor (and the FP8 pairs): no cycles for the collector to look for
def choose_dtypes(
    checkpoint: Checkpoint,
    target_name: str,
    keep: Sequence[str] = (),
    config: Mapping[str, object] | None = None,
    block_size: str | None = None,
) -> DtypeChoice:
    """Every F64/F32/F16/BF16 tensor to `target_name` (bf16, fp16, fp32 or their long
    spellings) unless a `keep` glob matches its name; everything else unchanged. In an
    FP8 checkpoint (scale tensors beside the weights, or `config`'s
    quantization_config) every FP8 weight is dequantised to the target and its scale
    tensor left out; `keep` does not apply to them (an FP8 weight cannot be kept
    without its scales). `fp8` quantises instead (see :func:`choose_quantised`), in
    `block_size` blocks ("ROWSxCOLUMNS", 128x128 by default)."""
    from ..format import dtype_cast
    from .fp8_quantise import is_fp8_target

    keep = as_globs(keep)
    for pattern in keep:
        if not pattern:
            raise BadInputError(f"{option('keep', '')}: give a glob of tensor names, e.g. {option('keep', '*norm*')}")
    if is_fp8_target(target_name):
        return choose_quantised(checkpoint, keep, config, block_size)
    if block_size is not None:
        raise BadInputError(
            f"{option_name('block_size')} applies to {option('dtype', 'fp8')} (quantisation), "
            f"not to {option('dtype', target_name)}"
        )
    target = dtype_cast.parse_target(target_name)
    fp8 = find_layout(checkpoint, config)
    if fp8 is None:
        _refuse_other_quantisation(checkpoint, config)
    scale_names = fp8.scale_names if fp8 is not None else frozenset()
    fp8_weights = fp8.weights if fp8 is not None else {}
    dtypes: dict[str, str] = {}
    kept: list[str] = []
    not_float: list[str] = []
    for name, tensor in checkpoint.tensors.items():
        source = tensor.info.dtype
        dtypes[name] = source
        if name in scale_names:
            continue
        if name in fp8_weights:
            dtypes[name] = target
        elif not dtype_cast.is_convertible(source):
            not_float.append(name)
        elif keep and any(fnmatch.fnmatchcase(name, pattern) for pattern in keep):
            kept.append(name)
        else:
            dtypes[name] = target
    return DtypeChoice(target, dtypes, tuple(kept), tuple(not_float), fp8)


def choose_quantised(
    checkpoint: Checkpoint, keep: Sequence[str], config: Mapping[str, object] | None, block_size: str | None
) -> DtypeChoice:
    """`--dtype fp8`: the weights transformers' FP8 quantiser would quantise become
    F8_E4M3, each with a F32 scale tensor beside it; every other tensor is copied as it
    is (the model keeps its dtype, as in transformers)."""
    from .fp8_layout import FP8_DTYPE
    from .fp8_quantise import choose_quantised as quantised_weights
    from .fp8_quantise import parse_block_size

    block = parse_block_size(block_size)
    quantised, kept = quantised_weights(checkpoint, block, keep, config)
    dtypes = {name: tensor.info.dtype for name, tensor in checkpoint.tensors.items()}
    for name, of in quantised.items():
        dtypes[name] = FP8_DTYPE
        dtypes[of.scale_name] = "F32"
    return DtypeChoice(FP8_DTYPE, dtypes, tuple(kept), (), quantised=quantised, block=block)


def _refuse_other_quantisation(checkpoint: Checkpoint, config: Mapping[str, object] | None) -> None:
    """A quantised checkpoint with no FP8 weights to dequantise (GPTQ, AWQ, bitsandbytes,
    compressed-tensors' int and FP4 schemes) keeps float scales beside its packed
    weights: converting them would round every scale (fp16 → bf16 drops 3 mantissa
    bits, so every dequantised weight moves) under a config that still names the
    quantisation, with exit 0 and a "lossless" report."""
    section = quantization_config(config)
    if section is not None:
        raise BadInputError(
            f"{checkpoint.root / 'config.json'}: the checkpoint is quantised (quantization_config.quant_method "
            f"{section.get('quant_method')!r}) and has no FP8 weights to dequantise; {option_name('dtype')} would "
            "round its scales; convert the unquantised checkpoint instead"
        )


def config_with_dtype(text: bytes, target: str, where: object, dequantised: bool = False) -> bytes:
    """config.json with `torch_dtype` and/or `dtype` (whichever it has, both if both)
    naming `target`; a config with neither is returned unchanged. `dequantised`: the
    weights are no longer quantised, so `quantization_config` goes (transformers would
    otherwise look for the scales) and `torch_dtype` is set even where it was absent."""
    config = parse_config(text, where)
    if dequantised:
        config.pop("quantization_config", None)
    keys = [key for key in ("torch_dtype", "dtype") if key in config] or (["torch_dtype"] if dequantised else [])
    if not keys:
        return text
    for key in keys:
        config[key] = DTYPES[target].torch  # config.json spells dtypes as torch does
    return (json.dumps(config, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def read_config(checkpoint: Checkpoint) -> dict[str, object] | None:
    """The checkpoint folder's config.json, if it has one."""
    from .. import storage

    path = checkpoint.root / "config.json"
    return parse_config(storage.read_bytes(path), path) if path.is_file() else None


def parse_config(text: bytes, where: object) -> dict[str, object]:
    try:
        config = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadInputError(f"{where}: not valid JSON ({exc}); cannot record the new dtype in it") from None
    if not isinstance(config, dict):
        raise BadInputError(f"{where}: not a JSON object; cannot record the new dtype in it")
    return config
