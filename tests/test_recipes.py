"""Recipes: renames and dim-0 fuse/split/swap as byte ranges, checked before writing;
the built-in Flux recipes checked against diffusers' own converter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
single_file_utils = pytest.importorskip("diffusers.loaders.single_file_utils")

from safetensors.torch import load_file, save_file  # noqa: E402

import shardkit  # noqa: E402
from conftest import assert_clean_failure, run_cli, snapshot, temporaries  # noqa: E402

#: diffusers' converter hard-codes FLUX.1's inner_dim of 3072 for the single blocks' split.
INNER = 3072


def bfl_flux(double: int = 2, single: int = 3) -> dict[str, torch.Tensor]:
    """A FLUX.1-layout transformer (BFL key names) with random tensors, small where diffusers allows."""
    generator = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(torch.bfloat16)

    state: dict[str, torch.Tensor] = {}
    for stem in ("time_in", "vector_in", "guidance_in"):
        for layer in ("in_layer", "out_layer"):
            state[f"{stem}.{layer}.weight"], state[f"{stem}.{layer}.bias"] = rand(8, 4), rand(8)
    for stem in ("txt_in", "img_in", "final_layer.linear"):
        state[f"{stem}.weight"], state[f"{stem}.bias"] = rand(8, 4), rand(8)
    state["final_layer.adaLN_modulation.1.weight"], state["final_layer.adaLN_modulation.1.bias"] = rand(8, 4), rand(8)
    for i in range(double):
        for side in ("img", "txt"):
            block = f"double_blocks.{i}"
            state[f"{block}.{side}_mod.lin.weight"], state[f"{block}.{side}_mod.lin.bias"] = rand(12, 4), rand(12)
            state[f"{block}.{side}_attn.qkv.weight"], state[f"{block}.{side}_attn.qkv.bias"] = rand(12, 4), rand(12)
            state[f"{block}.{side}_attn.norm.query_norm.scale"] = rand(4)
            state[f"{block}.{side}_attn.norm.key_norm.scale"] = rand(4)
            state[f"{block}.{side}_attn.proj.weight"], state[f"{block}.{side}_attn.proj.bias"] = rand(4, 4), rand(4)
            for layer in ("0", "2"):
                state[f"{block}.{side}_mlp.{layer}.weight"] = rand(8, 4)
                state[f"{block}.{side}_mlp.{layer}.bias"] = rand(8)
    for i in range(single):
        block = f"single_blocks.{i}"
        state[f"{block}.modulation.lin.weight"], state[f"{block}.modulation.lin.bias"] = rand(9, 4), rand(9)
        state[f"{block}.linear1.weight"], state[f"{block}.linear1.bias"] = rand(7 * INNER, 2), rand(7 * INNER)
        state[f"{block}.norm.query_norm.scale"], state[f"{block}.norm.key_norm.scale"] = rand(4), rand(4)
        state[f"{block}.linear2.weight"], state[f"{block}.linear2.bias"] = rand(4, 8), rand(4)
    return state


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert a[name].contiguous().view(torch.uint8).equal(b[name].contiguous().view(torch.uint8)), name


def test_flux_bfl_to_diffusers_matches_diffusers_and_comes_back_exactly(tmp_path: Path) -> None:
    original = bfl_flux()
    source = tmp_path / "flux1-dev.safetensors"
    save_file(original, source, metadata={"format": "pt"})
    expected = single_file_utils.convert_flux_transformer_checkpoint_to_diffusers(dict(original))

    diffusers_folder = tmp_path / "transformer"
    shardkit.split(source, diffusers_folder, max_shard_size="200KB", prefix="diffusion_pytorch_model",
                   recipe="flux-bfl-to-diffusers", verify=True)
    shards = sorted(diffusers_folder.glob("diffusion_pytorch_model-*.safetensors"))
    assert len(shards) > 1
    converted = {k: v for shard in shards for k, v in load_file(shard).items()}
    assert_same(converted, expected)

    back = tmp_path / "back.safetensors"
    result = run_cli("merge", diffusers_folder, "-o", back, "--recipe", "flux-diffusers-to-bfl", "--verify")
    assert result.exit_code == 0, result.stderr
    assert_same(load_file(back), original)
    assert back.read_bytes() == source.read_bytes()  # laid out as save_file lays it out


def test_a_recipe_file_in_toml_fuses_splits_and_swaps(tmp_path: Path) -> None:
    tensors = {f"l.{i}.{p}": torch.randn(2 * (i + 1), 3) for i in range(2) for p in "qkv"} | {"x": torch.randn(4, 2)}
    source = tmp_path / "m.safetensors"
    save_file(tensors, source)
    recipe = tmp_path / "r.toml"
    recipe.write_text(
        '[[rules]]\nfuse = ["l.{i}.q", "l.{i}.k", "l.{i}.v"]\nto = "l.{i}.qkv"\n'
        '[[rules]]\nswap = "x"\nto = "x_swapped"\n'
    )
    out = tmp_path / "out.safetensors"
    shardkit.merge(source, out, recipe=str(recipe))
    written = load_file(out)
    for i in range(2):
        assert torch.equal(written[f"l.{i}.qkv"], torch.cat([tensors[f"l.{i}.{p}"] for p in "qkv"]))
    assert torch.equal(written["x_swapped"], torch.cat([tensors["x"][2:], tensors["x"][:2]]))
    split_recipe = tmp_path / "s.json"
    split_recipe.write_text(json.dumps({"rules": [
        {"split": "l.{i}.qkv", "to": ["l.{i}.q", "l.{i}.k", "l.{i}.v"]}, {"swap": "x_swapped", "to": "x"}]}))
    back = tmp_path / "back.safetensors"
    shardkit.merge(out, back, recipe=str(split_recipe), dtype="bf16")
    for name, tensor in load_file(back).items():
        assert torch.equal(tensor, tensors[name].to(torch.bfloat16)), name


@pytest.mark.parametrize(
    ("rules", "message"),
    [
        ([{"rename": "a", "to": "b"}], "source tensor(s) used by no rule: 'c'"),
        ([{"rename": "a", "to": "b"}, {"rename": "c", "to": "b"}], "two rules produce 'b'"),
        ([{"fuse": ["a", "c"], "to": "ac"}], "cannot fuse 'a' (F32 [4, 2]) and 'c' (F32 [3, 3])"),
        ([{"split": "a", "to": ["a1", "a2"], "sizes": [1, 2]}, {"drop": "c"}], "sizes [1, 2] of 'a' add up to 3"),
        ([{"swap": "c", "to": "c2"}, {"drop": "a"}], "cannot swap the halves of 'c': dim 0 is 3, odd"),
        ([{"rename": "a", "to": "b"}, {"rename": "a", "to": "d"}, {"drop": "c"}], "'a' is used twice"),
        ([{"rename": "zzz", "to": "b"}], "rename zzz: matches no tensor"),
        ([{"shuffle": "a"}], "give exactly one of rename, fuse, split, swap, drop"),
    ],
)
def test_bad_recipes_are_refused_naming_the_tensors(tmp_path: Path, rules: list[object], message: str) -> None:
    source_folder = tmp_path / "src"
    source_folder.mkdir()
    save_file({"a": torch.zeros(4, 2), "c": torch.zeros(3, 3)}, source_folder / "m.safetensors")
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"rules": rules}))
    before = snapshot(source_folder)
    out = tmp_path / "out.safetensors"
    result = run_cli("merge", source_folder / "m.safetensors", "-o", out, "--recipe", recipe)
    assert_clean_failure(result, 2, message)
    assert not out.exists() and temporaries(tmp_path) == []
    assert snapshot(source_folder) == before


def test_an_unknown_recipe_names_the_built_ins(tmp_path: Path) -> None:
    result = run_cli("merge", tmp_path, "-o", tmp_path / "o.safetensors", "--recipe", "flux-nope")
    assert_clean_failure(result, 2, "flux-bfl-to-diffusers, flux-diffusers-to-bfl")


def test_dtype_losses_of_a_fused_tensor_are_counted_once_under_its_name(tmp_path: Path) -> None:
    """`--dtype fp16` on a recipe's outputs: a fused tensor's pieces are cast as one tensor,
    its overflows and underflows counted once each (pieces larger than a cast round, values
    at their edges) and reported under the output's name; a split's chunks each count their own."""
    generator = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(300, 1024, generator=generator) for _ in range(3))  # 1.2 MB each
    k[0, 0], k[-1, -1], k[150, 7] = 1e6, -1e6, 7e4  # over fp16's 65504: to ±inf
    v[0, 0], v[299, 1023] = 1e-9, -1e-9  # under fp16's smallest subnormal: to zero
    mlp = torch.randn(400, 8, generator=generator)
    mlp[399, 0] = 1e5  # in the second half only
    tensors = {"l.0.q": q, "l.0.k": k, "l.0.v": v, "l.0.mlp": mlp}
    source = tmp_path / "m.safetensors"
    save_file(tensors, source)
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"rules": [
        {"fuse": ["l.{i}.q", "l.{i}.k", "l.{i}.v"], "to": "l.{i}.qkv"},
        {"split": "l.{i}.mlp", "to": ["l.{i}.gate", "l.{i}.up"]}]}))
    out = tmp_path / "out.safetensors"
    result = run_cli("merge", source, "-o", out, "--recipe", recipe, "--dtype", "fp16", "--json")
    assert result.exit_code == 0, result.stderr
    written = load_file(out)
    fused = torch.cat([q, k, v])
    assert written["l.0.qkv"].view(torch.int16).equal(fused.to(torch.float16).view(torch.int16))
    assert written["l.0.up"].equal(mlp[200:].to(torch.float16))
    report = json.loads(result.stdout)
    losses = {loss["tensor"]: (loss["overflow"], loss["underflow"]) for loss in report["dtype"]["losses"]}
    assert losses == {"l.0.qkv": (3, 2), "l.0.up": (1, 0)}
    assert any("l.0.qkv: F32 → F16: 3 value(s) overflowed to ±inf, 2 underflowed to zero" in w
               for w in report["warnings"]), report["warnings"]
