"""`shardkit convert`: a torch `.bin`/`.pt`/`.pth` checkpoint as safetensors, torch-free.

The torch files are read as data (:mod:`shardkit.format.torch_checkpoint`: the zip's
directory and a pickle interpreter that executes nothing), so every tensor is a byte
range of its file and conversion is a copy at disk speed in constant memory. A folder
output is what the Hub's converter (safetensors' `convert.py`) makes of it: one
safetensors file per source file with the same tensors, an index for several, the
folder's config and tokenizer files copied.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from .. import storage
from ..checkpoint.shards import open_checkpoint
from ..engine.options import WriteOptions
from ..plan import output_path
from ..plan.files import plan_convert, plan_merge
from ..plan.recipe import load_recipe
from ..plan.selection import parse_selection
from ..reports import ConvertReport
from .writing import ProgressCallback, companion_copies, reshape, run_plan


def convert(
    source: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    force: bool = False,
    sha256: bool = False,
    dry_run: bool = False,
    verify: bool = False,
    dtype: str | None = None,
    keep: Sequence[str] = (),
    select: Sequence[str] = (),
    drop: Sequence[str] = (),
    rename: Sequence[tuple[str, str]] = (),
    recipe: str | None = None,
    endpoint_url: str | None = None,
    progress: ProgressCallback | None = None,
) -> ConvertReport:
    """Convert the checkpoint at `source` (a `.bin`/`.pt`/`.pth` file, a folder with
    `pytorch_model.bin` or `pytorch_model.bin.index.json` and its shards, or that index)
    to safetensors at `output`.

    An `output` ending in `.safetensors` is one file holding every tensor; any other is
    a folder laid out as the Hub converter lays it out (`pytorch_model-00001-of-00002.bin`
    → `model-00001-of-00002.safetensors`, `model.safetensors.index.json`, companions
    copied). Tensors sharing a storage are written as `convert.py` writes them: a tied
    duplicate once, its name recorded in the metadata and reported in `warnings`; views
    of a storage that do not overlap each get their own bytes; a transposed or strided
    view is made contiguous. Nothing of the pickle is ever executed: a file that names
    any function a state dict does not need is refused before a byte is written.

    `force`, `sha256`, `dry_run`, `verify`, `dtype`, `keep`, `select`, `drop`, `rename`,
    `endpoint_url` and `progress` are as for :func:`~shardkit.commands.merge.merge`.

    Example::

        report = shardkit.convert("gpt2-bin/", "gpt2-safetensors/")
        print(report.files, report.warnings)
    """
    output_path.placeholders(os.fspath(output))
    selection = parse_selection(select, drop, rename)
    recut = load_recipe(recipe) if recipe is not None else None
    source_path = storage.as_path(source, endpoint_url=endpoint_url)
    selected, dtypes = reshape(open_checkpoint(source_path), selection, recut, dtype, keep)
    checkpoint = selected.checkpoint
    # The output path as merge takes it: {name} templates, the foreign-suffix check, and
    # missing parent folders created (and removed again if the run fails).
    tensors = output_path.output_dtypes(checkpoint, dtypes)
    destination = output_path.resolve(output, source=source, tensors=tensors, endpoint_url=endpoint_url)
    as_folder = not destination.name.endswith(".safetensors")
    scales = dtypes.scales if dtypes else None
    if as_folder:
        plan = plan_convert(checkpoint, companion_copies(checkpoint, destination, dtypes), dtypes, scales)
    else:
        plan = plan_merge(checkpoint, destination.name, (), dtypes, scales)
    options = WriteOptions(force=force, sha256=sha256, dry_run=dry_run, verify=verify, progress=progress)
    with output_path.parents_created(destination, enabled=not dry_run):
        report = run_plan(
            ConvertReport, "convert", checkpoint, source_path, plan, destination, options,
            as_folder=as_folder, dtypes=dtypes, renamed=selected.renamed,
        )
    return report  # type: ignore[return-value]
