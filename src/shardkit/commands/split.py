"""`shardkit split` (alias `reshard`): a checkpoint into Hugging Face shards of a given size.

The source may be one file or already sharded: resharding 4 shards into 8, or into 1,
is the same operation, since the plan only looks at the tensors, never at how the
source happened to be cut.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

from .. import storage
from ..checkpoint import open_checkpoint
from ..errors import BadInputError
from ..plan import natural_key, plan_split
from ..reports import SplitReport
from ..sizes import DEFAULT_MAX_SHARD_SIZE, parse_size
from .writing import ProgressCallback, companion_copies, dtype_choice, run_plan


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
    endpoint_url: str | None = None,
    progress: ProgressCallback | None = None,
) -> SplitReport:
    """Write the checkpoint at `source` into `output_dir` as shards of at most
    `max_shard_size` tensor-data bytes ("5GB" = 5·10⁹, "4GiB" = 4·2³⁰, or an int).

    The folder gets `{prefix}-00001-of-0000N.safetensors` shards plus
    `{prefix}.safetensors.index.json`, or a lone `{prefix}.safetensors` and no index
    when everything fits in one shard, plus the source folder's non-weight files. A
    tensor larger than the limit gets a shard of its own, as in huggingface_hub, so a
    shard can exceed the limit. The folder is staged and swapped in whole: an old
    index or shard of a replaced `output_dir` can never survive next to the new ones.
    Source and output may be remote, and `dtype` and `keep` convert, as for
    :func:`~shardkit.commands.merge.merge`; shards are packed by the converted sizes.
    `prefix` names the shards (`diffusion_pytorch_model` for diffusers). With `verify`,
    the written folder is compared tensor by tensor with the source and removed if
    anything differs.

    `force` replaces an existing output (never a source); `sha256` hashes the output in
    the same pass and writes a `sha256sum -c` file; `dry_run` returns the plan's report
    and writes nothing; `strict` also refuses what the format forbids but the reference
    reader tolerates; `allow_unindexed` ignores weight files no index covers;
    `endpoint_url` names an S3-compatible store; `progress(advance, total)` is called
    with the bytes just written.

    Example::

        report = shardkit.split("qwen.safetensors", "qwen-sharded", max_shard_size="2GB")
        print(report.index, report.layout)
    """
    source = storage.as_path(source, endpoint_url=endpoint_url)
    output_dir = storage.as_path(output_dir, endpoint_url=endpoint_url, output=True)
    limit = parse_size(max_shard_size)
    _check_prefix(prefix)
    if output_dir.name.endswith(".safetensors"):
        raise BadInputError(
            f"{output_dir}: split writes a folder of shards; name the output folder without .safetensors "
            "(use merge for a single file)"
        )
    checkpoint = open_checkpoint(source, strict=strict, allow_unindexed=allow_unindexed)
    dtypes = dtype_choice(checkpoint, dtype, keep)
    copies = companion_copies(checkpoint, output_dir, dtypes)
    plan = plan_split(checkpoint, limit, prefix, copies, dtypes)
    report = run_plan(
        SplitReport, "split", checkpoint, source, plan, output_dir,
        as_folder=True, force=force, sha256=sha256, dry_run=dry_run, progress=progress, verify=verify,
        dtypes=dtypes,
    )
    layout = {f.name: sorted(f.tensors, key=natural_key) for f in plan.files}
    return dataclasses.replace(report, max_shard_size=limit, layout=layout)  # type: ignore[type-var]


def _check_prefix(prefix: str) -> None:
    """The prefix becomes part of file names inside the output folder, nothing more."""
    if not prefix or prefix.startswith(".") or any(c in prefix for c in "/\\\0"):
        raise BadInputError(
            f"prefix {prefix!r} must be a plain file name start such as 'model' or 'diffusion_pytorch_model'"
        )
    if prefix.endswith(".safetensors"):
        raise BadInputError(f"prefix {prefix!r} must not end in .safetensors: it is added to every shard name")
