"""How one planned file becomes an S3 multipart upload assembled inside the store. Pure.

S3's UploadPartCopy copies a byte range of an existing object into a part of a new one
without the bytes passing through the client, so a merge or reshard inside one store
costs almost no traffic. The rules that shape the plan:

- every part but the last is 5 MiB to 5 GiB, and an upload has at most 10,000 parts;
- a part is either uploaded by the client or copied from one range of one object.

Parts the store cannot copy are *made by the client*: the bytes of every planned step
that is not a plain copy (the header, converted tensors), produced by
:func:`shardkit.plan.fill.fill` and uploaded in parts of at most `upload_part` bytes. A
made run shorter than 5 MiB takes in the start of the next copied range (fetched
with ranged GETs) to reach 5 MiB, as the first part does: the new header plus
enough leading tensor data.
A tensor range of 5 MiB or more becomes copy parts (split beyond 5 GiB). The hard
case is a run of small ranges between big ones (layer norms, biases, small
projections: several MB per layer, ~90 MB for a 0.5B model), which cannot be parts of
their own. They are assembled server-side in *staged objects*: a small range may be
the last part of an upload, so `staged₁ = base + small₁`, `staged₂ = staged₁ + small₂`,
... where the base is the last 5 MiB of the part before the run; the final staged
object then goes in as one copy part. Each step copies at most `chain_limit` bytes
inside the store, so the store's work stays linear in the file size. Only when an
upload would exceed 10,000 parts are its parts grouped into staged objects first.

The result, an :class:`ObjectPlan`, is checked by :func:`check_object_plan` and can be
replayed on bytes in memory, which is how the tests prove it right without a server.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

from .files import Copy, PlannedFile

MiB = 1024 * 1024


@dataclass(frozen=True)
class PartLimits:
    """S3's multipart limits (as AWS documents them), and how long a staged chain may grow."""

    min_part: int = 5 * MiB
    max_part: int = 5 * 1024 * MiB
    max_parts: int = 10_000
    #: A chain is cut once its staged object holds this much (the head goes in as a
    #: part, the last min_part bytes carry on), so a chain step copies < chain_limit + min_part.
    chain_limit: int = 10 * MiB
    #: Largest part the client makes and uploads: what it holds in memory per part in flight.
    upload_part: int = 8 * MiB

    @property
    def made_part(self) -> int:
        return min(self.upload_part, self.max_part)

    def __post_init__(self) -> None:
        # A big range is cut into pieces of at least max_part / 2; a staged object holds
        # less than chain_limit + min_part bytes, and a cut leaves a head of at least min_part.
        if self.min_part <= 0 or self.max_part < 2 * self.min_part or self.max_parts < 2:
            raise ValueError(f"inconsistent part limits: {self}")
        if not 2 * self.min_part <= self.chain_limit <= self.max_part - self.min_part:
            raise ValueError("chain_limit must lie between 2 × min_part and max_part − min_part")
        if self.made_part < self.min_part:
            raise ValueError("upload_part must be at least min_part")


@dataclass(frozen=True)
class Span:
    """`length` bytes at `offset` of `source`: a source location, or a staged object's name."""

    source: str
    offset: int
    length: int


@dataclass(frozen=True)
class UploadPart:
    """A part the client makes and uploads: bytes [start, start + length) of the planned
    file, produced from its steps (header, converted tensors, copied bytes fetched)."""

    start: int
    length: int

    @property
    def size(self) -> int:
        return self.length


@dataclass(frozen=True)
class CopyPart:
    """A part the store copies from one range of one object (UploadPartCopy)."""

    span: Span

    @property
    def size(self) -> int:
        return self.span.length


Part = UploadPart | CopyPart


@dataclass(frozen=True)
class StagedObject:
    """A temporary object built (in plan order) before the destination, deleted after it."""

    name: str
    parts: tuple[Part, ...]

    @property
    def size(self) -> int:
        return sum(p.size for p in self.parts)


@dataclass(frozen=True)
class ObjectPlan:
    """Staged objects to build first, then the destination object's parts (numbered from 1)."""

    parts: tuple[Part, ...]
    staged: tuple[StagedObject, ...] = ()

    @property
    def size(self) -> int:
        return sum(p.size for p in self.parts)

    def uploads(self) -> Iterable[tuple[str | None, tuple[Part, ...]]]:
        """Every multipart upload in order: (staged name, parts), the destination (None) last."""
        for staged in self.staged:
            yield staged.name, staged.parts
        yield None, self.parts

    @property
    def uploaded_bytes(self) -> int:
        """Bytes the client sends (parts it uploads)."""
        return sum(p.size for _, parts in self.uploads() for p in parts if isinstance(p, UploadPart))

    def fetched_bytes(self, planned: PlannedFile) -> int:
        """Bytes the client downloads to make the parts it uploads."""
        made = (p for _, parts in self.uploads() for p in parts if isinstance(p, UploadPart))
        return sum(span[2] for p in made for span in planned.source_spans(p.start, p.start + p.length))

    @property
    def copied_bytes(self) -> int:
        """Bytes the store copies by itself (UploadPartCopy), staged objects included."""
        return sum(p.size for _, parts in self.uploads() for p in parts if isinstance(p, CopyPart))


def plan_object(planned: PlannedFile, limits: PartLimits = PartLimits()) -> ObjectPlan:
    """The parts that assemble `planned` inside the store: copies of its plain-copy
    steps where S3's part rules allow, parts the client makes for everything else."""
    # Each cut of a chain adds a part: a huge file gets longer chains to stay within max_parts.
    wanted = -(-planned.size // (limits.max_parts // 2))
    limits = replace(limits, chain_limit=min(max(limits.chain_limit, wanted), limits.max_part - limits.min_part))
    if planned.size <= limits.min_part:
        return ObjectPlan((UploadPart(0, planned.size),))
    builder = _Builder(limits)
    for step in planned.steps:
        if isinstance(step, Copy):
            builder.add(Span(step.source, step.source_offset, step.length))
        else:
            builder.make(step.length)
    return builder.finish()


@dataclass
class _Tail:
    """The last part so far (at least min_part) and the small ranges to append to it."""

    base: Part
    appends: list[Span] = field(default_factory=list)
    #: The base is being made by the client and holds more than the header: small copied
    #: ranges join it (fetched) instead of costing a staged chain step each.
    absorbs: bool = False

    @property
    def size(self) -> int:
        return self.base.size + sum(s.length for s in self.appends)


class _Builder:
    def __init__(self, limits: PartLimits) -> None:
        self.limits = limits
        self.parts: list[Part] = []
        self.staged: list[StagedObject] = []
        self.tail: _Tail | None = None
        self.position = 0  # offset in the planned file of the next byte added

    def _open_upload(self) -> UploadPart | None:
        """The part being made by the client, if it is the tail and nothing is chained onto it."""
        tail = self.tail
        if tail is not None and isinstance(tail.base, UploadPart) and not tail.appends:
            return tail.base
        return None

    def make(self, length: int) -> None:
        """`length` bytes only the client can produce (a header, a converted tensor)."""
        if self._open_upload() is None:
            self._flush()
            self.tail = _Tail(UploadPart(self.position, 0))
        assert self.tail is not None
        self.tail.absorbs = self.tail.absorbs or self.position > 0
        self._grow(length)

    def _grow(self, length: int) -> None:
        """Extend the part being made; full parts of `made_part` bytes are emitted."""
        assert self.tail is not None and isinstance(self.tail.base, UploadPart)
        cap = self.limits.made_part
        start, size = self.tail.base.start, self.tail.base.length
        self.position += length
        while length:
            take = min(length, cap - size)
            size, length = size + take, length - take
            if size == cap and length:
                self.parts.append(UploadPart(start, size))
                start, size = start + size, 0
        self.tail.base = UploadPart(start, size)

    def add(self, segment: Span) -> None:
        made = self._open_upload()
        if made is not None and self.tail is not None and self.tail.absorbs and segment.length < self.limits.min_part:
            self._grow(segment.length)
            return
        if made is not None and made.size < self.limits.min_part:
            # A part that is not last needs min_part bytes: the client fetches the lead of this range.
            lead = min(segment.length, self.limits.min_part - made.size)
            self._grow(lead)
            segment = Span(segment.source, segment.offset + lead, segment.length - lead)
            if not segment.length:
                return
        self.position += segment.length
        if segment.length >= self.limits.min_part:
            self._flush()
            pieces = _split(segment, self.limits.max_part)
            self.parts.extend(CopyPart(p) for p in pieces[:-1])
            self.tail = _Tail(CopyPart(pieces[-1]))
            return
        tail = self.tail
        if tail is None:  # a file that opens with a small copied range: the client makes it
            self.position -= segment.length
            self.make(segment.length)
            return
        if not tail.appends:
            self._carve(tail)
        elif tail.size >= self.limits.chain_limit:
            staged = self._chain(tail.base, tail.appends)
            keep = self.limits.min_part
            self.parts.append(CopyPart(Span(staged.name, 0, staged.size - keep)))
            tail = self.tail = _Tail(CopyPart(Span(staged.name, staged.size - keep, keep)))
        tail.appends.append(segment)

    def _carve(self, tail: _Tail) -> None:
        """Copy a long base in directly and keep only its last min_part bytes to chain onto,
        so every chain step copies little."""
        base, keep = tail.base, self.limits.min_part
        if base.size < 2 * keep:
            return
        if isinstance(base, CopyPart):
            span = base.span
            self.parts.append(CopyPart(Span(span.source, span.offset, span.length - keep)))
            tail.base = CopyPart(Span(span.source, span.offset + span.length - keep, keep))
        else:
            self.parts.append(UploadPart(base.start, base.length - keep))
            tail.base = UploadPart(base.start + base.length - keep, keep)

    def _chain(self, base: Part, appends: Sequence[Span]) -> StagedObject:
        """staged₁ = base + a₁, staged₂ = staged₁ + a₂, ...: each small range is the last,
        size-exempt part of its upload."""
        previous: Part = base
        staged = None
        for span in appends:
            staged = StagedObject(f"staged-{len(self.staged) + 1:05d}", (previous, CopyPart(span)))
            self.staged.append(staged)
            previous = CopyPart(Span(staged.name, 0, staged.size))
        assert staged is not None
        return staged

    def _flush(self) -> None:
        tail, self.tail = self.tail, None
        if tail is None:
            return
        if tail.appends:
            staged = self._chain(tail.base, tail.appends)
            self.parts.append(CopyPart(Span(staged.name, 0, staged.size)))
        else:
            self.parts.append(tail.base)

    def finish(self) -> ObjectPlan:
        tail = self.tail
        if tail is not None and tail.appends:
            # The very last part may be small: the last range goes in as is, one chain step saved.
            last = tail.appends.pop()
            self._flush()
            self.parts.append(CopyPart(last))
        else:
            self._flush()
        parts = self.parts
        if len(parts) > self.limits.max_parts:
            parts = self._group(parts)
        return ObjectPlan(tuple(parts), tuple(self.staged))

    def _group(self, parts: list[Part]) -> list[Part]:
        """Too many parts: gather runs of consecutive parts into staged objects of at most
        max_part bytes, each then copied in as one part."""
        grouped: list[Part] = []
        run: list[Part] = []

        def close() -> None:
            if len(run) == 1:
                grouped.append(run[0])
            elif run:
                staged = StagedObject(f"staged-{len(self.staged) + 1:05d}", tuple(run))
                self.staged.append(staged)
                grouped.append(CopyPart(Span(staged.name, 0, staged.size)))
            run.clear()

        for part in parts:
            if run and sum(p.size for p in run) + part.size > self.limits.max_part:
                close()
            run.append(part)
        close()
        if len(grouped) > self.limits.max_parts:
            raise ValueError(
                f"{sum(p.size for p in parts)} bytes need more than {self.limits.max_parts} parts "
                f"of at most {self.limits.max_part} bytes"
            )
        return grouped


def _split(span: Span, max_part: int) -> list[Span]:
    """A range cut into near-equal pieces of at most max_part bytes."""
    count = -(-span.length // max_part)
    step, extra = divmod(span.length, count)
    pieces, offset = [], span.offset
    for i in range(count):
        length = step + (1 if i < extra else 0)
        pieces.append(Span(span.source, offset, length))
        offset += length
    return pieces


def check_object_plan(plan: ObjectPlan, limits: PartLimits = PartLimits()) -> None:
    """Raise ValueError if any upload of `plan` breaks a multipart rule, or a staged object
    is used before it is built."""
    built: dict[str, int] = {}
    for name, parts in plan.uploads():
        where = name or "destination"
        if not 1 <= len(parts) <= limits.max_parts:
            raise ValueError(f"{where}: {len(parts)} parts")
        for number, part in enumerate(parts, 1):
            if part.size > limits.max_part or (number < len(parts) and part.size < limits.min_part):
                raise ValueError(f"{where}: part {number} holds {part.size} bytes")
            spans = (part.span,) if isinstance(part, CopyPart) else ()
            for span in spans:
                if span.source.startswith("staged-"):
                    if span.source not in built:
                        raise ValueError(f"{where}: part {number} copies {span.source} before it is built")
                    if span.offset < 0 or span.offset + span.length > built[span.source]:
                        raise ValueError(f"{where}: part {number} copies past the end of {span.source}")
        if name is not None:
            built[name] = sum(p.size for p in parts)
