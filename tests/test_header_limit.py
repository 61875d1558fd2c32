"""The format's 100 MB header limit holds for what shardkit writes, not only for what it reads.

Two shards can each be valid while the union of their `__metadata__` (which a merge
writes into its file, and a split into every shard) is over the limit: such a file
opens in no reader. It must be refused before anything is written, naming the keys.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from conftest import assert_clean_failure, run_cli, snapshot, temporaries
from shardkit.format.header import MAX_HEADER_SIZE, read_header

pytestmark = pytest.mark.slow

HALF = MAX_HEADER_SIZE // 2 + 1_000_000  # each shard well under the limit, the two together over it


@pytest.fixture(scope="module")
def large_metadata(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two valid shards, each with one large metadata key, and their index."""
    folder = tmp_path_factory.mktemp("limit") / "model"
    folder.mkdir()
    shards = {"model-00001-of-00002.safetensors": "notes_a", "model-00002-of-00002.safetensors": "notes_b"}
    weight_map = {}
    for number, (shard, key) in enumerate(shards.items()):
        name = f"layer.{number}.weight"
        save_file({name: np.full((4, 4), number, dtype=np.float32)}, folder / shard,
                  metadata={"format": "pt", key: "x" * HALF})
        weight_map[name] = shard
        assert read_header(folder / shard).header_size < MAX_HEADER_SIZE
        assert load_file(folder / shard)[name].shape == (4, 4)  # the reference reader opens it
    import json

    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 128}, "weight_map": weight_map})
    )
    return folder


@pytest.mark.parametrize("command", ["merge", "split"])
def test_a_header_over_the_limit_is_refused_before_writing(large_metadata: Path, tmp_path: Path, command: str) -> None:
    before = snapshot(large_metadata)
    out = tmp_path / ("merged.safetensors" if command == "merge" else "sharded")
    extra = ["--max-shard-size", "64"] if command == "split" else []

    result = run_cli(command, large_metadata, "-o", out, *extra)

    assert_clean_failure(result, 2, "over the format's 100,000,000-byte limit")
    assert "'notes_a' (" in result.stderr and "'notes_b' (" in result.stderr
    assert "remove or shorten these keys" in result.stderr
    assert not out.exists() and temporaries(tmp_path) == [] and list(tmp_path.iterdir()) == []
    assert snapshot(large_metadata) == before
