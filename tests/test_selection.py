"""--select, --drop and --rename: the same bytes under the names asked for, or a refusal
naming the tensors before anything is written."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import safetensors
from safetensors import safe_open

import shardkit
from conftest import assert_clean_failure, run_cli, snapshot, temporaries
from shardkit.errors import BadInputError
from shardkit.synthetic import SyntheticCheckpoint, write_checkpoint


def load_file(path: Path) -> dict[str, bytes]:
    """Every tensor's bytes as the reference reader sees them (any dtype, F4 and F8 too)."""
    return {name: bytes(entry["data"]) for name, entry in safetensors.deserialize(path.read_bytes())}


def test_rename_strips_a_prefix_with_the_same_bytes_and_metadata(checkpoint: SyntheticCheckpoint, tmp_path: Path):
    out = tmp_path / "stripped.safetensors"
    result = run_cli("merge", checkpoint.folder, "-o", out, "--rename", r"model\.(.*)", r"\1", "--json")
    assert result.exit_code == 0, result.stderr
    written = load_file(out)
    expected = {t.name.removeprefix("model."): checkpoint.expected_bytes(t.name) for t in checkpoint.tensors}
    assert set(written) == set(expected)
    for name, data in written.items():
        assert data == expected[name], name
    report = json.loads(result.stdout)
    renamed = {old: new for old, new in report["renamed"]}
    assert renamed["model.norm.weight"] == "norm.weight" and "lm_head.weight" not in renamed
    with safe_open(out, "np") as handle:
        assert handle.metadata() == {"format": "pt"}


def test_select_then_drop_then_rename_in_order(checkpoint: SyntheticCheckpoint, tmp_path: Path):
    out = tmp_path / "layer0.safetensors"
    report = shardkit.merge(
        checkpoint.folder, out, select=["model.layers.0.*", "model.norm.weight"], drop=["*.bias"],
        rename=[(r"model\.layers\.0\.(.*)", r"block.\1"), (r"block\.(.*)\.weight", r"b.\1")],
    )
    names = set(load_file(out))
    source = [t.name for t in checkpoint.tensors
              if t.name.startswith("model.layers.0.") and not t.name.endswith(".bias")]
    assert names == {"model.norm.weight"} | {"b." + n.removeprefix("model.layers.0.").removesuffix(".weight")
                                              for n in source}
    assert report.tensors == len(names)
    with safe_open(out, "np") as handle:
        shapes = [handle.get_slice(n).get_shape() for n in names]
    assert report.parameters == sum(math.prod(shape) for shape in shapes)
    assert ["model.layers.0.mlp.up_proj.weight", "b.mlp.up_proj"] in report.renamed


def test_split_index_follows_the_new_names(checkpoint: SyntheticCheckpoint, tmp_path: Path):
    out = tmp_path / "sharded"
    result = run_cli("split", checkpoint.folder, "-o", out, "-s", "500KB", "--rename", r"model\.(.*)", r"backbone.\1")
    assert result.exit_code == 0, result.stderr
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == {
        "backbone." + t.name.removeprefix("model.") if t.name.startswith("model.") else t.name
        for t in checkpoint.tensors
    }
    for name, shard in index["weight_map"].items():
        with safe_open(out / shard, "np") as handle:
            assert name in handle.keys()  # noqa: SIM118 (not a dict)
    assert "renamed: " in result.stdout


def test_dry_run_lists_old_and_new_names_and_writes_nothing(checkpoint: SyntheticCheckpoint, tmp_path: Path):
    out = tmp_path / "out.safetensors"
    result = run_cli(
        "merge", checkpoint.folder, "-o", out, "--dry-run", "--rename", r"model\.norm\.weight", "final_norm"
    )
    assert result.exit_code == 0, result.stderr
    assert "model.norm.weight → final_norm" in result.stdout
    assert not out.exists()


def test_rename_composes_with_dtype_and_keep_by_the_new_names(checkpoint: SyntheticCheckpoint, tmp_path: Path):
    out = tmp_path / "bf16.safetensors"
    report = shardkit.merge(
        checkpoint.folder, out, dtype="fp16", keep=["final_norm"], select=["model.norm.weight", "model.layers.1.*"],
        rename=[(r"model\.norm\.weight", "final_norm")],
    )
    with safe_open(out, "np") as handle:
        dtypes = {n: handle.get_slice(n).get_dtype() for n in handle.keys()}  # noqa: SIM118 (not a dict)
    source_dtype = next(t.dtype for t in checkpoint.tensors if t.name == "model.norm.weight")
    assert dtypes["final_norm"] == source_dtype
    assert all(d == "F16" for n, d in dtypes.items() if n != "final_norm")
    assert report.dtype is not None and report.dtype.kept == ["final_norm"]


def test_a_pipeline_refuses_a_selection_naming_the_component_to_use(tmp_path: Path):
    pipeline = tmp_path / "pipe"
    pipeline.mkdir()
    (pipeline / "model_index.json").write_text('{"_class_name": "X", "transformer": ["diffusers", "T"]}')
    write_checkpoint(pipeline / "transformer", max_shard_size=None, prefix="diffusion_pytorch_model")
    with pytest.raises(BadInputError, match="apply to one component"):
        shardkit.merge(pipeline, tmp_path / "out", drop=["x"])


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--select", "vision.*"], "--select 'vision.*' matches no tensor"),
        (["--drop", "*ema*"], "--drop '*ema*' matches no tensor"),
        (["--select", "model.norm.weight", "--drop", "model.norm.*"], "the selection leaves no tensor"),
        (["--rename", r"model\.layers\.\d+\.(.*)", r"\1"],
         "--rename gives several tensors one name: 'model.layers.0.input_layernorm.weight', "
         "'model.layers.1.input_layernorm.weight'"),
        (["--rename", "lm_head.weight", "model.norm.weight"],
         "'lm_head.weight', 'model.norm.weight' → 'model.norm.weight'"),
        (["--rename", "layers", "x"], "--rename layers x matches no tensor name whole"),
        (["--rename", "(", "x"], "--rename '(': not a regular expression"),
        (["--rename", r"model\.(.*)", r"\2"], "bad replacement"),
        (["--rename", "lm_head.weight", ""], "renames 'lm_head.weight' to an empty name"),
        (["--select", ""], "--select '': give a glob"),
    ],
)
@pytest.mark.parametrize("command", ["merge", "split"])
def test_bad_selections_are_refused_before_anything_is_written(
    checkpoint: SyntheticCheckpoint, tmp_path: Path, options: list[str], message: str, command: str
):
    before = snapshot(checkpoint.folder)
    out = tmp_path / ("out.safetensors" if command == "merge" else "out")
    result = run_cli(command, checkpoint.folder, "-o", out, *options)
    assert_clean_failure(result, 2, message)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["qwen-tiny"]
    assert temporaries(tmp_path) == []
    assert snapshot(checkpoint.folder) == before


def test_convert_renames_and_drops_a_torch_checkpoint(tmp_path: Path):
    torch = pytest.importorskip("torch")
    state = {"model.a.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3), "ema.a": torch.ones(2)}
    torch.save(state, tmp_path / "pytorch_model.bin")
    out = tmp_path / "out.safetensors"
    report = shardkit.convert(tmp_path / "pytorch_model.bin", out, drop=["ema.*"], rename=[(r"model\.(.*)", r"\1")])
    assert load_file(out) == {"a.weight": state["model.a.weight"].numpy().tobytes()}
    assert report.renamed == [["model.a.weight", "a.weight"]]


def test_a_renamed_strided_torch_view_is_still_gathered(tmp_path: Path):
    torch = pytest.importorskip("torch")
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    torch.save({"w": base.t(), "b": torch.zeros(2)}, tmp_path / "pytorch_model.bin")
    out = tmp_path / "out.safetensors"
    shardkit.convert(tmp_path / "pytorch_model.bin", out, rename=[("w", "renamed.w")], verify=True)
    assert load_file(out)["renamed.w"] == base.t().contiguous().numpy().tobytes()
