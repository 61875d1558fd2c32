"""Which tensors of a checkpoint are FP8 weights, and which tensor holds each one's scales.

Planning only, from the headers and config.json's `quantization_config`. The
Hugging Face "fine-grained FP8" layout (DeepSeek-V3/R1, Kimi K2, Qwen3 -FP8): each
quantised `X.weight` is F8_E4M3 of shape [rows, columns] and `X.weight_scale_inv` is
F32 of shape [ceil(rows / block_rows), ceil(columns / block_columns)], the block
given by `weight_block_size` (128 × 128 when the config does not say).

A pairing that does not hold (a weight without its scale, a scale without its
weight, a grid of the wrong shape) is refused naming both tensors: loaders that
guess report "some layers were not initialized" much later, or silently multiply by
the wrong scales.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from .checkpoint import Checkpoint, SourceTensor
from .errors import BadInputError

SCALE_SUFFIX = "_scale_inv"
FP8_DTYPE = "F8_E4M3"
DEFAULT_BLOCK = (128, 128)


@dataclass(frozen=True)
class Fp8Layout:
    """The FP8 weights of a checkpoint and their scales."""

    scheme: str  # "fp8" (fine-grained, block-scaled)
    block: tuple[int, int]
    scales: Mapping[str, SourceTensor]  # weight name -> its scale tensor

    def pairs(self) -> dict[str, tuple[SourceTensor, tuple[int, int]]]:
        """weight name -> (scale tensor, block), as the planner takes them."""
        return {name: (scale, self.block) for name, scale in self.scales.items()}

    @property
    def scale_names(self) -> frozenset[str]:
        return frozenset(scale.name for scale in self.scales.values())


def quantization_config(config: Mapping[str, object] | None) -> Mapping[str, object] | None:
    section = (config or {}).get("quantization_config")
    return section if isinstance(section, Mapping) else None


def find_layout(checkpoint: Checkpoint, config: Mapping[str, object] | None) -> Fp8Layout | None:
    """The fine-grained FP8 layout of `checkpoint`, or None if it has no scale tensors
    and its config does not say `quant_method: fp8` (FP8 tensors of such a checkpoint
    are data, copied unchanged)."""
    section = quantization_config(config)
    tensors = checkpoint.tensors
    scale_names = [name for name in tensors if name.endswith(SCALE_SUFFIX)]
    if not scale_names and not (section and section.get("quant_method") == "fp8"):
        return None
    block = _block(section)
    where = checkpoint.root
    scales: dict[str, SourceTensor] = {}
    for name in scale_names:
        weight_name = name[: -len(SCALE_SUFFIX)]
        weight = tensors.get(weight_name)
        if weight is None:
            raise BadInputError(
                f"{where}: scale tensor {name!r} has no weight {weight_name!r} beside it; "
                "the checkpoint is incomplete or its scales are named differently"
            )
        _check_pair(where, weight, tensors[name], block)
        scales[weight_name] = tensors[name]
    for name, tensor in tensors.items():
        if tensor.info.dtype == FP8_DTYPE and name not in scales:
            raise BadInputError(
                f"{where}: FP8 weight {name!r} has no scale tensor {name + SCALE_SUFFIX!r}; "
                "it cannot be dequantised (is a shard missing, or are its scales named differently?)"
            )
    return Fp8Layout("fp8", block, scales)


def _block(section: Mapping[str, object] | None) -> tuple[int, int]:
    value = (section or {}).get("weight_block_size")
    if value is None:
        return DEFAULT_BLOCK
    if (
        not isinstance(value, list)
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    ):
        raise BadInputError(
            f"config.json: quantization_config.weight_block_size is {value!r}; expected two positive integers "
            "such as [128, 128]"
        )
    return value[0], value[1]


def _check_pair(where: object, weight: SourceTensor, scale: SourceTensor, block: tuple[int, int]) -> None:
    both = f"weight {weight.name!r} and its scale {scale.name!r}"
    if weight.info.dtype != FP8_DTYPE:
        raise BadInputError(f"{where}: {both}: the weight is {weight.info.dtype}, expected {FP8_DTYPE}")
    if scale.info.dtype != "F32":
        raise BadInputError(f"{where}: {both}: the scale is {scale.info.dtype}, expected F32")
    if len(weight.info.shape) != 2:
        raise BadInputError(
            f"{where}: {both}: the weight has shape {list(weight.info.shape)}; only 2-D FP8 weights are dequantised"
        )
    rows, columns = weight.info.shape
    expected = [-(-rows // block[0]), -(-columns // block[1])]
    if list(scale.info.shape) != expected:
        raise BadInputError(
            f"{where}: {both}: the scale has shape {list(scale.info.shape)}, expected {expected} "
            f"for a {rows}×{columns} weight in {block[0]}×{block[1]} blocks (weight_block_size in config.json)"
        )
