"""Carry out a plan into S3: every output object appears whole, or not at all.

Each weight file is one multipart upload, and S3 makes an object visible only when
CompleteMultipartUpload succeeds, so a reader never sees half a file. Any failure,
Ctrl-C included, aborts the upload (no orphaned parts are left to be billed); a run
killed outright cannot abort, so every run first aborts the unfinished uploads and
deletes the staged objects a previous run left for the same destination.

Two ways to fill an upload:

- *server-side*, when every source is an object of the same store: plain-copy steps
  are copied from the sources inside the store (UploadPartCopy, planned by
  :mod:`shardkit.plan.multipart`); the client makes and uploads only the rest: the
  first 5 MiB (the new header and the data after it) and converted tensors;
- *streamed* otherwise (local files, HTTP, another store): the output's bytes are made
  in order by :func:`shardkit.plan.fill.fill`, several chunks at once (parallel ranged
  reads), and uploaded as parts, in bounded memory.

A folder output is several objects: weight files first, then config and tokenizer
files, then the index, so an index never names a shard that is not there yet. S3
cannot swap a folder atomically; if a run fails, the objects it completed are
deleted, and with `force` the old output's other objects are deleted after success.
Without `force` every object is written on condition that its key is free
(`If-None-Match: *`), so a concurrent writer's output is never silently replaced.

A verified run (`before_commit`), and a forced one over an earlier folder (whose
objects would otherwise be replaced one by one, so a run failing half-way would leave
it part old, part new, part gone), stages: the output is written under a hidden prefix
beside the destination (`.shardkit-tmp-<name>.<pid>.<random>/`, which the next run
to the same destination removes if this one was killed), verified there, and only then
copied to its final keys inside the store (CopyObject, or UploadPartCopy past 5 GB),
index last. A failed verification, an error or Ctrl-C before that leaves an earlier
output as it was; signals that arrive during the copies wait until they are done.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from collections import deque
from collections.abc import Callable, Collection, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeGuard

from .. import storage
from ..checkpoint.manifest import format_file_manifest
from ..errors import OutputError, option
from ..plan.files import Plan, PlannedFile, Source
from ..plan.fill import CastLog, fill, ordered_chunks
from ..plan.multipart import CopyPart, ObjectPlan, Part, UploadPart, plan_object
from ..storage.remote import RemotePath
from ..storage.s3 import WORKERS, S3Path, S3Store
from . import stream
from .atomic import TEMP_MARK
from .destination import Sources, refuse_existing, refuse_unexpected, unexpected_names
from .held_signals import held_signals
from .source_reads import RangeSources, check_sources_unchanged, stream_workers
from .written import WrittenFile, checksum_file_name, written_names

MiB = 1024 * 1024
#: Part size of streamed uploads (raised for huge files to stay within 10,000 parts).
PART_SIZE = 16 * MiB
#: Bytes of parts being uploaded at once (the read-ahead of stream.ordered_reads comes on top).
IN_FLIGHT = 48 * MiB
_DELETE_BATCH = 1000
#: The largest object CopyObject copies in one request; larger ones are copied in parts.
COPY_OBJECT_LIMIT = 5 * 1024 * MiB
#: Part size of the server-side copy that commits a staged object over COPY_OBJECT_LIMIT.
COMMIT_PART = 1024 * MiB


def execute_s3(
    plan: Plan,
    dest: RemotePath,
    *,
    as_folder: bool,
    force: bool = False,
    sha256: bool = False,
    progress: Callable[[int], None] | None = None,
    log: CastLog | None = None,
    protect: Sources | None = None,
    before_commit: Callable[[S3Path], None] | None = None,
) -> list[WrittenFile]:
    """Write `plan` to `dest` (an object, or a folder prefix holding all planned files).

    `protect` names what must never be touched (sources, index, companion files, the
    source folder); the plan's sources are protected anyway. `before_commit` is called
    with the staged output (its object, or its folder) before anything is written at
    `dest`: an exception there discards it and leaves `dest` as it was."""
    sources = plan.sources
    log = log if log is not None else CastLog()
    if not isinstance(dest, S3Path):
        raise OutputError(f"{dest}: cannot write there; outputs go to a local path or an s3:// URL")
    protect = protect or Sources(tuple(storage.lookup(h.path) for h in sources))
    writes = written_names(plan, sha256)
    check_s3_destination(dest, protect, force=force, as_folder=as_folder, writes=writes)
    for target in [dest / f.name for f in plan.files] + [dest] if as_folder else [dest]:
        clean_stale(target)
    # A forced folder is staged too: its objects are replaced one by one, and a run that
    # failed half-way would leave an earlier output with some shards new, some gone.
    staging = before_commit is not None or (as_folder and force and dest.is_dir())
    stage = staged_twin(dest) if staging else None
    base = stage if stage is not None else dest
    # Staged keys belong to this run alone; final keys are only replaced when forced.
    replace = force or stage is not None
    write = assemble if is_server_side(sources, dest) else upload_streamed
    # A staged single file keeps its name inside its staging prefix.
    targets = [base / f.name for f in plan.files] if as_folder else [base / dest.name if stage is not None else dest]
    completed: list[S3Path] = []
    try:
        written = []
        for planned, target in zip(plan.files, targets):
            # Reads are conditional on each source's ETag anyway; this also catches a source
            # replaced after its last byte was read, as a local run would.
            check = lambda: check_sources_unchanged(sources)  # noqa: E731
            written.append(write(
                planned, target, sha256=sha256, progress=progress, before_commit=check, log=log, replace=replace
            ))
            completed.append(target)
        if as_folder:
            completed += _write_extras(plan, base, written, replace=replace)
        if stage is not None:
            if before_commit is not None:
                before_commit(stage if as_folder else completed[0])
            finals = [dest / p.key[len(stage.key) + 1 :] for p in completed] if as_folder else [dest]
            with held_signals():  # a Ctrl-C now would leave a folder half old, half new
                commit_staged(list(zip(completed, finals)), dest, force=force, index_name=plan.index_name)
                if as_folder and force:
                    _delete_earlier(dest, {p.key for p in finals}, writes)
        elif as_folder and force:
            _delete_earlier(dest, {p.key for p in completed}, writes)
    except BaseException:
        if stage is None:
            delete_keys(dest, [p.key for p in completed], best_effort=True)
            remove_own_staged(targets)
        raise
    finally:
        if stage is not None:
            remove_own_staged([dest])
    return written


def remove_own_staged(targets: Sequence[S3Path]) -> None:
    """Delete every staged object this process made for `targets`, listed rather than
    remembered: a Ctrl-C that cut an upload's own clean-up short (between its completion
    and the deletion of its staged parts) must not leave them behind."""
    for target in targets:
        prefix = f"{staging_prefix(target)}{os.getpid()}."
        try:
            delete_keys(target, [item["Key"] for item in target.objects(prefix)], best_effort=True)
        except Exception:  # noqa: BLE001 - best effort: the original failure is what the user must see
            pass


def _delete_earlier(dest: S3Path, keep: set[str], writes: Collection[str]) -> None:
    """After a forced folder write: what the old output held beside the new files (the
    keys in `keep`); anything shardkit would not have written stays."""
    earlier = [k for k in dest.keys_under() if k not in keep]
    delete_keys(dest, [k for k in earlier if not unexpected_names([k[len(dest.key) + 1 :]], writes)])


def is_server_side(sources: Sequence[Source], dest: object) -> bool:
    """Whether writing to `dest` copies inside the store: every source is in the same one."""
    return isinstance(dest, S3Path) and all(_same_store(s.path, dest.store) for s in sources)


def _same_store(location: str, store: S3Store) -> bool:
    source = storage.lookup(location)
    return isinstance(source, S3Path) and source.store is store


# --------------------------------------------------------------------------- destination


def check_s3_destination(
    dest: S3Path, protect: Sources, *, force: bool, as_folder: bool, writes: Collection[str] = ()
) -> None:
    """The same refusals as a local destination, by bucket and key: an existing output
    without force, a kind change, an output that is, lies inside or holds a source (file
    or folder), a forced folder holding what shardkit did not write, a missing bucket."""
    if not as_folder and not dest.key:
        raise OutputError(f"{dest}: name the output object, e.g. {dest}/model.safetensors")
    if dest.store.call("head_bucket", str(dest), missing_ok=True, Bucket=dest.bucket) is None:
        raise OutputError(f"{dest}: bucket {dest.bucket} does not exist")
    folder = protect.folder if _in_bucket_of(protect.folder, dest) else None
    files = [f for f in protect.files if _in_bucket_of(f, dest)]
    if folder is not None and folder.key == dest.key:
        raise OutputError(
            f"{dest}: output is the source folder {folder}; it would overwrite the source; choose another path"
        )
    for source in files:
        if source.key == dest.key:
            raise OutputError(f"{dest}: output would overwrite the source {source}; choose another path")
    if folder is not None and _holds(folder.key, dest.key):
        raise OutputError(f"{dest}: output lies inside the source folder {folder}; write it outside that folder")
    for source in ([folder] if folder is not None else []) + files:
        if as_folder and _holds(dest.key, source.key):
            raise OutputError(f"{dest}: output would overwrite the source: it contains {source}; choose another path")
    is_file, is_dir = dest.is_file(), dest.is_dir()
    if not (is_file or is_dir):
        return
    refuse_existing(dest, force=force, exists=True)
    if as_folder != is_dir or (is_file and is_dir):
        kind = "a folder" if is_dir else "a file"
        raise OutputError(f"{dest}: already exists and is {kind}; refusing to replace it with the other kind")
    if as_folder:
        refuse_unexpected(dest, unexpected_names((k[len(dest.key) + 1 :] for k in dest.keys_under()), writes))


def _in_bucket_of(location: object, dest: S3Path) -> TypeGuard[S3Path]:
    return isinstance(location, S3Path) and location.store is dest.store and location.bucket == dest.bucket


def _holds(folder_key: str, key: str) -> bool:
    """Whether the folder `folder_key` (the bucket itself when empty) holds `key`."""
    return not folder_key or key.startswith(folder_key + "/")


def staging_prefix(target: S3Path) -> str:
    """Where the staged objects of runs writing `target` live (hidden, beside it)."""
    parent = target.key.rpartition("/")[0]
    return f"{parent}/{TEMP_MARK}{target.name}." if parent else f"{TEMP_MARK}{target.name}."


def staged_twin(dest: S3Path) -> S3Path:
    """This run's own staging folder for `dest`: under :func:`staging_prefix`, so a killed
    run's leftovers are removed by the next run to the same destination."""
    token = f"{os.getpid()}.{secrets.token_hex(4)}"
    return S3Path(dest.store, dest.bucket, staging_prefix(dest) + token)


def commit_staged(
    pairs: Sequence[tuple[S3Path, S3Path]], dest: S3Path, *, force: bool, index_name: str | None
) -> None:
    """Copy each verified staged object to its final key, inside the store; the index
    last, so it never names a shard that is not there yet. Without `force` each copy is
    refused if its key was taken meanwhile. A copy that fails removes the final objects
    this commit added under new keys (those it replaced cannot come back: it says so)."""
    index = [pair for pair in pairs if index_name is not None and pair[1].name == index_name]
    others = [pair for pair in pairs if pair not in index]
    existed = set(dest.keys_under()) | ({dest.key} if dest.is_file() else set())
    done: list[S3Path] = []
    try:
        with ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="shardkit-commit") as pool:
            futures = [(pool.submit(copy_within, source, final, replace=force), final) for source, final in others]
            for future, final in futures:
                future.result()
                done.append(final)
        for source, final in index:
            copy_within(source, final, replace=force)
            done.append(final)
    except BaseException:
        delete_keys(dest, [p.key for p in done if p.key not in existed], best_effort=True)
        replaced = [p for p in done if p.key in existed]
        if replaced:
            raise OutputError(
                f"{dest}: committing the verified output stopped after replacing {len(replaced)} of {len(pairs)} "
                f"earlier objects, so it holds old and new files; run again with {option('force')}"
            ) from None
        raise


def copy_within(source: S3Path, target: S3Path, *, replace: bool) -> None:
    """Copy the object `source` (the version whose ETag it knows) to `target`, server-side."""
    stat = source.stat()
    condition: dict[str, Any] = {} if replace else {"IfNoneMatch": "*"}
    if stat.st_size <= COPY_OBJECT_LIMIT:
        if stat.version:
            condition["CopySourceIfMatch"] = stat.version
        response = target.store.call(
            "copy_object", str(target), Bucket=target.bucket, Key=target.key,
            CopySource={"Bucket": source.bucket, "Key": source.key}, **condition,
        )
        target.store.count(copied=stat.st_size)
        target.learn(storage.remote.RemoteStat(stat.st_size, response.get("CopyObjectResult", {}).get("ETag")))
        return
    upload = MultipartUpload(target)
    try:
        for number, offset in enumerate(range(0, stat.st_size, COMMIT_PART), 1):
            upload.copy_part(number, source, offset, min(COMMIT_PART, stat.st_size - offset))
        upload.complete(replace=replace, size=stat.st_size)
    except BaseException:
        upload.abort()
        raise


def clean_stale(target: S3Path) -> list[str]:
    """Abort unfinished uploads of `target` and delete staged objects left by runs that
    were killed before they could clean up; returns what was removed."""
    prefix = staging_prefix(target)
    removed: list[str] = []
    for search in (target.key, prefix):
        marker: dict[str, str] = {}
        while True:
            response = target.call("list_multipart_uploads", Prefix=search, **marker)
            for upload in response.get("Uploads", []):
                key = upload["Key"]
                if key == target.key or key.startswith(prefix):
                    target.call("abort_multipart_upload", Key=key, UploadId=upload["UploadId"])
                    removed.append(f"upload {upload['UploadId']} of {key}")
            if not response.get("IsTruncated"):
                break
            marker = {"KeyMarker": response["NextKeyMarker"], "UploadIdMarker": response["NextUploadIdMarker"]}
    staged = [item["Key"] for item in target.objects(prefix)]
    delete_keys(target, staged)
    return removed + staged


def delete_keys(near: S3Path, keys: Sequence[str], *, best_effort: bool = False) -> None:
    for start in range(0, len(keys), _DELETE_BATCH):
        batch = [{"Key": key} for key in keys[start : start + _DELETE_BATCH]]
        try:
            near.store.call("delete_objects", str(near), Bucket=near.bucket, Delete={"Objects": batch, "Quiet": True})
        except Exception:
            if not best_effort:
                raise


def remove(path: S3Path) -> None:
    """Remove an output object, or every object of an output folder."""
    keys = [path.key] if path.is_file() else path.keys_under()
    delete_keys(path, keys)


def put_bytes(path: S3Path, data: bytes, *, replace: bool = True) -> None:
    """A small object in one request (atomic, as every PUT is); without `replace` it is
    refused (OutputExistsError) if the key is taken, even by a writer that came meanwhile.
    `path` learns the new object's size and ETag."""
    response = path.call("put_object", Key=path.key, Body=data, **_no_replace(replace))
    path.learn(storage.remote.RemoteStat(len(data), response.get("ETag")))


def _no_replace(replace: bool) -> dict[str, str]:
    """The condition of a write that must not replace an object (S3 conditional writes)."""
    return {} if replace else {"IfNoneMatch": "*"}


# --------------------------------------------------------------------------- one upload


class MultipartUpload:
    """One object being written; it appears on `complete`, and `abort` leaves nothing."""

    def __init__(self, target: S3Path) -> None:
        self.target = target
        self.upload_id = target.call("create_multipart_upload", Key=target.key)["UploadId"]
        self.etags: dict[int, str] = {}

    def upload_part(self, number: int, data: bytes) -> None:
        response = self.target.call(
            "upload_part", Key=self.target.key, UploadId=self.upload_id, PartNumber=number, Body=data
        )
        self.etags[number] = response["ETag"]

    def copy_part(self, number: int, source: S3Path, offset: int, length: int) -> None:
        stat = source._stat
        condition: dict[str, Any] = {"CopySourceIfMatch": stat.version} if stat and stat.version else {}
        response = self.target.store.call(
            "upload_part_copy", str(source),
            Bucket=self.target.bucket, Key=self.target.key, UploadId=self.upload_id, PartNumber=number,
            CopySource={"Bucket": source.bucket, "Key": source.key},
            CopySourceRange=f"bytes={offset}-{offset + length - 1}",
            **condition,
        )
        self.target.store.count(copied=length)
        self.etags[number] = response["CopyPartResult"]["ETag"]

    def complete(self, *, replace: bool = True, size: int | None = None) -> None:
        """Make the object visible (without `replace`, only if its key is still free); the
        target learns its ETag (and `size`, when given)."""
        parts = [{"PartNumber": n, "ETag": self.etags[n]} for n in sorted(self.etags)]
        response = self.target.call(
            "complete_multipart_upload", Key=self.target.key, UploadId=self.upload_id,
            MultipartUpload={"Parts": parts}, **_no_replace(replace),
        )
        if size is not None:
            self.target.learn(storage.remote.RemoteStat(size, response.get("ETag")))

    def abort(self) -> None:
        """Best effort: a store that is gone cannot be told; the next run cleans up."""
        try:
            self.target.call("abort_multipart_upload", Key=self.target.key, UploadId=self.upload_id)
        except Exception:  # noqa: BLE001 - the original failure is what the user must see
            pass


# --------------------------------------------------------------------------- streamed


def upload_streamed(
    planned: PlannedFile,
    target: S3Path,
    *,
    sha256: bool = False,
    progress: Callable[[int], None] | None = None,
    before_commit: Callable[[], None] | None = None,
    log: CastLog | None = None,
    replace: bool = True,
) -> WrittenFile:
    """Upload the planned file's bytes, made in order from wherever the sources are
    (without `replace`, on condition that the key is still free)."""
    hasher = hashlib.sha256() if sha256 else None
    part_size = max(PART_SIZE, -(-planned.size // 10_000 // MiB) * MiB)
    in_flight = max(1, IN_FLIGHT // part_size)
    with RangeSources([planned]) as sources:
        # Local files need no lead to keep the upload busy; remote sources get the full one.
        remote = any(storage.is_remote(source) for source, _, _ in planned.source_spans(0, planned.size))
        workers = stream_workers(remote)
        lead = stream.MAX_BUFFERED if remote else workers * stream.CHUNK
        chunks = ordered_chunks(planned, sources.read, workers=workers, max_buffered=lead, log=log)
        if planned.size <= part_size:
            data = b"".join(chunks)
            if hasher is not None:
                hasher.update(data)
            if before_commit is not None:
                before_commit()
            put_bytes(target, data, replace=replace)
            if progress is not None:
                progress(len(data))
        else:
            _upload_parts(chunks, target, part_size, in_flight, hasher, progress, before_commit, replace)
    return WrittenFile(planned.name, planned.size, len(planned.tensors), hasher.hexdigest() if hasher else None)


def _upload_parts(
    chunks: Iterable[bytes],
    target: S3Path,
    part_size: int,
    in_flight: int,
    hasher: hashlib._Hash | None,
    progress: Callable[[int], None] | None,
    before_commit: Callable[[], None] | None,
    replace: bool,
) -> None:
    upload = MultipartUpload(target)
    pool = ThreadPoolExecutor(max_workers=in_flight, thread_name_prefix="shardkit-upload")
    pending: deque[tuple[Future[None], int]] = deque()
    filling: list[memoryview] = []  # the part being filled, joined (one copy) when full
    filled = 0
    number = 0
    size = 0

    def settle() -> None:
        future, size = pending.popleft()
        future.result()
        if progress is not None:
            progress(size)

    def send(data: bytes) -> None:
        nonlocal number
        number += 1
        while len(pending) >= in_flight:
            settle()
        pending.append((pool.submit(upload.upload_part, number, data), len(data)))

    try:
        for chunk in chunks:
            if hasher is not None:
                hasher.update(chunk)
            size += len(chunk)
            view = memoryview(chunk)
            while view:
                take = min(len(view), part_size - filled)
                filling.append(view[:take])
                filled, view = filled + take, view[take:]
                if filled == part_size:
                    send(b"".join(filling))
                    filling, filled = [], 0
        if filled or number == 0:
            send(b"".join(filling))
        while pending:
            settle()
        if before_commit is not None:
            before_commit()
        upload.complete(replace=replace, size=size)
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        upload.abort()
        raise
    finally:
        pool.shutdown(wait=True)


# --------------------------------------------------------------------------- server-side


def assemble(
    planned: PlannedFile,
    target: S3Path,
    *,
    sha256: bool = False,
    progress: Callable[[int], None] | None = None,
    before_commit: Callable[[], None] | None = None,
    log: CastLog | None = None,
    replace: bool = True,
) -> WrittenFile:
    """Build the planned file inside the store: plain copies server-side, the rest made
    here (without `replace`, on condition that the key is still free)."""
    log = log if log is not None else CastLog()
    object_plan = plan_object(planned)
    with RangeSources([planned]) as sources:
        digest = _hash_planned(planned, sources, log) if sha256 else None

        def make(part: UploadPart) -> bytes:
            data = bytearray(part.length)
            stats = fill(planned, part.start, memoryview(data), sources.read)
            if not sha256:  # with sha256 every element was counted while hashing
                log.add(stats)
            return data  # type: ignore[return-value]

        if not object_plan.staged and len(object_plan.parts) == 1 and isinstance(object_plan.parts[0], UploadPart):
            data = make(object_plan.parts[0])
            if before_commit is not None:
                before_commit()
            put_bytes(target, data, replace=replace)
            if progress is not None:
                progress(planned.size)
        else:
            _Assembly(object_plan, target, make, progress, before_commit).run(replace=replace, size=planned.size)
    return WrittenFile(planned.name, planned.size, len(planned.tensors), digest)


def _hash_planned(planned: PlannedFile, sources: RangeSources, log: CastLog) -> str:
    """SHA-256 of the output without writing it: the one case that makes every byte here."""
    hasher = hashlib.sha256()
    for chunk in ordered_chunks(planned, sources.read, workers=stream.WORKERS, log=log):
        hasher.update(chunk)
    return hasher.hexdigest()


class _Assembly:
    """Runs an ObjectPlan: staged objects, then the destination's parts, on one pool.

    Tasks are submitted in plan order and only ever wait for tasks submitted before
    them (a staged object it copies from), so the FIFO pool cannot deadlock.
    """

    def __init__(
        self,
        plan: ObjectPlan,
        target: S3Path,
        make: Callable[[UploadPart], bytes],
        progress: Callable[[int], None] | None,
        before_commit: Callable[[], None] | None = None,
    ) -> None:
        self.plan = plan
        self.make = make
        self.target = target
        self.progress = progress
        self.before_commit = before_commit
        token = f"{os.getpid()}.{secrets.token_hex(4)}"
        self.staged = {
            s.name: S3Path(target.store, target.bucket, f"{staging_prefix(target)}{token}/{s.name}")
            for s in plan.staged
        }
        self.built: dict[str, Future[None]] = {}
        self.uploads: list[MultipartUpload] = []

    def run(self, *, replace: bool = True, size: int | None = None) -> None:
        pool = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="shardkit-copy")
        final: MultipartUpload | None = None
        try:
            for staged in self.plan.staged:
                self.built[staged.name] = pool.submit(self._build, self.staged[staged.name], staged.parts)
            final = MultipartUpload(self.target)
            self.uploads.append(final)
            futures = [
                pool.submit(self._part, final, number, part, True) for number, part in enumerate(self.plan.parts, 1)
            ]
            for future in futures:
                future.result()
            if self.before_commit is not None:
                self.before_commit()
            final.complete(replace=replace, size=size)
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            for upload in self.uploads:
                upload.abort()
            raise
        finally:
            pool.shutdown(wait=True)
            delete_keys(self.target, [p.key for p in self.staged.values()], best_effort=True)

    def _build(self, path: S3Path, parts: tuple[Part, ...]) -> None:
        upload = MultipartUpload(path)
        self.uploads.append(upload)
        for number, part in enumerate(parts, 1):
            self._part(upload, number, part, False)
        upload.complete()
        size = sum(p.size for p in parts)
        path.learn(storage.remote.RemoteStat(size, None))

    def _part(self, upload: MultipartUpload, number: int, part: Part, final: bool) -> None:
        if isinstance(part, CopyPart):
            span = part.span
            if span.source in self.staged:
                self.built[span.source].result()
                source = self.staged[span.source]
            else:
                source = storage.lookup(span.source)  # type: ignore[assignment]
            upload.copy_part(number, source, span.offset, span.length)
        else:
            upload.upload_part(number, self.make(part))
        if final and self.progress is not None:
            self.progress(part.size)


# --------------------------------------------------------------------------- extras


def _write_extras(plan: Plan, dest: S3Path, written: list[WrittenFile], *, replace: bool) -> list[S3Path]:
    """Config/tokenizer copies, then the index, then the checksum file."""
    done: list[S3Path] = []
    for copy in plan.copies:
        target = dest / copy.name
        source = storage.as_path(copy.source) if isinstance(copy.source, str) else copy.source
        if copy.data is not None:
            put_bytes(target, copy.data, replace=replace)
        elif isinstance(source, S3Path) and source.store is dest.store:
            copy_within(source, target, replace=replace)
        else:
            put_bytes(target, storage.read_bytes(source), replace=replace)
        done.append(target)
    if plan.index is not None:
        target = dest / plan.index.name
        put_bytes(target, (json.dumps(plan.index.document, indent=2, sort_keys=True) + "\n").encode(), replace=replace)
        done.append(target)
    sums = [(w.name, w.sha256) for w in written if w.sha256]
    if sums:
        target = dest / checksum_file_name(plan)
        put_bytes(target, format_file_manifest(sums).encode(), replace=replace)
        done.append(target)
    return done
