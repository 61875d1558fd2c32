"""The merged model folder loads in transformers and computes the same logits."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import shardkit  # noqa: E402
from shardkit.checkpoint import open_checkpoint  # noqa: E402

pytestmark = pytest.mark.hf


def tiny_qwen2(tie: bool) -> object:
    config = transformers.Qwen2Config(
        vocab_size=128, hidden_size=64, intermediate_size=176, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=tie, torch_dtype="float32",
    )
    torch.manual_seed(0)
    return transformers.Qwen2ForCausalLM(config).eval()


def logits(folder: Path) -> object:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(torch.arange(16).reshape(2, 8)).logits


@pytest.mark.parametrize("tie", [False, True])
def test_merged_folder_loads_with_identical_logits(tmp_path: Path, tie: bool) -> None:
    sharded = tmp_path / "sharded"
    tiny_qwen2(tie).save_pretrained(sharded, max_shard_size="100KB")
    assert len(open_checkpoint(sharded).shards) >= 3
    merged = tmp_path / "merged"
    report = shardkit.merge(sharded, merged, verify=True)
    assert (merged / "model.safetensors").is_file()
    assert not list(merged.glob("*.index.json"))
    assert "config.json" in report.copied_files and "generation_config.json" in report.copied_files
    assert torch.equal(logits(sharded), logits(merged))
    if tie:  # a tied model stores the embedding once; the merge must not invent lm_head
        assert "lm_head.weight" not in open_checkpoint(merged).tensors
