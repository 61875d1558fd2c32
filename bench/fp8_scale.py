"""Start-up cost of `inspect` and `merge --dtype bf16 --dry-run` on a DeepSeek-V3-shaped
FP8 checkpoint, beside a process that opens the same headers with the reference reader.

The checkpoint has DeepSeek-V3's tensor names, shapes and dtypes (61 layers plus the
MTP layer 61, 256 routed experts per MoE layer, F8_E4M3 weights with F32
`weight_scale_inv` grids, 91,992 tensors, 688 GB in 163 shards) and costs no disk:
real headers, sparse data. Each command runs in a fresh process, the best of `--runs`.

    python bench/fp8_scale.py [--folder /tmp/deepseek-v3-shaped] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import math
import struct
import subprocess
import sys
import time
from pathlib import Path

HIDDEN, MOE, DENSE, VOCAB = 7168, 2048, 18432, 129280
SIZES = {"F8_E4M3": 1, "F32": 4, "BF16": 2}
Tensor = tuple[str, str, list[int]]


def fp8(name: str, rows: int, columns: int) -> list[Tensor]:
    return [(name, "F8_E4M3", [rows, columns]), (name + "_scale_inv", "F32", [-(-rows // 128), -(-columns // 128)])]


def layer(i: int) -> list[Tensor]:
    p = f"model.layers.{i}."
    attn = p + "self_attn."
    tensors = [
        *fp8(attn + "q_a_proj.weight", 1536, HIDDEN), (attn + "q_a_layernorm.weight", "BF16", [1536]),
        *fp8(attn + "q_b_proj.weight", 24576, 1536),
        *fp8(attn + "kv_a_proj_with_mqa.weight", 576, HIDDEN), (attn + "kv_a_layernorm.weight", "BF16", [512]),
        *fp8(attn + "kv_b_proj.weight", 32768, 512), *fp8(attn + "o_proj.weight", HIDDEN, 16384),
        (p + "input_layernorm.weight", "BF16", [HIDDEN]), (p + "post_attention_layernorm.weight", "BF16", [HIDDEN]),
    ]
    if i < 3:
        return tensors + [
            *fp8(p + "mlp.gate_proj.weight", DENSE, HIDDEN), *fp8(p + "mlp.up_proj.weight", DENSE, HIDDEN),
            *fp8(p + "mlp.down_proj.weight", HIDDEN, DENSE),
        ]
    for expert in [f"experts.{e}" for e in range(256)] + ["shared_experts"]:
        q = f"{p}mlp.{expert}."
        tensors += [*fp8(q + "gate_proj.weight", MOE, HIDDEN), *fp8(q + "up_proj.weight", MOE, HIDDEN),
                    *fp8(q + "down_proj.weight", HIDDEN, MOE)]
    tensors += [(p + "mlp.gate.weight", "BF16", [256, HIDDEN]), (p + "mlp.gate.e_score_correction_bias", "F32", [256])]
    if i == 61:  # the multi-token-prediction layer
        tensors += [
            (p + "embed_tokens.weight", "BF16", [VOCAB, HIDDEN]), (p + "enorm.weight", "BF16", [HIDDEN]),
            (p + "hnorm.weight", "BF16", [HIDDEN]), (p + "shared_head.norm.weight", "BF16", [HIDDEN]),
            (p + "shared_head.head.weight", "BF16", [VOCAB, HIDDEN]), *fp8(p + "eh_proj.weight", HIDDEN, 2 * HIDDEN),
        ]
    return tensors


def build(folder: Path, shards: int = 163) -> int:
    tensors = [("model.embed_tokens.weight", "BF16", [VOCAB, HIDDEN])]
    for i in range(62):
        tensors += layer(i)
    tensors += [("model.norm.weight", "BF16", [HIDDEN]), ("lm_head.weight", "BF16", [VOCAB, HIDDEN])]
    nbytes = [SIZES[d] * math.prod(s) for _, d, s in tensors]
    total = sum(nbytes)
    folder.mkdir(parents=True, exist_ok=True)
    groups: list[list[int]] = [[]]
    seen = 0
    for index, size in enumerate(nbytes):
        if seen >= total / shards * len(groups) and len(groups) < shards:
            groups.append([])
        groups[-1].append(index)
        seen += size
    weight_map = {}
    for number, group in enumerate(groups, 1):
        name = f"model-{number:05d}-of-{len(groups):05d}.safetensors"
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for index in group:
            tensor, dtype, shape = tensors[index]
            header[tensor] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes[index]]}
            offset += nbytes[index]
            weight_map[tensor] = name
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        with open(folder / name, "wb") as out:
            out.write(struct.pack("<Q", len(text)) + text)
            out.truncate(8 + len(text) + offset)  # sparse: the data costs no disk
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    config = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "torch_dtype": "bfloat16",
              "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                      "weight_block_size": [128, 128]}}
    (folder / "config.json").write_text(json.dumps(config))
    return len(tensors)


REFERENCE = """
import glob, sys
from safetensors import safe_open
for path in sorted(glob.glob(sys.argv[1] + "/*.safetensors")):
    with safe_open(path, "np") as handle:
        handle.metadata()
        for name in handle.keys():
            handle.get_slice(name).get_shape()
"""


def best(command: list[str], runs: int) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, default=Path("/tmp/deepseek-v3-shaped"))
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    count = build(args.folder)
    python = sys.executable
    rows = {
        "reference reader (safe_open, every header)": [python, "-c", REFERENCE, str(args.folder)],
        "shardkit inspect": [python, "-m", "shardkit", "inspect", str(args.folder)],
        "shardkit merge --dtype bf16 --dry-run": [
            python, "-m", "shardkit", "merge", str(args.folder), "-o", str(args.folder) + "-bf16", "--dtype", "bf16",
            "--dry-run",
        ],
    }
    print(f"{count:,} tensors in {args.folder}")
    for label, command in rows.items():
        print(f"{label:45s} {best(command, args.runs):6.2f} s")


if __name__ == "__main__":
    main()
