"""FP8 checkpoints: dequantising the fine-grained layout bit for bit as transformers does.

Each test builds a DeepSeek-shaped FP8 checkpoint with torch (F8_E4M3 weights beside
F32 `weight_scale_inv` grids, a config with `quantization_config`), runs the real CLI
and compares the bytes with transformers' own dequantisers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers.integrations.finegrained_fp8 import Fp8Dequantize, _dequantize_fp8_weight

from conftest import assert_clean_failure, kill_while_writing, run_cli, snapshot, temporaries
from shardkit.checkpoint.shards import open_checkpoint

BLOCK = (128, 128)
TORCH = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def fp8_weight(rows: int, columns: int, seed: int, corners: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """An FP8 weight (every code, ±448, NaN, a zero block) and a scale grid of
    partial blocks' shape, scales spread over many magnitudes."""
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 256, (rows, columns), dtype=torch.uint8, generator=generator)
    if corners:
        codes[:128, :128] = 0  # a zero block
        codes[0, 200] = 0x7E  # 448
        codes[1, 200] = 0xFE  # -448
        codes[2, 300] = 0x7F  # NaN
        codes[3, 300] = 0xFF  # -NaN
    weight = codes.view(torch.float8_e4m3fn)
    grid = (-(-rows // BLOCK[0]), -(-columns // BLOCK[1]))
    scales = torch.exp2(torch.randn(grid, generator=generator) * 4) * (1 + torch.rand(grid, generator=generator))
    return weight, scales.float()


def deepseek_fp8(folder: Path, extra_config: dict | None = None) -> dict[str, torch.Tensor]:
    """A two-shard, DeepSeek-named FP8 checkpoint with an index and config.json."""
    folder.mkdir(parents=True)
    tensors: dict[str, torch.Tensor] = {}
    shapes = {
        "model.layers.0.self_attn.kv_a_proj_with_mqa": (576, 448),  # 5 scale rows, the last one partial
        "model.layers.0.self_attn.q_a_proj": (384, 448),  # rows divide the grid: Fp8Dequantize's block is wrong
        "model.layers.0.mlp.experts.0.down_proj": (256, 384),  # whole blocks: Fp8Dequantize applies
        "model.layers.1.mlp.experts.1.gate_proj": (200, 130),
    }
    for seed, (name, (rows, columns)) in enumerate(shapes.items()):
        weight, scales = fp8_weight(rows, columns, seed, corners=seed == 0)
        tensors[f"{name}.weight"], tensors[f"{name}.weight_scale_inv"] = weight, scales
    tensors["model.embed_tokens.weight"] = torch.randn(64, 448).to(torch.bfloat16)
    tensors["model.layers.0.input_layernorm.weight"] = torch.randn(448).to(torch.bfloat16)
    tensors["model.layers.1.mlp.gate.e_score_correction_bias"] = torch.randn(8)
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2 :]}
    weight_map = {}
    for file, part in halves.items():
        save_file({n: tensors[n].contiguous() for n in part}, folder / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": size}, "weight_map": weight_map})
    )
    config = {
        "architectures": ["DeepseekV3ForCausalLM"], "torch_dtype": "bfloat16",
        "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                "weight_block_size": list(BLOCK)},
        **(extra_config or {}),
    }
    (folder / "config.json").write_text(json.dumps(config))
    return tensors


def read_all(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")) if path.is_dir() else [path]:
        with safe_open(file, "pt") as handle:
            out.update({name: handle.get_tensor(name) for name in handle.keys()})  # noqa: SIM118 - not a dict
    return out


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical, except that any NaN equals any NaN (torch's NaN bits differ by code path)."""
    assert a.dtype == b.dtype and a.shape == b.shape
    nan_a, nan_b = a.float().isnan(), b.float().isnan()
    bits = {2: torch.int16, 4: torch.int32}[a.element_size()]
    return bool(torch.equal(nan_a, nan_b) and torch.equal(a.view(bits)[~nan_a], b.view(bits)[~nan_b]))


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
def test_dequantise_is_transformers_arithmetic_bit_for_bit(tmp_path: Path, dtype: str) -> None:
    source = tmp_path / "fp8"
    tensors = deepseek_fp8(source)
    before = snapshot(source)
    result = run_cli("merge", source, "-o", tmp_path / "out", "--dtype", dtype, "--keep", "*e_score_correction_bias")
    assert result.exit_code == 0, result.stderr
    assert snapshot(source) == before
    written = read_all(tmp_path / "out")
    assert not [n for n in written if n.endswith("_scale_inv")]
    assert sorted(written) == sorted(n for n in tensors if not n.endswith("_scale_inv"))
    target = TORCH[dtype]
    for name, tensor in tensors.items():
        if name.endswith("_scale_inv"):
            continue
        if tensor.dtype == torch.float8_e4m3fn:
            scales = tensors[name + "_scale_inv"]
            expected = _dequantize_fp8_weight(tensor, scales, list(BLOCK), torch.float32).to(target)
            assert same_bits(written[name], expected), name
            rows, columns = tensor.shape
            if (rows, columns) == (scales.shape[0] * BLOCK[0], scales.shape[1] * BLOCK[1]):  # whole blocks only
                op = Fp8Dequantize(None)._dequantize_one(tensor, scales, output_dtype=target)
                assert same_bits(written[name], op), name
        elif name.endswith("e_score_correction_bias"):
            assert written[name].dtype == torch.float32 and torch.equal(written[name], tensor)
        else:
            assert torch.equal(written[name], tensor.to(target))
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["torch_dtype"] == {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[dtype]


def test_fp8_dequantize_op_picks_the_wrong_block_where_shardkit_takes_the_config(tmp_path: Path) -> None:
    """384 rows in 3 scale rows look like blocks of 128 to either, but 448 columns in 4
    scale columns give Fp8Dequantize blocks of 112: the config says 128."""
    weight, scales = fp8_weight(384, 448, 1)
    right = _dequantize_fp8_weight(weight, scales, list(BLOCK), torch.float32)
    guessed = Fp8Dequantize(None)._dequantize_one(weight, scales, output_dtype=torch.float32)
    assert not torch.equal(right.nan_to_num(), guessed.nan_to_num())
    source = tmp_path / "fp8"
    deepseek_fp8(source)
    assert run_cli("merge", source, "-o", tmp_path / "o.safetensors", "--dtype", "fp32").exit_code == 0
    written = read_all(tmp_path / "o.safetensors")["model.layers.0.self_attn.q_a_proj.weight"]
    tensors = read_all(source)
    expected = _dequantize_fp8_weight(
        tensors["model.layers.0.self_attn.q_a_proj.weight"],
        tensors["model.layers.0.self_attn.q_a_proj.weight_scale_inv"], list(BLOCK), torch.float32,
    )
    assert same_bits(written, expected)


def test_split_dequantises_and_the_dry_run_json_names_each_scale_range(tmp_path: Path) -> None:
    source = tmp_path / "fp8"
    tensors = deepseek_fp8(source)
    result = run_cli("split", source, "-o", tmp_path / "plan", "--dtype", "bf16", "-s", "300KB", "--dry-run", "--json")
    assert result.exit_code == 0, result.stderr
    plan = json.loads(result.stdout)["plan"]
    steps = {s["tensor"]: s for f in plan["files"] for s in f["steps"] if s["kind"] == "transform"}
    kv = steps["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"]
    assert kv["src_dtype"] == "F8_E4M3" and kv["dst_dtype"] == "BF16"
    assert kv["scales"]["tensor"] == "model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv"
    assert kv["scales"]["grid"] == [5, 4] and kv["scales"]["block"] == [128, 128]
    assert kv["scales"]["source_length"] == 5 * 4 * 4
    assert not (tmp_path / "plan").exists()
    result = run_cli("split", source, "-o", tmp_path / "out", "--dtype", "bf16", "-s", "300KB")
    assert result.exit_code == 0, result.stderr
    written = read_all(tmp_path / "out")
    assert len(list((tmp_path / "out").glob("*.safetensors"))) > 1
    name = "model.layers.1.mlp.experts.1.gate_proj.weight"
    expected = _dequantize_fp8_weight(tensors[name], tensors[name + "_scale_inv"], list(BLOCK), torch.float32)
    assert same_bits(written[name], expected.to(torch.bfloat16))
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert not [n for n in index["weight_map"] if n.endswith("_scale_inv")]


def test_the_block_size_comes_from_the_config(tmp_path: Path) -> None:
    source = tmp_path / "fp8"
    source.mkdir()
    weight = torch.randint(0, 126, (100, 70), dtype=torch.uint8).view(torch.float8_e4m3fn)
    scales = torch.rand(4, 2) + 0.5  # 32×64 blocks: 4 rows of blocks (the last of 4 rows), 2 columns (of 6)
    save_file({"w.weight": weight, "w.weight_scale_inv": scales}, source / "model.safetensors")
    (source / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "fp8",
                                                                           "weight_block_size": [32, 64]}}))
    assert run_cli("merge", source, "-o", tmp_path / "o.safetensors", "--dtype", "bf16").exit_code == 0
    expected = _dequantize_fp8_weight(weight, scales, [32, 64], torch.float32).to(torch.bfloat16)
    assert same_bits(read_all(tmp_path / "o.safetensors")["w.weight"], expected)


def test_a_long_weight_streams_through_many_chunks_bit_for_bit(tmp_path: Path) -> None:
    """5 MB of FP8: more than one fill chunk and scratch buffer, edges inside block rows."""
    source = tmp_path / "fp8"
    source.mkdir()
    weight, scales = fp8_weight(2500, 2100, 7)
    save_file({"big.weight": weight, "big.weight_scale_inv": scales}, source / "model.safetensors")
    assert run_cli("merge", source, "-o", tmp_path / "o.safetensors", "--dtype", "bf16").exit_code == 0
    expected = _dequantize_fp8_weight(weight, scales, list(BLOCK), torch.float32).to(torch.bfloat16)
    assert same_bits(read_all(tmp_path / "o.safetensors")["big.weight"], expected)


def _broken(tmp_path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    source = tmp_path / "broken"
    source.mkdir()
    save_file(tensors, source / "model.safetensors")
    (source / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "fp8",
                                                                           "weight_block_size": [128, 128]}}))
    return source


@pytest.mark.parametrize(
    "case, message",
    [
        ("no scale", "FP8 weight 'a.weight' has no scale tensor 'a.weight_scale_inv'"),
        ("no weight", "scale tensor 'b.weight_scale_inv' has no weight 'b.weight'"),
        ("wrong shape", "weight 'a.weight' and its scale 'a.weight_scale_inv': the scale has shape [2, 1], "
                        "expected [2, 2]"),
    ],
)
def test_mismatched_scales_are_refused_naming_both_tensors(tmp_path: Path, case: str, message: str) -> None:
    weight, scales = fp8_weight(200, 130, 3)
    tensors = {"a.weight": weight, "a.weight_scale_inv": scales, "c.weight": torch.ones(4)}
    if case == "no scale":
        del tensors["a.weight_scale_inv"]
    elif case == "no weight":
        tensors["b.weight_scale_inv"] = scales.clone()
    else:
        tensors["a.weight_scale_inv"] = scales[:, :1].contiguous()
    source = _broken(tmp_path, tensors)
    before = snapshot(tmp_path)
    for command in (["merge", source, "-o", tmp_path / "out"], ["split", source, "-o", tmp_path / "out2", "-s", "1MB"]):
        result = run_cli(*command, "--dtype", "bf16")
        assert_clean_failure(result, 2, message)
    assert snapshot(tmp_path) == before
    assert temporaries(tmp_path) == []
    assert not (tmp_path / "out").exists() and not (tmp_path / "out2").exists()


def test_of_many_pairs_the_first_wrong_one_in_name_order_is_named(tmp_path: Path) -> None:
    """Pairs are checked once per (dtype, shape) kind: a wrong kind, a missing weight
    later on, still name the first wrong pair as checking one by one would."""
    weight, scales = fp8_weight(200, 130, 3)
    tensors = {}
    for i in range(20):
        tensors[f"m.{i}.weight"], tensors[f"m.{i}.weight_scale_inv"] = weight.clone(), scales.clone()
    tensors["m.5.weight_scale_inv"] = scales[:, :1].contiguous()  # after m.12 in name order
    tensors["m.12.weight_scale_inv"] = scales.double()
    tensors["z.weight_scale_inv"] = scales.clone()  # no weight, last
    source = _broken(tmp_path, tensors)
    result = run_cli("merge", source, "-o", tmp_path / "out", "--dtype", "bf16")
    assert_clean_failure(result, 2, "weight 'm.12.weight' and its scale 'm.12.weight_scale_inv': the scale is F64")
    del tensors["m.12.weight_scale_inv"], tensors["m.12.weight"]
    (tmp_path / "again").mkdir()
    source = _broken(tmp_path / "again", tensors)
    result = run_cli("merge", source, "-o", tmp_path / "out", "--dtype", "bf16")
    assert_clean_failure(result, 2, "weight 'm.5.weight' and its scale 'm.5.weight_scale_inv': the scale has shape")
    assert not (tmp_path / "out").exists()


def test_a_killed_dequantisation_leaves_nothing(tmp_path: Path) -> None:
    source = tmp_path / "fp8"
    source.mkdir()
    tensors = {}
    for i in range(24):
        tensors[f"l{i}.weight"], tensors[f"l{i}.weight_scale_inv"] = fp8_weight(2048, 2048, i)
    save_file(tensors, source / "model.safetensors")
    dest = tmp_path / "out" / "bf16"
    dest.parent.mkdir()
    kill_while_writing(["merge", source, "-o", dest, "--dtype", "fp32"], dest.parent)
    assert not dest.exists()
    assert run_cli("merge", source, "-o", dest, "--dtype", "fp32").exit_code == 0
    assert temporaries(dest.parent) == []
    assert open_checkpoint(dest).total_bytes == 24 * 2048 * 2048 * 4


def test_the_e4m3_table_is_torchs_widening() -> None:
    from shardkit.format.fp8 import e4m3_table

    every = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    table = torch.from_numpy(e4m3_table().copy())
    assert same_bits(table, every)


def compressed_fp8(folder: Path, scale_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """An llm-compressor-style FP8 checkpoint: per-channel and per-tensor `weight_scale`
    in `scale_dtype`, a static `input_scale`, quant_method compressed-tensors."""
    folder.mkdir(parents=True)
    generator = torch.Generator().manual_seed(11)

    def codes(rows: int, columns: int) -> torch.Tensor:
        return torch.randint(0, 256, (rows, columns), dtype=torch.uint8, generator=generator).view(torch.float8_e4m3fn)

    tensors = {
        "model.layers.0.mlp.down_proj.weight": codes(200, 130),
        "model.layers.0.mlp.down_proj.weight_scale": (torch.rand(200, 1, generator=generator) * 0.01).to(scale_dtype),
        "model.layers.0.self_attn.o_proj.weight": codes(130, 200),
        "model.layers.0.self_attn.o_proj.weight_scale": torch.tensor([0.0371]).to(scale_dtype),
        "model.layers.0.self_attn.o_proj.input_scale": torch.tensor([0.5]).to(scale_dtype),
        "model.norm.weight": torch.randn(130).to(torch.bfloat16),
    }
    save_file(tensors, folder / "model.safetensors")
    config = {"torch_dtype": "bfloat16", "quantization_config": {
        "quant_method": "compressed-tensors", "format": "float-quantized",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": {"num_bits": 8, "type": "float",
                                                                         "strategy": "channel", "symmetric": True}}},
    }}
    (folder / "config.json").write_text(json.dumps(config))
    return tensors


@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
def test_compressed_tensors_fp8_is_that_packages_dequantisation(
    tmp_path: Path, scale_dtype: torch.dtype, dtype: str
) -> None:
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import dequantize

    source = tmp_path / "ct"
    tensors = compressed_fp8(source, scale_dtype)
    result = run_cli("merge", source, "-o", tmp_path / "out", "--dtype", dtype)
    assert result.exit_code == 0, result.stderr
    written = read_all(tmp_path / "out")
    assert sorted(written) == [
        "model.layers.0.mlp.down_proj.weight", "model.layers.0.self_attn.o_proj.weight", "model.norm.weight",
    ]
    for layer, strategy in (("mlp.down_proj", "channel"), ("self_attn.o_proj", "tensor")):
        name = f"model.layers.0.{layer}.weight"
        args = QuantizationArgs(num_bits=8, type="float", strategy=strategy, symmetric=True)
        expected = dequantize(tensors[name], tensors[name + "_scale"], None, args).to(TORCH[dtype])
        assert same_bits(written[name], expected), name
    assert "quantization_config" not in json.loads((tmp_path / "out" / "config.json").read_text())


def test_compressed_tensors_block_scales_follow_the_block_structure(tmp_path: Path) -> None:
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import dequantize

    source = tmp_path / "ct"
    source.mkdir()
    weight, scales = fp8_weight(200, 130, 5)
    save_file({"w.weight": weight, "w.weight_scale": scales.to(torch.bfloat16)}, source / "model.safetensors")
    weights = {"num_bits": 8, "type": "float", "strategy": "block", "block_structure": [128, 128]}
    (source / "config.json").write_text(json.dumps({"quantization_config": {
        "quant_method": "compressed-tensors", "config_groups": {"g": {"weights": weights}}}}))
    assert run_cli("merge", source, "-o", tmp_path / "o.safetensors", "--dtype", "bf16").exit_code == 0
    args = QuantizationArgs(num_bits=8, type="float", strategy="block", block_structure=[128, 128])
    expected = dequantize(weight, scales.to(torch.bfloat16), None, args).to(torch.bfloat16)
    assert same_bits(read_all(tmp_path / "o.safetensors")["w.weight"], expected)


def test_a_compressed_tensors_scale_of_the_wrong_shape_is_refused(tmp_path: Path) -> None:
    source = tmp_path / "ct"
    source.mkdir()
    weight, _ = fp8_weight(200, 130, 5)
    save_file({"w.weight": weight, "w.weight_scale": torch.ones(130, 1)}, source / "model.safetensors")
    before = snapshot(tmp_path)
    result = run_cli("merge", source, "-o", tmp_path / "o.safetensors", "--dtype", "bf16")
    assert_clean_failure(result, 2, "weight 'w.weight' and its scale 'w.weight_scale': the scale has shape [130, 1]")
    assert snapshot(tmp_path) == before and temporaries(tmp_path) == []


def test_inspect_shows_the_fp8_scheme_and_counts_no_scale_as_a_parameter(tmp_path: Path) -> None:
    source = tmp_path / "fp8"
    tensors = deepseek_fp8(source)
    result = run_cli("inspect", source, "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    scales = [n for n in tensors if n.endswith("_scale_inv")]
    assert report["quantization"] == {
        "scheme": "fp8", "block_size": [128, 128], "quantised_tensors": 4, "scale_tensors": 4,
        "scale_parameters": sum(tensors[n].numel() for n in scales),
    }
    assert report["parameters"] == sum(t.numel() for n, t in tensors.items() if n not in scales)
    assert report["parameters"] == sum(report["parameters_by_dtype"].values())
    text = run_cli("inspect", source).stdout
    assert "quantisation  fp8 (F8_E4M3, blocks 128×128): 4 quantised tensors, 4 scale tensors" in text


def test_inspect_warns_about_a_broken_fp8_layout_instead_of_failing(tmp_path: Path) -> None:
    weight, scales = fp8_weight(200, 130, 3)
    source = _broken(tmp_path, {"a.weight": weight, "a.weight_scale_inv": scales[:, :1].contiguous()})
    result = run_cli("inspect", source, "--json")
    assert result.exit_code == 0
    assert "the scale has shape [2, 1], expected [2, 2]" in " ".join(json.loads(result.stdout)["warnings"])


@pytest.mark.hf
def test_verify_accepts_the_scales_of_an_fp8_model(tmp_path: Path) -> None:
    import shardkit
    from hf_models import tiny_qwen2

    model = tiny_qwen2(tie=False)
    tensors: dict[str, torch.Tensor] = {}
    for name, value in model.state_dict().items():
        if name.startswith("model.layers.") and name.endswith("proj.weight"):
            tensors[name] = value.clamp(-448, 448).to(torch.float8_e4m3fn)
            tensors[name + "_scale_inv"] = torch.ones(-(-value.shape[0] // 32), -(-value.shape[1] // 32))
        else:
            tensors[name] = value.contiguous()
    folder = tmp_path / "fp8"
    folder.mkdir()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    config = model.config.to_dict()
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [32, 32]}
    (folder / "config.json").write_text(json.dumps(config))
    report = shardkit.verify(folder)
    assert report.ok, [str(p) for p in report.problems]
    assert "architecture" in report.checks
    del tensors["model.layers.0.mlp.up_proj.weight_scale_inv"]  # a real problem is still one
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    assert not shardkit.verify(folder).ok


def test_the_block_table_lookup_is_the_products_then_cast_bit_for_bit() -> None:
    """The fast path (each block's 256 results made once, then looked up) gives the bytes and
    the loss counts of multiplying in float32 and casting, on random ranges of random
    shapes and blocks; where a scale is not finite or a result is lost it steps aside."""
    import numpy as np

    from shardkit.format.dtype_cast import cast_into
    from shardkit.format.fp8 import dequantise_by_lookup, dequantise_into

    rng = np.random.default_rng(7)
    looked_up = stepped_aside = 0
    for trial in range(200):
        rows, columns = int(rng.integers(1, 600)), int(rng.integers(1, 700))
        block = (int(rng.choice([1, 7, 128])), int(rng.choice([1, 5, 128])))
        grid = (-(-rows // block[0]), -(-columns // block[1]))
        scales = (rng.standard_normal(grid) * 10.0 ** float(rng.integers(-8, 8))).astype(np.float32)
        scales.flat[0] = [0.0, np.inf, np.nan, scales.flat[0]][trial % 4]
        codes = rng.integers(0, 256, rows * columns, dtype=np.uint8)  # NaN codes included
        first = int(rng.integers(0, rows * columns))
        count = int(rng.integers(1, rows * columns - first + 1))
        band = first // columns // block[0]
        part = codes[first : first + count]
        for dst, size in (("BF16", 2), ("F16", 2), ("F32", 4)):
            products = np.empty(count, np.float32)
            dequantise_into(part, first, columns, block, scales[band:], band, products)
            expected = bytearray(count * size)
            expected_losses = cast_into(products, "F32", dst, memoryview(expected))
            got = bytearray(count * size)
            losses = dequantise_by_lookup(part, first, columns, block, scales[band:], band, dst, memoryview(got))
            if losses is None:
                stepped_aside += 1
                continue
            looked_up += 1
            assert bytes(got) == bytes(expected), (trial, dst)
            assert losses == expected_losses, (trial, dst)
    assert looked_up > 300 and stepped_aside > 50  # both paths were taken
