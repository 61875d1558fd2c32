"""`make bench`: shardkit against the physical floor, side by side, as ratios.

For each Qwen2.5 shape a sharded checkpoint with pseudo-random bytes is generated
once (bench-data/, reused by later runs). Every measurement is a whole process,
start-up included, writing to a fresh path, with the output durable on disk (shardkit
fsyncs; the baseline runs `sync`), page cache dropped before each run when we may
(root), alternating which side goes first, median of N pairs. Peak RSS comes from
wait4() of each process. Results go to stdout and bench/RESULTS.md.

Beside `cat`+`sync`, merge and reshard are compared with the device floor: the larger
of a sequential O_DIRECT read of the source files and a sequential O_DIRECT write of
the output's size (fio, 4 MiB blocks, caches dropped, measured in the same run),
and with fio doing both at once (one job reading the sources, one writing): a merge
moves both streams together, and where a disk's reads and writes share one budget
(the virtio disk measured here: 3.1 GB read 3.0-3.6 s, written 3.3-3.9 s, both at
once 4.6-6.1 s) that, not the larger of the two, is what it can reach.
The conversion rows (`--only convert`) merge an F32 copy of the checkpoint with
`--dtype bf16` (against the plain merge of the same F32 files, safetensors
load_file + .to(bf16) + save_file, and transformers from_pretrained(dtype=bf16) +
save_pretrained) and the BF16 checkpoint with `--dtype fp16` (against its plain merge);
fio reading the F32 sources while writing the bf16 output's size gives the conversion's
own device floor, and each torch way's time over it is the most any tool could gain on
this disk.
The `.bin` rows (`--only torchbin`) convert a `pytorch_model.bin` that torch.save wrote
from the BF16 checkpoint: `shardkit convert` against `cat`+`sync` of the same bytes and
against torch.load(weights_only=True, mmap=True) + save_file (time and peak RSS ratios).
The surgery rows (`--only surgery`) merge the 1.5B checkpoint (each shape's when 1.5B is not
run) with `--rename '(.*)' 'x.\\1'` (every tensor renamed) against its plain merge, and, once
per run, a FLUX.1-shaped checkpoint (real key names and shapes, `--flux-blocks` double and
single blocks: 2,4 is 2.6 GB) with the built-in recipes against the plain merge of the same
files: `flux-bfl-to-diffusers` on the BFL single file (splits and a swap) and
`flux-diffusers-to-bfl` on the diffusers folder (fuses).

    python bench/bench.py [--shapes 0.5B,1.5B,3B,7B] [--pairs 5] [--other-pairs 3] [--only merge,sha256,...]
                          [--flux-blocks 2,4]
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


NAIVE_CAST = """
import sys, torch
from safetensors.torch import load_file, save_file
state = {}
for shard in sys.argv[2:]:
    state.update({k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in load_file(shard).items()})
save_file(state, sys.argv[1], metadata={"format": "pt"})
import os; os.sync()
"""

TRANSFORMERS_CAST = """
import sys, torch, transformers
model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[2], dtype=torch.bfloat16)
model.save_pretrained(sys.argv[1], max_shard_size="100GB")
import os; os.sync()
"""


TORCH_LOAD = """
import sys, torch
from safetensors.torch import save_file
state = torch.load(sys.argv[2], map_location="cpu", weights_only=True, mmap=True)
save_file({k: v.contiguous() for k, v in state.items()}, sys.argv[1], metadata={"format": "pt"})
import os; os.sync()
"""

TORCH_SAVE = """
import sys, torch
from safetensors.torch import load_file
state = {}
for shard in sys.argv[2:]:
    state.update(load_file(shard))
torch.save(state, sys.argv[1])
"""


@dataclass
class Run:
    seconds: float
    peak_rss_mb: float
    cpu_seconds: float = 0.0  # user + system: steadier than wall time on a shared machine


def drop_caches() -> None:
    subprocess.run(["sync"], check=True)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        pass  # not root: runs start warm, both sides alike


# Linux starts a child's ru_maxrss at its parent's resident size (the forked copy of the
# parent's memory counts until exec), so a bench process that generated a checkpoint in memory
# would lend every command it times its own peak. A small launcher process forks the command
# and reports the child's figures: the command then inherits only the launcher's ~10 MB.
LAUNCHER = """
import os, sys, time
started = time.perf_counter()
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
print(time.perf_counter() - started, usage.ru_utime + usage.ru_stime, usage.ru_maxrss,
      os.waitstatus_to_exitcode(status), file=sys.stderr)
"""


def launch(command: list[str]) -> Run:
    """Wall time, CPU time and peak RSS of `command`, run from the small launcher."""
    process = subprocess.run([sys.executable, "-c", LAUNCHER, *command], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    *_, last = process.stderr.strip().splitlines() or ["0 0 0 1"]
    seconds, cpu_seconds, maxrss_kb, code = last.split()
    if int(code) != 0:
        sys.stderr.write(process.stderr)
        raise SystemExit(f"benchmark command failed: {' '.join(command)}")
    return Run(float(seconds), int(maxrss_kb) / 1024, float(cpu_seconds))


def timed(command: list[str], cold: bool = True) -> Run:
    if cold:
        drop_caches()
    return launch(command)


def remove(path: Path) -> None:
    """Remove an output and the checksum file --sha256 writes beside it."""
    if path.is_dir():
        shutil.rmtree(path)
    for leftover in (path, path.with_name(path.name + ".sha256")):
        if leftover.is_file():
            leftover.unlink()


def make_checkpoint(shape: str, dtype: str = "BF16") -> tuple[Path, list[Path], int]:
    import dataclasses

    from shardkit.synthetic import SHAPES, qwen2_tensors, write_checkpoint

    folder = DATA / (f"qwen2.5-{shape}" if dtype == "BF16" else f"qwen2.5-{shape}-{dtype}")
    done = folder / ".complete"
    spec = dataclasses.replace(SHAPES[shape], dtype=dtype)
    total = sum(t.nbytes for t in qwen2_tensors(spec))
    if not done.exists():
        remove(folder)
        print(f"generating {folder.name} ({total / 1e9:.1f} GB) ...", flush=True)
        # four shards, like the Qwen2.5-7B release
        write_checkpoint(folder, spec, max_shard_size=total // 4 + 64 * 2**20, seed=1)
        if dtype == "F32":
            weights_like(folder)
        subprocess.run(["sync"], check=True)
        done.write_text("ok\n")
    shards = sorted(folder.glob("model-*.safetensors"))
    return folder, shards, total


def weights_like(folder: Path) -> None:
    """Overwrite an F32 checkpoint's tensors with N(0, 0.02) values, as trained weights
    look: a conversion meets pseudo-random bits' NaNs and infinities (its slow paths)
    far more often than it ever would in a real checkpoint."""
    import numpy as np

    from shardkit.format.header import read_header

    rng = np.random.default_rng(1)
    chunk = 16 * 2**20  # elements
    for path in sorted(folder.glob("*.safetensors")):
        header = read_header(path)
        fd = os.open(path, os.O_WRONLY)
        try:
            for tensor in header.tensors:
                done, count = 0, tensor.nbytes // 4
                while done < count:
                    step = min(chunk, count - done)
                    values = (rng.standard_normal(step, dtype=np.float32) * 0.02).astype("<f4")
                    os.pwrite(fd, values.tobytes(), header.data_start + tensor.begin + 4 * done)
                    done += step
        finally:
            os.close(fd)


def realistic_bf16(shape: str, f32: Path) -> Path:
    """The BF16 checkpoint the fp16 row converts: the bf16 conversion of the F32 one
    (trained-weight values, not pseudo-random bits), written once by shardkit itself."""
    folder = DATA / f"qwen2.5-{shape}-BF16-from-F32"
    if not (folder / ".complete").exists():
        remove(folder)
        total = sum(p.stat().st_size for p in f32.glob("*.safetensors"))
        subprocess.run([*SHARDKIT, "split", str(f32), "-o", str(folder), "--dtype", "bf16", "--quiet",
                        "--max-shard-size", str(total // 8 + 32 * 2**20)], check=True)
        (folder / ".complete").write_text("ok\n")
    return folder


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
        "baseline_peak_rss_mb": round(max(r.peak_rss_mb for r in base), 1),
    }
    print(json.dumps(result), flush=True)
    return result


MEASUREMENTS = (
    "inspect", "merge", "sha256", "reshard", "checksum", "verify", "naive", "convert", "torchbin", "surgery",
)


def device_floor(shape: str, sources: list[Path], output_size: int, scratch: Path, count: int) -> dict[str, object]:
    """What the device allows for these bytes: the larger of a sequential O_DIRECT read of
    the sources and a sequential O_DIRECT write of the output's size, medians of `count`."""
    if shutil.which("fio") is None:
        raise SystemExit("the device floor needs fio: apt-get install -y fio")
    common = ["--bs=4M", "--direct=1", "--ioengine=psync", "--output=/dev/null"]
    read = ["fio", *common, "--rw=read"]
    for number, source in enumerate(sources):  # one file after the other, as a merge reads them
        read += [f"--name=read{number}", f"--filename={source}", "--stonewall"]
    target = scratch / "fio-write"
    write_job = ["--name=write", "--rw=write", f"--filename={target}", f"--size={output_size}", "--end_fsync=1"]
    write = ["fio", *common, *write_job]
    # both at once, as a merge moves them: one job reading the sources front to back, one writing
    every_source = ":".join(str(source).replace(":", "\\:") for source in sources)
    both = ["fio", *common, "--name=read", "--rw=read", f"--filename={every_source}",
            "--file_service_type=sequential", *write_job]
    reads, writes, concurrent = [], [], []
    for _ in range(count):
        reads.append(timed(read).seconds)
        writes.append(timed(write).seconds)
        target.unlink()
        concurrent.append(timed(both).seconds)
        target.unlink()
    result = {
        "what": f"{shape} device floor: fio O_DIRECT read of the sources / write of the output",
        "read_s": round(statistics.median(reads), 2), "write_s": round(statistics.median(writes), 2),
        "both_s": round(statistics.median(concurrent), 2),
    }
    result["floor_s"] = max(result["read_s"], result["write_s"])
    print(json.dumps(result), flush=True)
    return result


def against_floor(row: dict[str, object], floor: dict[str, object], what: str | None = None) -> dict[str, object]:
    """A merge or reshard row again, as a ratio to the device floor, and to fio reading
    and writing the same bytes at once (on a disk whose reads and writes share one
    budget, that is what a merge can reach, above the larger of the two alone)."""
    ours = float(row["ours_s"])  # type: ignore[arg-type]
    result = {
        "what": what or str(row["what"]).replace("vs cat+sync", "vs device floor (fio)"),
        "ours_s": row["ours_s"], "baseline_s": floor["floor_s"],
        "ratio": round(ours / float(floor["floor_s"]), 3),  # type: ignore[arg-type]
        "pair_ratios": [], "ours_peak_rss_mb": row["ours_peak_rss_mb"],
        "floor_read_s": floor["read_s"], "floor_write_s": floor["write_s"], "floor_both_s": floor["both_s"],
        "ratio_to_both": round(ours / float(floor["both_s"]), 3),  # type: ignore[arg-type]
    }
    print(json.dumps(result), flush=True)
    return result


def bench_conversion(shape: str, count: int, others: int) -> list[dict[str, object]]:
    """--dtype rows: F32 → bf16 and BF16 → fp16, against the plain merge and the torch ways."""
    f32, f32_shards, f32_total = make_checkpoint(shape, "F32")
    bf16 = realistic_bf16(shape, f32)
    scratch = DATA / "out"
    scratch.mkdir(exist_ok=True)
    out_file, out_dir = scratch / "converted.safetensors", scratch / "converted"
    quiet = ["--quiet"]
    to_bf16 = [*SHARDKIT, "merge", str(f32), "-o", str(out_file), "--dtype", "bf16", *quiet]
    results = [
        pairs(f"{shape} F32 merge --dtype bf16 vs plain merge of the F32 files", to_bf16,
              [*SHARDKIT, "merge", str(f32), "-o", str(out_file), *quiet], out_file, count),
        pairs(f"{shape} F32 merge --dtype bf16 vs safetensors load_file+.to(bf16)+save_file", to_bf16,
              [sys.executable, "-c", NAIVE_CAST, str(out_file), *map(str, f32_shards)], out_file, others),
        pairs(f"{shape} F32 merge --dtype bf16 (folder) vs transformers from_pretrained(dtype=bf16)+save_pretrained",
              [*SHARDKIT, "merge", str(f32), "-o", str(out_dir), "--dtype", "bf16", *quiet],
              [sys.executable, "-c", TRANSFORMERS_CAST, str(out_dir), str(f32)], out_dir, others),
        pairs(f"{shape} BF16 merge --dtype fp16 vs plain merge",
              [*SHARDKIT, "merge", str(bf16), "-o", str(out_file), "--dtype", "fp16", *quiet],
              [*SHARDKIT, "merge", str(bf16), "-o", str(out_file), *quiet], out_file, count),
    ]
    # what the device allows for the F32 → bf16 conversion's bytes: read 6.2 GB, write half
    floor = device_floor(f"{shape} F32 --dtype bf16", f32_shards, f32_total // 2, scratch, count)
    converted = results[0]
    results += [floor, against_floor(converted, floor, f"{shape} F32 merge --dtype bf16 vs device floor (fio)")]
    for torch_way in results[1:3]:  # the most any tool could gain over it on this disk
        torch_way["torch_way_over_floor"] = round(float(torch_way["baseline_s"]) / float(floor["both_s"]), 2)  # type: ignore[arg-type]
    for row in results[:3] + results[-2:]:
        row["gigabytes"] = round(f32_total / 1e9, 2)  # the F32 source
    return results


def torch_bin(shape: str, shards: list[Path]) -> Path:
    """The checkpoint's tensors as one pytorch_model.bin, written once by torch.save."""
    folder = DATA / f"qwen2.5-{shape}-bin"
    path = folder / "pytorch_model.bin"
    if not (folder / ".complete").exists():
        remove(folder)
        folder.mkdir(parents=True)
        print(f"writing {path} with torch.save ...", flush=True)
        subprocess.run([sys.executable, "-c", TORCH_SAVE, str(path), *map(str, shards)], check=True)
        subprocess.run(["sync"], check=True)
        (folder / ".complete").write_text("ok\n")
    return path


def bench_torch_bin(shape: str, shards: list[Path], count: int, others: int) -> list[dict[str, object]]:
    """`shardkit convert` of a .bin against the bytes' floor and against the torch way."""
    source = torch_bin(shape, shards)
    out = DATA / "out" / "converted.safetensors"
    convert = [*SHARDKIT, "convert", str(source), "-o", str(out), "--quiet"]
    cat_sync = ["sh", "-c", 'cat "$1" > "$0" && sync', str(out), str(source)]
    results = [
        pairs(f"{shape} convert pytorch_model.bin vs cat+sync", convert, cat_sync, out, count),
        pairs(f"{shape} convert pytorch_model.bin vs torch.load(weights_only, mmap)+save_file", convert,
              [sys.executable, "-c", TORCH_LOAD, str(out), str(source)], out, others),
    ]
    for row in results:
        row["gigabytes"] = round(source.stat().st_size / 1e9, 2)
    return results


def bench_rename(shape: str, folder: Path, count: int) -> dict[str, object]:
    """A merge renaming every tensor against the plain merge: renames are labels, not bytes."""
    out = DATA / "out" / "renamed.safetensors"
    merge = [*SHARDKIT, "merge", str(folder), "-o", str(out), "--quiet"]
    return pairs(f"{shape} merge --rename every tensor vs plain merge", [*merge, "--rename", "(.*)", r"x.\1"],
                 merge, out, count)


def flux_checkpoint(double: int, single: int) -> tuple[Path, Path]:
    """A FLUX.1-shaped BFL single file and the diffusers folder the built-in recipe splits
    it into (1 GB shards, as diffusers ships the transformer), both written once."""
    from shardkit.synthetic import ByteSource, flux_tensors, write_safetensors

    folder = DATA / f"flux1-{double}-double-{single}-single"
    bfl, diffusers = folder / "flux1-dev.safetensors", folder / "transformer"
    if not (folder / ".complete").exists():
        remove(folder)
        folder.mkdir(parents=True)
        tensors = flux_tensors(double, single)
        print(f"generating {folder.name} ({sum(t.nbytes for t in tensors) / 1e9:.1f} GB) ...", flush=True)
        write_safetensors(bfl, tensors, ByteSource(1), {"format": "pt"})
        subprocess.run([*SHARDKIT, "split", str(bfl), "-o", str(diffusers), "--recipe", "flux-bfl-to-diffusers",
                        "--prefix", "diffusion_pytorch_model", "--max-shard-size", "1GB", "--quiet"], check=True)
        subprocess.run(["sync"], check=True)
        (folder / ".complete").write_text("ok\n")
    return bfl, diffusers


def bench_flux(blocks: str, count: int) -> list[dict[str, object]]:
    """The built-in Flux recipes (dim-0 splits, fuses and a half swap) against the plain
    merge of the same checkpoint."""
    double, single = (int(n) for n in blocks.split(","))
    bfl, diffusers = flux_checkpoint(double, single)
    out = DATA / "out" / "flux.safetensors"
    results = []
    for source, recipe, what in ((bfl, "flux-bfl-to-diffusers", "BFL file"),
                                 (diffusers, "flux-diffusers-to-bfl", "diffusers folder")):
        merge = [*SHARDKIT, "merge", str(source), "-o", str(out), "--quiet"]
        row = pairs(f"FLUX.1 {double}+{single} blocks {what} merge --recipe {recipe} vs plain merge",
                    [*merge, "--recipe", recipe], merge, out, count)
        row["shape"], row["gigabytes"] = "FLUX.1", round(bfl.stat().st_size / 1e9, 2)
        results.append(row)
    return results


def bench_shape(shape: str, count: int, others: int, measurements: set[str]) -> list[dict[str, object]]:
    """Merge, merge --sha256 and reshard (the ones with targets) get `count` pairs; the rest `others`."""
    folder, shards, total = make_checkpoint(shape)
    scratch = DATA / "out"
    scratch.mkdir(exist_ok=True)
    out_file = scratch / "merged.safetensors"
    out_dir = scratch / "split"
    sums = scratch / "SHA256SUMS"
    cat_sync = ["sh", "-c", 'cat "$@" > "$0" && sync', str(out_file), *map(str, shards)]
    cat_sync_dir = ["sh", "-c", 'mkdir -p "$0" && cat "$@" > "$0/all" && sync', str(out_dir), *map(str, shards)]
    merge = [*SHARDKIT, "merge", str(folder), "-o", str(out_file), "--quiet"]
    split = [*SHARDKIT, "split", str(folder), "-o", str(out_dir), "--max-shard-size", "2GB", "--quiet"]
    results = []
    if "inspect" in measurements:
        inspect = [*SHARDKIT, "inspect", str(folder)]
        python = [sys.executable, "-c", "pass"]  # the floor for any Python command
        name = f"{shape} inspect (warm cache) vs bare python start-up"
        results.append(pairs(name, inspect, python, out_file, 5, cold=False))
    floor = None
    if measurements & {"merge", "reshard"}:
        floor = device_floor(shape, shards, sum(p.stat().st_size for p in shards), scratch, 3)
        results.append(floor)
    if "merge" in measurements:
        results.append(pairs(f"{shape} merge vs cat+sync", merge, cat_sync, out_file, count))
        results.append(against_floor(results[-1], floor))  # type: ignore[arg-type]
    if "sha256" in measurements:
        results.append(pairs(f"{shape} merge --sha256 vs cat+sync", [*merge, "--sha256"], cat_sync, out_file, count))
    if "reshard" in measurements:
        results.append(pairs(f"{shape} reshard to 2GB vs cat+sync", split, cat_sync_dir, out_dir, count))
        results.append(against_floor(results[-1], floor))  # type: ignore[arg-type]
    if "checksum" in measurements:
        checksum = [*SHARDKIT, "checksum", str(folder), "-o", str(sums)]
        sha256sum = ["sh", "-c", 'sha256sum "$@" > "$0"', str(sums), *map(str, shards)]
        results.append(pairs(f"{shape} checksum vs sha256sum", checksum, sha256sum, sums, others))
    if "verify" in measurements:
        verify = [*SHARDKIT, "verify", str(folder), "--against", str(folder), "--no-architecture", "--quiet"]
        cat_both = ["sh", "-c", 'cat "$@" "$@" > /dev/null', "cat", *map(str, shards)]
        results.append(pairs(f"{shape} verify --against (reads both) vs cat of both", verify, cat_both, sums, others))
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if "naive" in measurements and memory < 1.5 * total:
        print(f"skipping {shape} naive: it holds the whole model in memory ({memory / 1e9:.0f} GB here)", flush=True)
    elif "naive" in measurements:
        remove(out_file)
        run = timed([sys.executable, "-c", NAIVE, str(out_file), *map(str, shards)])
        remove(out_file)
        base = timed(cat_sync)
        remove(out_file)
        result = {
            "what": f"{shape} naive load_file+save_file vs cat+sync (1 run)",
            "ours_s": round(run.seconds, 2), "baseline_s": round(base.seconds, 2),
            "ratio": round(run.seconds / base.seconds, 3), "pair_ratios": [round(run.seconds / base.seconds, 3)],
            "ours_peak_rss_mb": round(run.peak_rss_mb, 1),
        }
        print(json.dumps(result), flush=True)
        results.append(result)
    if "convert" in measurements:
        results += bench_conversion(shape, count, others)
    if "torchbin" in measurements:
        results += bench_torch_bin(shape, shards, count, others)
    if "surgery" in measurements:
        results.append(bench_rename(shape, folder, count))
    for r in results:
        r["shape"] = shape
        r.setdefault("gigabytes", round(total / 1e9, 2))
    return results


def write_table(results: list[dict[str, object]]) -> str:
    lines = [
        "| measurement | GB | pairs | shardkit s | baseline s | ratio (median) | per-pair ratios "
        "| shardkit peak RSS MB | baseline peak RSS MB |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |",
    ]
    for r in results:
        if "floor_s" in r:
            both = f", both at once {r['both_s']}" if "both_s" in r else ""
            lines.append(
                f"| {r['what']} | {r['gigabytes']} | 3 | | read {r['read_s']}, write {r['write_s']}{both} "
                f"| floor {r['floor_s']} s | | | |"
            )
            continue
        if "ratio_to_both" in r:
            per_pair = f"{r['ratio_to_both']:.2f}× of fio reading and writing at once"
            lines.append(
                f"| {r['what']} | {r['gigabytes']} | 0 | {r['ours_s']} | {r['baseline_s']} | {r['ratio']:.2f}× "
                f"| {per_pair} | {r['ours_peak_rss_mb']} | |"
            )
            continue
        per_pair = ", ".join(f"{x:.2f}" for x in r.get("pair_ratios", []))  # type: ignore[union-attr]
        lines.append(
            f"| {r['what']} | {r['gigabytes']} | {len(r.get('pair_ratios', []))} | {r['ours_s']} | "  # type: ignore[arg-type]
            f"{r['baseline_s']} | {r['ratio']:.2f}× | {per_pair} | {r['ours_peak_rss_mb']} | "
            f"{r.get('baseline_peak_rss_mb', '')} |"
        )
    return "\n".join(lines) + "\n"


def merged_with_earlier(results: list[dict[str, object]]) -> list[dict[str, object]]:
    """A partial run (--shapes, --only) replaces its rows in bench/results.json and keeps the others."""
    path = ROOT / "bench" / "results.json"
    earlier = json.loads(path.read_text()) if path.exists() else []
    fresh = {r["what"] for r in results}
    combined = [r for r in earlier if r["what"] not in fresh] + results
    order = {shape: i for i, shape in enumerate(["0.5B", "1.5B", "3B", "7B"])}
    kinds = {kind: i for i, kind in enumerate(MEASUREMENTS)}

    def key(r: dict[str, object]) -> tuple[int, int]:
        return order.get(str(r["shape"]), 99), kinds.get(_kind(str(r["what"])), len(kinds))

    return sorted(combined, key=key)


def _kind(what: str) -> str:
    for word, kind in (("pytorch_model.bin", "torchbin"), ("--dtype", "convert"), ("inspect", "inspect"),
                       ("--rename", "surgery"), ("--recipe", "surgery"),
                       ("--sha256", "sha256"),
                       ("reshard", "reshard"), ("device floor", "merge"),
                       ("checksum", "checksum"), ("verify", "verify"), ("naive", "naive"), ("merge", "merge")):
        if word in what:
            return kind
    return what


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=os.environ.get("BENCH_SHAPES", "0.5B,1.5B,3B,7B"))
    parser.add_argument("--pairs", type=int, default=int(os.environ.get("BENCH_PAIRS", "5")),
                        help="pairs for merge, merge --sha256 and reshard (the measurements with targets)")
    parser.add_argument("--other-pairs", type=int, default=int(os.environ.get("BENCH_OTHER_PAIRS", "3")),
                        help="pairs for checksum and verify")
    parser.add_argument("--only", default=os.environ.get("BENCH_ONLY", ",".join(MEASUREMENTS)),
                        help=f"comma-separated subset of {','.join(MEASUREMENTS)}")
    parser.add_argument("--flux-blocks", default=os.environ.get("BENCH_FLUX_BLOCKS", "2,4"),
                        help="double,single blocks of the FLUX.1-shaped checkpoint of the surgery rows (2,4: 2.6 GB)")
    args = parser.parse_args()
    measurements = set(args.only.split(","))
    if measurements - set(MEASUREMENTS):
        parser.error(f"unknown measurement(s): {', '.join(sorted(measurements - set(MEASUREMENTS)))}")
    DATA.mkdir(exist_ok=True)
    results = []
    shapes = args.shapes.split(",")
    for shape in shapes:
        from shardkit.synthetic import SHAPES, qwen2_tensors

        need = 3 * sum(t.nbytes for t in qwen2_tensors(SHAPES[shape]))
        if shutil.disk_usage(DATA).free < need and not (DATA / f"qwen2.5-{shape}" / ".complete").exists():
            print(f"skipping {shape}: needs {need / 1e9:.0f} GB free", flush=True)
            continue
        # the rename row is the 1.5B merge's (issue 17); other shapes only when 1.5B is not run
        here = measurements - {"surgery"} if shape != "1.5B" and "1.5B" in shapes else measurements
        results += bench_shape(shape, args.pairs, args.other_pairs, here)
    if "surgery" in measurements:
        results += bench_flux(args.flux_blocks, args.pairs)
    results = merged_with_earlier(results)
    table = write_table(results)
    header = (
        f"Measured {time.strftime('%Y-%m-%d')} on {os.cpu_count()} cores; page cache dropped before each run "
        "(inspect: warm); alternating pairs, median; whole processes; outputs durable (fsync / sync).\n\n"
    )
    (ROOT / "bench" / "RESULTS.md").write_text(header + table)
    (ROOT / "bench" / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(table)


if __name__ == "__main__":
    main()
