"""diff across renames: `--rename` on side A, and tensors that only changed name."""

from __future__ import annotations

import json
from pathlib import Path

import shardkit
from conftest import assert_clean_failure, run_cli
from shardkit.synthetic import SyntheticCheckpoint


def test_diff_reports_tensors_under_another_name_with_the_same_bytes(checkpoint: SyntheticCheckpoint, tmp_path):
    renamed = tmp_path / "renamed.safetensors"
    shardkit.merge(checkpoint.folder, renamed, rename=[(r"model\.norm\.weight", "final_norm.weight")])
    result = run_cli("diff", checkpoint.folder, renamed)
    assert result.exit_code == 1, result.stderr
    assert "= model.norm.weight ↔ final_norm.weight, same bytes" in result.stdout
    assert "only in" not in result.stdout
    report = json.loads(run_cli("diff", checkpoint.folder, renamed, "--json").stdout)
    assert report["renamed"] == [["model.norm.weight", "final_norm.weight"]]
    assert report["only_a"] == [] and report["only_b"] == [] and not report["identical"]


def test_diff_with_the_rename_applied_to_a_is_identical_in_tensors(checkpoint: SyntheticCheckpoint, tmp_path: Path):
    stripped = tmp_path / "stripped.safetensors"
    shardkit.merge(checkpoint.folder, stripped, rename=[(r"model\.(.*)", r"\1")])
    result = run_cli("diff", checkpoint.folder, stripped, "--rename", r"model\.(.*)", r"\1", "--json")
    report = json.loads(result.stdout)
    assert report["only_a"] == report["only_b"] == report["renamed"] == [] and report["data_different"] == []
    assert report["identical"], result.stdout


def test_a_same_shape_tensor_with_other_bytes_is_not_called_renamed(checkpoint: SyntheticCheckpoint, tmp_path: Path):
    other = tmp_path / "other.safetensors"
    shardkit.merge(checkpoint.folder, other, select=["model.layers.1.input_layernorm.weight"],
                   rename=[(".*", "model.layers.0.post_attention_layernorm.weight")])
    mine = tmp_path / "mine.safetensors"
    shardkit.merge(checkpoint.folder, mine, select=["model.layers.0.input_layernorm.weight"])
    report = shardkit.diff(mine, other)
    assert report.renamed == [] and report.only_a == ["model.layers.0.input_layernorm.weight"]


def test_diff_rename_that_matches_nothing_is_refused(checkpoint: SyntheticCheckpoint):
    result = run_cli("diff", checkpoint.folder, checkpoint.folder, "--rename", "nothing", "x")
    assert_clean_failure(result, 2, "--rename nothing x matches no tensor name whole")
