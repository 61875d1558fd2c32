"""`make bench`: parsing large headers and indexes, against the reference reader.

The format allows a 100 MB header (about a million tensors) and an index can list
hundreds of thousands of tensors (mixture-of-experts models). This generates such
checkpoints once (bench-data/headers/, sparse files: the data is never written, only
the headers) and measures, as whole processes in the same run, side by side:

* shardkit: parsing the header(s) (`read_header` / `open_checkpoint` in a process that
  does only that), `inspect`, `merge --dry-run`, `split --dry-run`, `verify`;
* the reference reader opening the same files: `safetensors.safe_open` of the file
  and listing its tensors and metadata; for an index, `json.load` of the index, then
  `safe_open` of every shard it names.

Alternating which side goes first, median of N runs each; CPU time and peak RSS from
wait4() in a small launcher process (bench.py's LAUNCHER).
Warm page cache (headers are small and read once). Ratios go to stdout and
bench/RESULTS_HEADERS.md.

    python bench/bench_headers.py [--cases 1MB,10MB,100MB,index-100k,index-500k] [--runs 3] [--only parse,inspect,...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import struct
import sys
import time
from pathlib import Path

from bench import launch as timed  # bench/bench.py: the one launcher (wait4 of a forked child)

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "bench-data" / "headers"
SHARDKIT = [sys.executable, "-m", "shardkit"]

#: A process that opens one file or an index with the reference reader and looks at
#: every tensor name and the metadata: what any loader does before reading data.
REFERENCE = """
import json, os, sys
from safetensors import safe_open
path = sys.argv[1]
if path.endswith(".json"):
    with open(path, encoding="utf-8") as f:
        weight_map = json.load(f)["weight_map"]
    files = [os.path.join(os.path.dirname(path), name) for name in sorted(set(weight_map.values()))]
else:
    files = [path]
count = 0
for file in files:
    with safe_open(file, framework="np") as f:
        count += len(f.keys())
        f.metadata()
print(count)
"""

#: shardkit's parse alone: the format rules and checkpoint cross-checks, no command.
PARSE = """
import sys
from shardkit.checkpoint.shards import open_checkpoint
print(len(open_checkpoint(sys.argv[1]).tensors))
"""

#: Tensor shapes of one mixture-of-experts layer (BF16 experts, an F32 router and norms).
_EXPERT = (("gate_proj", (64, 32)), ("up_proj", (64, 32)), ("down_proj", (32, 64)))
_EXPERTS_PER_LAYER = 128


def moe_tensors():
    """An endless MoE-shaped tensor list: (name, dtype, shape, nbytes), names as in Qwen3-MoE."""
    layer = 0
    while True:
        prefix = f"model.layers.{layer}"
        yield f"{prefix}.input_layernorm.weight", "F32", (32,), 128
        yield f"{prefix}.mlp.gate.weight", "F32", (_EXPERTS_PER_LAYER, 32), _EXPERTS_PER_LAYER * 128
        for expert in range(_EXPERTS_PER_LAYER):
            for proj, shape in _EXPERT:
                yield f"{prefix}.mlp.experts.{expert}.{proj}.weight", "BF16", shape, shape[0] * shape[1] * 2
        layer += 1


def entry_json(name: str, dtype: str, shape: tuple[int, ...], begin: int, end: int) -> str:
    """One header entry as the reference writer (serde_json, compact) writes it; names are plain ASCII."""
    dims = ",".join(map(str, shape))
    return f'"{name}":{{"dtype":"{dtype}","shape":[{dims}],"data_offsets":[{begin},{end}]}}'


def write_sparse(path: Path, entries: list[tuple[str, str, tuple[int, ...], int]]) -> None:
    """A valid safetensors file laid out as the reference writer lays it out; the data
    section is a hole (the file is sparse), so a 100 MB header costs 100 MB of disk."""
    from shardkit.format.header import writer_order

    parts, offset = ['"__metadata__":{"format":"pt"}'], 0
    for name, dtype, shape, nbytes in sorted(entries, key=lambda e: writer_order(e[0], e[1])):
        parts.append(entry_json(name, dtype, shape, offset, offset + nbytes))
        offset += nbytes
    body = ("{" + ",".join(parts) + "}").encode()
    body += b" " * (-len(body) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".partial")
    with open(temporary, "wb") as f:
        f.write(struct.pack("<Q", len(body)) + body)
        f.truncate(8 + len(body) + offset)
    temporary.rename(path)


def single_file(header_bytes: int) -> tuple[Path, int]:
    """A file whose header is just under `header_bytes` (the format's limit is 100 MB)."""
    path = DATA / f"header-{header_bytes // 1_000_000 or 1}MB.safetensors"
    entries, size, offset = [], 40, 0
    for entry in moe_tensors():
        # written at the largest offset: the writer's order moves entries, never past the total
        size += len(entry_json(entry[0], entry[1], entry[2], 10 * offset, 10 * offset)) + 1
        offset += entry[3]
        if size > header_bytes - 8:
            break
        entries.append(entry)
    if not path.exists():
        print(f"generating {path.name} ({len(entries):,} tensors) ...", flush=True)
        write_sparse(path, entries)
    assert _header_bytes(path) <= min(header_bytes, 100_000_000), path
    return path, len(entries)


def indexed(tensors: int, shards: int) -> tuple[Path, int]:
    """A folder of `shards` sparse shards and the index tying `tensors` tensors to them."""
    folder = DATA / f"index-{tensors // 1000}k"
    index = folder / "model.safetensors.index.json"
    if not index.exists():
        print(f"generating {folder.name} ({tensors:,} tensors in {shards} shards) ...", flush=True)
        folder.mkdir(parents=True, exist_ok=True)
        source = moe_tensors()
        entries = [next(source) for _ in range(tensors)]
        per_shard = -(-tensors // shards)
        weight_map: dict[str, str] = {}
        for number in range(shards):
            name = f"model-{number + 1:05d}-of-{shards:05d}.safetensors"
            group = entries[number * per_shard : (number + 1) * per_shard]
            write_sparse(folder / name, group)
            weight_map.update((entry[0], name) for entry in group)
        total = sum(entry[3] for entry in entries)
        document = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (folder / "config.json").write_text("{}\n")
        temporary = folder / "index.partial"
        temporary.write_text(json.dumps(document, indent=2) + "\n")
        temporary.rename(index)
    return index, tensors


CASES = {
    "1MB": lambda: single_file(1_000_000),
    "10MB": lambda: single_file(10_000_000),
    "100MB": lambda: single_file(100_000_000),
    "index-100k": lambda: indexed(100_000, 64),
    "index-500k": lambda: indexed(500_000, 128),
}
MEASUREMENTS = ("parse", "inspect", "merge", "split", "verify")


def commands(path: Path, scratch: Path) -> dict[str, list[str]]:
    source = str(path.parent if path.name.endswith(".json") else path)
    return {
        "parse": [sys.executable, "-c", PARSE, source],
        "inspect": [*SHARDKIT, "inspect", source],
        "merge": [*SHARDKIT, "merge", source, "-o", str(scratch / "merged.safetensors"), "--dry-run"],
        "split": [*SHARDKIT, "split", source, "-o", str(scratch / "split"), "--max-shard-size", "1GB", "--dry-run"],
        "verify": [*SHARDKIT, "verify", source, "--no-architecture", "--quiet"],
    }


_LABELS = {
    "parse": "parse (open_checkpoint)",
    "inspect": "inspect",
    "merge": "merge --dry-run",
    "split": "split --dry-run",
    "verify": "verify (headers only)",
}


def measure(case: str, runs: int, only: set[str]) -> list[dict[str, object]]:
    path, tensors = CASES[case]()
    scratch = DATA / "out"
    scratch.mkdir(exist_ok=True)
    reference = [sys.executable, "-c", REFERENCE, str(path)]
    results = []
    for what, command in commands(path, scratch).items():
        if what not in only:
            continue
        ours, base = [], []
        for i in range(runs):
            for side in (("ours", "base") if i % 2 == 0 else ("base", "ours")):
                if side == "ours":
                    ours.append(timed(command))
                else:
                    base.append(timed(reference))
        ours_s = statistics.median(r.seconds for r in ours)
        base_s = statistics.median(r.seconds for r in base)
        ours_cpu = statistics.median(r.cpu_seconds for r in ours)
        base_cpu = statistics.median(r.cpu_seconds for r in base)
        ours_mb = statistics.median(r.peak_rss_mb for r in ours)
        base_mb = statistics.median(r.peak_rss_mb for r in base)
        result = {
            "case": case, "tensors": tensors, "what": _LABELS[what], "runs": runs,
            "header_mb": round(_header_bytes(path) / 1e6, 1),
            "ours_s": round(ours_s, 2), "reference_s": round(base_s, 2), "time_ratio": round(ours_s / base_s, 2),
            "ours_cpu_s": round(ours_cpu, 2), "reference_cpu_s": round(base_cpu, 2),
            "cpu_ratio": round(ours_cpu / base_cpu, 2),
            "ours_rss_mb": round(ours_mb), "reference_rss_mb": round(base_mb),
            "memory_ratio": round(ours_mb / base_mb, 2),
        }
        print(json.dumps(result), flush=True)
        results.append(result)
    return results


def _header_bytes(path: Path) -> int:
    """JSON bytes the readers parse: the header, or the index plus every shard's header."""
    files = [path] if not path.name.endswith(".json") else sorted(path.parent.glob("*.safetensors"))
    total = path.stat().st_size if path.name.endswith(".json") else 0
    for file in files:
        with open(file, "rb") as f:
            total += struct.unpack("<Q", f.read(8))[0]
    return total


def write_table(results: list[dict[str, object]]) -> str:
    lines = [
        "| case | tensors | JSON MB | shardkit | runs | shardkit s | reference s | time ratio "
        "| CPU s (shardkit / ref) | CPU ratio | shardkit RSS MB | reference RSS MB | memory ratio |",
        "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        lines.append(
            f"| {r['case']} | {r['tensors']:,} | {r['header_mb']} | {r['what']} | {r['runs']} | {r['ours_s']} | "
            f"{r['reference_s']} | {r['time_ratio']:.2f}× | {r['ours_cpu_s']} / {r['reference_cpu_s']} | "
            f"{r['cpu_ratio']:.2f}× | {r['ours_rss_mb']} | {r['reference_rss_mb']} | "
            f"{r['memory_ratio']:.2f}× |"
        )
    return "\n".join(lines) + "\n"


def merged_with_earlier(results: list[dict[str, object]]) -> list[dict[str, object]]:
    """A partial run (--cases, --only) replaces its rows in bench/results_headers.json, keeps the others."""
    path = ROOT / "bench" / "results_headers.json"
    earlier = json.loads(path.read_text()) if path.exists() else []
    fresh = {(r["case"], r["what"]) for r in results}
    combined = [r for r in earlier if (r["case"], r["what"]) not in fresh] + results
    cases, labels = list(CASES), list(_LABELS.values())
    return sorted(combined, key=lambda r: (cases.index(str(r["case"])), labels.index(str(r["what"]))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=os.environ.get("BENCH_HEADER_CASES", ",".join(CASES)))
    parser.add_argument("--runs", type=int, default=int(os.environ.get("BENCH_HEADER_RUNS", "3")))
    parser.add_argument("--only", default=",".join(MEASUREMENTS), help=f"subset of {','.join(MEASUREMENTS)}")
    args = parser.parse_args()
    cases, only = args.cases.split(","), set(args.only.split(","))
    if set(cases) - set(CASES) or only - set(MEASUREMENTS):
        parser.error(f"cases are {', '.join(CASES)}; measurements {', '.join(MEASUREMENTS)}")
    DATA.mkdir(parents=True, exist_ok=True)
    results = merged_with_earlier([r for case in cases for r in measure(case, args.runs, only)])
    table = write_table(results)
    header = (
        f"Measured {time.strftime('%Y-%m-%d')} on {os.cpu_count()} cores by `bench/bench_headers.py "
        "--runs N` (N in the table): whole processes, start-up included, warm page cache, alternating sides, "
        "median of the runs; CPU time (user + system) and peak RSS from wait4(). Reference: a process "
        "that opens the same files with `safetensors.safe_open` and lists every tensor and the metadata "
        "(for an index: `json.load` of the index, then `safe_open` of each shard). Ratios are shardkit / reference.\n\n"
    )
    (ROOT / "bench" / "RESULTS_HEADERS.md").write_text(header + table)
    (ROOT / "bench" / "results_headers.json").write_text(json.dumps(results, indent=2) + "\n")
    print(table)


if __name__ == "__main__":
    main()
