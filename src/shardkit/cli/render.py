"""Reports as people read them: short rich tables on stdout."""

from __future__ import annotations

from ..reports import WriteReport
from ..sizes import format_size


def console():  # noqa: ANN201 - rich is imported lazily to keep start-up fast
    from rich.console import Console

    return Console(highlight=False, soft_wrap=True)


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
    if report.verified:
        out.print("verified: every tensor equals the source, byte for byte")
