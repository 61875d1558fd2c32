"""`shardkit verify`: prove a checkpoint is whole, and that its bytes are the right ones.

What is checked, and what it costs:

- Always, from headers only: every weight file against every rule of the format, each
  file on its own so that one broken shard does not hide another (the rule that the
  tensors cover exactly the file's data bytes is what catches a truncated or extended
  file), then the index cross-checks of :func:`~shardkit.checkpoint.shards.open_checkpoint`.
- Bytes, wherever there is something to compare them with: a checksum manifest
  (`checksums`), the blob names of a Hugging Face cache snapshot (found by itself), or
  another checkpoint (`against`, tensor by tensor, whatever the sharding). Each file is
  then read once, front to back, in constant memory. Without a reference a full read
  would only prove the disk can still read the file, at the price of the whole
  checkpoint's I/O, so a plain verify reads headers only and takes milliseconds.
- The architecture: with a `config.json` (given, or found in the checkpoint folder),
  tensor names, shapes and dtypes against the model transformers builds on the meta
  device (:mod:`shardkit.checks.architecture`, needs the `hf` extra).

Problems are collected, not raised: the report lists every one with its file and
tensor, and `ok` says whether there were none. Only unusable input (a missing path,
an unreadable manifest, a broken `against` checkpoint) raises.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .. import storage
from ..checkpoint import layouts
from ..checkpoint.manifest import Manifest, read_manifest
from ..checkpoint.pipeline import find_pipeline
from ..checkpoint.readability import check_folder_readable
from ..checkpoint.shards import (
    Checkpoint,
    SourceTensor,
    broken_companions,
    check_shard_name,
    find_indexes,
    open_checkpoint,
    read_index,
    torch_weight_files,
)
from ..checks.compare import compare_checkpoints
from ..engine import stream
from ..engine.hashing import Streamer
from ..errors import (
    BadInputError,
    CheckpointError,
    FormatError,
    MissingExtraError,
    MissingShardsError,
    PathNotFoundError,
    option,
    option_name,
)
from ..format import header_json
from ..format.header import Header
from ..format.torch_checkpoint import byte_runs, is_torch_file
from ..plan.files import ScalesFor
from ..reports import JsonReport
from ..storage.hub_cache import HubBlob, hub_blob
from .checksum import manifest_name
from .writing import ProgressCallback, dtype_choice

if TYPE_CHECKING:
    from ..checkpoint.pipeline import Pipeline
    from ..checkpoint.variants import WeightSet
    from .pipeline_runs import PipelineReport

INSTALL_HINT = "pip install 'shardkit[hf]'"


@dataclass(frozen=True)
class Problem(JsonReport):
    """One thing wrong, with where it is. `check` is the check that found it."""

    check: str  # format | index | companions | hub | checksums | tensor-checksums | against | architecture | read
    message: str
    file: str | None = None
    tensor: str | None = None

    def __str__(self) -> str:
        where = f"{self.file}: " if self.file else ""
        if self.tensor is not None:
            where += f"tensor {self.tensor!r}: "
        return where + self.message


@dataclass(frozen=True)
class VerifyReport(JsonReport):
    path: str
    ok: bool
    problems: list[Problem]
    checks: list[str]  # the checks that ran, in order
    files: list[str]  # the weight files examined
    tensors: int
    bytes_read: int  # data bytes read (headers not counted)
    seconds: float
    read_seconds: float  # of which reading and hashing or comparing data
    notes: list[str] = field(default_factory=list)  # checks skipped, and why
    warnings: list[str] = field(default_factory=list)
    checksums: str | None = None
    against: str | None = None
    config: str | None = None

    def __bool__(self) -> bool:
        """A report is true when the checkpoint verified: `if shardkit.verify(path): …`."""
        return self.ok


def verify(
    path: str | os.PathLike[str] | storage.Location,
    *,
    checksums: str | os.PathLike[str] | Manifest | None = None,
    against: str | os.PathLike[str] | None = None,
    config: str | os.PathLike[str] | None = None,
    architecture: bool | None = None,
    strict: bool = False,
    dtype: str | None = None,
    keep: Sequence[str] = (),
    block_size: str | None = None,
    allow_unindexed: bool = False,
    endpoint_url: str | None = None,
    progress: ProgressCallback | None = None,
) -> VerifyReport:
    """Prove the checkpoint at `path` (a file, folder or index) is whole and holds the right bytes.

    Every weight file is checked against every rule of the format, each on its own so
    one broken shard does not hide another, then the index cross-checks; that part
    reads headers only. The bytes are read only when there is something to compare
    them with:

    - `checksums`: a `sha256sum` manifest (from `shardkit checksum`) or a per-tensor
      manifest (`shardkit checksum --tensors`, valid across merge and split);
    - `against`: another checkpoint, same names, dtypes, shapes and bytes whatever the
      sharding; with `dtype` (and `keep`, `block_size`), `path` is `against`
      converted with `merge`/`split --dtype`, and each converted tensor must hold
      exactly the cast of the source's, recomputed while reading (a dequantised FP8
      weight its dequantisation, a quantised one its codes and scales);
    - a Hugging Face cache snapshot, found by itself (its blobs are named by SHA-256).

    `config` / `architecture`: with a `config.json` (given, or the folder's own),
    names, shapes and dtypes are checked against the model transformers builds on the
    meta device. None checks when transformers is installed (else a note says how to
    install it); True requires the check; False skips it. `strict` applies the
    format's strict rules and turns index warnings (a wrong `total_size`) into problems.
    `allow_unindexed` ignores weight files no index covers (a pipeline's other variants)
    with a warning, as for merge. A well-known sibling layout (Mistral's
    `consolidated.safetensors` beside the shards, a single `model.safetensors` beside
    an index) is a note naming what loaders use, never a problem. Every top-level
    `.json` besides the index must parse.
    `checksums` may also be a parsed :class:`~shardkit.checkpoint.manifest.Manifest` (a pipeline's,
    per component). `endpoint_url` names an S3-compatible store; `progress(advance, total)` is called
    as data bytes are read.

    Problems are collected, not raised: the report lists every one with its check,
    file and tensor, and `bool(report)` (or `report.ok`) says whether there were none.
    Unusable input (a missing path, an unreadable manifest, a broken `against`) raises
    a :class:`~shardkit.errors.ShardkitError`.

    Example::

        report = shardkit.verify("model", checksums="model/SHA256SUMS")
        assert report, [str(p) for p in report.problems]
    """
    started = time.perf_counter()
    path = storage.as_path(path, endpoint_url=endpoint_url)
    if not path.exists():
        raise PathNotFoundError(path, layouts.missing_path(path))
    if isinstance(path, Path) and path.is_dir():
        check_folder_readable(path)  # else it looks empty, or its config.json unreadable
    pipeline = find_pipeline(path, allow_unindexed=allow_unindexed)
    if pipeline is not None:  # a diffusers pipeline: each component verified on its own

        return verify_pipeline(  # type: ignore[return-value]
            pipeline, str(path), checksums=checksums, against=against, config=config,  # type: ignore[arg-type]
            architecture=architecture, strict=strict, progress=progress,
        )
    manifest = checksums if isinstance(checksums, Manifest) or checksums is None else read_manifest(checksums)
    reference = (
        open_checkpoint(
            storage.as_path(against, endpoint_url=endpoint_url), strict=strict, allow_unindexed=allow_unindexed
        )
        if against is not None
        else None
    )
    if (dtype is not None or keep or block_size is not None) and reference is None:
        raise BadInputError(
            f"{option_name('dtype')} checks a conversion against its source; "
            f"pass {option('against', metavar='SOURCE')} too"
        )
    conversion = dtype_choice(reference, dtype, keep, block_size) if reference is not None else None
    config_path, note = _architecture_config(path, config, architecture)

    run = _Run(path, strict, allow_unindexed)
    run.converted = conversion.dtypes if conversion is not None else None
    run.scales = conversion.scales if conversion is not None else None
    if note:
        run.notes.append(note)
    files, indexes = weight_files(path)
    headers = run.check_files(files)
    checkpoint = run.check_checkpoint()
    run.check_companions()
    run.check_companion_files(checkpoint)
    reading = time.perf_counter()
    run.check_bytes(files + indexes, checkpoint, manifest, reference, progress)
    read_seconds = time.perf_counter() - reading
    if config_path is not None:
        run.check_architecture(config_path, checkpoint, explicit=config is not None or architecture is True)

    return VerifyReport(
        path=str(path),
        ok=not run.problems,
        problems=run.problems,
        checks=run.checks,
        files=[str(f) for f in files],
        tensors=len(checkpoint.tensors) if checkpoint else sum(len(h.tensors) for h in headers.values()),
        bytes_read=run.bytes_read,
        seconds=round(time.perf_counter() - started, 6),
        read_seconds=round(read_seconds, 6),
        notes=run.notes,
        warnings=run.warnings,
        checksums=manifest.path if manifest is not None else None,
        against=storage.display(against) if against is not None else None,
        config=str(config_path) if config_path is not None else None,
    )


def weight_files(path: storage.Location) -> tuple[list[storage.Location], list[storage.Location]]:
    """The `.safetensors` files to check at `path`, and the index files found.

    A folder contributes every top-level `.safetensors` file and every shard its
    indexes name, so a file the index forgot and a shard the folder lacks both show up.
    """
    if path.is_file():
        if path.name.endswith(".safetensors") or is_torch_file(path.name):
            return [path], []
        if path.name.endswith(".json"):
            return sorted(_index_shards(path)), [path]
        raise BadInputError(f"{path}: not a .safetensors or torch .bin/.pt/.pth file, an index .json or a folder")
    indexes = find_indexes(path)
    files = {p for p in path.glob("*.safetensors") if p.is_file()}
    for index in indexes:
        files |= _index_shards(index)
    if not files and not indexes:  # a .bin checkpoint: the files its discovery would read
        files = set(torch_weight_files(path))
    if not files and not indexes:
        raise BadInputError(layouts.no_weights(path) + ": nothing to verify")
    return sorted(files), indexes


def _index_shards(index: storage.Location) -> set[storage.Location]:
    """Existing shard files an index names; a broken index is reported by the cross-checks,
    but one nested deeper than any JSON reader goes is refused outright (exit 2)."""
    try:
        text = index.read_text(encoding="utf-8")
        if header_json.depth(text) > header_json.MAX_DEPTH:
            raise BadInputError(f"{index}: not an index: JSON nested deeper than {header_json.MAX_DEPTH} levels")
        names = set(read_index(index, check_names=False).shards)
    except (OSError, UnicodeDecodeError, CheckpointError, TypeError):
        return set()
    shards = set()
    for name in names:
        try:
            check_shard_name(name, index, "")
        except CheckpointError:
            continue
        if (index.parent / name).is_file():
            shards.add(index.parent / name)
    return shards


def hf_installed() -> bool:
    """Whether the `hf` extra (torch and transformers) can be imported, without importing it."""
    for name in ("torch", "transformers"):
        try:
            if importlib.util.find_spec(name) is None:
                return False
        except (ImportError, ValueError):  # ValueError: a module set to None in sys.modules
            return False
    return True


def _architecture_config(
    path: storage.Location, config: str | os.PathLike[str] | None, architecture: bool | None
) -> tuple[Path | None, str | None]:
    """Which config.json to check against (or None), and a note if the check is skipped."""
    if architecture is False:
        return None, None
    config_option = option("config", metavar="PATH")
    if config is not None:
        config = Path(config)
        if not config.is_file():
            raise BadInputError(f"{config}: config file not found")
        if not hf_installed():
            raise MissingExtraError(f"the architecture check ({config_option})", "hf")
        return config, None
    # Only a folder or an index is a model: a lone .safetensors file may sit beside an
    # unrelated config.json.
    found = (path if path.is_dir() else path.parent) / "config.json"
    if storage.is_remote(path) and not path.name.endswith(".safetensors") and found.is_file():
        if architecture:
            raise BadInputError(f"{path}: the architecture check reads a local config.json; pass {config_option}")
        return None, f"architecture check skipped: {found} is remote; pass {config_option} with a local copy"
    if path.name.endswith(".safetensors") or not found.is_file():
        if architecture:
            raise BadInputError(f"{path}: no config.json to check the architecture against; pass {config_option}")
        return None, None
    if not hf_installed():
        if architecture:
            raise MissingExtraError("the architecture check", "hf")
        return None, (
            f"architecture check skipped: {found} needs transformers and torch; {INSTALL_HINT} to check "
            "tensor names and shapes against it"
        )
    assert isinstance(found, Path)  # a remote one returned above
    return found, None


class _Run:
    """The problems, notes and counters of one verification."""

    def __init__(self, path: storage.Location, strict: bool, allow_unindexed: bool = False) -> None:
        self.path = path
        self.strict = strict
        self.allow_unindexed = allow_unindexed
        self.problems: list[Problem] = []
        self.checks: list[str] = []
        self.notes: list[str] = []
        self.warnings: list[str] = []
        self.bytes_read = 0
        self._broken: set[str] = set()
        #: with --dtype: tensor -> dtype the reference's tensor must have been converted to
        self.converted: Mapping[str, str] | None = None
        #: with --dtype on an FP8 source, or --dtype fp8: the (de)quantisation
        self.scales: ScalesFor | None = None

    def problem(self, check: str, message: str, file: object = None, tensor: str | None = None) -> None:
        self.problems.append(Problem(check, message, str(file) if file is not None else None, tensor))

    # ------------------------------------------------------------------ headers

    def check_files(self, files: list[storage.Location]) -> dict[storage.Location, Header]:
        """Every format rule, file by file."""
        self.checks.append("format")
        headers = {}
        for file in files:
            try:
                headers[file] = storage.read_header(file, strict=self.strict)
            except FormatError as exc:
                self._broken.add(exc.path)
                self.problem("format", exc.rule, exc.path, exc.tensor)
            except OSError as exc:
                self._broken.add(str(file))
                self.problem("format", f"cannot read: {exc.strerror or exc}", file)
        return headers

    def check_checkpoint(self) -> Checkpoint | None:
        """The index cross-checks; they need every header, so a broken file stops them."""
        self.checks.append("index")
        try:
            checkpoint = open_checkpoint(self.path, strict=self.strict, allow_unindexed=self.allow_unindexed)
        except FormatError as exc:
            if exc.path not in self._broken:
                self.problem("format", exc.rule, exc.path, exc.tensor)
            self.notes.append("index cross-checks stopped: a weight file is unreadable")
            return None
        except MissingShardsError as exc:
            for name in exc.missing:  # each its own problem: --json lists every file to fetch again
                self.problem("index", f"named in {exc.index} but missing: download it again", _beside(exc.index, name))
            return None
        except CheckpointError as exc:
            self.problem("index", str(exc))
            return None
        except OSError as exc:
            self.problem("index", f"cannot read: {exc.strerror or exc}", exc.filename)
            return None
        self.notes.extend(checkpoint.notes)
        for warning in checkpoint.warnings:
            if self.strict:
                self.problem("index", f"strict: {warning}")
            else:
                self.warnings.append(warning)
        return checkpoint

    def check_companions(self) -> None:
        """Every top-level .json of a model folder besides the index (config, generation
        config, tokenizer files, chat template ...) must parse: a loader stops on it."""
        if self.path.is_file() and self.path.name.endswith(".safetensors"):
            return  # a lone file's neighbours are not necessarily its model's files
        folder = self.path if self.path.is_dir() else self.path.parent
        self.checks.append("json")
        for file in sorted(folder.glob("*.json")):
            if ".safetensors.index" in file.name or not file.is_file():
                continue  # the index has its own check
            try:
                json.loads(file.read_text(encoding="utf-8"))
            except UnicodeDecodeError:
                self.problem("json", "not UTF-8 text: loaders cannot read it; restore it from the source", file)
            except ValueError as exc:
                self.problem("json", f"not valid JSON ({exc}): loaders cannot read it; restore it from the source",
                             file)
            except OSError as exc:
                self.problem("json", f"cannot read: {exc.strerror or exc}", file)

    def check_companion_files(self, checkpoint: Checkpoint | None) -> None:
        """The files a loader reads beside the weights (config, tokenizer, ...) must be
        readable: a dangling symlink is a download that did not finish."""
        if checkpoint is None or self.path.name.endswith(".safetensors"):
            return  # a lone weight file has no companions to check
        self.checks.append("companions")
        for path, problem in broken_companions(checkpoint):
            self.problem("companions", problem, path)

    # ------------------------------------------------------------------ bytes

    def check_bytes(
        self,
        files: list[storage.Location],
        checkpoint: Checkpoint | None,
        manifest: Manifest | None,
        reference: Checkpoint | None,
        progress: ProgressCallback | None,
    ) -> None:
        """Hub blob names, checksum manifest and `against`: one read of each file for the
        hashes, then the tensor-by-tensor comparison."""
        blobs = [blob for blob in (hub_blob(f) for f in files if isinstance(f, Path)) if blob is not None]
        reads = _Reads()
        for blob in blobs:
            reads.whole(blob.path)
        expected_files: dict[storage.Location, str] = {}
        if manifest is not None and manifest.kind == "files":
            expected_files = self._plan_file_manifest(manifest, files, checkpoint, reads)
        tensor_manifest = manifest if manifest is not None and manifest.kind == "tensors" else None
        if checkpoint is None:
            for skipped, what in ((tensor_manifest, "tensor checksums"), (reference, "comparison with --against")):
                if skipped is not None:
                    self.notes.append(f"{what} skipped: the checkpoint's headers do not cross-check")
            tensor_manifest = reference = None
        if tensor_manifest is not None and checkpoint is not None:
            for header in checkpoint.shards:
                reads.tensors(header)

        total = reads.total_bytes() + (2 * checkpoint.total_bytes if reference and checkpoint else 0)
        on_bytes = _progress(progress, total)
        digests = self._hash(reads, on_bytes)

        if blobs:
            self.checks.append("hub")
            for blob in blobs:
                self._check_blob(blob, digests)
        if manifest is not None and manifest.kind == "files":
            self.checks.append("checksums")
            for file, expected in expected_files.items():
                self._check_digest(file, expected, digests, manifest.path)
        if tensor_manifest is not None and checkpoint is not None:
            self.checks.append("tensor-checksums")
            self._check_tensor_manifest(tensor_manifest, checkpoint, digests)
        if reference is not None and checkpoint is not None:
            self.checks.append("against")
            self._compare(checkpoint, reference, on_bytes)

    def _plan_file_manifest(
        self, manifest: Manifest, files: list[storage.Location], checkpoint: Checkpoint | None, reads: _Reads
    ) -> dict[storage.Location, str]:
        base = self.path if self.path.is_dir() else self.path.parent
        expected = {}
        for name, digest in manifest.files.items():
            file = base / name
            if not file.is_file():
                self.problem("checksums", f"listed in {manifest.path} but missing", file)
                continue
            expected[file] = digest
            reads.whole(file)
        listed = {(base / name).resolve() for name in manifest.files}
        weight = [Path(h.path) for h in checkpoint.shards] if checkpoint is not None else files
        for file in weight:
            if file.name.endswith(".safetensors") and file.resolve() not in listed:
                self.problem(
                    "checksums",
                    f"not listed in {manifest.path}{_listed_as(file, base)}: its bytes are unverified",
                    file,
                )
        return expected

    def _hash(self, reads: _Reads, on_bytes: Callable[[int], None] | None) -> dict[storage.Location, _Digest]:
        digests = {}
        with Streamer() as streamer:
            for file, (whole, header) in sorted(reads.files.items()):
                ranges = _tensor_ranges(header) if header else []
                try:
                    result = stream.digest_file(streamer, file, whole=whole, ranges=ranges, on_bytes=on_bytes)
                except OSError as exc:
                    self.problem("read", f"cannot read: {exc.strerror or exc}", file)
                    continue
                self.bytes_read += result.bytes_read
                tensors = _tensor_digests(header, result.ranges) if header else {}
                digests[file] = _Digest(result.file, tensors)  # keyed by resolved path
        return digests

    def _check_blob(self, blob: HubBlob, digests: dict[storage.Location, _Digest]) -> None:
        actual = digests.get(blob.path.resolve())
        if actual is None or actual.file is None:
            return
        if actual.file != blob.sha256:
            self.problem(
                "hub",
                f"content SHA-256 is {actual.file} but the Hugging Face cache blob is named {blob.sha256}: "
                f"the download is truncated or corrupted (delete {blob.blob} and download it again)",
                blob.path,
            )

    def _check_digest(
        self, file: storage.Location, expected: str, digests: dict[storage.Location, _Digest], manifest: str
    ) -> None:
        actual = digests.get(file.resolve())
        if actual is not None and actual.file != expected:
            self.problem("checksums", f"SHA-256 is {actual.file} but {manifest} says {expected}", file)

    def _check_tensor_manifest(
        self, manifest: Manifest, checkpoint: Checkpoint, digests: dict[storage.Location, _Digest]
    ) -> None:
        for name, want in manifest.tensors.items():
            source = checkpoint.tensors.get(name)
            if source is None:
                self.problem("tensor-checksums", f"listed in {manifest.path} but not in the checkpoint", None, name)
                continue
            info, file, said = source.info, source.shard.path, f"{manifest.path} says"
            if info.dtype != want.dtype:
                self.problem("tensor-checksums", f"dtype is {info.dtype}, {said} {want.dtype}", file, name)
            elif info.shape != want.shape:
                self.problem("tensor-checksums", f"shape is {list(info.shape)}, {said} {list(want.shape)}", file, name)
            else:
                actual = digests.get(Path(file).resolve())
                if actual is not None and actual.tensors.get(name) != want.sha256:
                    self.problem("tensor-checksums", f"data SHA-256 differs from {manifest.path}", file, name)
        for name in sorted(set(checkpoint.tensors) - set(manifest.tensors)):
            file = checkpoint.tensors[name].shard.path
            self.problem("tensor-checksums", f"not listed in {manifest.path}: unverified", file, name)

    def _compare(self, checkpoint: Checkpoint, reference: Checkpoint, on_bytes: Callable[[int], None] | None) -> None:
        # compare_checkpoints reports the bytes of one side; both sides are read.
        both = (lambda step: on_bytes(2 * step)) if on_bytes is not None else None
        if self.converted is None:
            comparison = compare_checkpoints(checkpoint, reference, on_bytes=both)
        else:
            comparison = compare_checkpoints(
                reference, checkpoint, on_bytes=both, converted=self.converted, scales=self.scales
            ).swapped()
        self.bytes_read += 2 * comparison.compared_bytes
        source = reference.index_path or reference.shards[0].path

        def where(name: str) -> str:
            return checkpoint.tensors[name].shard.path

        for name in comparison.only_a:
            self.problem("against", f"not in {source}", where(name), name)
        def origin(name: str) -> str:  # a quantisation's scale tensor is made from its weight
            tensor = reference.tensors.get(name) or reference.tensors[name.removesuffix("_scale_inv")]
            return tensor.shard.path

        for name in comparison.only_b:
            self.problem("against", f"missing: {origin(name)} has it", self.path, name)
        has = f"{source} converted with --dtype has" if self.converted is not None else f"{source} has"
        for change in comparison.dtype_changed:
            self.problem("against", f"dtype {change.a}, {has} {change.b}", where(change.name), change.name)
        for change in comparison.shape_changed:
            self.problem("against", f"shape {change.a}, {source} has {change.b}", where(change.name), change.name)
        for name in comparison.data_different:
            made = "what --dtype makes of" if self.scales is not None else "in"
            self.problem("against", f"holds different bytes than {made} {origin(name)}", where(name), name)

    # ------------------------------------------------------------------ architecture

    def check_architecture(self, config: Path, checkpoint: Checkpoint | None, *, explicit: bool) -> None:
        if checkpoint is None:
            self.notes.append("architecture check skipped: the checkpoint's headers do not cross-check")
            return
        from ..checks import architecture

        present = {name: (t.info.dtype, t.info.shape) for name, t in checkpoint.tensors.items()}
        try:
            problems = architecture.check_architecture(config, present)
        except (architecture.ArchitectureCheckError, ImportError) as exc:  # MissingExtraError is one
            if explicit:
                raise BadInputError(f"architecture check: {exc}") from None
            self.notes.append(f"architecture check skipped: {exc}")
            return
        self.checks.append("architecture")
        for found in problems:
            source = checkpoint.tensors.get(found.tensor)
            where = source.shard.path if source else config
            self.problem("architecture", _architecture_message(found), where, found.tensor)


def _architecture_message(found: object) -> str:
    """The problem without the tensor's name (the report names it once), so the same
    mismatch on many tensors reads as one message."""
    kind, expected, actual = found.kind, found.expected, found.found  # type: ignore[attr-defined]
    if kind == "missing":
        return f"missing: the architecture expects {expected}"
    if kind == "unexpected":
        return f"unexpected: {actual} is not part of the architecture"
    if kind == "dtype":
        return f"dtype {actual}, the config says {expected}"
    return f"{kind} {actual}, the architecture expects {expected}"


@dataclass
class _Digest:
    file: str | None
    tensors: dict[str, str]


class _Reads:
    """Which files to read and what to hash in each: the whole file, its tensors, or both.

    Keyed by resolved path, so a file reached under two names is still read once."""

    def __init__(self) -> None:
        self.files: dict[storage.Location, tuple[bool, Header | None]] = {}

    def whole(self, file: storage.Location) -> None:
        file = file.resolve()
        _, header = self.files.get(file, (True, None))
        self.files[file] = (True, header)

    def tensors(self, header: Header) -> None:
        file = Path(header.path).resolve()
        whole, _ = self.files.get(file, (False, None))
        self.files[file] = (whole, header)

    def total_bytes(self) -> int:
        total = 0
        for file, (whole, header) in self.files.items():
            if whole:
                total += file.stat().st_size
            elif header is not None:
                total += header.data_size
        return total


def _listed_as(file: storage.Location, base: storage.Location) -> str:
    """How the manifest would name `file`, when that is more than the file name already shown."""
    name = manifest_name(file, base)
    return f" (as {name})" if name != file.name else ""


def _beside(file: str, name: str) -> str:
    """The path of `name` in `file`'s folder, local or remote (a Path would fold `s3://`)."""
    return f"{file.rsplit('/', 1)[0]}/{name}" if "/" in file else name


def _tensor_ranges(header: Header) -> list[tuple[int, int]]:
    return [(header.data_start + t.begin, header.data_start + t.end) for t in byte_runs(header)]


def _tensor_digests(header: Header, run_digests: Sequence[str]) -> dict[str, str]:
    """Each tensor's SHA-256 as `checksum --tensors` writes it: of the bytes a
    safetensors file holds, so a torch file's strided view is hashed made contiguous."""
    runs = byte_runs(header)
    digests = {t.name: d for t, d in zip(runs, run_digests)}
    if len(runs) != len(header.tensors):
        from ..plan.tensor_bytes import view_sha256

        for info in header.tensors:
            if info.name not in digests:
                digests[info.name] = view_sha256(SourceTensor(info, header))
    return digests


def _progress(progress: ProgressCallback | None, total: int) -> Callable[[int], None] | None:
    if progress is None or total == 0:
        return None
    return lambda step: progress(step, total)


def verify_pipeline(
    pipeline: Pipeline,
    shown: str,
    *,
    checksums: str | os.PathLike[str] | None,
    against: str | os.PathLike[str] | None,
    config: object,
    architecture: bool | None,
    strict: bool,
    progress: ProgressCallback | None,
) -> PipelineReport:
    """Each weight set verified on its own; a file manifest's lines are dealt out to the
    components they name, and the lines for other files (model_index.json, scheduler
    and tokenizer files, configs) are checked here."""
    import dataclasses

    from .pipeline_runs import (
        PipelineReport,
        component_row,
        elapsed,
        other_pipeline,
        own_warnings,
        row_warnings,
        weight_set_sizes,
    )


    if config is not None:
        raise BadInputError(
            f"{shown}: {option_name('config')} applies to one component; name it as PATH (e.g. {shown}/unet)"
        )
    started = time.perf_counter()
    manifest = read_manifest(Path(checksums)) if checksums is not None else None
    if manifest is not None and manifest.kind != "files":
        raise BadInputError(
            f"{manifest.path}: a tensor manifest covers one checkpoint; verify each component against its own"
        )
    reference = other_pipeline(against, option_name("against")) if against is not None else None
    problems: list[str] = []
    rows = []
    claimed: set[str] = set()
    for weight_set in pipeline.weight_sets:
        part = _manifest_part(manifest, weight_set, claimed) if manifest is not None else None
        other = None
        if reference is not None:
            match = reference.find(weight_set.component, weight_set.variant)
            if match is None:
                problems.append(f"{weight_set.label}: not in {against}")
                continue
            other = str(match.entry)
        report = verify(
            str(weight_set.entry), checksums=part, against=other, architecture=architecture, strict=strict,
            allow_unindexed=True, progress=progress,
        )
        report = dataclasses.replace(report, warnings=own_warnings(report.warnings, weight_set))
        parameters, size = weight_set_sizes(weight_set, strict)
        rows.append(component_row(
            weight_set, str(weight_set.entry), len(report.files), report.tensors, parameters, size, report.ok,
            report.to_dict(),
        ))
    if reference is not None:
        problems += [
            f"{s.label}: only in {against}, missing here"
            for s in reference.weight_sets
            if pipeline.find(s.component, s.variant) is None
        ]
    if manifest is not None:
        problems += _check_other_lines(manifest, pipeline.root, claimed)
    return PipelineReport(
        "verify", shown, rows, elapsed(started), problems=problems,
        notes=[f"{r.label}: {n}" for r in rows for n in r.report["notes"]],
        checksum_file=manifest.path if manifest is not None else None,
        warnings=[*pipeline.warnings, *row_warnings(rows)],
    )


def _manifest_part(manifest: Manifest, weight_set: WeightSet, claimed: set[str]) -> Manifest:
    """The manifest lines for this weight set's files, named relative to its folder."""
    own = {f.name for f in weight_set.files}
    prefix = weight_set.component + "/"
    files = {}
    for name, digest in manifest.files.items():
        relative = name.removeprefix("./")
        if relative.startswith(prefix) and relative[len(prefix) :] in own:
            files[relative[len(prefix) :]] = digest
            claimed.add(name)
    return Manifest(manifest.path, "files", files=files)


def _check_other_lines(manifest: Manifest, root: Path, claimed: set[str]) -> list[str]:
    """The manifest's lines no weight set claimed, each hashed and compared here."""
    import hashlib

    problems = []
    for name, digest in sorted(manifest.files.items()):
        if name in claimed:
            continue
        file = root / name
        if not file.is_file():
            problems.append(f"{file}: listed in {manifest.path} but missing")
            continue
        with open(file, "rb") as handle:
            actual = hashlib.file_digest(handle, "sha256").hexdigest() if hasattr(hashlib, "file_digest") else (
                hashlib.sha256(handle.read()).hexdigest()
            )
        if actual != digest:
            problems.append(f"{file}: SHA-256 is {actual} but {manifest.path} says {digest}")
    return problems
