"""Tiny diffusers pipelines saved by diffusers itself, so the layout is the real one.

A Stable-Diffusion-shaped pipeline (unet, vae, text_encoder, tokenizer, scheduler),
saved twice as diffusers saves it: the default float32 weights with the unet and the
text encoder sharded (`diffusion_pytorch_model-00001-of-0000N.safetensors` plus its
index), and an `fp16` variant in float16 (`diffusion_pytorch_model.fp16.safetensors`,
a sharded `model.fp16-0000k-of-0000N.safetensors` text encoder). Import only where
torch and diffusers are installed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer


def tiny_pipeline() -> StableDiffusionPipeline:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, norm_num_groups=4, attention_head_dim=2,
    )
    vae = AutoencoderKL(
        block_out_channels=(8,), in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=4,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=2, vocab_size=64,
        projection_dim=16, max_position_embeddings=16,
    ))
    scheduler = DDIMScheduler(clip_sample=False, steps_offset=1)
    return StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=_tokenizer(), scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def _tokenizer() -> CLIPTokenizer:
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, **{c + "</w>": i + 2 for i, c in enumerate("abcdefgh")}}
        (Path(folder) / "vocab.json").write_text(json.dumps(vocab))
        (Path(folder) / "merges.txt").write_text("#version: 0.2\n")
        return CLIPTokenizer(str(Path(folder) / "vocab.json"), str(Path(folder) / "merges.txt"))


def save_pipeline(folder: Path) -> Path:
    """Save the tiny pipeline at `folder` with sharded components and an fp16 variant."""
    pipe = tiny_pipeline()
    pipe.save_pretrained(folder, max_shard_size="40KB")
    pipe.to(torch.float16).save_pretrained(folder, variant="fp16", max_shard_size="40KB")
    return folder


def copy_pipeline(cached: Path, folder: Path) -> Path:
    shutil.copytree(cached, folder, symlinks=True)
    return folder
