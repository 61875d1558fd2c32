"""`shardkit split` (alias `reshard`): a checkpoint into Hugging Face shards of a given size.

The source may be one file or already sharded: resharding 4 shards into 8, or into 1,
is the same operation, since the plan only looks at the tensors, never at how the
source happened to be cut.
"""

from __future__ import annotations

import dataclasses
import os
import unicodedata
from collections.abc import Sequence
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING

from .. import storage
from ..checkpoint.layers import natural_key, natural_keys_distinct
from ..checkpoint.shards import Checkpoint, open_checkpoint
from ..engine.options import WriteOptions
from ..errors import BadInputError, option_name
from ..plan import output_path
from ..plan.conversion import DtypeChoice
from ..plan.files import Plan, plan_split
from ..plan.recipe import load_recipe
from ..plan.selection import parse_selection
from ..reports import SplitReport
from ..sizes import DEFAULT_MAX_SHARD_SIZE, parse_size
from .writing import (
    ProgressCallback,
    companion_copies,
    refuse_selection_of_pipeline,
    reshape,
    run_plan,
    whole_run_seconds,
)

if TYPE_CHECKING:
    from ..checkpoint.pipeline import Pipeline
    from ..checkpoint.variants import WeightSet
    from .pipeline_runs import PipelineReport


@whole_run_seconds
def split(
    source: str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    *,
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
    prefix: str = "model",
    force: bool = False,
    sha256: bool = False,
    dry_run: bool = False,
    strict: bool = False,
    allow_unindexed: bool = False,
    verify: bool = False,
    dtype: str | None = None,
    keep: Sequence[str] = (),
    block_size: str | None = None,
    select: Sequence[str] = (),
    drop: Sequence[str] = (),
    rename: Sequence[tuple[str, str]] = (),
    recipe: str | None = None,
    endpoint_url: str | None = None,
    progress: ProgressCallback | None = None,
    verify_progress: ProgressCallback | None = None,
) -> SplitReport:
    """Write the checkpoint at `source` into `output_dir` as shards of at most
    `max_shard_size` tensor-data bytes ("5GB" = 5·10⁹, "4GiB" = 4·2³⁰, or an int).

    The folder gets `{prefix}-00001-of-0000N.safetensors` shards plus
    `{prefix}.safetensors.index.json`, or a lone `{prefix}.safetensors` and no index
    when everything fits in one shard, plus the source folder's non-weight files. A
    tensor larger than the limit gets a shard of its own, as in huggingface_hub, so a
    shard can exceed the limit. The folder is staged and swapped in whole: an old
    index or shard of a replaced `output_dir` can never survive next to the new ones.
    Source and output may be remote, and `dtype`, `keep` and `block_size` convert (or quantise), as for
    :func:`~shardkit.commands.merge.merge`; shards are packed by the converted sizes.
    `select`, `drop` and `rename` choose and rename tensors as for merge; shards are
    packed and the index's weight_map written by the new names; so is `recipe`.
    `output_dir` may be a name template, as there. `prefix` names the shards
    (`diffusion_pytorch_model` for diffusers); a diffusers pipeline is split component
    by component, each with its own prefix. With `verify`, the staged folder is
    compared tensor by tensor with the source before it is committed, and discarded
    (an earlier output left as it was) if anything differs.

    `force` replaces an existing output: a file, or a folder holding only an earlier
    output (weight, index, config, tokenizer and checksum files), never a source or
    its folder; `sha256` hashes the output in
    the same pass and writes a `sha256sum -c` file; `dry_run` returns the plan's report
    and writes nothing; `strict` also refuses what the format forbids but the reference
    reader tolerates; `allow_unindexed` ignores weight files no index covers;
    `endpoint_url` names an S3-compatible store; `progress(advance, total)` is called
    with the bytes just written, `verify_progress(advance, total)` with the bytes
    `verify` compared.

    Example::

        report = shardkit.split("qwen.safetensors", "qwen-sharded", max_shard_size="2GB")
        print(report.index, report.layout)
    """
    output_path.placeholders(os.fspath(output_dir))
    options = WriteOptions(
        force=force, sha256=sha256, dry_run=dry_run, verify=verify, progress=progress, verify_progress=verify_progress
    )
    location = storage.as_path(source, endpoint_url=endpoint_url)
    limit = parse_size(max_shard_size)
    _check_prefix(prefix)
    selection = parse_selection(select, drop, rename)
    recut = load_recipe(recipe) if recipe is not None else None
    from ..checkpoint.pipeline import find_pipeline

    pipeline = find_pipeline(location, allow_unindexed=allow_unindexed)
    if pipeline is not None:
        refuse_selection_of_pipeline(location, selection, recut)
        if prefix != "model" or dtype is not None or keep or block_size is not None:
            given = option_name("prefix" if prefix != "model" else "dtype")
            raise BadInputError(
                f"{location}: a diffusers pipeline's components keep their own names and dtypes; {given} applies "
                f"to one component (e.g. {location}/unet)"
            )
        return split_pipeline(  # type: ignore[return-value]
            pipeline, source, output_dir, options, max_shard_size=limit, strict=strict
        )
    opened = open_checkpoint(location, strict=strict, allow_unindexed=allow_unindexed, whole=True)
    selected, dtypes = reshape(opened, selection, recut, dtype, keep, block_size)
    checkpoint = selected.checkpoint
    tensors = output_path.output_dtypes(checkpoint, dtypes)
    destination = output_path.resolve(output_dir, source=source, tensors=tensors, endpoint_url=endpoint_url)
    with output_path.parents_created(destination, enabled=not dry_run):
        return split_checkpoint(
            checkpoint, location, destination, options, max_shard_size=limit, prefix=prefix, dtypes=dtypes,
            renamed=selected.renamed,
        )


def split_checkpoint(
    checkpoint: Checkpoint,
    source: storage.Location,
    output_dir: storage.Location,
    options: WriteOptions,
    *,
    max_shard_size: int,
    prefix: str = "model",
    variant: str | None = None,
    dtypes: DtypeChoice | None = None,
    renamed: Sequence[tuple[str, str]] = (),
) -> SplitReport:
    """Split an opened checkpoint into `output_dir`. With `variant` (`fp16`), names are
    those transformers and diffusers give a variant: `{prefix}.fp16-00001-of-00002.safetensors`
    and `{prefix}.safetensors.index.fp16.json`, or `{prefix}.fp16.safetensors`."""
    if output_dir.name.endswith(".safetensors"):
        raise BadInputError(
            f"{output_dir}: split writes a folder of shards; name the output folder without .safetensors "
            "(use merge for a single file)"
        )
    copies = companion_copies(checkpoint, output_dir, dtypes)
    scales = dtypes.scales if dtypes else None
    plan = plan_split(checkpoint, max_shard_size, f"{prefix}.{variant}" if variant else prefix, copies, dtypes, scales)
    if variant and plan.index is not None:
        variant_index = dataclasses.replace(plan.index, name=f"{prefix}.safetensors.index.{variant}.json")
        plan = dataclasses.replace(plan, index=variant_index)
    report = run_plan(
        SplitReport, "split", checkpoint, source, plan, output_dir, options,
        as_folder=True, dtypes=dtypes, renamed=renamed,
    )
    assert isinstance(report, SplitReport)
    return dataclasses.replace(report, max_shard_size=max_shard_size, layout=_layout(plan))


def _layout(plan: Plan) -> dict[str, list[str]]:
    """Each shard's tensors in natural name order (ties in data order), as the dry run
    shows them. The planner packed each shard in that order already, so its order is
    taken as it is: sorting the names a second time was half the CPU of a dry run of
    a 500,000-tensor index. Only names that can tie (`a.01` beside `a.1`: one natural
    key, packed in name order, listed here in data order) are sorted again."""
    if natural_keys_distinct(chain.from_iterable(f.packed for f in plan.files)):
        return {f.name: list(f.packed) for f in plan.files}
    return {f.name: sorted(f.tensors, key=natural_key) for f in plan.files}


def _check_prefix(prefix: str) -> None:
    """The prefix becomes part of file names inside the output folder, nothing more."""
    if not prefix or prefix.startswith(".") or any(c in prefix for c in "/\\\0"):
        raise BadInputError(
            f"prefix {prefix!r} must be a plain file name start such as 'model' or 'diffusion_pytorch_model'"
        )
    if prefix.endswith(".safetensors"):
        raise BadInputError(f"prefix {prefix!r} must not end in .safetensors: it is added to every shard name")
    control = next((c for c in prefix if unicodedata.category(c) in ("Cc", "Zl", "Zp")), None)
    if control is not None:
        # A newline or escape in a file name breaks line-based tools, logs and terminals.
        raise BadInputError(
            f"prefix {prefix!r} holds the control character {control!r}: shard names may not; "
            "use letters, digits, '-', '_' or '.'"
        )


def split_pipeline(
    pipeline: Pipeline, source: str | os.PathLike[str], output: str | os.PathLike[str], options: WriteOptions, *,
    max_shard_size: int, strict: bool,
) -> PipelineReport:
    """Each weight set resharded in its component's folder, with the component's own
    prefix and the variant's names (`diffusion_pytorch_model.fp16-00001-of-00002.safetensors`)."""
    from ..engine import atomic
    from .pipeline_runs import relocated, write_pipeline


    def write(weight_set: WeightSet, checkpoint: Checkpoint, folder: Path, first: bool, on: ProgressCallback | None):
        # A folder is written whole: a second variant goes to a folder of its own in the
        # staging area, and its files are moved beside the first's afterwards.
        target = folder if first or options.dry_run else folder.parent / f".{folder.name}.{weight_set.variant}"
        report = split_checkpoint(
            checkpoint, weight_set.entry, target, options.replace(force=False, progress=on, verify_progress=None),
            max_shard_size=max_shard_size, prefix=weight_set.prefix, variant=weight_set.variant,
        )
        if target != folder:
            written = [Path(f.path).name for f in report.files] + ([Path(report.index).name] if report.index else [])
            for name in written:
                os.replace(target / name, folder / name)
            atomic.remove(target)
            report = relocated(report, target, folder)
        return report, folder

    return write_pipeline("split", pipeline, source, output, write, options, strict=strict)
