"""Remote checkpoints against a real S3 server (SeaweedFS on 127.0.0.1).

The same checkpoints are merged and split locally and through the store; every
remote result must be the local result, byte for byte. Failures must leave nothing
behind in the store (no object, no unfinished multipart upload, no staged object)
and must say what is wrong in one line without credentials or signatures.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from boto3.s3.transfer import TransferConfig
from botocore.config import Config

from conftest import assert_clean_failure, run_cli, sigint_as_in_a_terminal, snapshot, temporaries
from s3_server import SeaweedS3, find_weed
from shardkit.synthetic import Qwen2Shape, SyntheticCheckpoint, write_checkpoint

pytestmark = pytest.mark.s3

MiB = 1024 * 1024
#: ~76 MB: big enough for several multipart parts, with tensors on both sides of 5 MiB.
MID = Qwen2Shape(hidden=512, intermediate=2816, layers=6, heads=8, kv_heads=2, vocab=8192, tie_word_embeddings=False)
UPLOAD = TransferConfig(max_concurrency=8, multipart_chunksize=64 * MiB)


# --------------------------------------------------------------------------- helpers


def s3_env(server: SeaweedS3, **overrides: str) -> dict[str, str]:
    """Credentials and endpoint as a user sets them; no ~/.aws file can interfere."""
    return {
        "AWS_ACCESS_KEY_ID": server.access_key,
        "AWS_SECRET_ACCESS_KEY": server.secret_key,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": server.endpoint_url,
        "AWS_CONFIG_FILE": "/nonexistent",
        "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
        **overrides,
    }


def upload_folder(server: SeaweedS3, folder: Path, bucket: str, prefix: str, skip: tuple[str, ...] = ()) -> None:
    client = server.client()
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name not in skip:
            client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(folder).as_posix()}", Config=UPLOAD)


def get_bytes(server: SeaweedS3, bucket: str, key: str) -> bytes:
    return server.client().get_object(Bucket=bucket, Key=key)["Body"].read()


class _Sha256Sink:
    """A write-only file object that hashes what boto3 downloads into it, in order."""

    def __init__(self) -> None:
        self.hasher = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.hasher.update(data)
        return len(data)


def object_sha256(server: SeaweedS3, bucket: str, key: str) -> str:
    sink = _Sha256Sink()
    server.client().download_fileobj(bucket, key, sink, Config=UPLOAD)
    return sink.hasher.hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(16 * MiB):
            digest.update(chunk)
    return digest.hexdigest()


def keys(server: SeaweedS3, bucket: str, prefix: str = "") -> list[str]:
    listing = server.client().list_objects_v2(Bucket=bucket, Prefix=prefix)
    return sorted(o["Key"] for o in listing.get("Contents", []))


def unfinished_uploads(server: SeaweedS3, bucket: str, prefix: str = "") -> list[str]:
    uploads = server.client().list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    return sorted(u["Key"] for u in uploads if u["Key"].startswith(prefix))


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def remote_folder_bytes(server: SeaweedS3, bucket: str, prefix: str) -> dict[str, bytes]:
    return {key[len(prefix) + 1 :]: get_bytes(server, bucket, key) for key in keys(server, bucket, prefix + "/")}


@pytest.fixture(scope="module")
def store(s3_server: SeaweedS3) -> Iterator[SeaweedS3]:
    """The session's server, with this module's credentials in the environment for
    in-process API calls (CLI runs get them through `s3_env`)."""
    saved = {k: os.environ.get(k) for k in s3_env(s3_server)}
    os.environ.update(s3_env(s3_server))
    yield s3_server
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The local side of the S3 tests (a 1 GB checkpoint among others): removed after the module."""
    folder = tmp_path_factory.mktemp("s3")
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def bucket(store: SeaweedS3) -> str:
    return store.make_bucket(f"models-{uuid.uuid4().hex[:8]}")


@pytest.fixture(scope="module")
def tiny(store: SeaweedS3, bucket: str, work: Path) -> SyntheticCheckpoint:
    """4 shards + index + config/tokenizer with the format's corner-case tensors, at s3://bucket/tiny/."""
    checkpoint = write_checkpoint(work / "tiny", edge_tensors=True)
    upload_folder(store, checkpoint.folder, bucket, "tiny")
    return checkpoint


@pytest.fixture(scope="module")
def mid(store: SeaweedS3, bucket: str, work: Path) -> SyntheticCheckpoint:
    """~76 MB in 4 shards at s3://bucket/mid/: several parts, small and big tensors mixed."""
    checkpoint = write_checkpoint(work / "mid", MID, max_shard_size=25_000_000)
    upload_folder(store, checkpoint.folder, bucket, "mid")
    return checkpoint


@pytest.fixture(scope="module")
def half(store: SeaweedS3, bucket: str, work: Path) -> tuple[SyntheticCheckpoint, str]:
    """A Qwen2.5-0.5B-shaped checkpoint (~1 GB, 4 shards) at s3://bucket/half/, and the
    SHA-256 of its local merge."""
    import shardkit

    checkpoint = write_checkpoint(work / "half", "0.5B", max_shard_size=250_000_000)
    upload_folder(store, checkpoint.folder, bucket, "half")
    merged = work / "half-merged.safetensors"
    digest = shardkit.merge(checkpoint.folder, merged, sha256=True).sha256
    merged.unlink()
    return checkpoint, digest


# --------------------------------------------------------------------------- reading


def test_inspect_reads_headers_only_with_a_few_requests_per_shard(store: SeaweedS3, bucket: str, tiny) -> None:
    import shardkit
    from shardkit import storage

    requests: list[str] = []
    before = storage.traffic()
    report = shardkit.inspect(f"s3://{bucket}/tiny/", endpoint_url=store.endpoint_url)
    spent = storage.traffic() - before
    # An independent count: every request the client sends (the store is cached per endpoint).
    from shardkit.storage.s3 import S3Store

    def count(request, **_: object) -> None:
        requests.append(f"{request.method} {request.url.split('?')[0]}")

    events = S3Store.for_endpoint(store.endpoint_url).client.meta.events
    events.register("before-send.s3", count)
    try:
        shardkit.inspect(f"s3://{bucket}/tiny/", endpoint_url=store.endpoint_url)
    finally:
        events.unregister("before-send.s3", count)

    local = shardkit.inspect(tiny.folder)
    assert (report.tensors, report.parameters, report.bytes) == (local.tensors, local.parameters, local.bytes)
    assert [f.path for f in report.files] == [f.path for f in local.files]
    shards = len(tiny.shard_files)
    assert spent.requests == len(requests) <= 2 * shards + 8, requests
    # A 64 KiB prefetch per shard at most, and the index: never the tensor data.
    assert spent.bytes_received <= shards * 64 * 1024 + 16 * 1024
    assert spent.bytes_received < sum(p.stat().st_size for p in tiny.folder.glob("*.safetensors")) / 10


def test_remote_to_local_merge_equals_the_local_merge(store: SeaweedS3, bucket: str, tiny, work: Path) -> None:
    import shardkit

    local, remote = work / "tiny-local.safetensors", work / "tiny-remote.safetensors"
    shardkit.merge(tiny.folder, local)

    result = run_cli("merge", f"s3://{bucket}/tiny/", "-o", remote, "--sha256", "--json", env=s3_env(store))

    assert result.exit_code == 0, result.stderr
    assert remote.read_bytes() == local.read_bytes()
    report = json.loads(result.stdout)
    assert report["sha256"] == file_sha256(local)
    assert report["transfer"]["bytes_received"] >= report["bytes"] - report["header_bytes"]
    assert report["transfer"]["bytes_sent"] == 0
    assert not temporaries(work)


def test_remote_to_local_split_equals_the_local_split(store: SeaweedS3, bucket: str, tiny, work: Path) -> None:
    import shardkit

    local, remote = work / "tiny-split-local", work / "tiny-split-remote"
    shardkit.split(tiny.folder, local, max_shard_size="700KB")

    result = run_cli("split", f"s3://{bucket}/tiny/", "-o", remote, "--max-shard-size", "700KB", env=s3_env(store))

    assert result.exit_code == 0, result.stderr
    assert folder_bytes(remote) == folder_bytes(local)  # shards, index and config/tokenizer files


def test_diff_verify_and_checksum_read_remote_checkpoints(store: SeaweedS3, bucket: str, tiny) -> None:
    env = s3_env(store)
    same = run_cli("diff", f"s3://{bucket}/tiny/", tiny.folder, env=env)
    assert same.exit_code == 0, same.stderr
    assert "identical" in same.stdout
    verified = run_cli("verify", f"s3://{bucket}/tiny/", "--against", tiny.folder, "--json", env=env)
    assert verified.exit_code == 0, verified.stderr
    report = json.loads(verified.stdout)
    assert report["ok"] and "against" in report["checks"]
    for kind in ((), ("--tensors",)):
        remote = run_cli("checksum", f"s3://{bucket}/tiny/", *kind, env=env)
        local = run_cli("checksum", tiny.folder, *kind)
        assert remote.exit_code == 0, remote.stderr
        assert remote.stdout == local.stdout  # same names, same digests


# --------------------------------------------------------------------------- writing


def test_s3_to_s3_merge_and_split_match_the_local_results(store: SeaweedS3, bucket: str, mid, work: Path) -> None:
    import shardkit

    env = s3_env(store)
    local_merge, local_split = work / "mid-merged.safetensors", work / "mid-split"
    shardkit.merge(mid.folder, local_merge)
    shardkit.split(mid.folder, local_split, max_shard_size="20MB")

    merged = run_cli("merge", f"s3://{bucket}/mid/", "-o", f"s3://{bucket}/mid-merged.safetensors", "--json", env=env)
    split = run_cli("split", f"s3://{bucket}/mid/", "-o", f"s3://{bucket}/mid-split/", "-s", "20MB", env=env)

    assert merged.exit_code == 0, merged.stderr
    assert split.exit_code == 0, split.stderr
    assert get_bytes(store, bucket, "mid-merged.safetensors") == local_merge.read_bytes()
    assert remote_folder_bytes(store, bucket, "mid-split") == folder_bytes(local_split)
    transfer = json.loads(merged.stdout)["transfer"]
    assert transfer["server_side"] and transfer["bytes_sent"] == 5 * MiB
    assert transfer["bytes_copied"] >= local_merge.stat().st_size - 5 * MiB
    assert unfinished_uploads(store, bucket) == []
    assert not [k for k in keys(store, bucket) if ".shardkit-tmp-" in k]


def test_local_to_s3_merge_is_a_multipart_upload_of_the_same_bytes(
    store: SeaweedS3, bucket: str, mid, work: Path
) -> None:
    import shardkit

    local = work / "mid-merged-2.safetensors"
    shardkit.merge(mid.folder, local)
    before = snapshot(mid.folder)

    result = run_cli("merge", mid.folder, "-o", f"s3://{bucket}/uploaded/", "--sha256", "--json", env=s3_env(store))

    assert result.exit_code == 0, result.stderr
    uploaded = remote_folder_bytes(store, bucket, "uploaded")
    assert uploaded["model.safetensors"] == local.read_bytes()
    assert uploaded["model.safetensors.sha256"] == f"{file_sha256(local)}  model.safetensors\n".encode()
    assert {"config.json", "tokenizer.json", "generation_config.json"} <= set(uploaded)
    assert json.loads(result.stdout)["transfer"]["bytes_sent"] >= local.stat().st_size
    assert snapshot(mid.folder) == before


def test_replacing_an_s3_folder_leaves_no_stale_shard(store: SeaweedS3, bucket: str, tiny) -> None:
    env = s3_env(store)
    first = run_cli("split", f"s3://{bucket}/tiny/", "-o", f"s3://{bucket}/resharded/", "-s", "300KB", env=env)
    assert first.exit_code == 0, first.stderr
    many = keys(store, bucket, "resharded/")

    again = run_cli("split", f"s3://{bucket}/tiny/", "-o", f"s3://{bucket}/resharded/", "-s", "2MB", env=env)
    assert_clean_failure(again, 2, "already exists; pass --force")
    forced = run_cli("split", f"s3://{bucket}/tiny/", "-o", f"s3://{bucket}/resharded/", "-s", "2MB", "-f", env=env)

    assert forced.exit_code == 0, forced.stderr
    shards = [k for k in keys(store, bucket, "resharded/") if k.endswith(".safetensors")]
    assert len(shards) == 2 and len([k for k in many if k.endswith(".safetensors")]) > 2
    index = json.loads(get_bytes(store, bucket, "resharded/model.safetensors.index.json"))
    assert sorted(set(index["weight_map"].values())) == sorted(k.split("/")[-1] for k in shards)


def test_s3_to_s3_merge_of_a_1gb_checkpoint_moves_under_16_mib(store: SeaweedS3, bucket: str, half) -> None:
    import shardkit
    from shardkit.storage.s3 import S3Store

    checkpoint, expected = half
    measured = {"sent": 0, "received": 0, "requests": 0}

    def on_send(request, **_: object) -> None:
        measured["requests"] += 1
        body = request.body
        sized = isinstance(body, (bytes, bytearray))
        measured["sent"] += len(body) if sized else int(request.headers.get("Content-Length", 0))
        measured["sent"] += sum(len(k) + len(str(v)) + 4 for k, v in request.headers.items())

    def on_response(http_response, model, **_: object) -> None:
        if model.name != "HeadObject":  # a HEAD's Content-Length is the object's, not sent
            measured["received"] += int(http_response.headers.get("Content-Length", 0))
        measured["received"] += sum(len(k) + len(v) + 4 for k, v in http_response.headers.items())

    events = S3Store.for_endpoint(store.endpoint_url).client.meta.events
    events.register("before-send.s3", on_send)
    events.register("after-call.s3", on_response)
    try:
        report = shardkit.merge(
            f"s3://{bucket}/half/", f"s3://{bucket}/half-merged.safetensors", endpoint_url=store.endpoint_url
        )
    finally:
        events.unregister("before-send.s3", on_send)
        events.unregister("after-call.s3", on_response)

    size = sum(p.stat().st_size for p in checkpoint.folder.glob("*.safetensors"))
    assert report.bytes > 900_000_000 and size > 900_000_000
    assert report.transfer.server_side
    assert report.transfer.bytes_sent + report.transfer.bytes_received < 16 * MiB
    assert measured["sent"] + measured["received"] < 16 * MiB, measured  # headers and XML included
    assert object_sha256(store, bucket, "half-merged.safetensors") == expected


# --------------------------------------------------------------------------- failures


def test_a_killed_client_leaves_no_object_and_the_next_run_cleans_up(store: SeaweedS3, bucket: str, half) -> None:
    checkpoint, _ = half
    key = "killed/model.safetensors"
    command = [sys.executable, "-m", "shardkit", "merge", f"s3://{bucket}/half/", "-o", f"s3://{bucket}/{key}"]
    process = subprocess.Popen(command, env={**os.environ, **s3_env(store)}, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while key not in unfinished_uploads(store, bucket):  # the destination's upload has begun
            assert process.poll() is None and time.monotonic() < deadline, "merge ended before it could be killed"
            time.sleep(0.02)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()

    assert key not in keys(store, bucket, "killed/")  # no object: the upload was never completed
    assert key in unfinished_uploads(store, bucket)

    rerun = run_cli("merge", f"s3://{bucket}/half/", "-o", f"s3://{bucket}/{key}", env=s3_env(store))

    assert rerun.exit_code == 0, rerun.stderr
    assert unfinished_uploads(store, bucket) == []
    assert keys(store, bucket, "killed/") == [key]  # no staged object left either
    # The bytes of this very merge are proven in the 1 GB traffic test; here the size says it completed.
    merged_size = json.loads(run_cli("merge", checkpoint.folder, "-o", "x.safetensors", "--dry-run", "--json").stdout)
    assert store.client().head_object(Bucket=bucket, Key=key)["ContentLength"] == merged_size["bytes"]


def test_ctrl_c_aborts_the_upload_itself(store: SeaweedS3, bucket: str, mid) -> None:
    key = "interrupted/model.safetensors"
    command = [sys.executable, "-m", "shardkit", "merge", mid.folder, "-o", f"s3://{bucket}/{key}"]
    process = subprocess.Popen(
        command, env={**os.environ, **s3_env(store)}, stderr=subprocess.PIPE, text=True,
        preexec_fn=sigint_as_in_a_terminal,
    )
    client = store.client()
    deadline = time.monotonic() + 60
    while True:  # wait until a part of the upload has arrived
        uploads = [u for u in client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) if u["Key"] == key]
        if uploads and client.list_parts(Bucket=bucket, Key=key, UploadId=uploads[0]["UploadId"]).get("Parts"):
            break
        assert process.poll() is None and time.monotonic() < deadline, "merge ended before it could be interrupted"
        time.sleep(0.01)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)

    assert process.returncode == 130, stderr
    assert stderr == "shardkit: error: interrupted; temporary files removed\n"
    assert keys(store, bucket, "interrupted/") == []
    assert unfinished_uploads(store, bucket) == []  # aborted by the run itself, not left for the next


def test_a_source_replaced_during_a_server_side_merge_fails_the_run(store: SeaweedS3, bucket: str, mid) -> None:
    client = store.client()
    for name in sorted(p.name for p in mid.folder.iterdir()):
        client.copy_object(Bucket=bucket, Key=f"mutable/{name}", CopySource={"Bucket": bucket, "Key": f"mid/{name}"})
    victim = f"mutable/{mid.shard_files[-1]}"
    changed = bytearray((mid.folder / mid.shard_files[-1]).read_bytes())
    changed[-1] ^= 0xFF  # same size, same header, one data byte different

    def replace_when_the_merge_starts() -> None:
        deadline = time.monotonic() + 60
        while "mutable-merged.safetensors" not in unfinished_uploads(store, bucket) and time.monotonic() < deadline:
            time.sleep(0.005)
        client.put_object(Bucket=bucket, Key=victim, Body=bytes(changed))

    replacer = threading.Thread(target=replace_when_the_merge_starts, daemon=True)
    replacer.start()
    result = run_cli(
        "merge", f"s3://{bucket}/mutable/", "-o", f"s3://{bucket}/mutable-merged.safetensors", env=s3_env(store)
    )
    replacer.join(timeout=60)

    # Caught by the ETag condition of a copy, or by the check before completion: either way named.
    assert_clean_failure(result, 1, f"s3://{bucket}/{victim}: ")
    assert "changed" in result.stderr and "output discarded" in result.stderr
    assert "mutable-merged.safetensors" not in keys(store, bucket)
    assert unfinished_uploads(store, bucket) == []
    assert not [k for k in keys(store, bucket) if ".shardkit-tmp-" in k]


@pytest.mark.parametrize("output", ["hf://acme/model", "https://example.com/model.safetensors"])
def test_outputs_shardkit_cannot_write_are_refused_before_anything_happens(tiny, output: str) -> None:
    result = run_cli("merge", tiny.folder, "-o", output)
    assert_clean_failure(result, 2, f"{output}: cannot write there; outputs go to a local path or an s3:// URL")


def restart(server: SeaweedS3) -> None:
    """Start weed again on the killed server's data folder (new ports, same objects)."""
    server._launch(find_weed(), server.workdir / "s3.json")  # type: ignore[operator]
    server._wait_until_ready(time.monotonic() + 60)


def test_a_killed_server_leaves_no_object_and_the_next_run_cleans_up(mid, tiny, work: Path) -> None:
    server = SeaweedS3()
    server.start()
    try:
        bucket = server.make_bucket("crash")
        key = "out/model.safetensors"
        watcher = server.client()

        finished = threading.Event()

        def kill_when_parts_arrive() -> None:
            while not finished.is_set():
                uploads = watcher.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
                if uploads and watcher.list_parts(Bucket=bucket, Key=key, UploadId=uploads[0]["UploadId"]).get("Parts"):
                    server.kill()
                    return
                time.sleep(0.01)

        killer = threading.Thread(target=kill_when_parts_arrive, daemon=True)
        killer.start()
        # One attempt per request: retrying against a dead server only makes the test slow.
        crashed = run_cli("merge", mid.folder, "-o", f"s3://{bucket}/{key}", env=s3_env(server, AWS_MAX_ATTEMPTS="1"))
        finished.set()
        killer.join(timeout=60)

        assert_clean_failure(crashed, 1, "cannot reach")
        assert server.secret_key not in crashed.stderr
        restart(server)
        assert keys(server, bucket) == []
        assert unfinished_uploads(server, bucket) == [key]  # the client could not abort: the store was gone

        rerun = run_cli("merge", tiny.folder, "-o", f"s3://{bucket}/{key}", env=s3_env(server))

        assert rerun.exit_code == 0, rerun.stderr
        assert unfinished_uploads(server, bucket) == []
        assert keys(server, bucket) == [key]
    finally:
        server.stop()


@pytest.fixture(scope="module")
def broken(store: SeaweedS3, bucket: str, tiny) -> str:
    """The tiny checkpoint without its second shard."""
    upload_folder(store, tiny.folder, bucket, "broken", skip=("model-00002-of-00004.safetensors",))
    return f"s3://{bucket}/broken/"


@pytest.mark.parametrize(
    "case",
    ["bad credentials", "unknown key", "missing bucket", "missing shard", "missing object", "unreachable endpoint",
     "output exists", "output is the source"],
)
def test_failures_are_one_clear_line(store: SeaweedS3, bucket: str, tiny, broken: str, work: Path, case: str) -> None:
    secret = "s3cr3t-" + uuid.uuid4().hex
    env = s3_env(store)
    output = work / f"failed-{case.replace(' ', '-')}.safetensors"
    source = f"s3://{bucket}/tiny/"
    code, message = 2, ""
    if case == "bad credentials":
        env["AWS_SECRET_ACCESS_KEY"] = secret
        message = f"{source.rstrip('/')}: access denied ("
    elif case == "unknown key":
        env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"] = "AKIAUNKNOWN000000000", secret
        message = "access denied ("
    elif case == "missing bucket":
        source = "s3://no-such-bucket-here/model/"
        message = "s3://no-such-bucket-here/model: bucket no-such-bucket-here does not exist"
    elif case == "missing shard":
        source, message = broken, "shard model-00002-of-00004.safetensors named in weight_map does not exist"
    elif case == "missing object":
        source, message = f"s3://{bucket}/nothing-here.safetensors", "no such file or folder"
    elif case == "unreachable endpoint":
        env["AWS_ENDPOINT_URL"], code, message = "http://127.0.0.1:9", 1, "cannot reach http://127.0.0.1:9"
        env["AWS_MAX_ATTEMPTS"] = "1"  # retrying a refused connection only makes the test slow
    elif case == "output exists":
        output, message = f"s3://{bucket}/broken/config.json", "already exists; pass --force"
    elif case == "output is the source":
        output, message = f"s3://{bucket}/tiny/model-00001-of-00004.safetensors", "output would overwrite the source"

    result = run_cli("merge", source, "-o", output, env=env)

    assert_clean_failure(result, code, message)
    assert secret not in result.stdout + result.stderr
    assert not isinstance(output, Path) or not output.exists()
    assert unfinished_uploads(store, bucket) == []


def test_a_stale_upload_of_the_destination_is_aborted_first(store: SeaweedS3, bucket: str, tiny) -> None:
    client = store.client()
    stale = client.create_multipart_upload(Bucket=bucket, Key="stale/model.safetensors")["UploadId"]
    client.upload_part(Bucket=bucket, Key="stale/model.safetensors", UploadId=stale, PartNumber=1, Body=b"x" * 1000)

    result = run_cli("merge", f"s3://{bucket}/tiny/", "-o", f"s3://{bucket}/stale/model.safetensors", env=s3_env(store))

    assert result.exit_code == 0, result.stderr
    assert unfinished_uploads(store, bucket) == []


# --------------------------------------------------------------------------- http, hf, extras


def test_a_presigned_https_url_is_read_with_ranges_and_never_printed(
    store: SeaweedS3, bucket: str, tiny, work: Path
) -> None:
    # A file that is a whole checkpoint by itself (one shard alone would stand for its
    # whole checkpoint, whose other files a presigned URL does not reach).
    shard = work / "presigned-alone" / "model.safetensors"
    shard.parent.mkdir(exist_ok=True)
    shard.write_bytes((tiny.folder / tiny.shard_files[0]).read_bytes())
    sign = store.client(Config(signature_version="s3v4")).generate_presigned_url
    store.client().upload_file(str(shard), bucket, "presigned-alone/model.safetensors", Config=UPLOAD)
    url = sign("get_object", Params={"Bucket": bucket, "Key": "presigned-alone/model.safetensors"}, ExpiresIn=600)
    signature = url.split("X-Amz-Signature=")[1].split("&")[0]
    one_shard = sign("get_object", Params={"Bucket": bucket, "Key": f"tiny/{tiny.shard_files[0]}"}, ExpiresIn=600)
    import shardkit

    local, remote = work / "shard-local.safetensors", work / "shard-remote.safetensors"
    shardkit.merge(shard, local)

    inspected = run_cli("inspect", url, "--json")
    merged = run_cli("merge", url, "-o", remote)
    expired = run_cli("inspect", url.replace(signature, "0" * len(signature)))
    partial = run_cli("merge", one_shard, "-o", work / "partial.safetensors")

    assert inspected.exit_code == 0, inspected.stderr
    assert json.loads(inspected.stdout)["tensors"] == len(shard_tensors(shard))
    assert merged.exit_code == 0, merged.stderr
    assert remote.read_bytes() == local.read_bytes()
    assert_clean_failure(expired, 2, "access denied (HTTP 403)")
    assert_clean_failure(partial, 2, "is shard 1 of 4, and a web server cannot list its folder")
    assert not (work / "partial.safetensors").exists()
    for result in (inspected, merged, expired, partial):
        assert "X-Amz" not in result.stdout + result.stderr and signature not in result.stdout + result.stderr


def shard_tensors(path: Path) -> list[str]:
    from shardkit.format.header import read_header

    return [t.name for t in read_header(path).tensors]


def fake_hub_cache(root: Path, checkpoint: SyntheticCheckpoint, repo: str, revision: str) -> None:
    """models--org--name/{refs/main, snapshots/<rev>/ → ../../blobs/<sha256>}, as huggingface_hub lays it out."""
    base = root / f"models--{repo.replace('/', '--')}"
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(revision)
    (base / "blobs").mkdir()
    snapshot_dir = base / "snapshots" / revision
    snapshot_dir.mkdir(parents=True)
    for path in sorted(checkpoint.folder.iterdir()):
        digest = file_sha256(path)
        (base / "blobs" / digest).write_bytes(path.read_bytes())
        (snapshot_dir / path.name).symlink_to(Path("../../blobs") / digest)


def test_hf_paths_resolve_to_the_local_cache_snapshot(tiny, work: Path) -> None:
    pytest.importorskip("huggingface_hub")
    cache, revision = work / "hub-cache", "0123456789abcdef0123456789abcdef01234567"
    fake_hub_cache(cache, tiny, "acme/tiny-qwen", revision)
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "HF_HOME": str(work / "hf-home")}
    import shardkit

    local, from_hub = work / "hub-local.safetensors", work / "hub-merged.safetensors"
    shardkit.merge(tiny.folder, local)

    inspected = run_cli("inspect", "hf://acme/tiny-qwen", "--json", env=env)
    merged = run_cli("merge", f"hf://acme/tiny-qwen@{revision}", "-o", from_hub, env=env)
    missing = run_cli("inspect", "hf://acme/not-downloaded", env=env)

    assert inspected.exit_code == 0, inspected.stderr
    assert json.loads(inspected.stdout)["tensors"] == len(tiny.tensors)
    assert merged.exit_code == 0, merged.stderr
    assert from_hub.read_bytes() == local.read_bytes()
    assert_clean_failure(missing, 2, "hf://acme/not-downloaded: not in the local Hugging Face cache")


def test_without_the_s3_extra_an_s3_path_is_one_line(tmp_path: Path) -> None:
    code = (
        "import sys; sys.modules['boto3'] = None; sys.modules['botocore'] = None\n"
        "sys.argv = ['shardkit', 'inspect', 's3://bucket/model/']\n"
        "from shardkit.cli import main; main()\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr == "shardkit: error: s3:// paths needs the optional extra: pip install 'shardkit[s3]'\n"


def test_local_commands_never_import_boto3(checkpoint, tmp_path: Path) -> None:
    code = (
        "import sys\n"
        f"sys.argv = ['shardkit', 'merge', {str(checkpoint.folder)!r}, '-o', {str(tmp_path / 'out')!r}, '-q']\n"
        "from shardkit.cli import main\n"
        "try:\n    main()\nexcept SystemExit as exit:\n    assert exit.code in (0, None), exit.code\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('boto3', 'botocore', 's3fs', 'fsspec')))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def bucket_state(server: SeaweedS3, bucket: str, prefix: str = "") -> dict[str, str]:
    listing = server.client().list_objects_v2(Bucket=bucket, Prefix=prefix)
    return {o["Key"]: o["ETag"] for o in listing.get("Contents", [])}


@pytest.mark.parametrize(("command", "output", "message"), [
    ("merge", "", "output would overwrite the source: it contains s3://{bucket}/tiny"),
    ("split", "tiny/", "output is the source folder s3://{bucket}/tiny; it would overwrite the source"),
    ("merge", "tiny/merged.safetensors", "output lies inside the source folder s3://{bucket}/tiny"),
    ("split", "tiny/resharded/", "output lies inside the source folder s3://{bucket}/tiny"),
])
def test_an_s3_output_never_touches_the_source_folder(
    store: SeaweedS3, bucket: str, tiny, command: str, output: str, message: str
) -> None:
    before = bucket_state(store, bucket)
    result = run_cli(command, f"s3://{bucket}/tiny/", "-o", f"s3://{bucket}/{output}", "--force", env=s3_env(store))
    assert_clean_failure(result, 2, message.format(bucket=bucket))
    assert bucket_state(store, bucket) == before
    assert unfinished_uploads(store, bucket) == []


def test_force_on_an_s3_folder_replaces_only_an_earlier_output(store: SeaweedS3, bucket: str, tiny) -> None:
    env = s3_env(store)
    first = run_cli("split", f"s3://{bucket}/tiny/", "-o", f"s3://{bucket}/mine/", "-s", "300KB", env=env)
    assert first.exit_code == 0, first.stderr
    client = store.client()
    for key in ("mine/optimizer.pt", "mine/.git/HEAD", "mine/checkpoint-500/trainer_state.json"):
        client.put_object(Bucket=bucket, Key=key, Body=b"the user's")
    before = bucket_state(store, bucket)
    result = run_cli("split", f"s3://{bucket}/tiny/", "-o", f"s3://{bucket}/mine/", "-s", "2MB", "--force", env=env)
    assert_clean_failure(result, 2, f"s3://{bucket}/mine: --force replaces only an earlier output")
    assert "the folder also holds .git/, checkpoint-500/, optimizer.pt; move those away" in result.stderr
    assert bucket_state(store, bucket) == before
    for key in ("mine/optimizer.pt", "mine/.git/HEAD", "mine/checkpoint-500/trainer_state.json"):
        client.delete_object(Bucket=bucket, Key=key)
    forced = run_cli("split", f"s3://{bucket}/tiny/", "-o", f"s3://{bucket}/mine/", "-s", "2MB", "--force", env=env)
    assert forced.exit_code == 0, forced.stderr
    assert len([k for k in keys(store, bucket, "mine/") if k.endswith(".safetensors")]) == 2


def test_s3_to_s3_merge_with_a_rename_stays_server_side(store: SeaweedS3, bucket: str, mid, work: Path) -> None:
    import shardkit

    env = s3_env(store)
    rename = (r"model\.(.*)", r"backbone.\1")
    local = work / "mid-renamed.safetensors"
    shardkit.merge(mid.folder, local, rename=[rename])
    merged = run_cli("merge", f"s3://{bucket}/mid/", "-o", f"s3://{bucket}/mid-renamed.safetensors",
                     "--rename", *rename, "--json", env=env)
    assert merged.exit_code == 0, merged.stderr
    assert get_bytes(store, bucket, "mid-renamed.safetensors") == local.read_bytes()
    report = json.loads(merged.stdout)
    transfer = report["transfer"]
    assert transfer["server_side"] and transfer["bytes_sent"] == 5 * MiB  # as for a plain merge
    assert transfer["bytes_copied"] >= local.stat().st_size - 5 * MiB
    assert len(report["renamed"]) == len(mid.tensors) - 1  # all but lm_head.weight


# --------------------------------------------------------------------------- --verify stages


def staged_keys(server: SeaweedS3, bucket: str, prefix: str = "") -> list[str]:
    return [k for k in keys(server, bucket, prefix) if ".shardkit-tmp-" in k]


def run_until_staged(
    server: SeaweedS3, bucket: str, command: list[str], prefix: str, staged: str
) -> subprocess.Popen[str]:
    """Start `command` and SIGSTOP it as soon as an object whose key ends with `staged`
    appears under a staging prefix in `prefix/`: the staged output is complete and
    verification is about to start (or has just started). The caller corrupts,
    interrupts or resumes it."""
    process = subprocess.Popen(
        [sys.executable, "-m", "shardkit", *command], env={**os.environ, **s3_env(server)},
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, preexec_fn=sigint_as_in_a_terminal,
    )
    deadline = time.monotonic() + 120
    while not any(k.endswith(staged) for k in staged_keys(server, bucket, f"{prefix}/")):
        assert process.poll() is None, f"ended before its output was staged: {process.stderr.read()}"  # type: ignore[union-attr]
        assert time.monotonic() < deadline
        time.sleep(0.005)
    process.send_signal(signal.SIGSTOP)
    return process


def forced_verified_run(bucket: str, command: str, prefix: str) -> tuple[list[str], str, str]:
    """A --force --verify run of the mid checkpoint over an earlier output: its
    arguments, its output key and the end of the key its staged output completes with."""
    if command == "merge":
        output, staged, extra = f"{prefix}/model.safetensors", "/model.safetensors", []
    else:
        output, staged, extra = f"{prefix}/sharded", "/model.safetensors.index.json", ["-s", "30MB"]
    args = [command, f"s3://{bucket}/mid/", "-o", f"s3://{bucket}/{output}", "--force", "--verify", *extra]
    return args, output, staged


@pytest.fixture
def earlier(store: SeaweedS3, bucket: str, tiny) -> Iterator[tuple[str, dict[str, str]]]:
    """A merged model and a split folder, each an earlier output a --force run replaces."""
    prefix = f"earlier-{uuid.uuid4().hex[:6]}"
    env = s3_env(store)
    merged = run_cli("merge", f"s3://{bucket}/tiny/", "-o", f"s3://{bucket}/{prefix}/model.safetensors", env=env)
    split = run_cli("split", f"s3://{bucket}/tiny/", "-o", f"s3://{bucket}/{prefix}/sharded/", "-s", "300KB", env=env)
    assert merged.exit_code == 0 and split.exit_code == 0, merged.stderr + split.stderr
    yield prefix, bucket_state(store, bucket, f"{prefix}/")


@pytest.mark.parametrize("command", ["merge", "split"])
def test_force_verify_that_fails_leaves_the_earlier_output_as_it_was(
    store: SeaweedS3, bucket: str, mid, earlier, command: str
) -> None:
    prefix, before = earlier
    args, output, staged = forced_verified_run(bucket, command, prefix)
    process = run_until_staged(store, bucket, args, prefix, staged)
    client = store.client()
    for key in staged_keys(store, bucket, f"{prefix}/"):  # one data byte of every staged weight file flipped
        if key.endswith(".safetensors"):
            data = bytearray(get_bytes(store, bucket, key))
            data[-1] ^= 0xFF
            client.put_object(Bucket=bucket, Key=key, Body=bytes(data))
    process.send_signal(signal.SIGCONT)
    _, stderr = process.communicate(timeout=120)

    assert process.returncode == 1, stderr
    # Caught by the comparison, or by the ETag condition of a read already under way: named either way.
    assert "verification failed, nothing was committed" in stderr or "changed while being read" in stderr, stderr
    assert stderr.count("\n") == 1 and "Traceback" not in stderr
    assert bucket_state(store, bucket, f"{prefix}/") == before  # earlier outputs byte for byte (ETags), nothing added
    assert unfinished_uploads(store, bucket, f"{prefix}/") == []


@pytest.mark.parametrize("command", ["merge", "split"])
def test_ctrl_c_during_a_forced_verification_leaves_the_earlier_output(
    store: SeaweedS3, bucket: str, mid, earlier, command: str
) -> None:
    prefix, before = earlier
    args, output, staged = forced_verified_run(bucket, command, prefix)
    process = run_until_staged(store, bucket, args, prefix, staged)
    process.send_signal(signal.SIGINT)
    process.send_signal(signal.SIGCONT)
    _, stderr = process.communicate(timeout=120)

    assert process.returncode == 130, stderr
    assert stderr == "shardkit: error: interrupted; temporary files removed\n"
    assert bucket_state(store, bucket, f"{prefix}/") == before
    assert staged_keys(store, bucket, f"{prefix}/") == []
    assert unfinished_uploads(store, bucket, f"{prefix}/") == []


@pytest.mark.parametrize("command", ["merge", "split"])
def test_force_verify_replaces_the_earlier_output_through_staging(
    store: SeaweedS3, bucket: str, mid, earlier, work: Path, command: str
) -> None:
    import shardkit

    prefix, before = earlier
    local = work / f"mid-{command}-{uuid.uuid4().hex[:6]}" / ("model.safetensors" if command == "merge" else "")
    args, output, _ = forced_verified_run(bucket, command, prefix)
    if command == "merge":
        local.parent.mkdir()
        shardkit.merge(mid.folder, local)
        expected = {"": local.read_bytes()}
    else:
        shardkit.split(mid.folder, local, max_shard_size="30MB")
        expected = folder_bytes(local)
    result = run_cli(*args, "--json", env=s3_env(store))

    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["verified"] is True
    if command == "merge":
        assert {"": get_bytes(store, bucket, output)} == expected
    else:  # the earlier split's extra shards are gone, the new folder is the local split
        assert remote_folder_bytes(store, bucket, output) == expected
    assert staged_keys(store, bucket, f"{prefix}/") == []
    assert unfinished_uploads(store, bucket, f"{prefix}/") == []
    untouched = {k: v for k, v in before.items() if not k.startswith(output)}
    assert {k: v for k, v in bucket_state(store, bucket, f"{prefix}/").items() if k in untouched} == untouched


@pytest.mark.parametrize("verify", [False, True])
def test_a_writer_that_comes_meanwhile_is_not_replaced_without_force(
    store: SeaweedS3, bucket: str, mid, verify: bool
) -> None:
    prefix = f"race-{uuid.uuid4().hex[:6]}"
    key = f"{prefix}/model.safetensors"
    staged = "/model.safetensors" if verify else None
    command = ["merge", f"s3://{bucket}/mid/", "-o", f"s3://{bucket}/{key}"] + (["--verify"] if verify else [])
    if staged is not None:
        process = run_until_staged(store, bucket, command, prefix, staged)
    else:  # stopped once its upload of the destination has begun
        process = subprocess.Popen(
            [sys.executable, "-m", "shardkit", *command], env={**os.environ, **s3_env(store)},
            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
        )
        deadline = time.monotonic() + 60
        while key not in unfinished_uploads(store, bucket):
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.005)
        process.send_signal(signal.SIGSTOP)
    store.client().put_object(Bucket=bucket, Key=key, Body=b"the other writer's output")
    process.send_signal(signal.SIGCONT)
    _, stderr = process.communicate(timeout=120)

    assert process.returncode == 2, stderr
    assert stderr == f"shardkit: error: s3://{bucket}/{key}: already exists; pass --force to replace it\n"
    assert get_bytes(store, bucket, key) == b"the other writer's output"
    assert staged_keys(store, bucket, f"{prefix}/") == []
    assert unfinished_uploads(store, bucket, f"{prefix}/") == []


def test_a_staged_object_over_the_copy_limit_is_committed_in_part_copies(
    store: SeaweedS3, bucket: str, tiny, mid, work: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shardkit
    from shardkit.engine import execute_s3

    # The 5 GB CopyObject limit and 1 GiB commit parts, scaled down to this 76 MB model.
    monkeypatch.setattr(execute_s3, "COPY_OBJECT_LIMIT", 10 * MiB)
    monkeypatch.setattr(execute_s3, "COMMIT_PART", 5 * MiB)
    prefix = f"big-commit-{uuid.uuid4().hex[:6]}"
    local = work / f"{prefix}.safetensors"
    shardkit.merge(mid.folder, local)
    shardkit.merge(f"s3://{bucket}/tiny/", f"s3://{bucket}/{prefix}/model.safetensors")

    report = shardkit.merge(f"s3://{bucket}/mid/", f"s3://{bucket}/{prefix}/model.safetensors", force=True, verify=True)

    assert report.verified
    assert get_bytes(store, bucket, f"{prefix}/model.safetensors") == local.read_bytes()
    etag = store.client().head_object(Bucket=bucket, Key=f"{prefix}/model.safetensors")["ETag"]
    assert etag.strip('"').endswith(f"-{-(-local.stat().st_size // (5 * MiB))}")  # one part copy per 5 MiB
    assert staged_keys(store, bucket, f"{prefix}/") == []
    assert unfinished_uploads(store, bucket, f"{prefix}/") == []


def test_s3_to_s3_merge_with_a_recipe_stays_server_side(store: SeaweedS3, bucket: str, mid, work: Path) -> None:
    """Fuses (q/k/v), splits and half swaps re-order the bytes but move none through the
    client beyond what a plain merge moves: every output range is still a server-side copy."""
    import shardkit

    layer = "model.layers.{i}"
    rules = [
        {"fuse": [f"{layer}.self_attn.{p}_proj.{{w}}" for p in "qkv"], "to": f"{layer}.self_attn.qkv_proj.{{w}}"},
        {"split": f"{layer}.mlp.gate_proj.weight", "to": [f"{layer}.mlp.gate_proj.{n}.weight" for n in (0, 1)]},
        {"swap": f"{layer}.mlp.up_proj.weight", "to": f"{layer}.mlp.up_proj_swapped.weight"},
        {"rename": f"{layer}.{{p}}.weight", "to": f"{layer}.{{p}}.weight"},
        *({"rename": f"{layer}.{p}.weight", "to": f"{layer}.{p}.weight"}
          for p in ("self_attn.o_proj", "mlp.down_proj")),
        {"rename": "{a}.{b}.weight", "to": "{a}.{b}.weight"},
        {"rename": "lm_head.weight", "to": "lm_head.weight"},
    ]
    recipe = work / "mid-recipe.json"
    recipe.write_text(json.dumps({"rules": rules}))
    env = s3_env(store)
    local = work / "mid-recut.safetensors"
    shardkit.merge(mid.folder, local, recipe=str(recipe))
    runs = {}
    for name, extra in (("plain", []), ("recut", ["--recipe", recipe])):
        result = run_cli("merge", f"s3://{bucket}/mid/", "-o", f"s3://{bucket}/mid-{name}.safetensors", *extra,
                         "--json", env=env)
        assert result.exit_code == 0, result.stderr
        runs[name] = json.loads(result.stdout)["transfer"]
    assert get_bytes(store, bucket, "mid-recut.safetensors") == local.read_bytes()
    assert runs["recut"]["server_side"]
    assert runs["recut"]["bytes_sent"] <= runs["plain"]["bytes_sent"]
    assert runs["recut"]["bytes_received"] <= runs["plain"]["bytes_received"] + 1 * MiB
    assert runs["recut"]["bytes_copied"] >= local.stat().st_size - 5 * MiB


def test_a_forced_folder_run_that_fails_half_way_leaves_the_earlier_output(store: SeaweedS3, bucket: str, mid) -> None:
    """Without staging, --force replaced the earlier split's shards one by one, and the
    failure (a source replaced mid-run) then deleted the new ones: the earlier index
    named shards that were gone."""
    prefix = f"half-way-{uuid.uuid4().hex[:6]}"
    earlier = run_cli("split", f"s3://{bucket}/mid/", "-o", f"s3://{bucket}/{prefix}/sharded/", "-s", "10MB",
                      env=s3_env(store))
    assert earlier.exit_code == 0, earlier.stderr
    before = bucket_state(store, bucket, f"{prefix}/")
    client = store.client()
    source = f"{prefix}-source"
    for name in sorted(p.name for p in mid.folder.iterdir()):
        client.copy_object(Bucket=bucket, Key=f"{source}/{name}", CopySource={"Bucket": bucket, "Key": f"mid/{name}"})
    victim = f"{source}/{mid.shard_files[-1]}"
    changed = bytearray((mid.folder / mid.shard_files[-1]).read_bytes())
    changed[-1] ^= 0xFF

    def replace_once_a_shard_is_written() -> None:  # the first upload under the prefix completed
        deadline = time.monotonic() + 60
        first: list[str] = []
        while time.monotonic() < deadline:
            uploads = unfinished_uploads(store, bucket, f"{prefix}/")
            if first and first[0] not in uploads:
                break
            first = first or uploads
            time.sleep(0.002)
        client.put_object(Bucket=bucket, Key=victim, Body=bytes(changed))

    replacer = threading.Thread(target=replace_once_a_shard_is_written, daemon=True)
    replacer.start()
    result = run_cli("split", f"s3://{bucket}/{source}/", "-o", f"s3://{bucket}/{prefix}/sharded/", "-s", "10MB",
                     "--force", env=s3_env(store))
    replacer.join(timeout=60)

    assert_clean_failure(result, 1, f"s3://{bucket}/{victim}: ")
    assert bucket_state(store, bucket, f"{prefix}/") == before
    assert unfinished_uploads(store, bucket, f"{prefix}/") == []
