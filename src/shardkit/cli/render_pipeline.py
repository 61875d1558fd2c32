"""A diffusers pipeline's report as people read it: one row per component, one verdict."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeGuard

from ..reports import SplitReport, WriteReport
from ..sizes import format_size
from .render import _aligned, print_split_report, print_write_report

if TYPE_CHECKING:
    from ..commands.pipeline_runs import PipelineReport

_VERDICT = {"verify": ("OK", "FAILED"), "diff": ("identical", "different")}


def is_pipeline_report(report: object) -> TypeGuard[PipelineReport]:
    return type(report).__name__ == "PipelineReport"


def print_written(report: object) -> None:
    """What merge or split wrote: a pipeline's components, or one checkpoint's files."""
    if is_pipeline_report(report):
        print_pipeline_report(report)
    elif isinstance(report, SplitReport):
        print_split_report(report)
    else:
        assert isinstance(report, WriteReport)
        print_write_report(report)


def print_pipeline_report(report: PipelineReport) -> None:
    """Plain print, no rich: component names and paths are data (brackets included)."""
    judged = report.command in _VERDICT
    head = ["component", "files", "tensors", "parameters", "size", "path"]
    if judged:
        head.insert(1, "result")
    rows = []
    for c in report.components:
        row = [c.label, str(c.files), f"{c.tensors:,}", f"{c.parameters:,}", format_size(c.bytes), c.path]
        if judged:
            row.insert(1, _VERDICT[report.command][0 if c.ok else 1])
        rows.append(row)
    print("\n".join(_aligned([head, *rows], right={2, 3, 4, 5} if judged else {1, 2, 3, 4})))
    for line in problem_lines(report):
        print(line)
    if report.command == "inspect":
        _print_tensor_rows(report)
    if report.copied_files and report.command in ("merge", "split"):
        print(("would copy: " if report.dry_run else "copied: ") + ", ".join(report.copied_files))
    if report.checksum_file:
        print(f"checksums: {report.checksum_file}")
    print(_summary(report))


def problem_lines(report: PipelineReport) -> list[str]:
    """Every problem of a verify or diff, component by component, then the pipeline's own."""
    lines = [f"{c.label}: {line}" for c in report.components for line in _component_lines(report.command, c.report)]
    return lines + [f"✗ {problem}" for problem in report.problems]


def _component_lines(command: str, detail: dict[str, Any]) -> list[str]:
    """What went wrong inside a component: verify's problems, diff's differences."""
    if command == "verify":
        return [f"✗ {p['check']}: {_where(p)}{p['message']}" for p in detail.get("problems", [])]
    if command == "diff":
        lines = [f"- {n}  (only in A)" for n in detail.get("only_a", [])]
        lines += [f"+ {n}  (only in B)" for n in detail.get("only_b", [])]
        for key, what in (("dtype_changed", "dtype"), ("shape_changed", "shape")):
            lines += [f"~ {c['name']}  {what} {c['a']} → {c['b']}" for c in detail.get(key, [])]
        lines += [f"~ metadata {m['key']!r}  {m['a']!r} → {m['b']!r}" for m in detail.get("metadata_changed", [])]
        lines += [f"≠ {n}  data differs" for n in detail.get("data_different", [])]
        return lines
    return []


def _print_tensor_rows(report: PipelineReport) -> None:
    """inspect --tensors / --filter: each component's rows under its name."""
    for c in report.components:
        detail = c.report
        rows = detail.get("tensor_rows")
        if (rows is None and detail.get("filter") is None) or (detail.get("filter") and not detail["matched_tensors"]):
            continue
        print()
        print(f"{c.label}: filter {detail['filter']!r}: {detail['matched_tensors']} of {detail['tensors']} tensors"
              if detail.get("filter") is not None else f"{c.label}:")
        if rows is not None:
            head = ["tensor", "dtype", "shape", "parameters", "bytes", "shard", "offset"]
            body = [[r["name"], r["dtype"], str(r["shape"]), f"{r['parameters']:,}", f"{r['bytes']:,}", r["shard"],
                     f"{r['offset']:,}"] for r in rows]
        else:
            head = ["tensor", "dtype", "shape", "count", "parameters"]
            body = [[g["pattern"], g["dtype"], str(g["shape"]), f"×{g['count']}" if g["count"] > 1 else "",
                     f"{g['parameters']:,}"] for g in detail["layers"]]
        if body:
            print("\n".join(_aligned([head, *body], right={3, 4, 6} if rows is not None else {3, 4})))


def _where(problem: dict[str, Any]) -> str:
    where = f"{problem['file']}: " if problem.get("file") else ""
    return where + (f"tensor {problem['tensor']!r}: " if problem.get("tensor") is not None else "")


def _summary(report: PipelineReport) -> str:
    count = f"{len(report.components)} component weight set(s), {report.tensors:,} tensors, {format_size(report.bytes)}"
    if report.command in ("merge", "split"):
        verb = "would write" if report.dry_run else "wrote"
        return f"{report.command}: {verb} a diffusers pipeline to {report.output}: {count} in {report.seconds:.2f} s"
    if report.command in _VERDICT:
        good, bad = _VERDICT[report.command]
        return f"{report.command}: {good if report.ok else bad}: diffusers pipeline {report.path}, {count}"
    return f"{report.command}: diffusers pipeline {report.path}: {count}"
