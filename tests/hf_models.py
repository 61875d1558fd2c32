"""Tiny transformers models shared by the load tests (import only where torch is present)."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers


def tiny_qwen2(tie: bool, layers: int = 2) -> transformers.Qwen2ForCausalLM:
    """A randomly initialised Qwen2 small enough to save and load in a second."""
    config = transformers.Qwen2Config(
        vocab_size=128, hidden_size=64, intermediate_size=176, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=tie, torch_dtype="float32",
    )
    torch.manual_seed(0)
    return transformers.Qwen2ForCausalLM(config).eval()


def logits(folder: Path) -> torch.Tensor:
    """Logits of a fixed batch, after loading `folder` exactly as a user would."""
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(torch.arange(16).reshape(2, 8)).logits
