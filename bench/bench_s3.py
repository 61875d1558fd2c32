"""`make bench`, S3 part: shardkit on a loopback SeaweedFS against the awscli way of doing it.

A Qwen2.5-shaped sharded checkpoint (bench-data/, shared with bench.py) is uploaded
once to a SeaweedFS S3 server on 127.0.0.1 (tests/s3_server.py). Then, as whole
processes, page cache dropped before each run when we may (root), alternating which
side goes first, median of N:

(a) S3 → S3 merge: `shardkit merge s3://… -o s3://…` (assembled inside the store)
    against download (`aws s3 cp --recursive`) + local `shardkit merge` + upload
    (`aws s3 cp`): wall time and the client's bytes on the wire.
(b) S3 → local merge: `shardkit merge s3://… -o file` against the download alone
    (`aws s3 cp --recursive`), and against download + local merge.

shardkit's bytes are its own count (request and response bodies, `--json` report);
awscli's are the objects it moved. Without awscli, boto3's `download_file`/`upload_file`
with their default TransferConfig stand in, and the table says so.
Results go to stdout and bench/RESULTS_S3.md.

    python bench/bench_s3.py [--shape 1.5B] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(ROOT / "tests")]

from bench import DATA, SHARDKIT, drop_caches, make_checkpoint  # noqa: E402

from s3_server import SeaweedS3  # noqa: E402

MB = 1e6


@dataclass
class Run:
    seconds: float
    peak_rss_mb: float
    stdout: str


def timed(command: list[str], env: dict[str, str]) -> Run:
    """Wall time and peak RSS (wait4) of one process; its output goes to files, not pipes,
    so nothing it prints can stall it."""
    drop_caches()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        started = time.perf_counter()
        process = subprocess.Popen(command, stdout=out, stderr=err, env=env, text=True)
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - started
        out.seek(0)
        err.seek(0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"benchmark command failed: {' '.join(command)}\n{err.read()}")
        return Run(seconds, usage.ru_maxrss / 1024, out.read())


def aws_cli() -> list[str] | None:
    """The `aws` command (awscli) if it runs here, from PATH or the system Python."""
    for candidate in (shutil.which("aws"), "/root/.pyenv/versions/3.11.7/bin/aws"):
        if candidate and subprocess.run([candidate, "--version"], capture_output=True).returncode == 0:
            return [candidate]
    return None


BOTO_DOWNLOAD = """
import sys, boto3, os
from botocore.config import Config
s3 = boto3.client("s3", config=Config(s3={"addressing_style": "path"}))
bucket, prefix, target = sys.argv[1:4]
os.makedirs(target, exist_ok=True)
for item in s3.list_objects_v2(Bucket=bucket, Prefix=prefix)["Contents"]:
    s3.download_file(bucket, item["Key"], os.path.join(target, item["Key"][len(prefix):]))
"""
BOTO_UPLOAD = """
import sys, boto3
from botocore.config import Config
boto3.client("s3", config=Config(s3={"addressing_style": "path"})).upload_file(sys.argv[1], sys.argv[2], sys.argv[3])
"""


class Baseline:
    """Download a prefix / upload a file with awscli, or boto3's defaults if awscli is missing."""

    def __init__(self, endpoint: str) -> None:
        self.aws = aws_cli()
        self.endpoint = endpoint
        self.name = "aws s3 cp" if self.aws else "boto3 download_file/upload_file (awscli not installed)"

    def download(self, bucket: str, prefix: str, target: Path) -> list[str]:
        if self.aws:
            return [*self.aws, "s3", "cp", "--recursive", "--only-show-errors", "--endpoint-url", self.endpoint,
                    f"s3://{bucket}/{prefix}", str(target)]
        return [sys.executable, "-c", BOTO_DOWNLOAD, bucket, prefix, str(target)]

    def upload(self, source: Path, bucket: str, key: str) -> list[str]:
        if self.aws:
            return [*self.aws, "s3", "cp", "--only-show-errors", "--endpoint-url", self.endpoint,
                    str(source), f"s3://{bucket}/{key}"]
        return [sys.executable, "-c", BOTO_UPLOAD, str(source), bucket, key]


def shell(*commands: list[str]) -> list[str]:
    """One process running the commands in turn, stopping at the first failure."""
    import shlex

    return ["sh", "-c", " && ".join(shlex.join(c) for c in commands)]


def clear(server: SeaweedS3, bucket: str, prefix: str, *paths: Path) -> None:
    client = server.client()
    listing = client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
    if listing:
        client.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": o["Key"]} for o in listing]})
    for path in paths:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def compare(name: str, ours: list[Run], base: list[Run], **extra: object) -> dict[str, object]:
    ours_s = statistics.median(r.seconds for r in ours)
    base_s = statistics.median(r.seconds for r in base)
    result = {
        "what": name,
        "ours_s": round(ours_s, 2),
        "baseline_s": round(base_s, 2),
        "ratio": round(ours_s / base_s, 3),
        "pair_ratios": [round(o.seconds / b.seconds, 3) for o, b in zip(ours, base)],
        "ours_peak_rss_mb": round(max(r.peak_rss_mb for r in ours), 1),
        **extra,
    }
    print(json.dumps(result), flush=True)
    return result


def rotate(count: int, **sides: Callable[[], Run]) -> dict[str, list[Run]]:
    """Each side once per round, starting one later each round, so that no side always
    runs first (or right after the same other side)."""
    names = list(sides)
    runs: dict[str, list[Run]] = {name: [] for name in names}
    for i in range(count):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            runs[name].append(sides[name]())
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default=os.environ.get("BENCH_S3_SHAPE", "1.5B"))
    parser.add_argument("--runs", type=int, default=int(os.environ.get("BENCH_S3_RUNS", "3")))
    args = parser.parse_args()
    DATA.mkdir(exist_ok=True)
    folder, shards, total = make_checkpoint(args.shape)
    size = sum(p.stat().st_size for p in shards)
    scratch = DATA / "s3-out"
    scratch.mkdir(exist_ok=True)
    downloaded, merged = scratch / "downloaded", scratch / "merged.safetensors"

    with SeaweedS3(memory_limit_mb=1024) as server:
        bucket = server.make_bucket("bench")
        env = {
            **os.environ,
            "AWS_ACCESS_KEY_ID": server.access_key,
            "AWS_SECRET_ACCESS_KEY": server.secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": server.endpoint_url,
        }
        print(f"uploading {folder.name} ({size / 1e9:.2f} GB) to {server.endpoint_url} ...", flush=True)
        from boto3.s3.transfer import TransferConfig

        client = server.client()
        for path in sorted(folder.iterdir()):
            if path.is_file() and not path.name.startswith("."):
                client.upload_file(str(path), bucket, f"src/{path.name}", Config=TransferConfig(max_concurrency=8))
        baseline = Baseline(server.endpoint_url)
        source = f"s3://{bucket}/src/"
        results = []

        # (a) S3 → S3
        transfers: list[dict[str, int]] = []

        def server_side() -> Run:
            clear(server, bucket, "out/")
            run = timed([*SHARDKIT, "merge", source, "-o", f"s3://{bucket}/out/model.safetensors", "--json"], env)
            transfers.append(json.loads(run.stdout)["transfer"])
            clear(server, bucket, "out/")
            return run

        def round_trip() -> Run:
            clear(server, bucket, "out/", downloaded, merged)
            run = timed(shell(
                baseline.download(bucket, "src/", downloaded),
                [*SHARDKIT, "merge", str(downloaded), "-o", str(merged), "--quiet"],
                baseline.upload(merged, bucket, "out/model.safetensors"),
            ), env)
            clear(server, bucket, "out/", downloaded, merged)
            return run

        runs = rotate(args.runs, ours=server_side, base=round_trip)
        ours, base = runs["ours"], runs["base"]
        client_bytes = max(t["bytes_sent"] + t["bytes_received"] for t in transfers)
        results.append(compare(
            f"S3→S3 merge (server-side) vs download + local merge + upload ({baseline.name})", ours, base,
            ours_client_mb=round(client_bytes / MB, 1), baseline_client_mb=round(2 * size / MB, 1),
            ours_requests=max(t["requests"] for t in transfers),
        ))

        # (b) S3 → local
        received: list[int] = []

        def remote_merge() -> Run:
            clear(server, bucket, "out/", merged)
            run = timed([*SHARDKIT, "merge", source, "-o", str(merged), "--json"], env)
            received.append(json.loads(run.stdout)["transfer"]["bytes_received"])
            clear(server, bucket, "out/", merged)
            return run

        def download_only() -> Run:
            clear(server, bucket, "out/", downloaded)
            run = timed(baseline.download(bucket, "src/", downloaded), env)
            clear(server, bucket, "out/", downloaded)
            return run

        def download_and_sync() -> Run:
            clear(server, bucket, "out/", downloaded)
            run = timed(shell(baseline.download(bucket, "src/", downloaded), ["sync"]), env)
            clear(server, bucket, "out/", downloaded)
            return run

        def download_and_merge() -> Run:
            clear(server, bucket, "out/", downloaded, merged)
            run = timed(shell(
                baseline.download(bucket, "src/", downloaded),
                [*SHARDKIT, "merge", str(downloaded), "-o", str(merged), "--quiet"],
            ), env)
            clear(server, bucket, "out/", downloaded, merged)
            return run

        runs = rotate(
            args.runs, ours=remote_merge, download=download_only, durable=download_and_sync, merge=download_and_merge
        )
        for side, what in (
            ("download", f"download alone ({baseline.name} --recursive)"),
            ("durable", "download + sync (durable, as shardkit's output is)"),
            ("merge", "download + local merge"),
        ):
            results.append(compare(
                f"S3→local merge vs {what}", runs["ours"], runs[side],
                ours_client_mb=round(max(received) / MB, 1), baseline_client_mb=round(size / MB, 1),
            ))

    for r in results:
        r["shape"], r["gigabytes"] = args.shape, round(size / 1e9, 2)
    table = write_table(results)
    root = os.geteuid() == 0
    header = (
        f"Measured {time.strftime('%Y-%m-%d')} on {os.cpu_count()} cores, SeaweedFS `weed server` on 127.0.0.1 "
        f"(the store shares the machine and its disk with the client); {args.shape}-shaped checkpoint, "
        f"{size / 1e9:.2f} GB in {len(shards)} shards; "
        f"{'page cache dropped before each run' if root else 'warm page cache (not root)'}; "
        f"median of {args.runs} alternating runs; whole processes. Client MB: shardkit's own count of request "
        "and response bodies; for the baseline, the bytes of the objects it moved.\n\n"
    )
    (HERE / "RESULTS_S3.md").write_text(header + table)
    (HERE / "results_s3.json").write_text(json.dumps(results, indent=2) + "\n")
    print(table)


def write_table(results: list[dict[str, object]]) -> str:
    lines = [
        "| measurement | GB | shardkit s | baseline s | ratio (median) | shardkit client MB | baseline client MB "
        "| shardkit peak RSS MB |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        lines.append(
            f"| {r['what']} | {r['gigabytes']} | {r['ours_s']} | {r['baseline_s']} | {r['ratio']:.2f}× | "
            f"{r['ours_client_mb']} | {r['baseline_client_mb']} | {r['ours_peak_rss_mb']} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
