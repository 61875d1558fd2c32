"""A split made by shardkit loads in transformers and computes the same logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from conftest import run_cli  # noqa: E402
from hf_models import logits, tiny_qwen2  # noqa: E402
from shardkit.checkpoint.shards import open_checkpoint  # noqa: E402

pytestmark = pytest.mark.hf


@pytest.mark.parametrize("tie", [False, True])
def test_split_of_a_single_file_model_loads_with_identical_logits(tmp_path: Path, tie: bool) -> None:
    original = tmp_path / "original"
    tiny_qwen2(tie).save_pretrained(original)
    assert (original / "model.safetensors").is_file() and not list(original.glob("*.index.json"))

    split = tmp_path / "split"
    result = run_cli("split", original, "-o", split, "--max-shard-size", "60KB", "--verify", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert len(report["files"]) >= 3
    assert report["verified"] is True
    assert "config.json" in report["copied_files"] and "generation_config.json" in report["copied_files"]
    index = json.loads((split / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {Path(f["path"]).name for f in report["files"]}
    assert not (split / "model.safetensors").exists()

    assert torch.equal(logits(original), logits(split))
    if tie:  # a tied model stores the embedding once; the split must not invent lm_head
        assert "lm_head.weight" not in open_checkpoint(split).tensors


def test_transformers_reshards_what_shardkit_split(tmp_path: Path) -> None:
    """The round trip through transformers' own loader and writer keeps every tensor."""
    original = tmp_path / "original"
    tiny_qwen2(False).save_pretrained(original)
    assert run_cli("split", original, "-o", tmp_path / "split", "-s", "50KB").exit_code == 0
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "split")
    model.save_pretrained(tmp_path / "resaved")
    result = run_cli("diff", original, tmp_path / "resaved")
    assert result.exit_code == 0, result.stdout + result.stderr
