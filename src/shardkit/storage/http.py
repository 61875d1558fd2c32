"""`http(s)://` sources: a single file or an index, read with Range requests.

A web server cannot list a folder, so a URL must name a `.safetensors` file or an
index `.json` (whose shards are fetched from beside it). Sizes come from a ranged GET
rather than HEAD, because a presigned S3 URL is signed for GET only.

No answer is trusted as given. The first answer to reach a file fixes its size and
validators (ETag, Last-Modified); every later ranged answer must be a 206 whose
`Content-Range` is exactly the range asked for, of that same total size, with a body
of that length and the same validators. Reads are conditional (`If-Match` on a strong
ETag, else `If-Range` on Last-Modified), so a file replaced mid-run fails the run
instead of mixing two versions; a server that ignores Range (200 with the whole file)
or answers another range than asked is refused rather than copied from.

The display form drops `user:password@`, the query (where presigned URLs carry their
signature) and the fragment: that is the only form that reaches messages and reports.
"""

from __future__ import annotations

import base64
import http.client
import re
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Literal
from urllib.parse import SplitResult, quote, unquote, urljoin, urlsplit, urlunsplit

from ..errors import BadInputError, SourceChangedError, TransportError
from .remote import RemotePath, RemoteStat

_REDIRECTS = (301, 302, 303, 307, 308)
_TIMEOUT = 60
_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+)\s*$")
_UNSATISFIED_RANGE = re.compile(r"^\s*bytes\s+\*/(\d+)\s*$")


def display_url(url: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname or ""
    if port_of(parts, url):
        host += f":{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def port_of(parts: SplitResult, url: str) -> int | None:
    """The URL's port; a one-line error, not urllib's ValueError, for `host:80x` or
    `host:99999` (typed by a user, or sent by a server in a redirect)."""
    try:
        return parts.port
    except ValueError:
        shown = urlunsplit((parts.scheme, parts.hostname or "", parts.path, "", ""))
        raise BadInputError(f"{shown}: the port in {parts.netloc.rpartition('@')[2]!r} is not a number from 0 "
                            "to 65535") from None


@dataclass(frozen=True)
class Seen:
    """What the first answer said about a file: the reference for every later answer."""

    size: int
    etag: str | None
    last_modified: str | None

    @property
    def version(self) -> str | None:
        """The version tag a `Header.stat` records (ETag, else Last-Modified)."""
        if self.etag:
            return self.etag
        return f"Last-Modified: {self.last_modified}" if self.last_modified else None

    def conditions(self) -> dict[str, str]:
        """Request headers that make the server refuse to answer from another version.
        If-Match compares strong ETags only; If-Range takes a date as well."""
        if self.etag and not self.etag.startswith("W/"):
            return {"If-Match": self.etag}
        if self.last_modified:
            return {"If-Range": self.last_modified}
        return {}

    def differs(self, response: http.client.HTTPResponse) -> str | None:
        """Which validator of `response` contradicts this one, as a message part, or None."""
        etag, modified = response.getheader("ETag"), response.getheader("Last-Modified")
        if self.etag and etag and etag != self.etag:
            return f"its ETag is now {etag}, was {self.etag}"
        if self.last_modified and modified and modified != self.last_modified:
            return f"its Last-Modified is now {modified}, was {self.last_modified}"
        return None


class HttpPath(RemotePath):
    """A web URL. `headers` go with every request to the URL's own host (an access
    token, say) and are dropped on a redirect elsewhere; `label` replaces the URL in
    messages (`hf://…` for a Hub file)."""

    def __init__(
        self, url: str, *, derived: bool = False, headers: Mapping[str, str] | None = None, label: str | None = None
    ) -> None:
        self._url = url  # may carry a signature or a password: never shown
        self.url = label or display_url(url)
        self.headers = dict(headers or {})
        self._stat: RemoteStat | None | Literal[False] = False
        self._seen: Seen | None = None
        self._seen_lock = threading.Lock()
        # A neighbour of the URL given (an index's shard, a config.json): a presigned
        # URL's signature does not cover it, so "access denied" there means "not there".
        self.derived = derived

    @property
    def store_key(self) -> object:
        return "http"

    def _sibling(self, path: str) -> HttpPath:
        parts = urlsplit(self._url)
        return HttpPath(urlunsplit((parts.scheme, parts.netloc, path, "", "")), derived=True, headers=self.headers)

    def _child(self, name: str) -> HttpPath:
        # An index names files, not URL paths: a space, `#` or `?` in a shard name is quoted.
        return self._sibling(urlsplit(self._url).path.rstrip("/") + "/" + quote(name, safe=""))

    def _parent(self) -> HttpPath:
        return self._sibling(urlsplit(self._url).path.rstrip("/").rpartition("/")[0])

    @property
    def name(self) -> str:
        return unquote(super().name)

    def file_stat(self) -> RemoteStat | None:
        if self._stat is False:
            reader = HttpReader(self)
            try:
                self._stat = reader.stat()
            except BadInputError as exc:
                absent = ("(HTTP 404)", "(HTTP 410)") + (("(HTTP 401)", "(HTTP 403)") if self.derived else ())
                if not str(exc).endswith(absent):
                    raise
                self._stat = None
        return self._stat

    def learn(self, seen: Seen) -> Seen:
        """Record the first answer's size and validators; later answers are compared with
        them. Returns the reference in force."""
        with self._seen_lock:
            if self._seen is None:
                self._seen = seen
                self._stat = RemoteStat(seen.size, seen.version)
            return self._seen

    def forget(self) -> None:
        with self._seen_lock:
            self._stat = False
            self._seen = None

    def is_dir(self) -> bool:
        return False

    def _list(self) -> list[RemotePath]:
        # A web server cannot list a folder: only files named outright (the URL given,
        # the shards its index names) are known, so the checks that need a listing (a
        # stray weight file beside the index) have nothing to look at. A folder URL never
        # gets here: it is not a file, so discovery says there is no such file.
        return []

    def walk_files(self) -> Iterator[tuple[RemotePath, str]]:
        return iter(())  # companion files of a web checkpoint are unknown: none are copied

    def read_bytes(self) -> bytes:
        status, _, body = HttpReader(self).request({})
        if status != 200:
            raise TransportError(f"{self}: the server answered a plain GET with HTTP {status}, not 200")
        return body

    def open_reader(self) -> HttpReader:
        return HttpReader(self)


class HttpReader:
    """Range requests over one keep-alive connection per thread; redirects are followed
    once and the final URL reused, so a CDN redirect is not paid per request."""

    def __init__(self, path: HttpPath) -> None:
        self.path = path
        self.target = path._url
        self._local = threading.local()

    def stat(self) -> RemoteStat:
        if self.path._seen is None:
            self.read_prefix(1)
        seen = self.path._seen
        assert seen is not None
        return RemoteStat(seen.size, seen.version)

    def read_prefix(self, length: int) -> bytes:
        """Up to `length` leading bytes; learns (or checks) the file's size and validators."""
        asked = f"bytes=0-{length - 1}"
        status, response, body = self.request({"Range": asked}, limit=length)
        if status == 416:  # nothing to give: an empty file, if the server says so
            total = _UNSATISFIED_RANGE.match(response.getheader("Content-Range") or "bytes */0")
            if total is None or int(total.group(1)) != 0:
                raise self._refused(asked, f"HTTP 416 with Content-Range: {response.getheader('Content-Range')}")
            size = 0
        elif status == 206:
            start, end, size = self._content_range(response, asked)
            if start != 0 or end != min(length, size) - 1:
                raise self._refused(asked, f"Content-Range: {response.getheader('Content-Range')}")
        elif status == 200:  # the whole file from its first byte: its start is the prefix asked for
            declared = response.getheader("Content-Length")
            if declared is None or not declared.strip().isdigit():
                raise self._refused(asked, "HTTP 200 without Content-Length, so its size is unknown")
            size = int(declared)
        else:
            raise self._refused(asked, f"HTTP {status}")
        self._check_seen(Seen(size, response.getheader("ETag"), response.getheader("Last-Modified")))
        if len(body) != min(length, size):
            raise TransportError(f"{self.path}: got {len(body)} of {min(length, size)} bytes at offset 0")
        return body

    def read(self, offset: int, length: int) -> bytes:
        if length == 0:
            return b""
        seen = self.path._seen
        if seen is None:
            self.stat()
            seen = self.path._seen
            assert seen is not None
        asked = f"bytes={offset}-{offset + length - 1}"
        status, response, body = self.request({"Range": asked, **seen.conditions()})
        changed = seen.differs(response)  # e.g. the whole new file, sent because If-Range failed
        if status == 412 or changed:
            reason = changed or "it no longer matches the version first read"
            raise SourceChangedError(f"{self.path}: changed while being read ({reason}); output discarded")
        if status != 206:
            answer = "HTTP 200 and the whole file" if status == 200 else f"HTTP {status}"
            raise self._refused(asked, f"{answer} instead of 206 Partial Content")
        start, end, total = self._content_range(response, asked)
        if total != seen.size:
            raise SourceChangedError(
                f"{self.path}: changed while being read (its size is now {total}, was {seen.size}); output discarded"
            )
        if (start, end) != (offset, offset + length - 1):
            raise self._refused(asked, f"Content-Range: {response.getheader('Content-Range')}")
        if len(body) != length:
            raise TransportError(f"{self.path}: got {len(body)} of {length} bytes at offset {offset}")
        return body

    def _check_seen(self, seen: Seen) -> None:
        reference = self.path.learn(seen)
        if reference.size != seen.size:
            raise SourceChangedError(
                f"{self.path}: changed while being read (its size is now {seen.size}, was {reference.size}); "
                "output discarded"
            )
        if reference.etag and seen.etag and reference.etag != seen.etag:
            raise SourceChangedError(
                f"{self.path}: changed while being read (its ETag is now {seen.etag}, was {reference.etag}); "
                "output discarded"
            )

    def _content_range(self, response: http.client.HTTPResponse, asked: str) -> tuple[int, int, int]:
        header = response.getheader("Content-Range") or ""
        found = _CONTENT_RANGE.match(header)
        if found is None:
            raise self._refused(asked, f"206 with Content-Range: {header or '(none)'}")
        start, end, total = (int(g) for g in found.groups())
        if end < start or end >= total:
            raise self._refused(asked, f"Content-Range: {header}")
        return start, end, total

    def _refused(self, asked: str, answer: str) -> TransportError:
        return TransportError(
            f"{self.path}: asked for {asked}, the server answered {answer}; its bytes are not used"
        )

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
        origin = urlsplit(self.path._url)
        # The path's own headers (an access token) go to its own host only, never to the
        # CDN a redirect leads to (as huggingface_hub and requests do).
        own = self.path.headers if (parts.scheme, parts.netloc) == (origin.scheme, origin.netloc) else {}
        # identity: a compressed answer has no byte ranges of the file.
        headers = {**own, "Accept-Encoding": "identity", **headers}
        if parts.username is not None:
            token = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
            headers["Authorization"] = "Basic " + base64.b64encode(token).decode()
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        for attempt in (1, 2):  # a kept-alive connection the server closed gets one retry
            connection = self._connection(parts.scheme, parts.hostname, port_of(parts, url))
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
                    if isinstance(exc, http.client.IncompleteRead):
                        got, missing = len(exc.partial), exc.expected or 0
                        raise TransportError(
                            f"{self.path}: the answer was cut short ({got} of {got + missing} bytes)"
                        ) from None
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
