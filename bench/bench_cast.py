"""Throughput of shardkit.format.dtype_cast beside torch's own conversion, in one process.

The buffers are 64 MiB of weight-like values (normal, σ = 0.02; `--zeros` sets a
fraction of exact zeros, which costs shardkit a counting pass per chunk),
far larger than the caches, so every run streams from and to memory as the executor
will. shardkit converts with cast_into (1 thread) and cast_parallel (2 threads);
torch with `dst.copy_(src)` into a preallocated tensor (the kernel of `.to()`
without its allocation) at torch.set_num_threads(1) and (2). GB/s counts source
bytes per second; each figure is the median of 5 runs after one warm-up.

    python bench/bench_cast.py [--mib 64] [--runs 5] [--pairs F32:BF16,BF16:F16,...]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from shardkit.format.dtype_cast import cast_into, cast_parallel

PAIRS = ("F32:BF16", "BF16:F16", "BF16:F32", "F16:F32", "F32:F16")
TORCH = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
SIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}


def source(dtype: str, nbytes: int, zeros: float) -> torch.Tensor:
    generator = torch.Generator().manual_seed(13)
    values = torch.randn(nbytes // SIZE[dtype], generator=generator) * 0.02
    if zeros:
        values[:: round(1 / zeros)] = 0.0
    return values.to(TORCH[dtype])


CLOCK = time.perf_counter


def median_seconds(run, runs: int) -> float:
    run()
    times = []
    for _ in range(runs):
        started = CLOCK()
        run()
        times.append(CLOCK() - started)
    return statistics.median(times)


def measure(pair: str, nbytes: int, runs: int, zeros: float) -> dict[str, float]:
    src_dtype, dst_dtype = pair.split(":")
    src = source(src_dtype, nbytes, zeros)
    dst = torch.empty(src.numel(), dtype=TORCH[dst_dtype])
    src_view = memoryview(src.view(torch.uint8).numpy())
    dst_view = memoryview(dst.view(torch.uint8).numpy())
    gbps = {}
    gbps["shardkit 1"] = nbytes / median_seconds(lambda: cast_into(src_view, src_dtype, dst_dtype, dst_view), runs)
    gbps["shardkit 2"] = nbytes / median_seconds(
        lambda: cast_parallel(src_view, src_dtype, dst_dtype, dst_view, 2), runs
    )
    mine = dst.clone()
    threads = torch.get_num_threads()
    for count in (1, 2):
        torch.set_num_threads(count)
        gbps[f"torch {count}"] = nbytes / median_seconds(lambda: dst.copy_(src), runs)
    torch.set_num_threads(threads)
    reference = src.to(TORCH[dst_dtype])
    same = torch.equal(mine.view(torch.uint8), reference.view(torch.uint8))
    return {name: value / 1e9 for name, value in gbps.items()} | {"same bytes": same}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--pairs", default=",".join(PAIRS))
    parser.add_argument("--zeros", type=float, default=0.0, help="fraction of exact zeros in the source")
    parser.add_argument("--cpu-time", action="store_true", help="divide by process CPU time, not wall time")
    args = parser.parse_args()
    if args.cpu_time:
        global CLOCK
        CLOCK = time.process_time
    columns = ("shardkit 1", "shardkit 2", "torch 1", "torch 2")
    # per CPU-second, "2 threads / 1" is what a core keeps of its speed beside another;
    # on a quiet machine the wall-time ratio is the speed-up
    clock = "per CPU-second, i.e. per core" if args.cpu_time else "wall time"
    print(f"GB/s of source bytes ({clock}), {args.mib} MiB buffers, {args.zeros:.0%} zeros, median of {args.runs}")
    print(f"| conversion | {' | '.join(columns)} | 2 threads / 1 | same bytes as torch |")
    print("| --- |" + " ---: |" * (len(columns) + 1) + " --- |")
    for pair in args.pairs.split(","):
        result = measure(pair, args.mib << 20, args.runs, args.zeros)
        cells = " | ".join(f"{result[c]:.2f}" for c in columns)
        scaling = result["shardkit 2"] / result["shardkit 1"]
        print(f"| {pair.replace(':', ' → ')} | {cells} | {scaling:.2f}× | {result['same bytes']} |", flush=True)


if __name__ == "__main__":
    main()
