"""`--dtype fp8`: quantising to E4M3 with block scales, bit for bit as transformers does.

The reference is transformers itself: its `Fp8Quantize` op on crafted tensors, and its
whole FP8 quantiser (`from_pretrained(..., quantization_config=FineGrainedFP8Config())`
then `save_pretrained`) on tiny random models of several architectures, compared with
shardkit's output byte for byte; the output is then loaded back by transformers."""

from __future__ import annotations

import json
import random
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, FineGrainedFP8Config
from transformers.integrations.finegrained_fp8 import Fp8Quantize
from transformers.quantizers.quantizer_finegrained_fp8 import FineGrainedFP8HfQuantizer

import shardkit
from conftest import assert_clean_failure, kill_while_writing, run_cli, snapshot, temporaries
from plan_replay import memory_read
from shardkit.checkpoint.shards import open_checkpoint
from shardkit.commands.writing import reshape
from shardkit.plan.files import plan_merge
from shardkit.plan.fill import fill
from shardkit.plan.selection import Selection


def transformers_quantise(value: torch.Tensor, block: tuple[int, int]) -> dict[str, torch.Tensor]:
    """transformers' `Fp8Quantize` on one weight (what its quantiser does to each Linear weight)."""
    quantizer = types.SimpleNamespace(quantization_config=FineGrainedFP8Config(weight_block_size=block))
    return Fp8Quantize(quantizer)._quantize_one("w.weight", value)


def crafted(rows: int, columns: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """Random values over many magnitudes plus the corners: zero blocks, ±448 and beyond,
    NaN, ±inf, subnormal blocks."""
    generator = torch.Generator().manual_seed(seed)
    value = torch.randn(rows, columns, generator=generator) * torch.exp2(
        torch.randint(-20, 10, (rows, 1), generator=generator).float()
    )
    value[: rows // 4, : columns // 4] = 0  # a zero block (or more)
    flat = value.view(-1)
    picks = torch.randint(0, flat.numel(), (12,), generator=generator)
    for i, special in zip(picks.tolist(), (448.0, -448.0, 449.0, -1e4, 3e38, float("nan"), -float("nan"),
                                           float("inf"), -float("inf"), 1e-40, -1e-42, 2.0**-10)):
        flat[i] = special
    value[-1, :] = torch.randn(columns, generator=generator) * 1e-41  # a band of subnormals
    return value.to(dtype)


def quantise_source(folder: Path, tensors: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen2", "torch_dtype": "bfloat16"}))
    return folder


@pytest.mark.parametrize("block", [(128, 128), (16, 32), (1, 1)])
def test_quantise_is_transformers_fp8quantize_bit_for_bit(tmp_path: Path, block: tuple[int, int]) -> None:
    shapes = [(256, 384, torch.bfloat16), (128, 256, torch.float32), (64, 96, torch.float16),
              (200, 130, torch.bfloat16), (576, 448, torch.bfloat16), (128, 128, torch.float64)]
    tensors = {
        f"model.layers.{i}.mlp.up_proj.weight": crafted(rows, columns, i, dtype)
        for i, (rows, columns, dtype) in enumerate(shapes)
    }
    tensors["model.layers.0.input_layernorm.weight"] = torch.randn(448).to(torch.bfloat16)
    source = quantise_source(tmp_path / "src", tensors)
    out = tmp_path / "out"
    spelled = f"{block[0]}x{block[1]}"
    result = run_cli("merge", source, "-o", out, "--dtype", "fp8", "--block-size", spelled)
    assert result.exit_code == 0, result.stderr
    written = load_file(out / "model.safetensors")
    expected: dict[str, torch.Tensor] = {}
    for name, value in tensors.items():
        reference = transformers_quantise(value, block) if value.ndim == 2 else {"w.weight": value}
        expected[name] = reference["w.weight"]
        if "w.weight_scale_inv" in reference:
            expected[name + "_scale_inv"] = reference["w.weight_scale_inv"]
    assert written.keys() == expected.keys()
    for name, value in expected.items():
        got = written[name]
        assert got.dtype == value.dtype, name
        assert torch.equal(got.view(torch.uint8), value.contiguous().view(torch.uint8)), name
    quantised = {n for n, t in written.items() if t.dtype == torch.float8_e4m3fn}
    # 200x130 and 576x448 are not whole 128x128 blocks: transformers passes them through
    if block == (128, 128):
        assert quantised == {f"model.layers.{i}.mlp.up_proj.weight" for i in (0, 1, 5)}
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["weight_block_size"] == list(block)


def test_a_true_division_would_differ_from_transformers_scales() -> None:
    """Why `448 / amax` is computed as torch does (reciprocal, then a product): the
    correctly rounded quotient differs in about a quarter of the blocks."""
    amax = torch.rand(100_000) * 10 + 1e-3
    torch_way = 448.0 / amax
    divided = torch.from_numpy(np.float32(448.0) / amax.numpy())
    assert torch.equal(torch_way, amax.reciprocal() * 448.0)
    assert 0.1 < (torch_way != divided).float().mean() < 0.5


def test_a_weight_streams_through_many_blocks_and_any_tiling_bit_for_bit(tmp_path: Path) -> None:
    """A weight larger than the writer's 32 MiB blocks (codes cut mid-band) and ranges of
    any size and place give the bytes transformers gives."""
    value = crafted(6144, 6144, 7, torch.bfloat16)  # 72 MiB of BF16, 36 MiB of codes
    source = quantise_source(tmp_path / "src", {"model.layers.0.mlp.down_proj.weight": value})
    result = run_cli("merge", source, "-o", tmp_path / "out.safetensors", "--dtype", "fp8")
    assert result.exit_code == 0, result.stderr
    reference = transformers_quantise(value, (128, 128))
    written = load_file(tmp_path / "out.safetensors")
    assert torch.equal(written["model.layers.0.mlp.down_proj.weight"].view(torch.uint8),
                       reference["w.weight"].view(torch.uint8))
    assert torch.equal(written["model.layers.0.mlp.down_proj.weight_scale_inv"], reference["w.weight_scale_inv"])
    whole = (tmp_path / "out.safetensors").read_bytes()
    selected, dtypes = reshape(open_checkpoint(source), Selection(), None, "fp8", ())
    checkpoint = selected.checkpoint
    assert dtypes is not None
    planned = plan_merge(checkpoint, "out.safetensors", (), dtypes, dtypes.scales).files[0]
    read = memory_read({str(source / "model.safetensors"): (source / "model.safetensors").read_bytes()})
    rng = random.Random(3)
    for _ in range(12):
        start = rng.randrange(planned.size)
        length = min(planned.size - start, rng.choice([1, 7, 4096, 1 << 20, 5 << 20]))
        out = bytearray(length)
        fill(planned, start, memoryview(out), read)
        assert bytes(out) == whole[start : start + length], (start, length)


ARCHITECTURES = {
    "qwen2": {},
    "llama": {},
    "gemma2": {"head_dim": 16},
    "gpt2": {"n_embd": 64, "n_layer": 2, "n_head": 4},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen2_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                  "shared_expert_intermediate_size": 48},
    "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "head_dim": 16},
    "deepseek_v3": {"n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                    "first_k_dense_replace": 1, "n_group": 2, "topk_group": 1, "q_lora_rank": 32,
                    "kv_lora_rank": 32, "qk_rope_head_dim": 16, "qk_nope_head_dim": 16, "v_head_dim": 16,
                    "num_key_value_heads": 4},
}
SMALL = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "vocab_size": 128}


def transformers_fp8_save(source: Path, out: Path, config: FineGrainedFP8Config, monkeypatch) -> None:
    """transformers' own quantise-then-save. Its quantiser refuses to quantise without a
    GPU (its FP8 matmuls need one); quantising and saving need none, so that check is
    skipped here and nothing else."""
    monkeypatch.setattr(FineGrainedFP8HfQuantizer, "validate_environment", lambda self, *a, **k: None)
    model = AutoModelForCausalLM.from_pretrained(source, quantization_config=config)
    model.save_pretrained(out)
    monkeypatch.undo()


def tiny_model(folder: Path, model_type: str, **extra: object) -> None:
    kwargs = {**SMALL, **ARCHITECTURES[model_type], **extra} if model_type != "gpt2" else {
        **ARCHITECTURES[model_type], "vocab_size": 128}
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **kwargs)).to(torch.bfloat16)
    model.save_pretrained(folder)


#: Tensors transformers loads in float32 whatever the model's dtype (DeepSeek's router).
IN_F32_WHEN_LOADED = {"deepseek_v3": ("e_score_correction_bias", "mlp.gate.weight")}
#: Expert projections as the experts' fused tensors of transformers 5 order them.
EXPERT_NAMES = {"mixtral": ("w1", "w3", "w2")}


def per_expert_scales(reference: dict[str, torch.Tensor], model_type: str) -> dict[str, torch.Tensor]:
    """transformers 5 saves a quantised MoE's expert weights per expert, as checkpoints
    have them, but leaves their scales fused (`experts.gate_up_proj_scale_inv`,
    [experts, rows, columns]): cut them per expert, into the names the fine-grained
    layout has (DeepSeek-V3's own checkpoints, and what transformers loads)."""
    gate, up, down = EXPERT_NAMES.get(model_type, ("gate_proj", "up_proj", "down_proj"))
    scales = {}
    for name, value in reference.items():
        if name.endswith(".experts.gate_up_proj_scale_inv"):
            prefix, half = name[: -len("gate_up_proj_scale_inv")], value.shape[1] // 2
            for expert in range(value.shape[0]):
                scales[f"{prefix}{expert}.{gate}.weight_scale_inv"] = value[expert, :half]
                scales[f"{prefix}{expert}.{up}.weight_scale_inv"] = value[expert, half:]
        elif name.endswith(".experts.down_proj_scale_inv"):
            prefix = name[: -len("down_proj_scale_inv")]
            for expert in range(value.shape[0]):
                scales[f"{prefix}{expert}.{down}.weight_scale_inv"] = value[expert]
        else:
            scales[name] = value
    return scales


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_the_tensors_quantised_are_the_ones_transformers_quantises(
    tmp_path: Path, model_type: str, monkeypatch
) -> None:
    """With 1x1 blocks every Linear weight divides: what is quantised is decided by the
    layer rule alone (routers, embeddings, lm_head and GPT-2's Conv1D are not Linear
    layers for transformers' quantiser); every value is transformers', and the output
    loads in transformers with the logits of its own dequantisation by shardkit."""
    tiny_model(tmp_path / "bf16", model_type)
    transformers_fp8_save(tmp_path / "bf16", tmp_path / "reference", FineGrainedFP8Config(weight_block_size=(1, 1)),
                          monkeypatch)
    result = run_cli("merge", tmp_path / "bf16", "-o", tmp_path / "out", "--dtype", "fp8", "--block-size", "1x1")
    if model_type == "gpt2":  # nothing is a Linear layer there (Conv1D, embeddings, a tied head)
        assert_clean_failure(result, 2, "found no Linear weight")
        return
    assert result.exit_code == 0, result.stderr
    reference = per_expert_scales(load_file(tmp_path / "reference" / "model.safetensors"), model_type)
    written = load_file(tmp_path / "out" / "model.safetensors")
    source = load_file(tmp_path / "bf16" / "model.safetensors")
    assert written.keys() == reference.keys()
    for name, value in reference.items():
        if name.endswith(IN_F32_WHEN_LOADED.get(model_type, ())):
            # transformers' loader widens these (its _keep_in_fp32_modules_strict), quantised or not;
            # shardkit copies them as the source has them (see the README's DeepSeek recipe)
            assert value.dtype == torch.float32 and torch.equal(value, source[name].float())
            assert torch.equal(written[name], source[name])
            continue
        assert torch.equal(written[name].view(torch.uint8), value.contiguous().view(torch.uint8)), name
    assert any(value.dtype == torch.float8_e4m3fn for value in written.values())
    if reference.keys() == load_file(tmp_path / "reference" / "model.safetensors").keys():  # no MoE
        assert (tmp_path / "out" / "model.safetensors").read_bytes() == (
            tmp_path / "reference" / "model.safetensors").read_bytes()
    assert (tmp_path / "out" / "config.json").read_bytes() == (tmp_path / "reference" / "config.json").read_bytes()
    assert run_cli("merge", tmp_path / "out", "-o", tmp_path / "back", "--dtype", "bf16").exit_code == 0
    tokens = torch.arange(16).reshape(1, 16)
    with torch.no_grad():
        logits = load_dequantised(tmp_path / "out")(tokens).logits
        assert torch.equal(logits, AutoModelForCausalLM.from_pretrained(tmp_path / "back")(tokens).logits)


def load_dequantised(folder: Path):
    return AutoModelForCausalLM.from_pretrained(folder, quantization_config=FineGrainedFP8Config(dequantize=True))


def test_a_tiny_qwen2_quantised_by_shardkit_is_transformers_own_and_loads_with_equal_logits(
    tmp_path: Path, monkeypatch
) -> None:
    tiny_model(tmp_path / "bf16", "qwen2", hidden_size=256, intermediate_size=384, vocab_size=512,
               tie_word_embeddings=False)
    transformers_fp8_save(tmp_path / "bf16", tmp_path / "reference", FineGrainedFP8Config(), monkeypatch)
    before = snapshot(tmp_path / "bf16")
    result = run_cli("reshard", tmp_path / "bf16", "-o", tmp_path / "out", "--dtype", "fp8", "-s", "400KB")
    assert result.exit_code == 0, result.stderr
    assert "14 weight(s) quantised to F8_E4M3 in 128x128 blocks" in result.stdout
    assert snapshot(tmp_path / "bf16") == before
    assert (tmp_path / "out" / "config.json").read_bytes() == (tmp_path / "reference" / "config.json").read_bytes()
    reference = load_file(tmp_path / "reference" / "model.safetensors")
    written = {}
    for shard in sorted((tmp_path / "out").glob("model-*.safetensors")):
        written.update(load_file(shard))
    assert written.keys() == reference.keys()
    for name in reference:
        assert torch.equal(written[name].view(torch.uint8), reference[name].view(torch.uint8)), name
    ours, theirs = load_dequantised(tmp_path / "out"), load_dequantised(tmp_path / "reference")
    assert ours.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    tokens = torch.arange(24).reshape(2, 12)
    with torch.no_grad():
        assert torch.equal(ours(tokens).logits, theirs(tokens).logits)
        original = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16")(tokens).logits
        assert not torch.equal(ours(tokens).logits, original)  # quantised for real


def test_keep_leaves_weights_unquantised_and_names_them_for_transformers(tmp_path: Path) -> None:
    tiny_model(tmp_path / "bf16", "qwen2", hidden_size=128, intermediate_size=256, vocab_size=256)
    report = shardkit.split(tmp_path / "bf16", tmp_path / "out", dtype="fp8", keep=["*.mlp.down_proj.weight"],
                            block_size="64x64")
    assert report.dtype is not None and report.dtype.block == [64, 64] and len(report.dtype.kept) == 2
    written = load_file(tmp_path / "out" / "model.safetensors")
    assert written["model.layers.0.mlp.down_proj.weight"].dtype == torch.bfloat16
    assert "model.layers.0.mlp.down_proj.weight_scale_inv" not in written
    assert written["model.layers.0.mlp.up_proj.weight"].dtype == torch.float8_e4m3fn
    assert written["model.layers.0.mlp.up_proj.weight_scale_inv"].shape == (4, 2)
    section = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert section["modules_to_not_convert"] == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert section["weight_block_size"] == [64, 64]
    model = load_dequantised(tmp_path / "out")
    assert torch.equal(model.model.layers[0].mlp.down_proj.weight,
                       load_file(tmp_path / "bf16" / "model.safetensors")["model.layers.0.mlp.down_proj.weight"])


def fp8_checkpoint(folder: Path) -> None:
    folder.mkdir(parents=True)
    codes = torch.randint(0, 0x7E, (128, 128), dtype=torch.uint8).view(torch.float8_e4m3fn)
    save_file({"model.layers.0.mlp.up_proj.weight": codes,
               "model.layers.0.mlp.up_proj.weight_scale_inv": torch.ones(1, 1)}, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "fp8"}}))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--dtype", "fp8", "--block-size", "128"], "--block-size 128: expected ROWSxCOLUMNS"),
        (["--dtype", "fp8", "--block-size", "0x128"], "--block-size 0x128: expected ROWSxCOLUMNS"),
        (["--dtype", "fp8", "--block-size", "128,128"], "two positive integers such as --block-size 128x128"),
        (["--dtype", "bf16", "--block-size", "128x128"], "--block-size applies to --dtype fp8"),
        (["--block-size", "128x128"], "--block-size is the block of an FP8 quantisation; pass --dtype fp8 too"),
        (["--dtype", "fp8", "--block-size", "512x512"], "found no Linear weight whose shape divides into 512x512"),
        (["--dtype", "fp8", "--block-size", "32x32", "--keep", "*"], "(or --keep left them out)"),
    ],
)
def test_bad_quantisation_requests_fail_cleanly(tmp_path: Path, args: list[str], message: str) -> None:
    tiny_model(tmp_path / "bf16", "qwen2")
    before = snapshot(tmp_path)
    for command in ("merge", "reshard"):
        result = run_cli(command, tmp_path / "bf16", "-o", tmp_path / "out", *args)
        assert_clean_failure(result, 2, message)
    assert snapshot(tmp_path) == before
    assert temporaries(tmp_path) == [] and not (tmp_path / "out").exists()


def test_an_fp8_checkpoint_is_not_quantised_again(tmp_path: Path) -> None:
    fp8_checkpoint(tmp_path / "fp8")
    before = snapshot(tmp_path)
    result = run_cli("merge", tmp_path / "fp8", "-o", tmp_path / "out", "--dtype", "fp8")
    assert_clean_failure(result, 2, "the checkpoint is already quantised")
    assert "dequantise it first with --dtype bf16" in result.stderr
    (tmp_path / "fp8" / "config.json").unlink()  # named by its tensors alone
    before = snapshot(tmp_path)
    result = run_cli("merge", tmp_path / "fp8", "-o", tmp_path / "out", "--dtype", "fp8")
    assert_clean_failure(result, 2, "is F8_E4M3: the checkpoint is already quantised")
    assert snapshot(tmp_path) == before
    assert temporaries(tmp_path) == [] and not (tmp_path / "out").exists()


def test_a_killed_quantisation_leaves_nothing(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(0)
    tensors = {f"model.layers.{i}.mlp.up_proj.weight": torch.randn(2048, 4096, generator=generator)
               for i in range(12)}
    source = quantise_source(tmp_path / "src", tensors)
    dest = tmp_path / "out" / "fp8"
    dest.parent.mkdir()
    kill_while_writing(["merge", source, "-o", dest, "--dtype", "fp8"], dest.parent)
    assert not dest.exists()
    assert run_cli("merge", source, "-o", dest, "--dtype", "fp8").exit_code == 0
    assert temporaries(dest.parent) == []
    assert open_checkpoint(dest).total_bytes == 12 * (2048 * 4096 + 16 * 32 * 4)


def test_the_dry_run_plan_names_the_quantise_steps(tmp_path: Path) -> None:
    tiny_model(tmp_path / "bf16", "qwen2")
    result = run_cli("merge", tmp_path / "bf16", "-o", tmp_path / "out", "--dtype", "fp8", "--block-size", "32x32",
                     "--dry-run", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    steps = [s for f in report["plan"]["files"] for s in f["steps"] if s["kind"] == "transform"]
    parts = {(s["tensor"], s["quantise"]["part"]) for s in steps}
    assert ("model.layers.0.mlp.up_proj.weight", "codes") in parts
    assert ("model.layers.0.mlp.up_proj.weight_scale_inv", "scales") in parts
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------- --verify and verify --against


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as file:
        file.seek(offset)
        value = file.read(1)[0]
        file.seek(offset)
        file.write(bytes([value ^ 0x01]))


def tensor_offset(path: Path, name: str) -> int:
    from shardkit.checkpoint.shards import open_file

    return open_file(path).tensors[name].offset


def test_verify_recomputes_a_quantisation_and_catches_a_flipped_byte(tmp_path: Path) -> None:
    tiny_model(tmp_path / "bf16", "qwen2")
    result = run_cli("merge", tmp_path / "bf16", "-o", tmp_path / "out", "--dtype", "fp8", "--block-size", "32x32",
                     "--verify", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["verified"] is True
    against = ["verify", tmp_path / "out", "--against", tmp_path / "bf16", "--dtype", "fp8", "--block-size", "32x32",
               "--no-architecture"]
    assert run_cli(*against).exit_code == 0
    weights = tmp_path / "out" / "model.safetensors"
    for name in ("model.layers.1.mlp.up_proj.weight", "model.layers.0.self_attn.o_proj.weight_scale_inv"):
        flip_byte(weights, tensor_offset(weights, name) + 5)
        result = run_cli(*against)
        assert result.exit_code == 1, result.stderr
        assert f"tensor '{name}': holds different bytes than what --dtype makes of" in result.stdout
        flip_byte(weights, tensor_offset(weights, name) + 5)
    wrong_block = run_cli(*against[:-2], "16x16", "--no-architecture")  # the scales of other blocks
    assert wrong_block.exit_code == 1 and "weight_scale_inv': shape [" in wrong_block.stdout


@pytest.mark.parametrize("dtype", ["fp8", "bf16"])
def test_verify_discards_a_staged_fp8_output_with_a_flipped_byte(tmp_path: Path, monkeypatch, dtype: str) -> None:
    """--verify compares the staged output before the commit: a byte flipped on disk
    after it was written (in a quantised or a dequantised weight) is caught and
    nothing is committed."""
    from shardkit.commands import writing
    from shardkit.errors import VerificationError

    if dtype == "fp8":
        tiny_model(tmp_path / "src", "qwen2")
        name, options = "model.layers.0.mlp.down_proj.weight", {"block_size": "32x32"}
    else:
        from test_fp8 import deepseek_fp8

        deepseek_fp8(tmp_path / "src")
        name, options = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight", {}
    real = writing.execute

    def corrupting(*args, before_commit, **kwargs):
        def flip_then_verify(staged: Path) -> None:
            file = staged / "model.safetensors"
            flip_byte(file, tensor_offset(file, name) + 3)
            before_commit(staged)

        return real(*args, before_commit=flip_then_verify, **kwargs)

    before = snapshot(tmp_path / "src")
    assert shardkit.merge(tmp_path / "src", tmp_path / "good", dtype=dtype, verify=True, **options).verified
    monkeypatch.setattr(writing, "execute", corrupting)
    with pytest.raises(VerificationError, match=f"nothing was committed.*tensor '{name}' holds different bytes"):
        shardkit.merge(tmp_path / "src", tmp_path / "out", dtype=dtype, verify=True, **options)
    assert not (tmp_path / "out").exists() and temporaries(tmp_path) == []
    assert snapshot(tmp_path / "src") == before


def test_verify_against_a_dequantised_copy_recomputes_the_dequantisation(tmp_path: Path) -> None:
    from test_fp8 import deepseek_fp8

    deepseek_fp8(tmp_path / "fp8")
    assert run_cli("merge", tmp_path / "fp8", "-o", tmp_path / "bf16", "--dtype", "bf16").exit_code == 0
    against = ["verify", tmp_path / "bf16", "--against", tmp_path / "fp8", "--dtype", "bf16", "--no-architecture"]
    assert run_cli(*against).exit_code == 0, run_cli(*against).stdout
    weights = tmp_path / "bf16" / "model.safetensors"
    name = "model.layers.1.mlp.experts.1.gate_proj.weight"
    flip_byte(weights, tensor_offset(weights, name) + 100)
    result = run_cli(*against)
    assert result.exit_code == 1
    assert f"tensor '{name}': holds different bytes than what --dtype makes of" in result.stdout
