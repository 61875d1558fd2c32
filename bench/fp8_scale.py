"""`make bench`: `inspect` and `merge --dtype bf16 --dry-run` on a DeepSeek-V3-shaped
FP8 checkpoint, beside a process that opens the same headers with the reference reader.

The checkpoint has DeepSeek-V3's tensor names, shapes and dtypes (61 layers plus the
MTP layer 61, 256 routed experts per MoE layer, F8_E4M3 weights with F32
`weight_scale_inv` grids, 91,992 tensors, 688 GB in 163 shards) and costs no disk:
real headers, sparse data (bench-data/deepseek-v3-shaped/, about 20 MB). The limits
(issue 15, "Scale"): inspect within 1.0 s, the dry run within 3 s, from the command line.

Each command is a whole process, start-up included, started from a small launcher
(bench.launch: wall time, CPU time and peak RSS from wait4()); shardkit and the
reference alternate which goes first, median of `--runs`. Warm page cache (headers are
read once), shardkit's modules compiled to bytecode first as an installed copy has
them. Results go to stdout, bench/RESULTS_FP8.md and bench/results_fp8.json.

    python bench/fp8_scale.py [--folder bench-data/deepseek-v3-shaped] [--runs 3]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

from bench import Run
from bench import launch as timed

ROOT = Path(__file__).resolve().parent.parent

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


#: What any loader does before reading data: the index, then every shard's header
#: through the reference reader, every tensor's shape and the metadata.
REFERENCE = """
import json, os, sys
from safetensors import safe_open
folder = sys.argv[1]
with open(os.path.join(folder, "model.safetensors.index.json"), encoding="utf-8") as f:
    weight_map = json.load(f)["weight_map"]
for name in sorted(set(weight_map.values())):
    with safe_open(os.path.join(folder, name), "np") as handle:
        handle.metadata()
        for tensor in handle.keys():
            handle.get_slice(tensor).get_shape()
"""

#: (what, limit in seconds, shardkit's arguments after `python -m shardkit`)
COMMANDS = (
    ("inspect", 1.0, lambda folder: ["inspect", folder]),
    ("merge --dtype bf16 --dry-run", 3.0,
     lambda folder: ["merge", folder, "-o", folder + "-bf16", "--dtype", "bf16", "--dry-run"]),
)


def compile_bytecode() -> None:
    """Compile shardkit's modules to bytecode first, as `pip install` does: an editable
    install run with PYTHONDONTWRITEBYTECODE=1 would otherwise compile every module
    again in every process, some 40 ms of CPU a start that no installed copy spends."""
    package = importlib.util.find_spec("shardkit")
    assert package is not None and package.submodule_search_locations, "shardkit is not importable"
    subprocess.run([sys.executable, "-m", "compileall", "-q", *package.submodule_search_locations], check=True)


def measure(folder: Path, runs: int) -> list[dict[str, object]]:
    reference = [sys.executable, "-c", REFERENCE, str(folder)]
    results = []
    for what, limit, arguments in COMMANDS:
        command = [sys.executable, "-m", "shardkit", *arguments(str(folder))]
        ours: list[Run] = []
        base: list[Run] = []
        for i in range(runs):
            for side in ("ours", "base") if i % 2 == 0 else ("base", "ours"):
                (ours if side == "ours" else base).append(timed(command if side == "ours" else reference))
        seconds = statistics.median(r.seconds for r in ours)
        reference_seconds = statistics.median(r.seconds for r in base)
        cpu = statistics.median(r.cpu_seconds for r in ours)
        reference_cpu = statistics.median(r.cpu_seconds for r in base)
        result = {
            "what": what, "runs": runs, "limit_s": limit,
            "ours_s": round(seconds, 2), "reference_s": round(reference_seconds, 2),
            "time_ratio": round(seconds / reference_seconds, 2), "of_limit": round(seconds / limit, 2),
            "ours_cpu_s": round(cpu, 2), "reference_cpu_s": round(reference_cpu, 2),
            "cpu_ratio": round(cpu / reference_cpu, 2),
            "ours_rss_mb": round(statistics.median(r.peak_rss_mb for r in ours)),
            "reference_rss_mb": round(statistics.median(r.peak_rss_mb for r in base)),
        }
        print(json.dumps(result), flush=True)
        results.append(result)
    return results


def write_table(results: list[dict[str, object]]) -> str:
    lines = [
        "| shardkit | limit | runs | shardkit s | reference s | time ratio | of the limit | within | "
        "CPU s (shardkit / ref) | CPU ratio | RSS MB (shardkit / ref) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: |",
    ]
    for r in results:
        within = "yes" if float(r["ours_s"]) <= float(r["limit_s"]) else "**no**"  # type: ignore[arg-type]
        lines.append(
            f"| {r['what']} | {r['limit_s']} s | {r['runs']} | {r['ours_s']} | {r['reference_s']} | "
            f"{r['time_ratio']:.2f}× | {r['of_limit']:.2f}× | {within} | {r['ours_cpu_s']} / {r['reference_cpu_s']} | "
            f"{r['cpu_ratio']:.2f}× | {r['ours_rss_mb']} / {r['reference_rss_mb']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", type=Path, default=ROOT / "bench-data" / "deepseek-v3-shaped")
    parser.add_argument("--runs", type=int, default=int(os.environ.get("BENCH_FP8_RUNS", "3")))
    args = parser.parse_args()
    count = build(args.folder)
    print(f"{count:,} tensors in {args.folder}", flush=True)
    compile_bytecode()
    load = os.getloadavg()[0]  # wall times on a shared machine are only as good as its quiet
    results = measure(args.folder, args.runs)
    table = write_table(results)
    header = (
        f"Measured {time.strftime('%Y-%m-%d')} on {os.cpu_count()} cores (load average {load:.1f} before the "
        f"run, {os.getloadavg()[0]:.1f} after) by `bench/fp8_scale.py --runs N`: "
        f"a DeepSeek-V3-shaped FP8 checkpoint ({count:,} tensors in 163 sparse shards with real headers, "
        "688 GB of F8_E4M3 weights, F32 scale grids and BF16 tensors). Whole processes from the command line, "
        "start-up included (bytecode compiled first, as pip install does), warm page cache, alternating sides, "
        "median of the runs; CPU time (user + system) "
        "and peak RSS from wait4(). Reference: a process that loads the index and opens every shard with "
        "`safetensors.safe_open`, reading every tensor's shape and the metadata. Ratios are shardkit / "
        "reference and shardkit / the limit of issue 15.\n\n"
    )
    (ROOT / "bench" / "RESULTS_FP8.md").write_text(header + table)
    (ROOT / "bench" / "results_fp8.json").write_text(json.dumps(results, indent=2) + "\n")
    print(table)


if __name__ == "__main__":
    main()
