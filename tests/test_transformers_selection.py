"""Selections and renames of a real transformers model load back in transformers."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from conftest import run_cli  # noqa: E402
from hf_models import logits, tiny_qwen2  # noqa: E402
from shardkit.checkpoint.shards import open_checkpoint  # noqa: E402

pytestmark = pytest.mark.hf


def test_a_stripped_then_restored_prefix_loads_with_identical_logits(tmp_path: Path) -> None:
    sharded = tmp_path / "sharded"
    tiny_qwen2(tie=False, layers=2).save_pretrained(sharded, max_shard_size="100KB")
    stripped, restored = tmp_path / "stripped", tmp_path / "restored"
    first = run_cli("split", sharded, "-o", stripped, "-s", "100KB", "--rename", r"model\.(.*)", r"\1")
    assert first.exit_code == 0, first.stderr
    names = set(open_checkpoint(stripped).tensors)
    assert {"embed_tokens.weight", "lm_head.weight"} <= names
    assert not any(n.startswith("model.") for n in names)
    second = run_cli("merge", stripped, "-o", restored, "--rename", r"(?!lm_head\.)(.*)", r"model.\1")
    assert second.exit_code == 0, second.stderr
    assert set(open_checkpoint(restored).tensors) == set(open_checkpoint(sharded).tensors)
    assert torch.equal(logits(sharded), logits(restored))


def test_the_selected_backbone_loads_as_the_base_model(tmp_path: Path) -> None:
    full = tmp_path / "full"
    model = tiny_qwen2(tie=False, layers=2)
    model.save_pretrained(full)
    backbone = tmp_path / "backbone"
    result = run_cli("merge", full, "-o", backbone, "--select", "model.*", "--drop", "*.layers.1.mlp.*",
                     "--rename", r"model\.(.*)", r"\1")
    assert result.exit_code == 0, result.stderr
    names = set(open_checkpoint(backbone).tensors)
    assert "lm_head.weight" not in names and "layers.1.mlp.up_proj.weight" not in names
    loaded, info = transformers.Qwen2Model.from_pretrained(backbone, output_loading_info=True)
    assert sorted(info["missing_keys"]) == [f"layers.1.mlp.{p}.weight" for p in ("down_proj", "gate_proj", "up_proj")]
    assert not info["unexpected_keys"]
    for name, tensor in loaded.state_dict().items():
        if ".layers.1.mlp." not in f".{name}":
            assert torch.equal(tensor, model.model.state_dict()[name]), name
