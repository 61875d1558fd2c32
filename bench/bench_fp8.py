"""`make bench`, FP8 rows: dequantise and quantise a DeepSeek-V3-shaped slice, as ratios.

The slice has DeepSeek-V3's real tensor names, shapes and dtypes: `--layers` MoE
layers (numbered from 3, DeepSeek's first MoE layer) with the attention (MLA
projections), norms, router (BF16 gate, F32 e_score_correction_bias), the shared
expert and `--experts` routed experts (gate/up [2048, 7168], down [7168, 2048]) each,
every Linear weight F8_E4M3 beside its F32 `weight_scale_inv` grid (128x128 blocks;
`kv_a_proj_with_mqa`'s 576 rows make a partial block), one shard per layer, an index
and config.json. All 256 experts of 4 layers would be 90 GB of BF16; the default (4
layers × 18 experts) gives 6.6 GB of BF16 output. `--scale` multiplies the expert
count (0.1 for a quick run). The codes are random E4M3 values without NaN.

Rows, each a whole process (start-up included), output durable (shardkit fsyncs, the
torch side calls os.sync()), page cache dropped before each run when we may (root),
the two sides alternating, median of `--pairs`; wall time, CPU time (user + system)
and peak RSS from wait4() of a small launcher's child:

- dequantise: `shardkit merge FP8 -o OUT --dtype bf16 --keep '*e_score_correction_bias'`
  against a plain `shardkit merge` of that BF16 output (the same bytes written), and
  against the torch way per shard: safetensors.torch.load_file, transformers'
  `_dequantize_fp8_weight` in float32 then `.to(bfloat16)`, save_file;
- quantise: `shardkit merge BF16 -o OUT --dtype fp8` against the torch way per shard:
  load_file, transformers' `Fp8Quantize` on each weight shardkit quantises, save_file.

Results go to stdout and bench/RESULTS_FP8_SPEED.md.

    python bench/bench_fp8.py [--layers 4] [--experts 18] [--scale 1.0] [--pairs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import bench  # bench/bench.py: the launcher, and the page cache dropped when root
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "bench-data" / "fp8"
SHARDKIT = [sys.executable, "-m", "shardkit"]
RESULTS = ROOT / "bench" / "RESULTS_FP8_SPEED.md"

HIDDEN, EXPERT, SHARED = 7168, 2048, 2048
ATTENTION = {  # DeepSeek-V3's MLA projections: [out, in]
    "self_attn.q_a_proj": (1536, HIDDEN),
    "self_attn.q_b_proj": (24576, 1536),
    "self_attn.kv_a_proj_with_mqa": (576, HIDDEN),
    "self_attn.kv_b_proj": (32768, 512),
    "self_attn.o_proj": (HIDDEN, 16384),
}
NORMS = {"input_layernorm": HIDDEN, "post_attention_layernorm": HIDDEN,
         "self_attn.q_a_layernorm": 1536, "self_attn.kv_a_layernorm": 512}

TORCH_DEQUANTISE = """
import os, sys, torch
from safetensors.torch import load_file, save_file
from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight
out = sys.argv[1]
os.makedirs(out, exist_ok=True)
for shard in sys.argv[2:]:
    state = load_file(shard)
    made = {}
    for name, value in state.items():
        if name.endswith("_scale_inv"):
            continue
        scale = state.get(name + "_scale_inv")
        if scale is not None:
            value = _dequantize_fp8_weight(value, scale, [128, 128], torch.float32).to(torch.bfloat16)
        elif value.dtype != torch.float32:
            value = value.to(torch.bfloat16)
        made[name] = value
    save_file(made, os.path.join(out, os.path.basename(shard)), metadata={"format": "pt"})
    del state, made
os.sync()
"""

TORCH_QUANTISE = """
import json, os, sys, types, torch
from safetensors.torch import load_file, save_file
from transformers import FineGrainedFP8Config
from transformers.integrations.finegrained_fp8 import Fp8Quantize
out, names = sys.argv[1], set(json.load(open(sys.argv[2])))
os.makedirs(out, exist_ok=True)
op = Fp8Quantize(types.SimpleNamespace(quantization_config=FineGrainedFP8Config()))
for shard in sys.argv[3:]:
    made = {}
    for name, value in load_file(shard).items():
        made.update(op._quantize_one(name, value) if name in names else {name: value})
    save_file(made, os.path.join(out, os.path.basename(shard)), metadata={"format": "pt"})
    del made
os.sync()
"""

def timed(command: list[str]) -> dict[str, float]:
    run = bench.timed(command)  # cold cache, from bench.py's launcher
    return {"wall": run.seconds, "cpu": run.cpu_seconds, "rss_mb": run.peak_rss_mb}


def layer_tensors(layer: int, experts: int) -> list[tuple[str, str, tuple[int, ...]]]:
    """(name, dtype, shape) of one DeepSeek-V3 MoE layer, weights with their scales."""
    prefix = f"model.layers.{layer}."
    linear = {**ATTENTION}
    for kind in ("gate_proj", "up_proj"):
        linear[f"mlp.shared_experts.{kind}"] = (SHARED, HIDDEN)
    linear["mlp.shared_experts.down_proj"] = (HIDDEN, SHARED)
    for expert in range(experts):
        for kind in ("gate_proj", "up_proj"):
            linear[f"mlp.experts.{expert}.{kind}"] = (EXPERT, HIDDEN)
        linear[f"mlp.experts.{expert}.down_proj"] = (HIDDEN, EXPERT)
    tensors = []
    for module, (rows, columns) in linear.items():
        tensors.append((f"{prefix}{module}.weight", "F8_E4M3", (rows, columns)))
        tensors.append((f"{prefix}{module}.weight_scale_inv", "F32", (-(-rows // 128), -(-columns // 128))))
    tensors += [(f"{prefix}{name}.weight", "BF16", (size,)) for name, size in NORMS.items()]
    tensors.append((f"{prefix}mlp.gate.weight", "BF16", (256, HIDDEN)))
    tensors.append((f"{prefix}mlp.gate.e_score_correction_bias", "F32", (256,)))
    return tensors


def random_bytes(dtype: str, count: int, rng: np.random.Generator) -> np.ndarray:
    if dtype == "F8_E4M3":
        codes = rng.integers(0, 256, count, dtype=np.uint8)
        codes[(codes & 0x7F) == 0x7F] -= 1  # no NaN: weights have none
        return codes
    if dtype == "F32":
        return (rng.random(count, dtype=np.float32) * 1e-3 + 1e-4).view(np.uint8)
    return (rng.standard_normal(count, dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)


def write_shard(path: Path, tensors: list[tuple[str, str, tuple[int, ...]]], rng: np.random.Generator) -> None:
    """A safetensors file laid out as save_file lays it out, streamed 64 MiB at a time."""
    from shardkit.format.header import TensorSpec, serialize_header, tensor_nbytes

    specs = [TensorSpec(name, dtype, shape, tensor_nbytes(dtype, shape)) for name, dtype, shape in tensors]
    header, placed = serialize_header(specs, {"format": "pt"})
    with open(path, "wb") as out:
        out.write(header)
        for spec, _ in placed:
            size = 1 if spec.dtype == "F8_E4M3" else 4 if spec.dtype == "F32" else 2
            left = spec.nbytes // size
            while left:
                count = min(left, 64 << 20)
                out.write(random_bytes(spec.dtype, count, rng).tobytes())
                left -= count


def make_slice(layers: int, experts: int) -> Path:
    from shardkit.format.header import tensor_nbytes

    folder = DATA / f"deepseek-v3-{layers}x{experts}"
    if (folder / "config.json").exists():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    weight_map, total = {}, 0
    for number, layer in enumerate(range(3, 3 + layers), start=1):
        name = f"model-{number:05d}-of-{layers:05d}.safetensors"
        tensors = layer_tensors(layer, experts)
        write_shard(folder / name, tensors, rng)
        for tensor, dtype, shape in tensors:
            weight_map[tensor] = name
            total += tensor_nbytes(dtype, shape)
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
    config = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "torch_dtype": "bfloat16",
              "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                      "weight_block_size": [128, 128]}}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def shards(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.glob("model-*.safetensors"))


def size_of(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*.safetensors"))


def median_pairs(sides: dict[str, list[str]], outputs: dict[str, Path], pairs: int) -> dict[str, dict[str, float]]:
    """Each side `pairs` times, alternating which goes first; medians."""
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in sides}
    for pair in range(pairs):
        order = list(sides) if pair % 2 == 0 else list(reversed(sides))
        for name in order:
            shutil.rmtree(outputs[name], ignore_errors=True)
            runs[name].append(timed(sides[name]))
            shutil.rmtree(outputs[name], ignore_errors=True)
    return {name: {key: statistics.median(r[key] for r in results) for key in results[0]}
            for name, results in runs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=18)
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies --experts (0.1 for a quick run)")
    parser.add_argument("--pairs", type=int, default=3)
    args = parser.parse_args()
    experts = max(1, round(args.experts * args.scale))
    started = time.perf_counter()
    fp8 = make_slice(args.layers, experts)
    work = DATA / "out"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    bf16 = work / "bf16"  # the dequantised slice: the plain merge's and the quantisation's source
    subprocess.run([*SHARDKIT, "reshard", fp8, "-o", bf16, "--dtype", "bf16", "--keep", "*e_score_correction_bias",
                    "-s", "4GB", "--quiet"], check=True)
    bf16_bytes = size_of(bf16)
    rows = []

    outputs = {"shardkit": work / "deq", "plain merge": work / "plain", "torch": work / "deq-torch"}
    sides = {
        "shardkit": [*SHARDKIT, "merge", str(fp8), "-o", str(outputs["shardkit"]), "--dtype", "bf16",
                     "--keep", "*e_score_correction_bias"],
        "plain merge": [*SHARDKIT, "merge", str(bf16), "-o", str(outputs["plain merge"])],
        "torch": [sys.executable, "-c", TORCH_DEQUANTISE, str(outputs["torch"]), *shards(fp8)],
    }
    measured = median_pairs(sides, outputs, args.pairs)
    rows.append(("FP8 → BF16 merge vs plain merge of the same BF16 bytes", bf16_bytes, measured["shardkit"],
                 measured["plain merge"]))
    rows.append(("FP8 → BF16 merge vs torch per shard (load_file, _dequantize_fp8_weight, save_file)", bf16_bytes,
                 measured["shardkit"], measured["torch"]))

    quantised = work / "quantised.json"
    plan = subprocess.run([*SHARDKIT, "merge", str(bf16), "-o", str(work / "dry"), "--dtype", "fp8", "--dry-run",
                           "--json"], check=True, capture_output=True, text=True)
    steps = json.loads(plan.stdout)["plan"]["files"]
    names = sorted({s["tensor"] for f in steps for s in f["steps"]
                    if s["kind"] == "transform" and (s.get("quantise") or {}).get("part") == "codes"})
    quantised.write_text(json.dumps(names))
    outputs = {"shardkit": work / "q", "torch": work / "q-torch"}
    sides = {
        "shardkit": [*SHARDKIT, "merge", str(bf16), "-o", str(outputs["shardkit"]), "--dtype", "fp8"],
        "torch": [sys.executable, "-c", TORCH_QUANTISE, str(outputs["torch"]), str(quantised), *shards(bf16)],
    }
    measured = median_pairs(sides, outputs, args.pairs)
    rows.append(("BF16 → FP8 merge vs torch per shard (load_file, Fp8Quantize, save_file)", bf16_bytes,
                 measured["shardkit"], measured["torch"]))
    shutil.rmtree(work, ignore_errors=True)
    table = write_table(rows, args, experts, fp8, time.perf_counter() - started)
    print(table)
    RESULTS.write_text(table)


def write_table(rows, args, experts: int, fp8: Path, seconds: float) -> str:
    lines = [
        "# FP8 dequantise and quantise (bench/bench_fp8.py)",
        "",
        f"DeepSeek-V3-shaped slice: {args.layers} MoE layers × {experts} routed experts at real shapes, "
        f"{size_of(fp8) / 1e9:.2f} GB of FP8 in {len(shards(fp8))} shards; {os.cpu_count()} cores; "
        f"median of {args.pairs} alternating runs, page cache dropped before each when root; whole processes; "
        f"the whole bench took {seconds:.0f} s. Command: `python bench/bench_fp8.py --layers {args.layers} "
        f"--experts {args.experts} --scale {args.scale} --pairs {args.pairs}`.",
        "",
        "| measurement | GB of BF16 | shardkit s (wall) | other s (wall) | wall ratio | shardkit CPU s | other CPU s "
        "| CPU ratio | shardkit peak RSS MB | other peak RSS MB |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for what, nbytes, ours, other in rows:
        lines.append(
            f"| {what} | {nbytes / 1e9:.2f} | {ours['wall']:.2f} | {other['wall']:.2f} | "
            f"{ours['wall'] / other['wall']:.2f}× | {ours['cpu']:.2f} | {other['cpu']:.2f} | "
            f"{ours['cpu'] / other['cpu']:.2f}× | {ours['rss_mb']:.0f} | {other['rss_mb']:.0f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
