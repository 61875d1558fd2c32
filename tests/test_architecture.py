"""Architecture check against real (tiny) transformers models saved with save_pretrained."""

from __future__ import annotations

import importlib.util
import json
import resource
import struct
import sys
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")

from shardkit.checks import architecture  # noqa: E402
from shardkit.checks.architecture import ArchitectureProblem, ExpectedTensor, check_architecture, expected_tensors  # noqa: E402

pytestmark = pytest.mark.hf

TINY_QWEN2 = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    max_position_embeddings=128,
    bos_token_id=1,
    eos_token_id=2,
)


# --------------------------------------------------------------------------- helpers


def read_present(directory: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (dtype code, shape) for every *.safetensors file, from the raw headers."""
    present: dict[str, tuple[str, tuple[int, ...]]] = {}
    for path in sorted(directory.glob("*.safetensors")):
        with path.open("rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(length))
        header.pop("__metadata__", None)
        for name, info in header.items():
            present[name] = (info["dtype"], tuple(info["shape"]))
    return present


def save_tiny_qwen2(directory: Path, *, tie: bool = False, dtype: torch.dtype | None = None) -> Path:
    torch.manual_seed(0)
    config = transformers.Qwen2Config(**TINY_QWEN2, tie_word_embeddings=tie)
    model = transformers.Qwen2ForCausalLM(config)
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(directory)
    if dtype is not None:  # as written by transformers 5 (4.x wrote "torch_dtype")
        edit_config(directory, torch_dtype=None, dtype=str(dtype).removeprefix("torch."))
    return directory


def edit_config(directory: Path, **changes) -> Path:
    path = directory / "config.json"
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data))
    return path


def rewrite_weights(directory: Path, edit) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Load model.safetensors, let `edit` mutate the dict of tensors, save it back, re-read."""
    path = directory / "model.safetensors"
    tensors = dict(safetensors_torch.load_file(str(path)))
    edit(tensors)
    safetensors_torch.save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})
    return read_present(directory)


@pytest.fixture(scope="module")
def qwen_untied(tmp_path_factory) -> Path:
    return save_tiny_qwen2(tmp_path_factory.mktemp("qwen_untied"))


@pytest.fixture
def untied(tmp_path, qwen_untied) -> Path:
    """A private copy of the saved untied model (tests may rewrite it)."""
    for src in qwen_untied.iterdir():
        (tmp_path / src.name).write_bytes(src.read_bytes())
    return tmp_path


# --------------------------------------------------------------------------- expected tensors


def test_expected_tensors_match_saved_model(untied):
    expected = expected_tensors(untied / "config.json")
    present = read_present(untied)
    assert set(expected) == set(present)
    for name, (code, shape) in present.items():
        assert expected[name] == ExpectedTensor(name, shape, code)
    # non-persistent rotary buffers are not expected
    assert not any("inv_freq" in name for name in expected)
    assert expected["model.layers.0.self_attn.k_proj.weight"].shape == (32, 64)


def test_expected_tensors_tied_entry(tmp_path):
    directory = save_tiny_qwen2(tmp_path, tie=True)
    expected = expected_tensors(directory / "config.json")
    assert expected["lm_head.weight"].tied_to == "model.embed_tokens.weight"
    assert expected["model.embed_tokens.weight"].tied_to is None
    assert expected["lm_head.weight"].shape == (128, 64)


def test_expected_dtype_is_none_without_config_dtype(untied):
    config = edit_config(untied, dtype=None, torch_dtype=None)
    expected = expected_tensors(config)
    assert {t.dtype for t in expected.values()} == {None}


# --------------------------------------------------------------------------- check_architecture


def test_clean_model_has_no_problems(untied):
    assert check_architecture(untied / "config.json", read_present(untied)) == []


def test_removed_tensor_is_missing(untied):
    name = "model.layers.1.mlp.up_proj.weight"
    present = rewrite_weights(untied, lambda t: t.pop(name))
    problems = check_architecture(untied / "config.json", present)
    assert problems == [ArchitectureProblem("missing", name, "[128, 64] F32", None)]
    assert name in problems[0].message()


def test_added_bogus_tensor_is_unexpected(untied):
    present = rewrite_weights(untied, lambda t: t.__setitem__("model.bogus.weight", torch.zeros(3, 5)))
    problems = check_architecture(untied / "config.json", present)
    assert problems == [ArchitectureProblem("unexpected", "model.bogus.weight", None, "[3, 5] F32")]
    assert "model.bogus.weight" in problems[0].message()


def test_transposed_tensor_is_shape_problem(untied):
    name = "model.layers.0.mlp.down_proj.weight"  # [64, 128]

    def transpose(tensors):
        tensors[name] = tensors[name].t().contiguous()

    present = rewrite_weights(untied, transpose)
    assert present[name][1] == (128, 64)
    problems = check_architecture(untied / "config.json", present)
    assert problems == [ArchitectureProblem("shape", name, "[64, 128]", "[128, 64]")]
    message = problems[0].message()
    assert name in message and "[64, 128]" in message and "[128, 64]" in message


def test_changed_vocab_size_is_shape_problem(untied):
    present = read_present(untied)
    present["model.embed_tokens.weight"] = ("F32", (130, 64))
    problems = check_architecture(untied / "config.json", present)
    assert problems == [ArchitectureProblem("shape", "model.embed_tokens.weight", "[128, 64]", "[130, 64]")]


def test_untied_model_without_lm_head_reports_it_missing(untied):
    present = rewrite_weights(untied, lambda t: t.pop("lm_head.weight"))
    problems = check_architecture(untied / "config.json", present)
    assert problems == [ArchitectureProblem("missing", "lm_head.weight", "[128, 64] F32", None)]
    assert problems[0].message().startswith("missing tensor lm_head.weight")


def test_tied_model_without_lm_head_is_clean(tmp_path):
    # Qwen2-0.5B style: tie_word_embeddings=true, save_pretrained drops lm_head.weight
    directory = save_tiny_qwen2(tmp_path, tie=True)
    present = read_present(directory)
    assert "lm_head.weight" not in present
    assert json.loads((directory / "config.json").read_text())["tie_word_embeddings"] is True
    assert check_architecture(directory / "config.json", present) == []


def test_tied_model_with_lm_head_present_is_clean(tmp_path):
    directory = save_tiny_qwen2(tmp_path, tie=True)
    present = read_present(directory)
    present["lm_head.weight"] = present["model.embed_tokens.weight"]
    assert check_architecture(directory / "config.json", present) == []


def test_tied_model_with_only_lm_head_is_clean(tmp_path):
    # tying is symmetric in transformers: the existing side is used for both
    directory = save_tiny_qwen2(tmp_path, tie=True)
    present = read_present(directory)
    present["lm_head.weight"] = present.pop("model.embed_tokens.weight")
    assert check_architecture(directory / "config.json", present) == []


def test_tied_model_without_both_embeddings_reports_both(tmp_path):
    directory = save_tiny_qwen2(tmp_path, tie=True)
    present = read_present(directory)
    del present["model.embed_tokens.weight"]
    problems = check_architecture(directory / "config.json", present)
    assert [(p.kind, p.tensor) for p in problems] == [
        ("missing", "lm_head.weight"),
        ("missing", "model.embed_tokens.weight"),
    ]


@pytest.mark.parametrize("dtype_key", ["torch_dtype", "dtype"])
def test_bfloat16_config_with_f32_tensor_is_dtype_problem(tmp_path, dtype_key):
    directory = save_tiny_qwen2(tmp_path, dtype=torch.bfloat16)
    config = edit_config(directory, dtype=None, torch_dtype=None)
    assert check_architecture(config, read_present(directory)) == []  # no dtype in config: not checked
    config = edit_config(directory, **{dtype_key: "bfloat16"})
    present = read_present(directory)
    assert {code for code, _ in present.values()} == {"BF16"}
    assert check_architecture(config, present) == []

    name = "model.layers.0.self_attn.o_proj.weight"
    present = rewrite_weights(directory, lambda t: t.__setitem__(name, t[name].float()))
    problems = check_architecture(config, present)
    assert problems == [ArchitectureProblem("dtype", name, "BF16", "F32")]
    message = problems[0].message()
    assert name in message and "BF16" in message and "F32" in message


def test_integer_tensors_are_not_dtype_checked(tmp_path):
    directory = save_tiny_qwen2(tmp_path, dtype=torch.bfloat16)
    present = read_present(directory)
    present["model.norm.weight"] = ("I8", (64,))
    present["model.layers.0.input_layernorm.weight"] = ("BOOL", (64,))
    assert check_architecture(directory / "config.json", present) == []


def test_no_config_dtype_means_no_dtype_check(untied):
    config = edit_config(untied, dtype=None, torch_dtype=None)
    present = read_present(untied)
    present["model.norm.weight"] = ("F16", (64,))
    assert check_architecture(config, present) == []


def test_legacy_rotary_buffers_are_ignored(untied):
    # old checkpoints stored a per-layer rotary inv_freq; transformers ignores it on load
    present = read_present(untied)
    present["model.layers.0.self_attn.rotary_emb.inv_freq"] = ("F32", (8,))
    assert check_architecture(untied / "config.json", present) == []


def test_base_model_checkpoint_gets_prefix(tmp_path):
    # Qwen2Model weights (no "model." prefix) checked against a Qwen2ForCausalLM config:
    # transformers adds base_model_prefix, so only the head is missing.
    directory = save_tiny_qwen2(tmp_path)
    present = {
        name.removeprefix("model."): value
        for name, value in read_present(directory).items()
        if name != "lm_head.weight"
    }
    problems = check_architecture(directory / "config.json", present)
    assert [(p.kind, p.tensor) for p in problems] == [("missing", "lm_head.weight")]


def test_several_problems_are_sorted_by_kind(untied):
    present = read_present(untied)
    del present["model.norm.weight"]
    present["zzz.extra"] = ("F32", (1,))
    present["model.layers.0.self_attn.q_proj.bias"] = ("F32", (65,))
    problems = check_architecture(untied / "config.json", present)
    assert [(p.kind, p.tensor) for p in problems] == [
        ("missing", "model.norm.weight"),
        ("unexpected", "zzz.extra"),
        ("shape", "model.layers.0.self_attn.q_proj.bias"),
    ]
    assert all(isinstance(p.message(), str) and "\n" not in p.message() for p in problems)


def test_architectures_fallback_to_auto_class(untied):
    present = read_present(untied)
    config = edit_config(untied, architectures=None)
    assert check_architecture(config, present) == []
    config = edit_config(untied, architectures=["NoSuchModelForCausalLM"])
    assert check_architecture(config, present) == []


def test_architectures_names_base_model(untied):
    config = edit_config(untied, architectures=["Qwen2Model"])
    expected = expected_tensors(config)
    assert "lm_head.weight" not in expected
    assert "embed_tokens.weight" in expected


def test_moe_checkpoint_is_converted_like_transformers(tmp_path):
    # v5 fuses MoE experts; save_pretrained writes the original per-expert layout and
    # from_pretrained converts it back (conversion_mapping). The check must accept it.
    config = transformers.MixtralConfig(
        **TINY_QWEN2, num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=False
    )
    transformers.MixtralForCausalLM(config).save_pretrained(tmp_path)
    present = read_present(tmp_path)
    assert "model.layers.0.block_sparse_moe.experts.3.w1.weight" in present
    assert check_architecture(tmp_path / "config.json", present) == []

    del present["model.layers.1.block_sparse_moe.experts.3.w1.weight"]
    del present["model.layers.1.block_sparse_moe.experts.3.w3.weight"]
    problems = check_architecture(tmp_path / "config.json", present)
    if importlib.util.find_spec("transformers.conversion_mapping") is None:  # transformers 4.x: per-expert params
        assert [(p.kind, p.tensor) for p in problems] == [
            ("missing", "model.layers.1.block_sparse_moe.experts.3.w1.weight"),
            ("missing", "model.layers.1.block_sparse_moe.experts.3.w3.weight"),
        ]
        return
    # transformers 5: the stacked experts of layer 1 get one expert too few
    assert [(p.kind, p.tensor) for p in problems] == [("shape", "model.layers.1.mlp.experts.gate_up_proj")]
    assert problems[0].expected == "[4, 256, 64]" and problems[0].found == "[3, 256, 64]"


def test_keep_in_fp32_modules_accept_f32_and_config_dtype(tmp_path):
    # DeepSeek-V3 keeps its router in fp32 (`_keep_in_fp32_modules_strict`)
    if not hasattr(transformers, "DeepseekV3ForCausalLM"):
        pytest.skip("transformers without DeepSeek-V3")
    config = {
        "model_type": "deepseek_v3",
        "architectures": ["DeepseekV3ForCausalLM"],
        "hidden_size": 64,
        "intermediate_size": 128,
        "moe_intermediate_size": 32,
        "num_hidden_layers": 2,
        "first_k_dense_replace": 1,
        "n_routed_experts": 4,
        "num_experts_per_tok": 2,
        "n_group": 1,
        "topk_group": 1,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "vocab_size": 128,
        "q_lora_rank": 16,
        "kv_lora_rank": 16,
        "qk_rope_head_dim": 8,
        "qk_nope_head_dim": 8,
        "v_head_dim": 8,
        "dtype": "bfloat16",
    }
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    expected = expected_tensors(path)
    assert expected["model.layers.1.mlp.gate.weight"].dtype == "F32"
    assert expected["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == "F32"
    assert expected["model.layers.1.self_attn.o_proj.weight"].dtype == "BF16"
    as_loaded = {name: (t.dtype, t.shape) for name, t in expected.items()}
    all_bf16 = {name: ("BF16", t.shape) for name, t in expected.items()}
    assert check_architecture(path, as_loaded) == []
    assert check_architecture(path, all_bf16) == []
    all_bf16["model.layers.1.self_attn.o_proj.weight"] = ("F32", (64, 32))
    assert check_architecture(path, all_bf16) == [
        ArchitectureProblem("dtype", "model.layers.1.self_attn.o_proj.weight", "BF16", "F32")
    ]


def test_errors_for_bad_configs(tmp_path):
    path = tmp_path / "config.json"
    with pytest.raises(ValueError, match="not found"):
        check_architecture(path, {})
    path.write_text("{not json")
    with pytest.raises(ValueError):
        expected_tensors(path)
    path.write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(ValueError, match="model_type"):
        expected_tensors(path)
    path.write_text(json.dumps({"model_type": "definitely-not-a-model"}))
    with pytest.raises(ValueError, match="definitely-not-a-model"):
        expected_tensors(path)


def test_missing_extra_raises_helpful_import_error(monkeypatch, untied):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match=r"pip install 'shardkit\[hf\]'"):
        check_architecture(untied / "config.json", {})


def test_fallback_classifier_agrees(monkeypatch, tmp_path):
    """The version-independent fallback (used when transformers' loader internals differ)."""

    def unavailable(*args, **kwargs):
        raise architecture._InternalsUnavailable("test")

    directory = save_tiny_qwen2(tmp_path / "untied")
    tied = save_tiny_qwen2(tmp_path / "tied", tie=True)
    present = read_present(directory)
    monkeypatch.setattr(architecture, "_classify_with_transformers", unavailable)

    assert check_architecture(directory / "config.json", present) == []
    assert check_architecture(tied / "config.json", read_present(tied)) == []
    broken = dict(present)
    del broken["lm_head.weight"]
    broken["model.layers.0.mlp.down_proj.weight"] = ("F32", (128, 64))
    broken["model.bogus"] = ("F32", (1,))
    broken["model.layers.1.self_attn.rotary_emb.inv_freq"] = ("F32", (8,))
    assert check_architecture(directory / "config.json", broken) == [
        ArchitectureProblem("missing", "lm_head.weight", "[128, 64] F32", None),
        ArchitectureProblem("unexpected", "model.bogus", None, "[1] F32"),
        ArchitectureProblem("shape", "model.layers.0.mlp.down_proj.weight", "[64, 128]", "[128, 64]"),
    ]


def test_qwen25_7b_shaped_config_is_meta_only(tmp_path):
    """7B-sized config: nothing is allocated (peak RSS stays far below the 15 GB of weights)."""
    config = {
        "model_type": "qwen2",
        "architectures": ["Qwen2ForCausalLM"],
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "vocab_size": 152064,
        "max_position_embeddings": 32768,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    expected = expected_tensors(path)
    assert len(expected) == 339
    assert expected["model.embed_tokens.weight"] == ExpectedTensor("model.embed_tokens.weight", (152064, 3584), "BF16")
    assert expected["model.layers.27.self_attn.k_proj.weight"].shape == (512, 3584)
    present = {name: (t.dtype, t.shape) for name, t in expected.items()}
    assert check_architecture(path, present) == []
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    assert peak_mb < 1024
