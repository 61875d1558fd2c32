"""The built-in recipes for the FLUX.1 transformer: BFL's single file ↔ diffusers.

Transcribed from diffusers' own converter
(`diffusers.loaders.single_file_utils.convert_flux_transformer_checkpoint_to_diffusers`),
which the tests run beside these recipes: double blocks' fused `qkv` ↔ `to_q`/`to_k`/`to_v`
(and the text stream's `add_*_proj`), single blocks' `linear1` ↔ q/k/v/`proj_mlp` (dim 0
in the ratio 1:1:1:4, diffusers' mlp_ratio), the final layer's shift/scale halves swapped,
everything else renamed. `flux-diffusers-to-bfl` is the same table read backwards.
"""

from __future__ import annotations

#: BFL name → diffusers name, for tensors renamed as they are ({i}: a block number).
_RENAMES = {
    "time_in.in_layer.{w}": "time_text_embed.timestep_embedder.linear_1.{w}",
    "time_in.out_layer.{w}": "time_text_embed.timestep_embedder.linear_2.{w}",
    "vector_in.in_layer.{w}": "time_text_embed.text_embedder.linear_1.{w}",
    "vector_in.out_layer.{w}": "time_text_embed.text_embedder.linear_2.{w}",
    "guidance_in.in_layer.{w}": "time_text_embed.guidance_embedder.linear_1.{w}",
    "guidance_in.out_layer.{w}": "time_text_embed.guidance_embedder.linear_2.{w}",
    "txt_in.{w}": "context_embedder.{w}",
    "img_in.{w}": "x_embedder.{w}",
    "double_blocks.{i}.img_mod.lin.{w}": "transformer_blocks.{i}.norm1.linear.{w}",
    "double_blocks.{i}.txt_mod.lin.{w}": "transformer_blocks.{i}.norm1_context.linear.{w}",
    "double_blocks.{i}.img_attn.norm.query_norm.scale": "transformer_blocks.{i}.attn.norm_q.weight",
    "double_blocks.{i}.img_attn.norm.key_norm.scale": "transformer_blocks.{i}.attn.norm_k.weight",
    "double_blocks.{i}.txt_attn.norm.query_norm.scale": "transformer_blocks.{i}.attn.norm_added_q.weight",
    "double_blocks.{i}.txt_attn.norm.key_norm.scale": "transformer_blocks.{i}.attn.norm_added_k.weight",
    "double_blocks.{i}.img_mlp.0.{w}": "transformer_blocks.{i}.ff.net.0.proj.{w}",
    "double_blocks.{i}.img_mlp.2.{w}": "transformer_blocks.{i}.ff.net.2.{w}",
    "double_blocks.{i}.txt_mlp.0.{w}": "transformer_blocks.{i}.ff_context.net.0.proj.{w}",
    "double_blocks.{i}.txt_mlp.2.{w}": "transformer_blocks.{i}.ff_context.net.2.{w}",
    "double_blocks.{i}.img_attn.proj.{w}": "transformer_blocks.{i}.attn.to_out.0.{w}",
    "double_blocks.{i}.txt_attn.proj.{w}": "transformer_blocks.{i}.attn.to_add_out.{w}",
    "single_blocks.{i}.modulation.lin.{w}": "single_transformer_blocks.{i}.norm.linear.{w}",
    "single_blocks.{i}.norm.query_norm.scale": "single_transformer_blocks.{i}.attn.norm_q.weight",
    "single_blocks.{i}.norm.key_norm.scale": "single_transformer_blocks.{i}.attn.norm_k.weight",
    "single_blocks.{i}.linear2.{w}": "single_transformer_blocks.{i}.proj_out.{w}",
    "final_layer.linear.{w}": "proj_out.{w}",
}
#: BFL's fused tensor → the diffusers tensors it holds along dim 0, with their ratio.
_FUSED = {
    "double_blocks.{i}.img_attn.qkv.{w}": (
        ["transformer_blocks.{i}.attn.to_q.{w}", "transformer_blocks.{i}.attn.to_k.{w}",
         "transformer_blocks.{i}.attn.to_v.{w}"], [1, 1, 1]),
    "double_blocks.{i}.txt_attn.qkv.{w}": (
        ["transformer_blocks.{i}.attn.add_q_proj.{w}", "transformer_blocks.{i}.attn.add_k_proj.{w}",
         "transformer_blocks.{i}.attn.add_v_proj.{w}"], [1, 1, 1]),
    "single_blocks.{i}.linear1.{w}": (
        ["single_transformer_blocks.{i}.attn.to_q.{w}", "single_transformer_blocks.{i}.attn.to_k.{w}",
         "single_transformer_blocks.{i}.attn.to_v.{w}", "single_transformer_blocks.{i}.proj_mlp.{w}"], [1, 1, 1, 4]),
}
_SWAPPED = {"final_layer.adaLN_modulation.1.{w}": "norm_out.linear.{w}"}


def _optional(bfl_name: str) -> dict[str, bool]:
    """FLUX.1-schnell has no guidance embedder."""
    return {"optional": True} if bfl_name.startswith("guidance_in.") else {}


def _bfl_to_diffusers() -> dict[str, object]:
    rules: list[dict[str, object]] = [{"rename": a, "to": b, **_optional(a)} for a, b in _RENAMES.items()]
    rules += [{"split": a, "to": parts, "ratio": ratio} for a, (parts, ratio) in _FUSED.items()]
    rules += [{"swap": a, "to": b} for a, b in _SWAPPED.items()]
    return {"rules": rules}


def _diffusers_to_bfl() -> dict[str, object]:
    rules: list[dict[str, object]] = [{"rename": b, "to": a, **_optional(a)} for a, b in _RENAMES.items()]
    rules += [{"fuse": parts, "to": a} for a, (parts, _) in _FUSED.items()]
    rules += [{"swap": b, "to": a} for a, b in _SWAPPED.items()]
    return {"rules": rules}


BUILTIN: dict[str, dict[str, object]] = {
    "flux-bfl-to-diffusers": _bfl_to_diffusers(),
    "flux-diffusers-to-bfl": _diffusers_to_bfl(),
}
