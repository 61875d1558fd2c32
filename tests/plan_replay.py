"""Replaying plans on bytes in memory: what the plan tests share.

`replay` assembles an S3 object plan as a store would, `memory_read` is the `read` of
`fill` over in-memory sources, `planned_bytes` reads a planned file's steps without
`fill`: an independent reading to compare `fill` with.
"""

from __future__ import annotations

from shardkit.plan.files import Literal, PlannedFile
from shardkit.plan.fill import fill
from shardkit.plan.multipart import ObjectPlan, PartLimits, Span, UploadPart, check_object_plan


def replay(plan: ObjectPlan, planned: PlannedFile, sources: dict[str, bytes], limits: PartLimits) -> bytes:
    """Assemble the object as a store would, refusing anything a store refuses."""
    check_object_plan(plan, limits)
    built: dict[str, bytes] = {}

    def span_bytes(span: Span) -> bytes:
        data = built[span.source] if span.source in built else sources[span.source]
        assert span.offset + span.length <= len(data)
        return data[span.offset : span.offset + span.length]

    def made(part: UploadPart) -> bytes:
        out = bytearray(part.length)
        fill(planned, part.start, memoryview(out), memory_read(sources))
        return bytes(out)

    result = b""
    for name, parts in plan.uploads():
        out = b"".join(made(part) if isinstance(part, UploadPart) else span_bytes(part.span) for part in parts)
        if name is None:
            result = out
        else:
            built[name] = out
    return result


def memory_read(sources: dict[str, bytes]):
    def read(source: str, offset: int, into: memoryview) -> None:
        assert offset + len(into) <= len(sources[source])
        into[:] = sources[source][offset : offset + len(into)]

    return read


def planned_bytes(planned: PlannedFile, sources: dict[str, bytes]) -> bytes:
    """The planned file, from its steps, without `fill`."""
    out = bytearray(planned.size)
    for step in planned.steps:
        if isinstance(step, Literal):
            out[step.offset : step.offset + step.length] = step.data
        else:
            data = sources[step.source][step.source_offset : step.source_offset + step.length]
            out[step.offset : step.offset + step.length] = data
    return bytes(out)
