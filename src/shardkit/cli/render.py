"""Reports as people read them: short rich tables on stdout."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..checkpoint import layouts
from ..reports import SplitReport, WriteReport
from ..sizes import format_size

if TYPE_CHECKING:
    from ..commands.checksum import ChecksumReport
    from ..commands.clean import CleanReport
    from ..commands.diff import DiffReport
    from ..commands.inspect import InspectReport
    from ..commands.verify import VerifyReport


def console():  # noqa: ANN201 - rich is imported lazily to keep start-up fast
    import sys

    from rich.console import Console

    # Piped output goes to files and CI logs: never truncate paths or digests there.
    width = None if sys.stdout.isatty() else 1000
    # markup=False: what is printed holds file and tensor names, which may contain
    # `[v2]` or `[/`; rich would eat the first as a style and fail on the second.
    return Console(highlight=False, soft_wrap=True, width=width, markup=False, emoji=False)


def print_write_report(report: WriteReport) -> None:
    from rich.table import Table

    out = console()
    verb = "would write" if report.dry_run else "wrote"
    table = Table(show_header=True, header_style="bold", box=None, pad_edge=False)
    table.add_column("file")
    table.add_column("tensors", justify="right")
    table.add_column("size", justify="right")
    if any(f.sha256 for f in report.files):
        table.add_column("sha256")
    for f in report.files:
        row = [f.path, str(f.tensors), format_size(f.size)]
        if f.sha256:
            row.append(f.sha256)
        table.add_row(*row)
    out.print(table)
    summary = (
        f"{report.command}: {verb} {report.tensors} tensors, {report.parameters:,} parameters, "
        f"{format_size(report.bytes)} from {len(report.source_files)} source file(s)"
    )
    if report.dry_run:
        summary += f" in {report.copy_ranges} copy range(s), {report.header_bytes} header bytes"
    else:
        summary += f" in {report.seconds:.2f} s ({format_size(int(report.throughput))}/s)"
    out.print(summary)
    if report.index:
        out.print(f"index: {report.index}")
    if report.copied_files:
        out.print("copied: " + ", ".join(report.copied_files))
    if report.checksum_file:
        out.print(f"checksums: {report.checksum_file}")
    if report.dtype is not None:
        for line in report.dtype.notes():
            out.print(line)
    for line in _renames(report):
        print(line)
    if report.verified:
        same = "its conversion of the source, recomputed" if report.dtype is not None else "the source, byte for byte"
        out.print(f"verified: every tensor equals {same}")
    if report.transfer:
        t = report.transfer
        copied = f"; the store copied {format_size(t.bytes_copied)} itself" if t.bytes_copied else ""
        out.print(
            f"transfer: {t.requests} requests, {format_size(t.bytes_sent)} sent, "
            f"{format_size(t.bytes_received)} received{copied}"
        )


def _aligned(rows: list[list[str]], right: frozenset[int] | set[int] = frozenset()) -> list[str]:
    """Rows as aligned plain-text columns that never wrap or truncate: long tensor
    names stay whole and greppable, and piping to a file or less keeps every column."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))] if rows else []
    return [
        "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()
        for row in rows
    ]


def print_split_report(report: SplitReport) -> None:
    """A dry run shows the layout: each shard with the first and last tensor it holds
    (shards hold consecutive runs of tensors in name order); a real run shows what
    was written, as merge does."""
    if not report.dry_run:
        print_write_report(report)
        return
    rows = []
    for f in report.files:
        names = report.layout.get(Path(f.path).name, [])
        holds = "" if not names else names[0] if len(names) == 1 else f"{names[0]} … {names[-1]}"
        rows.append([Path(f.path).name, str(f.tensors), format_size(f.size), holds])
    for line in _aligned([["shard", "tensors", "size", "holds (packed in name order)"], *rows], right={1, 2}):
        print(line)
    shards = f"{len(report.files)} shard(s)" + (" and an index" if report.index else ", no index")
    print(
        f"split: would write {shards} of at most {format_size(report.max_shard_size)} to {report.output}: "
        f"{report.tensors} tensors, {report.parameters:,} parameters, {format_size(report.bytes)}"
    )
    if report.copied_files:
        print("would copy: " + ", ".join(report.copied_files))
    for line in _renames(report):
        print(line)


def _renames(report: WriteReport) -> list[str]:
    """A dry run lists every old → new name (what the run would write, to check before
    it does); a real run says how many were renamed."""
    if not report.renamed:
        return []
    if not report.dry_run:
        return [f"renamed: {len(report.renamed)} tensor(s) (--dry-run lists them)"]
    return [f"renamed {len(report.renamed)} tensor(s):"] + [f"  {old} → {new}" for old, new in report.renamed]


def _count(value: int) -> str:
    """7615616512 → "7.62B": parameter counts as model cards write them."""
    for unit, scale in (("T", 10**12), ("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if value >= scale:
            return f"{value / scale:.2f}{unit}"
    return str(value)


def _shape(shape: list[int]) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


def print_inspect_report(report: InspectReport) -> None:
    """Summary, files, then the layer view (or, with --tensors, every tensor).
    Plain print, no rich: inspect is meant to be instant."""
    lines = []
    if report.index:
        state = "agrees with the shards" if report.index_consistent else "total_size disagrees, see warning"
        lines.append(["index", f"{report.index} ({state})"])
    by_dtype = ", ".join(f"{dtype} {count:,}" for dtype, count in report.parameters_by_dtype.items())
    lines += [
        ["files", str(len(report.files))],
        ["tensors", str(report.tensors)],
        ["parameters", f"{report.parameters:,} ({_count(report.parameters)})" + (f"; {by_dtype}" if by_dtype else "")],
        ["bytes", f"{report.bytes:,} ({format_size(report.bytes)})"],
    ]
    quantization = report.quantization
    if quantization is not None:
        block = "×".join(map(str, quantization.block_size)) if quantization.block_size else "per tensor/channel"
        lines.append([
            "quantisation",
            f"{quantization.scheme} (F8_E4M3, blocks {block}): {quantization.quantised_tensors} quantised tensors, "
            f"{quantization.scale_tensors} scale tensors ({quantization.scale_parameters:,} values, not counted "
            "as parameters)",
        ])
    if report.metadata:
        lines.append(["metadata", ", ".join(f"{k}={v}" for k, v in report.metadata.items())])
    extra = {k: v for k, v in report.index_metadata.items() if k != "total_size"}
    if extra:
        lines.append(["index metadata", ", ".join(f"{k}={v}" for k, v in extra.items())])
    print("\n".join(_aligned(lines)))

    if len(report.files) > 1:
        rows = [[f.path, str(f.tensors), format_size(f.size), f"{f.header_size:,} B"] for f in report.files]
        print()
        print("\n".join(_aligned([["file", "tensors", "size", "header"], *rows], right={1, 2, 3})))

    if report.filter is not None:
        print()
        print(
            f"filter {report.filter!r}: {report.matched_tensors} of {report.tensors} tensors, "
            f"{report.matched_parameters:,} parameters, {format_size(report.matched_bytes)}"
        )
    if report.tensor_rows is not None:
        head = ["tensor", "dtype", "shape", "parameters", "bytes", "shard", "offset"]
        rows = [
            [r.name, r.dtype, _shape(r.shape), f"{r.parameters:,}", f"{r.bytes:,}", r.shard, f"{r.offset:,}"]
            for r in report.tensor_rows
        ]
        right = {3, 4, 6}
    else:
        head = ["tensor", "dtype", "shape", "count", "parameters"]
        rows = [
            [g.pattern, g.dtype, _shape(g.shape), f"×{g.count}" if g.count > 1 else "", f"{g.parameters:,}"]
            for g in report.layers
        ]
        right = {3, 4}
    if rows:
        print()
        print("\n".join(_aligned([head, *rows], right=right)))


def print_diff_report(report: DiffReport) -> None:
    """One line per difference, then a summary line that says identical or not (plain
    print: tensor names may hold brackets that rich would read as markup)."""
    for name in report.only_a:
        print(f"- {name}  (only in A)")
    for name in report.only_b:
        print(f"+ {name}  (only in B)")
    for change in report.dtype_changed:
        print(f"~ {change.name}  dtype {change.a} → {change.b}")
    for change in report.shape_changed:
        print(f"~ {change.name}  shape {change.a} → {change.b}")
    for meta in report.metadata_changed:
        where = "metadata" if meta.scope == "file" else "index metadata"
        before = "(absent)" if meta.a is None else repr(meta.a)
        after = "(absent)" if meta.b is None else repr(meta.b)
        print(f"~ {where} {meta.key!r}  {before} → {after}")
    companions = (("-", report.files_only_a, "(only in A)"), ("+", report.files_only_b, "(only in B)"),
                  ("≠", report.files_different, "differs"))
    for sign, names, what in companions:
        for name in names:
            print(f"{sign} file {name}  {what}")
    for old, new in report.renamed:
        print(f"= {old} ↔ {new}, same bytes")
    for name in report.data_different:
        line = f"≠ {name}  data differs"
        if report.max_abs_diff is not None:
            value = report.max_abs_diff.get(name)
            line += "  (max |a-b| not measurable for this dtype)" if value is None else f"  max |a-b| = {value:.9g}"
        print(line)
    verdict = "identical" if report.identical else "different"
    if not report.data_compared:
        verdict += " headers"
    if report.data_compared:
        data = f"{report.data_equal} tensors with equal data ({format_size(report.compared_bytes)} compared)"
    else:
        data = "data not compared (--no-data)"
    print(f"{verdict}: A has {report.tensors_a} tensors, B has {report.tensors_b}; {data}")


#: More tensors (or files) than this with the same problem make one summary line.
FLOOD = 3


def folded_problems(report: VerifyReport) -> list[str]:
    """`check: file: tensor 'x': message`, one per problem, except that the same problem
    on more than FLOOD tensors of a file (or on more than FLOOD files) is one line
    with a few of the names; --json keeps every one."""
    groups: dict[tuple[str, str, str | None], list[object]] = {}
    for problem in report.problems:
        key = (problem.check, problem.message, problem.file if problem.tensor is not None else None)
        groups.setdefault(key, []).append(problem)
    lines = []
    for (check, message, file), members in groups.items():
        if len(members) <= FLOOD:
            lines += [f"{check}: {problem}" for problem in members]
        elif file is not None:
            tensors = [repr(p.tensor) for p in members]  # type: ignore[attr-defined]
            lines.append(f"{check}: {file}: {len(members)} tensors: {message}: {layouts.names(tensors)}")
        else:
            where = [str(p.file) for p in members]  # type: ignore[attr-defined]
            lines.append(f"{check}: {len(members)} files: {message}: {layouts.names(where)}")
    return lines


def print_verify_report(report: VerifyReport) -> None:
    """One line per problem (check, file, tensor, rule; floods folded), then a verdict
    line (plain print: messages hold shapes in brackets that rich would read as markup)."""
    for line in folded_problems(report):
        print(f"✗ {line}")
    files = f"{len(report.files)} file(s), {report.tensors} tensors"
    verdict = f"OK: {files}" if report.ok else f"FAILED: {len(report.problems)} problem(s) in {files}"
    read = ""
    if report.bytes_read:
        speed = report.bytes_read / report.read_seconds if report.read_seconds > 0 else 0
        read = f"; read {format_size(report.bytes_read)} ({format_size(int(speed))}/s)"
    print(f"verify: {verdict}; checks: {', '.join(report.checks)}{read}; {report.seconds:.2f} s")


def print_checksum_report(report: ChecksumReport) -> None:
    """The summary printed when the manifest went to a file (-o)."""
    kind = f"{len(report.tensors)} tensors" if report.kind == "tensors" else f"{len(report.files)} file(s)"
    speed = report.bytes / report.seconds if report.seconds > 0 else 0
    print(
        f"checksum: wrote {report.output}: {kind}, {format_size(report.bytes)} hashed in "
        f"{report.seconds:.2f} s ({format_size(int(speed))}/s)"
    )


def print_clean_report(report: CleanReport) -> None:
    folder = Path(report.folder)
    verb = "would remove" if report.dry_run else "removed"
    for name in report.removed:
        print(f"{verb} {folder / name}")
    for name in report.in_use:
        print(f"kept {folder / name}: its writer is still running")
    print(f"clean: {verb} {len(report.removed)} temporary entr{'y' if len(report.removed) == 1 else 'ies'} "
          f"({format_size(report.bytes)}) from {folder}")
