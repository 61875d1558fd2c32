"""Proof that the SeaweedFS test server does the S3 calls shardkit relies on.

Every check compares bytes, so a server that answers 200 with the wrong
content fails here rather than in a shardkit test that is harder to read.
"""

from __future__ import annotations

import os
import random
import uuid

import boto3
import botocore
import botocore.exceptions
import pytest
from botocore.config import Config

from s3_server import PATH_STYLE, REGION, SeaweedS3, SeaweedStartError

pytestmark = pytest.mark.s3

MiB = 1024 * 1024
REJECTED_CREDENTIAL_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"}


@pytest.fixture
def s3(s3_server: SeaweedS3) -> SeaweedS3:
    """The session's server (conftest.s3_server): starting weed takes ~4 s."""
    return s3_server


@pytest.fixture
def bucket(s3: SeaweedS3) -> str:
    """A fresh bucket per test, so no test sees another's objects or uploads."""
    return s3.make_bucket(f"test-{uuid.uuid4().hex[:12]}")


def random_bytes(size: int, seed: int) -> bytes:
    """Reproducible incompressible data: a failure shows the same bytes on rerun."""
    return random.Random(seed).randbytes(size)


def assert_same_bytes(got: bytes, expected: bytes) -> None:
    """Compare large payloads with a short message instead of a megabyte repr."""
    assert len(got) == len(expected), f"length {len(got)} != expected {len(expected)}"
    if got != expected:
        first = next(i for i, (a, b) in enumerate(zip(got, expected)) if a != b)
        pytest.fail(f"bytes differ from offset {first} on")


def error_code(excinfo: pytest.ExceptionInfo[botocore.exceptions.ClientError]) -> str:
    return excinfo.value.response["Error"]["Code"]


def test_put_get_and_ranged_get(s3: SeaweedS3, bucket: str) -> None:
    client = s3.client()
    data = random_bytes(1000, seed=1)
    client.put_object(Bucket=bucket, Key="blob", Body=data)

    assert client.get_object(Bucket=bucket, Key="blob")["Body"].read() == data

    ranged = client.get_object(Bucket=bucket, Key="blob", Range="bytes=10-19")
    assert ranged["ResponseMetadata"]["HTTPStatusCode"] == 206
    assert ranged["ContentRange"] == "bytes 10-19/1000"
    assert ranged["Body"].read() == data[10:20]


def test_multipart_upload_with_ranged_part_copy(s3: SeaweedS3, bucket: str) -> None:
    client = s3.client()
    source = random_bytes(3 * MiB, seed=2)
    client.put_object(Bucket=bucket, Key="source", Body=source)
    first_part = random_bytes(5 * MiB, seed=3)
    # Deliberately not aligned to SeaweedFS's 4 MiB chunks or to any power of two.
    copy_start, copy_end = 1_000_003, 2_750_000  # inclusive, as in HTTP ranges

    upload_id = client.create_multipart_upload(Bucket=bucket, Key="joined")["UploadId"]
    uploaded = client.upload_part(Bucket=bucket, Key="joined", UploadId=upload_id, PartNumber=1, Body=first_part)
    copied = client.upload_part_copy(
        Bucket=bucket,
        Key="joined",
        UploadId=upload_id,
        PartNumber=2,
        CopySource={"Bucket": bucket, "Key": "source"},
        CopySourceRange=f"bytes={copy_start}-{copy_end}",
    )
    client.complete_multipart_upload(
        Bucket=bucket,
        Key="joined",
        UploadId=upload_id,
        MultipartUpload={
            "Parts": [
                {"PartNumber": 1, "ETag": uploaded["ETag"]},
                {"PartNumber": 2, "ETag": copied["CopyPartResult"]["ETag"]},
            ]
        },
    )

    expected = first_part + source[copy_start : copy_end + 1]
    joined = client.get_object(Bucket=bucket, Key="joined")
    assert joined["ContentLength"] == len(expected)
    assert_same_bytes(joined["Body"].read(), expected)


def test_non_final_part_under_5_mib_is_refused(s3: SeaweedS3, bucket: str) -> None:
    """Like AWS, and unlike some mocks, the 5 MiB minimum part size is enforced."""
    client = s3.client()
    upload_id = client.create_multipart_upload(Bucket=bucket, Key="small")["UploadId"]
    parts = []
    for number, body in ((1, random_bytes(MiB, seed=4)), (2, b"tail")):
        etag = client.upload_part(Bucket=bucket, Key="small", UploadId=upload_id, PartNumber=number, Body=body)["ETag"]
        parts.append({"PartNumber": number, "ETag": etag})

    with pytest.raises(botocore.exceptions.ClientError) as excinfo:
        client.complete_multipart_upload(
            Bucket=bucket, Key="small", UploadId=upload_id, MultipartUpload={"Parts": parts}
        )
    assert error_code(excinfo) == "EntityTooSmall"


def test_abort_multipart_upload_leaves_nothing(s3: SeaweedS3, bucket: str) -> None:
    client = s3.client()
    upload_id = client.create_multipart_upload(Bucket=bucket, Key="aborted")["UploadId"]
    client.upload_part(Bucket=bucket, Key="aborted", UploadId=upload_id, PartNumber=1, Body=b"x" * 1000)
    listed = client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    assert [u["UploadId"] for u in listed] == [upload_id]

    client.abort_multipart_upload(Bucket=bucket, Key="aborted", UploadId=upload_id)

    assert client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    assert client.list_objects_v2(Bucket=bucket)["KeyCount"] == 0
    with pytest.raises(botocore.exceptions.ClientError) as excinfo:
        client.head_object(Bucket=bucket, Key="aborted")
    assert excinfo.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404


@pytest.mark.parametrize("credentials", ["wrong-secret", "unknown-key", "anonymous"])
def test_bad_credentials_are_rejected(s3: SeaweedS3, bucket: str, credentials: str) -> None:
    s3.client().put_object(Bucket=bucket, Key="private", Body=b"private bytes")
    config = PATH_STYLE.merge(Config(retries={"max_attempts": 1}))
    key, secret = s3.access_key, s3.secret_key
    if credentials == "wrong-secret":
        secret = "not-" + secret
    elif credentials == "unknown-key":
        key = "AKIAUNKNOWNKEY000000"
    else:
        config = config.merge(Config(signature_version=botocore.UNSIGNED))
    intruder = boto3.client(
        "s3",
        endpoint_url=s3.endpoint_url,
        aws_access_key_id=key,
        aws_secret_access_key=secret,
        region_name=REGION,
        config=config,
    )

    with pytest.raises(botocore.exceptions.ClientError) as read_error:
        intruder.get_object(Bucket=bucket, Key="private")
    with pytest.raises(botocore.exceptions.ClientError) as write_error:
        intruder.put_object(Bucket=bucket, Key="planted", Body=b"planted bytes")

    assert error_code(read_error) in REJECTED_CREDENTIAL_CODES
    assert error_code(write_error) in REJECTED_CREDENTIAL_CODES
    assert [o["Key"] for o in s3.client().list_objects_v2(Bucket=bucket)["Contents"]] == ["private"]


def test_kill_ends_the_server_and_stop_cleans_up() -> None:
    server = SeaweedS3()
    server.start()
    try:
        client = server.client(Config(retries={"max_attempts": 1}, connect_timeout=1))
        bucket = server.make_bucket("doomed")
        upload_id = client.create_multipart_upload(Bucket=bucket, Key="k")["UploadId"]
        pid, workdir, sockets = server.pid, server.workdir, server.grpc_socket_paths
        assert pid is not None and workdir is not None and all(p.exists() for p in sockets)

        server.kill()

        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
        with pytest.raises(botocore.exceptions.EndpointConnectionError):
            client.upload_part(Bucket=bucket, Key="k", UploadId=upload_id, PartNumber=1, Body=b"lost")
        assert workdir.exists(), "kill() keeps the data dir until stop()"
        assert not any(p.exists() for p in sockets)
    finally:
        server.stop()
    assert not workdir.exists()


def test_start_timeout_raises_with_log_tail_and_cleans_up() -> None:
    # weed needs ~3.5 s to elect its master and join the components, so each of these
    # times out; on a loaded machine it may not have logged anything after the first,
    # hence the longer ones: the tail must show weed's own words once it has any.
    tails = []
    for timeout in (1.5, 2.0, 2.5):
        server = SeaweedS3(start_timeout=timeout)
        with pytest.raises(SeaweedStartError, match="not ready after") as excinfo:
            server.start()
        assert server.process is None and server.workdir is None
        tails.append(str(excinfo.value).split("end of weed's log:\n", 1)[1])
        if tails[-1].strip():
            break
    assert "127.0.0.1" in tails[-1], tails
