"""S3 and S3-compatible object stores, through plain boto3.

Credentials come from the standard AWS chain (environment, `AWS_PROFILE`, ~/.aws,
instance roles); the endpoint from `--endpoint-url`, else `AWS_ENDPOINT_URL_S3` /
`AWS_ENDPOINT_URL`, else AWS. A custom endpoint gets path-style addressing (what
MinIO, SeaweedFS, Ceph and friends expect) and `us-east-1` unless a region is set.

Every call goes through :meth:`S3Store.call`, which counts requests and body bytes
(the traffic a report shows) and turns botocore's exceptions into one-line shardkit
errors that name the object and never carry credentials. Reads of a source are
conditional on the ETag seen when its header was read, so a source replaced during a
run fails the run instead of mixing two versions.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from typing import Any, Literal, overload
from urllib.parse import urlsplit, urlunsplit

from ..errors import (
    BadInputError,
    MissingExtraError,
    OutputExistsError,
    ShardkitError,
    SourceChangedError,
    TransportError,
)
from .location import Traffic
from .remote import RemotePath, RemoteStat

#: Threads (and pooled connections) for parallel ranged GETs, part uploads and copies.
WORKERS = 8

_ACCESS_CODES = {
    "AccessDenied", "403", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch",
    "InvalidToken", "ExpiredToken", "InvalidClientTokenId", "AuthorizationHeaderMalformed",
}
_MISSING_CODES = {"NoSuchKey", "404", "NotFound"}
_CHANGED_CODES = {"PreconditionFailed", "412"}


def display_endpoint(url: str | None) -> str:
    """An endpoint URL without user:password@, for messages."""
    if not url:
        return "AWS S3"
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def _error_code(exc: Exception) -> str | None:
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return None
    return str(response.get("Error", {}).get("Code") or response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))


class S3Store:
    """One endpoint's client and traffic counters; one instance per endpoint per process."""

    _stores: dict[str | None, S3Store] = {}
    _lock = threading.Lock()

    def __init__(self, endpoint_url: str | None) -> None:
        try:
            import boto3
            from botocore.config import Config
        except ImportError:
            raise MissingExtraError("s3:// paths", "s3") from None
        self.endpoint_url = endpoint_url
        custom = endpoint_url is not None
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        config = Config(
            s3={"addressing_style": "path"} if custom else {},
            # The AWS_MAX_ATTEMPTS / AWS_RETRY_MODE of the environment win, as in the AWS CLI.
            retries={
                "max_attempts": int(os.environ.get("AWS_MAX_ATTEMPTS") or 4),
                "mode": os.environ.get("AWS_RETRY_MODE") or "standard",
            },
            max_pool_connections=2 * WORKERS,
            connect_timeout=10,
            # A server-side copy of a multi-GB range answers only when it is done.
            read_timeout=900,
            # No CRC of every uploaded part unless the operation requires one: it costs CPU,
            # and several S3-compatible stores reject the new checksum headers.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        session = boto3.session.Session()
        self.client = session.client(
            "s3", endpoint_url=endpoint_url, region_name=region or ("us-east-1" if custom else None), config=config
        )
        self._counts = [0, 0, 0, 0]
        self._counts_lock = threading.Lock()

    @classmethod
    def for_endpoint(cls, endpoint_url: str | None = None) -> S3Store:
        endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        with cls._lock:
            store = cls._stores.get(endpoint_url)
            if store is None:
                store = cls._stores[endpoint_url] = cls(endpoint_url)
            return store

    @property
    def traffic(self) -> Traffic:
        with self._counts_lock:
            return Traffic(*self._counts)

    def count(self, *, sent: int = 0, received: int = 0, copied: int = 0, requests: int = 0) -> None:
        with self._counts_lock:
            self._counts[0] += requests
            self._counts[1] += sent
            self._counts[2] += received
            self._counts[3] += copied

    @overload
    def call(
        self, operation: str, what: str, *, missing_ok: Literal[False] = False, **kwargs: Any
    ) -> dict[str, Any]: ...

    @overload
    def call(self, operation: str, what: str, *, missing_ok: bool, **kwargs: Any) -> dict[str, Any] | None: ...

    def call(self, operation: str, what: str, *, missing_ok: bool = False, **kwargs: Any) -> dict[str, Any] | None:
        """Run one API call; count it and its upload body; translate its failure. With
        `missing_ok`, a missing object answers None instead of raising."""
        body = kwargs.get("Body")
        self.count(requests=1, sent=len(body) if isinstance(body, (bytes, bytearray, memoryview)) else 0)
        try:
            return getattr(self.client, operation)(**kwargs)
        except Exception as exc:  # noqa: BLE001 - every botocore failure becomes a one-line error
            code = _error_code(exc)
            if missing_ok and code in _MISSING_CODES:
                return None
            if "IfNoneMatch" in kwargs and code in _CHANGED_CODES:  # a no-replace write found an object there
                raise OutputExistsError(what) from None
            raise self.error(exc, what, kwargs.get("Bucket")) from None

    def read_body(self, response: dict[str, Any], what: str) -> bytes:
        try:
            data = response["Body"].read()
        except Exception as exc:  # noqa: BLE001
            raise self.error(exc, what, None) from None
        self.count(received=len(data))
        return data

    def error(self, exc: Exception, what: str, bucket: str | None) -> ShardkitError:
        """A botocore exception as a one-line shardkit error (no credentials, no signature)."""
        from botocore import exceptions as bx

        if isinstance(exc, ShardkitError):
            return exc
        if isinstance(exc, bx.ClientError):
            code = _error_code(exc)
            if code == "NoSuchBucket":
                return BadInputError(f"{what}: bucket {bucket} does not exist" if bucket else f"{what}: no such bucket")
            if code in _MISSING_CODES:
                return BadInputError(f"{what}: no such object")
            if code in _ACCESS_CODES:
                shown = f"HTTP {code}" if code.isdigit() else code  # a HEAD answer has no error body
                return BadInputError(
                    f"{what}: access denied ({shown}); check the credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
                    f"AWS_PROFILE or ~/.aws) and the endpoint ({display_endpoint(self.endpoint_url)})"
                )
            if code in _CHANGED_CODES:
                return SourceChangedError(
                    f"{what}: changed while being read (its ETag no longer matches); output discarded"
                )
            return TransportError(f"{what}: the store refused the request ({code})")
        if isinstance(exc, (bx.NoCredentialsError, bx.PartialCredentialsError)):
            return BadInputError(
                f"{what}: no AWS credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                "or AWS_PROFILE, or write ~/.aws/credentials"
            )
        if isinstance(exc, (bx.EndpointConnectionError, bx.ConnectionError, bx.HTTPClientError)):
            return TransportError(f"{what}: cannot reach {display_endpoint(self.endpoint_url)} ({type(exc).__name__})")
        if isinstance(exc, bx.BotoCoreError):
            return TransportError(f"{what}: {type(exc).__name__}")
        if isinstance(exc, OSError):
            return TransportError(f"{what}: {exc.strerror or type(exc).__name__}")
        raise exc


class S3Path(RemotePath):
    """`s3://bucket/key`: an object, or a folder (every key under `key/`)."""

    def __init__(self, store: S3Store, bucket: str, key: str, stat: RemoteStat | None = None) -> None:
        self.store = store
        self.bucket = bucket
        self.key = key.strip("/")
        self.url = f"s3://{bucket}/{self.key}" if self.key else f"s3://{bucket}"
        self._stat: RemoteStat | None | Literal[False] = stat if stat is not None else False  # False: not asked yet
        self._listing: list[RemotePath] | None = None

    @classmethod
    def parse(cls, url: str, *, endpoint_url: str | None = None) -> S3Path:
        bucket, _, key = url[len("s3://") :].partition("/")
        if not bucket:
            raise BadInputError(f"{url}: an S3 path is s3://bucket/key")
        return cls(S3Store.for_endpoint(endpoint_url), bucket, key)

    @property
    def store_key(self) -> object:
        return self.store.endpoint_url

    def _child(self, name: str) -> S3Path:
        return S3Path(self.store, self.bucket, f"{self.key}/{name}" if self.key else name)

    def _parent(self) -> S3Path:
        return S3Path(self.store, self.bucket, self.key.rpartition("/")[0])

    @property
    def name(self) -> str:
        return self.key.rsplit("/", 1)[-1] if self.key else self.bucket

    def call(self, operation: str, **kwargs: Any) -> dict[str, Any]:
        return self.store.call(operation, self.url, Bucket=self.bucket, **kwargs)

    # ------------------------------------------------------------------ what is there

    def file_stat(self) -> RemoteStat | None:
        if self._stat is False:
            self._stat = self._head()
        return self._stat

    def _head(self) -> RemoteStat | None:
        if not self.key:
            return None
        response = self.store.call("head_object", self.url, missing_ok=True, Bucket=self.bucket, Key=self.key)
        return RemoteStat(response["ContentLength"], response.get("ETag")) if response is not None else None

    def learn(self, stat: RemoteStat) -> None:
        self._stat = stat

    def forget(self) -> None:
        self._stat = False
        self._listing = None

    def is_dir(self) -> bool:
        prefix = f"{self.key}/" if self.key else ""
        response = self.call("list_objects_v2", Prefix=prefix, MaxKeys=1)
        return response.get("KeyCount", 0) > 0

    def _objects(self, delimiter: bool) -> Iterator[dict[str, Any]]:
        return self.objects(f"{self.key}/" if self.key else "", delimiter=delimiter)

    def objects(self, prefix: str, *, delimiter: bool = False) -> Iterator[dict[str, Any]]:
        """Listing entries (Key, Size, ETag) of the bucket's keys starting with `prefix`."""
        token: str | None = None
        while True:
            extra: dict[str, Any] = {"Delimiter": "/"} if delimiter else {}
            if token:
                extra["ContinuationToken"] = token
            response = self.call("list_objects_v2", Prefix=prefix, **extra)
            yield from response.get("Contents", [])
            token = response.get("NextContinuationToken")
            if not response.get("IsTruncated") or not token:
                return

    def _entry(self, item: dict[str, Any]) -> S3Path:
        return S3Path(self.store, self.bucket, item["Key"], RemoteStat(item["Size"], item.get("ETag")))

    def _list(self) -> list[RemotePath]:
        if self._listing is None:
            self._listing = [self._entry(o) for o in self._objects(delimiter=True) if not o["Key"].endswith("/")]
        return self._listing

    def walk_files(self) -> Iterator[tuple[RemotePath, str]]:
        prefix = f"{self.key}/" if self.key else ""
        for item in self._objects(delimiter=False):
            relative = item["Key"][len(prefix) :]
            if relative and not relative.endswith("/") and not any(p.startswith(".") for p in relative.split("/")):
                yield self._entry(item), relative

    def keys_under(self) -> list[str]:
        """Every key under this folder, hidden ones included (for replacing a folder)."""
        return [item["Key"] for item in self._objects(delimiter=False)]

    # ------------------------------------------------------------------ bytes

    def read_bytes(self) -> bytes:
        response = self.call("get_object", Key=self.key)
        return self.store.read_body(response, self.url)

    def open_reader(self) -> S3Reader:
        return S3Reader(self)


class S3Reader:
    """Ranged GETs of one object, each conditional on the ETag first seen."""

    def __init__(self, path: S3Path) -> None:
        self.path = path
        stat = path._stat
        self.version: str | None = stat.version if isinstance(stat, RemoteStat) else None

    def stat(self) -> RemoteStat:
        return self.path.stat()

    def read_prefix(self, length: int) -> bytes:
        """Up to `length` leading bytes; learns the object's size and ETag from the same answer."""
        try:
            response = self.path.call("get_object", Key=self.path.key, Range=f"bytes=0-{length - 1}")
        except TransportError as exc:
            if "(InvalidRange)" not in str(exc):
                raise
            return b""  # an empty object: the size check of the header reader says so
        data = self.path.store.read_body(response, self.path.url)
        total = int(response.get("ContentRange", "").rpartition("/")[2] or response["ContentLength"])
        self.version = response.get("ETag")
        self.path.learn(RemoteStat(total, self.version))
        return data

    def read(self, offset: int, length: int) -> bytes:
        if length == 0:
            return b""
        extra = {"IfMatch": self.version} if self.version else {}
        span = f"bytes={offset}-{offset + length - 1}"
        response = self.path.call("get_object", Key=self.path.key, Range=span, **extra)
        data = self.path.store.read_body(response, self.path.url)
        if len(data) != length:
            raise TransportError(f"{self.path}: got {len(data)} of {length} bytes at offset {offset} (object shrank?)")
        return data

    def close(self) -> None:
        pass
