"""Which tensors of a checkpoint are FP8 weights, and which tensor holds each one's scales.

Planning only, from the headers and config.json's `quantization_config`. Two layouts:

- Hugging Face "fine-grained FP8" (DeepSeek-V3/R1, Kimi K2, Qwen3 -FP8): each
  quantised `X.weight` is F8_E4M3 of shape [rows, columns] and `X.weight_scale_inv`
  is F32 of shape [ceil(rows / block_rows), ceil(columns / block_columns)], the block
  given by `weight_block_size` (128 × 128 when the config does not say). transformers
  multiplies in float32.
- compressed-tensors (llm-compressor's FP8 models, `quant_method:
  compressed-tensors`): `X.weight_scale` is one scale per tensor (shape [] or [1]),
  per output channel ([rows, 1]) or per block (the `block_structure` of the
  weights' quantisation args), in the model's dtype; compressed-tensors multiplies in
  the scale's dtype (`x_q.to(scale.dtype) * scale`). An `X.input_scale` (static
  activation scale) has nothing to apply to once the weight is dequantised and is
  left out with the weight's scale.

A pairing that does not hold (a weight without its scale, a scale without its
weight, a grid of the wrong shape) is refused naming both tensors: loaders that
guess report "some layers were not initialized" much later, or silently multiply by
the wrong scales.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property
from itertools import repeat
from operator import attrgetter, itemgetter, methodcaller

from ..checkpoint.shards import Checkpoint, SourceTensor
from ..errors import BadInputError
from ..format.header import TensorInfo
from .files import ScaleOf, not_written

SCALE_SUFFIX = "_scale_inv"
COMPRESSED_SUFFIX = "_scale"
FP8_DTYPE = "F8_E4M3"
DEFAULT_BLOCK = (128, 128)
SCALE_DTYPES = ("F32", "BF16", "F16")



@dataclass(frozen=True)
class Fp8Layout:
    """The FP8 weights of a checkpoint and how each is dequantised."""

    scheme: str  # "fp8" (fine-grained) or "compressed-tensors"
    block: tuple[int, int] | None  # the config's block size, None for per-tensor/channel scales
    weights: Mapping[str, ScaleOf]  # weight name -> its scale

    @cached_property  # asked by the dtype choice, the plan and the report: made once
    def scale_names(self) -> frozenset[str]:
        return frozenset(not_written(self.weights))


def quantization_config(config: Mapping[str, object] | None) -> Mapping[str, object] | None:
    section = (config or {}).get("quantization_config")
    return section if isinstance(section, Mapping) else None


def is_fp8(section: Mapping[str, object]) -> bool:
    """Whether a quantization_config describes FP8 weights: the model's own tensors in
    F8_E4M3 plus scales (fine-grained fp8, or compressed-tensors with 8-bit float
    weights in every group)."""
    method = section.get("quant_method")
    if method == "fp8":
        return True
    groups = section.get("config_groups")
    if method != "compressed-tensors" or not isinstance(groups, Mapping) or not groups:
        return False
    for group in groups.values():
        weights = group.get("weights") if isinstance(group, Mapping) else None
        if not isinstance(weights, Mapping) or weights.get("type") != "float" or weights.get("num_bits") != 8:
            return False
    return True


def find_layout(checkpoint: Checkpoint, config: Mapping[str, object] | None) -> Fp8Layout | None:
    """The FP8 layout of `checkpoint`, or None if it has no scale tensors beside FP8
    weights and its config names no FP8 quantisation (FP8 tensors of such a checkpoint
    are data, copied unchanged)."""
    section = quantization_config(config)
    method = section.get("quant_method") if section else None
    tensors = checkpoint.tensors
    fine = list(filter(methodcaller("endswith", SCALE_SUFFIX), tensors))
    if method == "compressed-tensors" or (not fine and method != "fp8" and _has_compressed_scales(tensors)):
        weights = _compressed(checkpoint, section)
        return Fp8Layout("compressed-tensors", _compressed_block(section), weights) if weights else None
    if not fine and method != "fp8":
        return None
    block = _block(section)
    pairs = _fine_pairs(checkpoint, fine, block)
    _refuse_unscaled(checkpoint, pairs, SCALE_SUFFIX)
    return Fp8Layout("fp8", block, pairs)


def _fine_pairs(checkpoint: Checkpoint, scale_names: list[str], block: tuple[int, int]) -> dict[str, ScaleOf]:
    """Each weight beside one of `scale_names` -> its F32 scale grid, checked.

    DeepSeek-V3's 45,809 pairs come in a few dozen (dtype, shape) kinds, so each kind
    is checked once, in C-speed passes over the names; only a missing weight or a
    wrong kind sends the pairs through one by one, to name the first wrong one."""
    tensors = checkpoint.tensors
    scales = list(map(tensors.__getitem__, scale_names))
    weights = list(map(tensors.get, [name[: -len(SCALE_SUFFIX)] for name in scale_names]))
    if None in weights or any(
        _pair_problem(weight, scale, block, ("F32",), False) is not None for weight, scale in _kinds(weights, scales)
    ):
        for name, scale in zip(scale_names, scales):
            _check_pair(checkpoint.root, _weight_of(checkpoint, name, SCALE_SUFFIX), scale, block, ("F32",))
    return dict(zip(map(_NAME, weights), map(ScaleOf, scales, repeat(block))))


def _kinds(
    weights: list[SourceTensor | None], scales: list[SourceTensor]
) -> Iterable[tuple[TensorInfo, TensorInfo]]:
    """Each distinct (dtype, shape) of a weight and of its scale, as nameless infos (no weight None)."""
    kinds = set(zip(map(_DTYPE_AND_SHAPE, map(_INFO, weights)), map(_DTYPE_AND_SHAPE, map(_INFO, scales))))
    return [(TensorInfo("", w_dtype, w_shape, 0, 0), TensorInfo("", s_dtype, s_shape, 0, 0))
            for (w_dtype, w_shape), (s_dtype, s_shape) in kinds]


_INFO = attrgetter("info")
_NAME = attrgetter("info.name")
_DTYPE_AND_SHAPE = itemgetter(slice(1, 3))  # of a TensorInfo


def _has_compressed_scales(tensors: Mapping[str, SourceTensor]) -> bool:
    """Whether some FP8 `X.weight` has an `X.weight_scale` beside it (compressed-tensors' naming)."""
    return any(
        name[: -len(COMPRESSED_SUFFIX)] in tensors and tensors[name[: -len(COMPRESSED_SUFFIX)]].info.dtype == FP8_DTYPE
        for name in filter(methodcaller("endswith", ".weight" + COMPRESSED_SUFFIX), tensors)
    )


def _weight_of(checkpoint: Checkpoint, scale_name: str, suffix: str) -> SourceTensor:
    weight_name = scale_name[: -len(suffix)]
    weight = checkpoint.tensors.get(weight_name)
    if weight is None:
        raise BadInputError(
            f"{checkpoint.root}: scale tensor {scale_name!r} has no weight {weight_name!r} beside it; "
            "the checkpoint is incomplete or its scales are named differently"
        )
    return weight


def _refuse_unscaled(checkpoint: Checkpoint, weights: Mapping[str, ScaleOf], suffix: str) -> None:
    for name, tensor in checkpoint.tensors.items():
        if tensor.info.dtype == FP8_DTYPE and name not in weights:
            raise BadInputError(
                f"{checkpoint.root}: FP8 weight {name!r} has no scale tensor {name + suffix!r}; "
                "it cannot be dequantised (is a shard missing, or are its scales named differently?)"
            )


def _compressed(checkpoint: Checkpoint, section: Mapping[str, object] | None) -> dict[str, ScaleOf]:
    tensors = checkpoint.tensors
    block = _compressed_block(section)
    weights: dict[str, ScaleOf] = {}
    for name in tensors:
        if not name.endswith(".weight" + COMPRESSED_SUFFIX):
            continue
        weight = _weight_of(checkpoint, name, COMPRESSED_SUFFIX)
        if weight.info.dtype != FP8_DTYPE:
            continue  # an int8 or FP4 scheme: not dequantised here
        scale = tensors[name]
        shape = weight.info.shape
        if len(shape) != 2:
            _check_pair(checkpoint.root, weight, scale, DEFAULT_BLOCK, SCALE_DTYPES)
        rows, columns = shape
        grid = list(scale.info.shape)
        if grid in ([], [1], [1, 1]):
            of_block = (rows, columns)
        elif grid == [rows, 1]:
            of_block = (1, columns)
        elif block is not None:
            of_block = block
        else:
            raise BadInputError(
                f"{checkpoint.root}: weight {weight.name!r} and its scale {name!r}: the scale has shape {grid}, "
                f"expected [] or [1] (per tensor) or [{rows}, 1] (per channel)"
            )
        _check_pair(checkpoint.root, weight, scale, of_block, SCALE_DTYPES, flat_ok=True)
        input_scale = weight.name[: -len("weight")] + "input_scale"
        weights[weight.name] = ScaleOf(
            scale, of_block, scale.info.dtype, (input_scale,) if input_scale in tensors else ()
        )
    _refuse_unscaled(checkpoint, weights, COMPRESSED_SUFFIX)
    return weights


def _compressed_block(section: Mapping[str, object] | None) -> tuple[int, int] | None:
    """The `block_structure` of the weights' args in config_groups, if any group has one."""
    groups = (section or {}).get("config_groups")
    for group in (groups.values() if isinstance(groups, Mapping) else ()):
        weights = group.get("weights") if isinstance(group, Mapping) else None
        structure = weights.get("block_structure") if isinstance(weights, Mapping) else None
        if structure is not None:
            return _pair(structure, "quantization_config.config_groups…weights.block_structure")
    return None


def _block(section: Mapping[str, object] | None) -> tuple[int, int]:
    value = (section or {}).get("weight_block_size")
    if value is None:
        return DEFAULT_BLOCK
    return _pair(value, "quantization_config.weight_block_size")


def _pair(value: object, what: str) -> tuple[int, int]:
    if (
        not isinstance(value, list)
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    ):
        raise BadInputError(f"config.json: {what} is {value!r}; expected two positive integers such as [128, 128]")
    return value[0], value[1]


def _check_pair(
    where: object,
    weight: SourceTensor,
    scale: SourceTensor,
    block: tuple[int, int],
    scale_dtypes: tuple[str, ...],
    flat_ok: bool = False,
) -> None:
    problem = _pair_problem(weight.info, scale.info, block, scale_dtypes, flat_ok)
    if problem is not None:
        raise BadInputError(f"{where}: weight {weight.name!r} and its scale {scale.name!r}: {problem}")


def _pair_problem(
    weight: TensorInfo, scale: TensorInfo, block: tuple[int, int], scale_dtypes: tuple[str, ...], flat_ok: bool
) -> str | None:
    """What is wrong with a weight and its scale, or None; the message is only made
    for a pair that is wrong (an FP8 MoE model has some 50,000 pairs)."""
    if weight.dtype != FP8_DTYPE:
        return f"the weight is {weight.dtype}, expected {FP8_DTYPE}"
    if scale.dtype not in scale_dtypes:
        return f"the scale is {scale.dtype}, expected {' or '.join(scale_dtypes)}"
    if len(weight.shape) != 2:
        return f"the weight has shape {list(weight.shape)}; only 2-D FP8 weights are dequantised"
    rows, columns = weight.shape
    expected = [-(-rows // block[0]), -(-columns // block[1])]
    shape = list(scale.shape)
    if shape != expected and not (flat_ok and expected == [1, 1] and shape in ([], [1])):
        return (
            f"the scale has shape {shape}, expected {expected} "
            f"for a {rows}×{columns} weight in {block[0]}×{block[1]} blocks (weight_block_size in config.json)"
        )
    return None


def quantised_names(present: Mapping[str, tuple[str, tuple[int, ...]]]) -> tuple[set[str], set[str]]:
    """(scale tensors, FP8 weights) among `present` (name -> (dtype, shape)), by name
    alone: for the architecture check, which compares names and shapes with a model
    whose layers transformers would swap for FP8 ones carrying these scales."""
    scales: set[str] = set()
    weights: set[str] = set()
    for name in present:
        for suffix in (SCALE_SUFFIX, COMPRESSED_SUFFIX):
            weight = name[: -len(suffix)]
            if name.endswith(suffix) and weight in present and present[weight][0] == FP8_DTYPE:
                scales.add(name)
                weights.add(weight)
                input_scale = weight[: -len("weight")] + "input_scale"
                if weight.endswith(".weight") and input_scale in present:
                    scales.add(input_scale)
    return scales, weights
