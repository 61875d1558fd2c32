"""The merged model folder loads in transformers and computes the same logits."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import shardkit  # noqa: E402
from hf_models import logits, tiny_qwen2  # noqa: E402
from shardkit.checkpoint.shards import open_checkpoint  # noqa: E402

pytestmark = pytest.mark.hf


@pytest.mark.parametrize("tie", [False, True])
def test_merged_folder_loads_with_identical_logits(tmp_path: Path, tie: bool) -> None:
    sharded = tmp_path / "sharded"
    tiny_qwen2(tie, layers=3).save_pretrained(sharded, max_shard_size="100KB")
    assert len(open_checkpoint(sharded).shards) >= 3
    merged = tmp_path / "merged"
    report = shardkit.merge(sharded, merged, verify=True)
    assert (merged / "model.safetensors").is_file()
    assert not list(merged.glob("*.index.json"))
    assert "config.json" in report.copied_files and "generation_config.json" in report.copied_files
    assert torch.equal(logits(sharded), logits(merged))
    if tie:  # a tied model stores the embedding once; the merge must not invent lm_head
        assert "lm_head.weight" not in open_checkpoint(merged).tensors
