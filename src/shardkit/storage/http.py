"""`http(s)://` sources: a single file or an index, read with Range requests.

A web server cannot list a folder, so a URL must name a `.safetensors` file or an
index `.json` (whose shards are fetched from beside it). Sizes come from a one-byte
ranged GET rather than HEAD, because a presigned S3 URL is signed for GET only.
The display form drops `user:password@`, the query (where presigned URLs carry their
signature) and the fragment: that is the only form that reaches messages and reports.
"""

from __future__ import annotations

import base64
import http.client
import threading
from collections.abc import Iterator
from urllib.parse import unquote, urljoin, urlsplit, urlunsplit

from ..errors import BadInputError, SourceChangedError
from . import TransportError
from .remote import RemotePath, RemoteStat

_REDIRECTS = (301, 302, 303, 307, 308)
_TIMEOUT = 60


def display_url(url: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


class HttpPath(RemotePath):
    def __init__(self, url: str, *, derived: bool = False) -> None:
        self._url = url  # may carry a signature or a password: never shown
        self.url = display_url(url)
        self._stat: RemoteStat | None | bool = False
        # A neighbour of the URL given (an index's shard, a config.json): a presigned
        # URL's signature does not cover it, so "access denied" there means "not there".
        self.derived = derived

    @property
    def store_key(self) -> object:
        return "http"

    def _child(self, name: str) -> HttpPath:
        parts = urlsplit(self._url)
        return HttpPath(
            urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/") + "/" + name, "", "")), derived=True
        )

    def _parent(self) -> HttpPath:
        parts = urlsplit(self._url)
        return HttpPath(
            urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/").rpartition("/")[0], "", "")), derived=True
        )

    @property
    def name(self) -> str:
        return unquote(super().name)

    def file_stat(self) -> RemoteStat | None:
        if self._stat is False:
            reader = HttpReader(self)
            try:
                reader.read_prefix(1)
                self._stat = reader.stat()
            except BadInputError as exc:
                absent = ("(HTTP 404)", "(HTTP 410)") + (("(HTTP 401)", "(HTTP 403)") if self.derived else ())
                if not str(exc).endswith(absent):
                    raise
                self._stat = None
        return self._stat  # type: ignore[return-value]

    def forget(self) -> None:
        self._stat = False

    def is_dir(self) -> bool:
        return False

    def _list(self) -> list[RemotePath]:
        raise BadInputError(
            f"{self}: a web server cannot list a folder; pass the URL of the .safetensors file or of the index .json"
        )

    def walk_files(self) -> Iterator[tuple[RemotePath, str]]:
        return iter(())  # companion files of a web checkpoint are unknown: none are copied

    def read_bytes(self) -> bytes:
        status, _, body = HttpReader(self).request({})
        return body

    def open_reader(self) -> HttpReader:
        return HttpReader(self)


class HttpReader:
    """Range requests over one keep-alive connection per thread; redirects are followed
    once and the final URL reused, so a CDN redirect is not paid per request."""

    def __init__(self, path: HttpPath) -> None:
        self.path = path
        self.target = path._url
        known = path._stat if isinstance(path._stat, RemoteStat) else None
        # Reads stay conditional on the version seen when the header was read.
        self.version: str | None = known.version if known else None
        self.size: int | None = known.st_size if known else None
        self._local = threading.local()

    def stat(self) -> RemoteStat:
        if self.size is None:
            self.read_prefix(1)
        assert self.size is not None
        return RemoteStat(self.size, self.version)

    def read_prefix(self, length: int) -> bytes:
        status, response, body = self.request({"Range": f"bytes=0-{length - 1}"}, limit=length)
        if status == 416:  # an empty file
            self.size = 0
            return b""
        if status == 206:
            self.size = int(response.getheader("Content-Range", "").rpartition("/")[2])
        else:  # the server ignores Range: it said how long the file is, we read no more
            self.size = int(response.getheader("Content-Length") or len(body))
        self.version = response.getheader("ETag")
        self.path._stat = RemoteStat(self.size, self.version)
        return body

    def read(self, offset: int, length: int) -> bytes:
        if length == 0:
            return b""
        headers = {"Range": f"bytes={offset}-{offset + length - 1}"}
        if self.version and not self.version.startswith("W/"):  # If-Match compares strong ETags only
            headers["If-Match"] = self.version
        status, _, body = self.request(headers)
        if status == 412:
            raise SourceChangedError(f"{self.path}: changed while being read (its ETag no longer matches)")
        if status != 206:
            raise TransportError(f"{self.path}: the server does not answer Range requests (HTTP {status})")
        if len(body) != length:
            raise TransportError(f"{self.path}: got {len(body)} of {length} bytes at offset {offset}")
        return body

    def close(self) -> None:
        connection = getattr(self._local, "connection", None)
        if connection is not None:
            connection[1].close()

    def request(
        self, headers: dict[str, str], limit: int | None = None
    ) -> tuple[int, http.client.HTTPResponse, bytes]:
        """GET with `headers`, following redirects; with `limit`, a full (200) answer is
        cut after that many bytes and its connection dropped."""
        url = self.target
        for _ in range(len(_REDIRECTS) + 2):
            status, response, body = self._send(url, headers, limit)
            if status in _REDIRECTS and response.getheader("Location"):
                url = urljoin(url, response.getheader("Location"))
                continue
            if status in (401, 403, 404, 410):
                reason = "not found" if status in (404, 410) else "access denied"
                raise BadInputError(f"{self.path}: {reason} (HTTP {status})")
            if status >= 400 and status not in (412, 416):
                raise TransportError(f"{self.path}: the server answered HTTP {status}")
            self.target = url
            return status, response, body
        raise TransportError(f"{self.path}: too many redirects")

    def _send(
        self, url: str, headers: dict[str, str], limit: int | None
    ) -> tuple[int, http.client.HTTPResponse, bytes]:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise BadInputError(f"{self.path}: not an http(s) URL")
        headers = dict(headers)
        if parts.username is not None:
            token = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
            headers["Authorization"] = "Basic " + base64.b64encode(token).decode()
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        for attempt in (1, 2):  # a kept-alive connection the server closed gets one retry
            connection = self._connection(parts.scheme, parts.hostname, parts.port)
            try:
                connection.request("GET", target, headers=headers)
                response = connection.getresponse()
                if limit is not None and response.status == 200:
                    body = response.read(limit)
                    self._local.connection = None
                    connection.close()
                else:
                    body = response.read()
            except (OSError, http.client.HTTPException) as exc:
                self._local.connection = None
                connection.close()
                if attempt == 2:
                    reason = getattr(exc, "strerror", None) or type(exc).__name__
                    raise TransportError(f"{self.path}: cannot reach {parts.hostname} ({reason})") from None
                continue
            return response.status, response, body
        raise AssertionError("unreachable")

    def _connection(self, scheme: str, host: str, port: int | None) -> http.client.HTTPConnection:
        key = (scheme, host, port)
        cached = getattr(self._local, "connection", None)
        if cached is not None and cached[0] == key:
            return cached[1]
        if cached is not None:
            cached[1].close()
        kind = http.client.HTTPSConnection if scheme == "https" else http.client.HTTPConnection
        connection = kind(host, port, timeout=_TIMEOUT)
        self._local.connection = (key, connection)
        return connection
