"""`shardkit merge`: a sharded checkpoint into one file or a ready-to-load folder."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .. import storage
from ..checkpoint.shards import SHARD_NAME, Checkpoint, open_checkpoint, single_file_name_for
from ..engine.options import WriteOptions
from ..errors import BadInputError, option_name
from ..format.torch_checkpoint import is_torch_file, safetensors_name
from ..plan import output_path
from ..plan.conversion import DtypeChoice
from ..plan.files import plan_merge
from ..plan.recipe import load_recipe
from ..plan.selection import parse_selection
from ..reports import MergeReport
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
def merge(
    source: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
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
) -> MergeReport:
    """Merge the checkpoint at `source` into `output`.

    `output` ending in `.safetensors` is a single file; anything else is a model
    folder holding one weight file plus every non-weight file of the source folder
    (config, generation config, tokenizer, ...), and no index. Reads headers only,
    validates everything before writing, copies byte ranges, commits atomically.
    With `verify`, the staged file is compared tensor by tensor with the source
    before it is committed, and discarded (an earlier output left as it was) if
    anything differs.

    Either side may be remote (`s3://bucket/prefix/`, `http(s)://` for the source,
    `hf://org/name`); `endpoint_url` names an S3-compatible store. S3 to S3 in one store
    is assembled server-side: the client moves about 10 MiB whatever the model size.

    `dtype` ("bf16", "fp16", "fp32" or "bfloat16", "float16", "float32") converts every
    floating-point tensor while writing, bit-identical to torch's `.to()`, except those
    whose name matches a `keep` glob; values that overflow or underflow are reported.
    An FP8 checkpoint (fine-grained or compressed-tensors) is dequantised. `dtype="fp8"`
    quantises instead, as transformers' FP8 quantiser does: its Linear weights to
    F8_E4M3 in `block_size` blocks ("ROWSxCOLUMNS", default "128x128"), each with a
    F32 `weight_scale_inv`, and `quantization_config` in config.json.

    `select` keeps only the tensors matching one of its globs, `drop` then leaves out
    those matching one of its globs, and each `(pattern, replacement)` of `rename` then
    renames the tensors whose whole name the regular expression matches (`re` syntax,
    `\\1` groups), in order; `keep` and the report use the new names. A glob or pattern
    that matches nothing, a selection that leaves nothing, or two tensors renamed to one
    name is refused before anything is written. `recipe` (a .json/.toml file or a
    built-in name such as `flux-diffusers-to-bfl`) then makes the output tensors from
    the source tensors by rename and dim-0 fuse, split and half swap, checked first
    (see :mod:`shardkit.plan.recipe`).

    `output` may be a name template (`{slug}_v{date}.safetensors`, see
    :mod:`shardkit.plan.output_path`); missing parent folders are created. A diffusers
    pipeline (a folder with `model_index.json`) is merged component by component into
    an output folder of the same layout and gives a
    :class:`~shardkit.commands.pipeline_runs.PipelineReport`.

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

        report = shardkit.merge("Qwen2.5-7B-Instruct", "qwen.safetensors", sha256=True)
        print(report.bytes, report.seconds, report.sha256)
    """
    output_path.placeholders(os.fspath(output))
    options = WriteOptions(
        force=force, sha256=sha256, dry_run=dry_run, verify=verify, progress=progress, verify_progress=verify_progress
    )
    selection = parse_selection(select, drop, rename)
    recut = load_recipe(recipe) if recipe is not None else None
    location = storage.as_path(source, endpoint_url=endpoint_url)
    from ..checkpoint.pipeline import find_pipeline

    pipeline = find_pipeline(location, allow_unindexed=allow_unindexed)
    if pipeline is not None:
        refuse_selection_of_pipeline(location, selection, recut)
        if dtype is not None or keep or block_size is not None:
            raise BadInputError(
                f"{location}: a diffusers pipeline's variants are named after their dtype (fp16); "
                f"{option_name('dtype')} applies to one component (e.g. {location}/unet)"
            )
        return merge_pipeline(  # type: ignore[return-value]
            pipeline, source, output, options, strict=strict
        )
    opened = open_checkpoint(location, strict=strict, allow_unindexed=allow_unindexed, whole=True)
    selected, dtypes = reshape(opened, selection, recut, dtype, keep, block_size)
    checkpoint = selected.checkpoint
    tensors = output_path.output_dtypes(checkpoint, dtypes)
    destination = output_path.resolve(output, source=source, tensors=tensors, endpoint_url=endpoint_url)
    with output_path.parents_created(destination, enabled=not dry_run):
        return merge_checkpoint(checkpoint, location, destination, options, dtypes=dtypes, renamed=selected.renamed)


def merge_checkpoint(
    checkpoint: Checkpoint,
    source: storage.Location,
    output: storage.Location,
    options: WriteOptions,
    *,
    dtypes: DtypeChoice | None = None,
    renamed: Sequence[tuple[str, str]] = (),
) -> MergeReport:
    """Merge an opened checkpoint into `output` (a file, or a folder unless it ends in .safetensors)."""
    as_folder = not output.name.endswith(".safetensors")
    if as_folder:
        weight_name = _weight_file_name(checkpoint.index_path, checkpoint.shards[0].path)
        copies = companion_copies(checkpoint, output, dtypes)
    else:
        weight_name, copies = output.name, []
    plan = plan_merge(checkpoint, weight_name, copies, dtypes, dtypes.scales if dtypes else None)
    report = run_plan(
        MergeReport, "merge", checkpoint, source, plan, output, options,
        as_folder=as_folder, dtypes=dtypes, renamed=renamed,
    )
    return report  # type: ignore[return-value]


def _weight_file_name(index_path: storage.Location | None, first_shard: str) -> str:
    """Keep the checkpoint's own prefix: diffusers folders load `diffusion_pytorch_model.safetensors`."""
    if index_path is not None:
        return single_file_name_for(index_path.name)
    name = Path(first_shard).name
    if is_torch_file(name):
        name = safetensors_name(name)
    shard = SHARD_NAME.match(name)
    return f"{shard.group('prefix')}.safetensors" if shard else name


def merge_pipeline(
    pipeline: Pipeline, source: str | os.PathLike[str], output: str | os.PathLike[str], options: WriteOptions, *,
    strict: bool,
) -> PipelineReport:
    """Each weight set into one file under its loader-given name, in its component's
    folder: `unet/diffusion_pytorch_model.safetensors`, `unet/diffusion_pytorch_model.fp16.safetensors`."""
    from .pipeline_runs import write_pipeline


    def write(weight_set: WeightSet, checkpoint: Checkpoint, folder: Path, first: bool, on: ProgressCallback | None):
        target = folder if first else folder / _weight_file_name(checkpoint.index_path, checkpoint.shards[0].path)
        # the staged pipeline folder is new: only the whole pipeline's commit may replace
        component = options.replace(force=False, progress=on, verify_progress=None)
        return merge_checkpoint(checkpoint, weight_set.entry, target, component), target

    return write_pipeline("merge", pipeline, source, output, write, options, strict=strict)
