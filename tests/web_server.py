"""Real HTTP servers on 127.0.0.1 for the remote tests: a web server with ranged GETs
and validators that lies on demand, and a fake Hugging Face Hub built on it.

`WebServer` serves byte strings under URL paths with `Range`, `ETag`, `Last-Modified`,
`If-Match` and `If-Range` as RFC 9110 says, counts the body bytes it sends per path,
and with `fault` set misbehaves on every ranged GET that does not start at byte 0 (so
headers read fine and the tensor data is what goes wrong):

- `ignore-range`: 200 and the whole file;
- `shifted-range`: 206 for a range 8 bytes further than asked, labelled as such;
- `short-body`: 206 labelled as the range asked, one byte short (Content-Length honest);
- `changed`: the file is replaced (same size, new bytes, new validators) before answering;
- `changed-ignoring-conditions`: the same, and If-Match / If-Range are ignored.

`FakeHub` answers what huggingface_hub asks of the Hub (read from its source):
`GET /api/models/{repo}[/revision/{rev}]` (model_info with `blobs=true`),
`GET /api/models/{repo}/tree/{rev}` (list_repo_tree, which snapshot_download uses), and
`HEAD`/`GET /{repo}/resolve/{rev}/{file}` with `X-Repo-Commit`, `ETag`; LFS files
(`*.safetensors`, `*.bin`) answer 302 to a separate CDN server (another origin, as
on the real Hub) with `X-Linked-Size` and `X-Linked-Etag`.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from email.message import Message
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


@dataclass
class Served:
    data: bytes
    etag: str | None
    last_modified: str | None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the client expects

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - quiet tests
        pass

    def do_HEAD(self) -> None:  # noqa: N802
        self.server.owner.answer(self, head=True)  # type: ignore[attr-defined]

    def do_GET(self) -> None:  # noqa: N802
        self.server.owner.answer(self, head=False)  # type: ignore[attr-defined]

    def send(self, status: int, headers: dict[str, str], body: bytes = b"", *, head: bool = False) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        if "Content-Length" not in headers:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)
            self.server.owner.count(urlsplit(self.path).path, len(body))  # type: ignore[attr-defined]


class WebServer:
    """A threaded HTTP/1.1 server on 127.0.0.1 serving `files` (URL path → bytes)."""

    def __init__(self) -> None:
        self.files: dict[str, Served] = {}
        self.bytes_served: Counter[str] = Counter()
        #: (method, path, headers): the headers answer `.get` and `in` case-insensitively.
        self.requests: list[tuple[str, str, Message]] = []
        self.fault: str | None = None
        self.routes: list[Callable[[_Handler, bool], bool]] = []
        self._lock = threading.Lock()
        self._version = 0
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.daemon_threads = True
        self._httpd.owner = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def __enter__(self) -> WebServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def url(self, path: str) -> str:
        return self.origin + path

    def put(self, path: str, data: bytes, *, etag: bool = True, last_modified: bool = True) -> None:
        with self._lock:
            self._version += 1
            tag = f'"{hashlib.sha256(data).hexdigest()[:16]}-{self._version}"' if etag else None
            modified = formatdate(1_700_000_000 + self._version, usegmt=True) if last_modified else None
            self.files[path] = Served(data, tag, modified)

    def put_folder(self, prefix: str, folder: Path, **validators: bool) -> None:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                self.put(f"{prefix}/{path.relative_to(folder).as_posix()}", path.read_bytes(), **validators)

    def count(self, path: str, sent: int) -> None:
        with self._lock:
            self.bytes_served[unquote(path)] += sent

    def answer(self, handler: _Handler, *, head: bool) -> None:
        with self._lock:
            self.requests.append((handler.command, unquote(handler.path), handler.headers))
        for route in self.routes:
            if route(handler, head):
                return
        self.serve_file(handler, unquote(urlsplit(handler.path).path), head=head)

    def serve_file(self, handler: _Handler, path: str, *, head: bool, extra: dict[str, str] | None = None) -> None:
        served = self.files.get(path)
        if served is None:
            handler.send(404, {**(extra or {})}, b"not found", head=head)
            return
        asked = _RANGE.match(handler.headers.get("Range", ""))
        faulty = self.fault is not None and asked is not None and int(asked.group(1)) > 0
        if faulty and self.fault in ("changed", "changed-ignoring-conditions"):
            self.put(path, bytes(b ^ 0xFF for b in served.data),
                     etag=served.etag is not None, last_modified=served.last_modified is not None)
            served = self.files[path]
        conditions = not (faulty and self.fault == "changed-ignoring-conditions")
        validators = {**(extra or {}), "Accept-Ranges": "bytes"}
        if served.etag:
            validators["ETag"] = served.etag
        if served.last_modified:
            validators["Last-Modified"] = served.last_modified
        if_match = handler.headers.get("If-Match")
        if conditions and if_match is not None and if_match != served.etag:
            handler.send(412, validators, b"precondition failed", head=head)
            return
        if_range = handler.headers.get("If-Range")
        if conditions and if_range is not None and if_range not in (served.etag, served.last_modified):
            asked = None  # the validator does not match: the whole (new) file
        data, total = served.data, len(served.data)
        if asked is None or (faulty and self.fault == "ignore-range"):
            handler.send(200, validators, data, head=head)
            return
        start = int(asked.group(1))
        end = min(int(asked.group(2)) if asked.group(2) else total - 1, total - 1)
        if start >= total:
            handler.send(416, {**validators, "Content-Range": f"bytes */{total}"}, head=head)
            return
        if faulty and self.fault == "shifted-range":
            start, end = min(start + 8, total - 1), min(end + 8, total - 1)
        body = data[start : end + 1]
        if faulty and self.fault == "short-body":
            body = body[:-1]
        handler.send(206, {**validators, "Content-Range": f"bytes {start}-{end}/{total}"}, body, head=head)


class FakeHub:
    """`repo_id` at `commit` (also reachable as `main`), its files taken from `folder`,
    served as the Hub serves them; LFS bytes come from `cdn`, a second server."""

    LFS = (".safetensors", ".bin")

    def __init__(self, hub: WebServer, cdn: WebServer, repo_id: str, folder: Path, commit: str) -> None:
        self.hub, self.cdn, self.repo_id, self.commit = hub, cdn, repo_id, commit
        found = sorted(p for p in folder.rglob("*") if p.is_file())
        self.files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in found}
        for name, data in self.files.items():
            if name.endswith(self.LFS):
                cdn.put(f"/blobs/{hashlib.sha256(data).hexdigest()}", data)
        hub.routes.append(self.route)

    @staticmethod
    def git_blob_id(data: bytes) -> str:
        return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()

    def sibling(self, name: str, data: bytes) -> dict[str, object]:
        entry: dict[str, object] = {"rfilename": name, "size": len(data), "blobId": self.git_blob_id(data)}
        if name.endswith(self.LFS):
            entry["lfs"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "pointerSize": 134}
        return entry

    def tree(self, folder: str) -> list[dict[str, object]]:
        """`list_repo_tree(recursive=True)`: every folder and file under `folder`."""
        prefix = f"{folder.strip('/')}/" if folder.strip("/") else ""
        entries: list[dict[str, object]] = []
        folders = sorted({n.rsplit("/", 1)[0] for n in self.files if "/" in n and n.startswith(prefix)})
        entries += [{"type": "directory", "oid": "0" * 40, "size": 0, "path": f} for f in folders]
        for name, data in self.files.items():
            if name.startswith(prefix):
                entry: dict[str, object] = {"type": "file", "oid": self.git_blob_id(data), "size": len(data)}
                entry["path"] = name
                if name.endswith(self.LFS):
                    entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
                entries.append(entry)
        return entries

    def route(self, handler: _Handler, head: bool) -> bool:
        path = unquote(urlsplit(handler.path).path)
        info = f"/api/models/{self.repo_id}/revision/"
        tree = f"/api/models/{self.repo_id}/tree/"
        resolve = f"/{self.repo_id}/resolve/"
        if path.startswith(info) or path == info.rpartition("/revision/")[0]:
            revision = path[len(info) :] or "main"
            if revision not in ("main", self.commit):
                handler.send(404, {"X-Error-Code": "RevisionNotFound"}, b'{"error": "revision not found"}', head=head)
                return True
            siblings = [self.sibling(name, data) for name, data in self.files.items()]
            body = json.dumps({"id": self.repo_id, "sha": self.commit, "siblings": siblings}).encode()
            handler.send(200, {"Content-Type": "application/json"}, body, head=head)
            return True
        if path.startswith(tree):
            revision, _, folder = path[len(tree) :].partition("/")
            if revision not in ("main", self.commit):
                handler.send(404, {"X-Error-Code": "RevisionNotFound"}, b'{"error": "revision not found"}', head=head)
                return True
            body = json.dumps(self.tree(folder)).encode()
            handler.send(200, {"Content-Type": "application/json"}, body, head=head)
            return True
        if path.startswith("/api/models/") or not path.startswith(resolve):
            if path.startswith("/api/models/"):  # another repository: the Hub's answer for a missing one
                handler.send(401, {"X-Error-Code": "RepoNotFound"}, b'{"error": "Repository not found"}', head=head)
                return True
            return False
        revision, _, name = path[len(resolve) :].partition("/")
        data = self.files.get(name)
        common = {"X-Repo-Commit": self.commit}
        if revision not in ("main", self.commit) or data is None:
            code = "RevisionNotFound" if data is not None else "EntryNotFound"
            handler.send(404, {**common, "X-Error-Code": code}, b"not found", head=head)
            return True
        if name.endswith(self.LFS):
            digest = hashlib.sha256(data).hexdigest()
            handler.send(302, {
                **common, "Location": self.cdn.url(f"/blobs/{digest}"), "X-Linked-Size": str(len(data)),
                "X-Linked-Etag": f'"{digest}"', "ETag": f'"{self.git_blob_id(data)}"', "Content-Length": "0",
            }, head=True)
            return True
        self.hub.files.setdefault(path, Served(data, f'"{self.git_blob_id(data)}"', None))
        self.hub.serve_file(handler, path, head=head, extra=common)
        return True
