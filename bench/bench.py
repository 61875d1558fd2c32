"""`make bench`: shardkit against the physical floor, side by side, as ratios.

For each Qwen2.5 shape a sharded checkpoint with pseudo-random bytes is generated
once (bench-data/, reused by later runs). Every measurement is a whole process,
start-up included, writing to a fresh path, with the output durable on disk (shardkit
fsyncs; the baseline runs `sync`), page cache dropped before each run when we may
(root), alternating which side goes first, median of N pairs. Peak RSS comes from
wait4() of each process. Results go to stdout and bench/RESULTS.md.

    python bench/bench.py [--shapes 0.5B,1.5B,3B,7B] [--pairs 5] [--naive]
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
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "bench-data"
SHARDKIT = [sys.executable, "-m", "shardkit"]

NAIVE = """
import sys
from safetensors.torch import load_file, save_file
state = {}
for shard in sys.argv[2:]:
    state.update(load_file(shard))
save_file(state, sys.argv[1], metadata={"format": "pt"})
import os; os.sync()  # durable, like the other two sides
"""


@dataclass
class Run:
    seconds: float
    peak_rss_mb: float


def drop_caches() -> None:
    subprocess.run(["sync"], check=True)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        pass  # not root: runs start warm, both sides alike


def timed(command: list[str], cold: bool = True) -> Run:
    if cold:
        drop_caches()
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"benchmark command failed: {' '.join(command)}")
    return Run(seconds, usage.ru_maxrss / 1024)


def remove(path: Path) -> None:
    """Remove an output and the checksum file --sha256 writes beside it."""
    if path.is_dir():
        shutil.rmtree(path)
    for leftover in (path, path.with_name(path.name + ".sha256")):
        if leftover.is_file():
            leftover.unlink()


def make_checkpoint(shape: str) -> tuple[Path, list[Path], int]:
    from shardkit.synthetic import SHAPES, qwen2_tensors, write_checkpoint

    folder = DATA / f"qwen2.5-{shape}"
    done = folder / ".complete"
    total = sum(t.nbytes for t in qwen2_tensors(SHAPES[shape]))
    if not done.exists():
        remove(folder)
        print(f"generating {folder.name} ({total / 1e9:.1f} GB) ...", flush=True)
        # four shards, like the Qwen2.5-7B release
        write_checkpoint(folder, shape, max_shard_size=total // 4 + 64 * 2**20, seed=1)
        subprocess.run(["sync"], check=True)
        done.write_text("ok\n")
    shards = sorted(folder.glob("model-*.safetensors"))
    return folder, shards, total


def pairs(
    name: str, ours: list[str], baseline: list[str], out: Path, count: int, cold: bool = True
) -> dict[str, object]:
    """Alternate which side goes first; ratio of medians and per-pair ratios."""
    mine, base = [], []
    for i in range(count):
        order = [("ours", ours), ("base", baseline)] if i % 2 == 0 else [("base", baseline), ("ours", ours)]
        for side, command in order:
            remove(out)
            run = timed(command, cold)
            (mine if side == "ours" else base).append(run)
            remove(out)
    ours_median = statistics.median(r.seconds for r in mine)
    base_median = statistics.median(r.seconds for r in base)
    ratios = [m.seconds / b.seconds for m, b in zip(mine, base)]
    result = {
        "what": name,
        "ours_s": round(ours_median, 2),
        "baseline_s": round(base_median, 2),
        "ratio": round(ours_median / base_median, 3),
        "pair_ratios": [round(r, 3) for r in ratios],
        "ours_peak_rss_mb": round(max(r.peak_rss_mb for r in mine), 1),
    }
    print(json.dumps(result), flush=True)
    return result


def bench_shape(shape: str, count: int, naive: bool, others: int) -> list[dict[str, object]]:
    folder, shards, total = make_checkpoint(shape)
    scratch = DATA / "out"
    scratch.mkdir(exist_ok=True)
    out_file = scratch / "merged.safetensors"
    cat_sync = ["sh", "-c", 'cat "$@" > "$0" && sync', str(out_file), *map(str, shards)]
    results = []
    merge = [*SHARDKIT, "merge", str(folder), "-o", str(out_file), "--quiet"]
    inspect = [*SHARDKIT, "inspect", str(folder)]
    python = [sys.executable, "-c", "pass"]  # the floor for any Python command
    results.append(pairs(f"{shape} inspect (warm cache) vs bare python start-up", inspect, python, out_file, 5, False))
    results.append(pairs(f"{shape} merge vs cat+sync", merge, cat_sync, out_file, count))
    results.append(pairs(f"{shape} merge --sha256 vs cat+sync", [*merge, "--sha256"], cat_sync, out_file, others))
    out_dir = scratch / "split"
    cat_sync_dir = ["sh", "-c", 'mkdir -p "$0" && cat "$@" > "$0/all" && sync', str(out_dir), *map(str, shards)]
    if _has_command("split"):
        split = [*SHARDKIT, "split", str(folder), "-o", str(out_dir), "--max-shard-size", "2GB", "--quiet"]
        results.append(pairs(f"{shape} reshard to 2GB vs cat+sync", split, cat_sync_dir, out_dir, others))
    if _has_command("checksum"):
        sums = scratch / "SHA256SUMS"
        checksum = [*SHARDKIT, "checksum", str(folder), "-o", str(sums)]
        sha256sum = ["sh", "-c", 'sha256sum "$@" > "$0"', str(sums), *map(str, shards)]
        results.append(pairs(f"{shape} checksum vs sha256sum", checksum, sha256sum, sums, others))
        verify = [*SHARDKIT, "verify", str(folder), "--against", str(folder), "--no-architecture", "--quiet"]
        cat_both = ["sh", "-c", 'cat "$@" "$@" > /dev/null', "cat", *map(str, shards)]
        results.append(pairs(f"{shape} verify --against (reads both) vs cat of both", verify, cat_both, sums, others))
    if naive:
        remove(out_file)
        run = timed([sys.executable, "-c", NAIVE, str(out_file), *map(str, shards)])
        remove(out_file)
        base = timed(cat_sync)
        remove(out_file)
        result = {
            "what": f"{shape} naive load_file+save_file vs cat+sync (1 run)",
            "ours_s": round(run.seconds, 2), "baseline_s": round(base.seconds, 2),
            "ratio": round(run.seconds / base.seconds, 3), "ours_peak_rss_mb": round(run.peak_rss_mb, 1),
        }
        print(json.dumps(result), flush=True)
        results.append(result)
    for r in results:
        r["shape"], r["gigabytes"] = shape, round(total / 1e9, 2)
    return results


def _has_command(name: str) -> bool:
    return subprocess.run([*SHARDKIT, name, "--help"], capture_output=True).returncode == 0


def write_table(results: list[dict[str, object]]) -> str:
    lines = [
        "| measurement | GB | shardkit s | baseline s | ratio (median) | shardkit peak RSS MB |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        lines.append(
            f"| {r['what']} | {r['gigabytes']} | {r['ours_s']} | {r['baseline_s']} | "
            f"{r['ratio']:.2f}× | {r['ours_peak_rss_mb']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=os.environ.get("BENCH_SHAPES", "0.5B,1.5B,3B,7B"))
    parser.add_argument("--pairs", type=int, default=int(os.environ.get("BENCH_PAIRS", "5")))
    parser.add_argument("--other-pairs", type=int, default=int(os.environ.get("BENCH_OTHER_PAIRS", "3")),
                        help="pairs for the measurements beside plain merge")
    parser.add_argument("--naive", action="store_true", default=os.environ.get("BENCH_NAIVE") == "1")
    args = parser.parse_args()
    DATA.mkdir(exist_ok=True)
    results = []
    for shape in args.shapes.split(","):
        from shardkit.synthetic import SHAPES, qwen2_tensors

        need = 3 * sum(t.nbytes for t in qwen2_tensors(SHAPES[shape]))
        if shutil.disk_usage(DATA).free < need and not (DATA / f"qwen2.5-{shape}" / ".complete").exists():
            print(f"skipping {shape}: needs {need / 1e9:.0f} GB free", flush=True)
            continue
        results += bench_shape(shape, args.pairs, args.naive, args.other_pairs)
    table = write_table(results)
    header = (
        f"Measured {time.strftime('%Y-%m-%d')} on {os.cpu_count()} cores; page cache dropped before each run; "
        f"median of {args.pairs} alternating pairs for merge, {args.other_pairs} for the rest; "
        "whole processes; outputs durable (fsync / sync).\n\n"
    )
    (ROOT / "bench" / "RESULTS.md").write_text(header + table)
    (ROOT / "bench" / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(table)


if __name__ == "__main__":
    main()
