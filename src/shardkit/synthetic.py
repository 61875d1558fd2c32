"""Qwen2-layout checkpoints with made-up bytes, for the demo, the tests and the benchmark.

Real tensor names, shapes, proportions, shard layout and companion files of a
Hugging Face checkpoint; the bytes are pseudo-random (weights cannot be downloaded
here, and a byte-copying tool does not care what the numbers mean). Files are
written with shardkit's own header writer and sharded with the Hugging Face packing
rule in the model's parameter order, as `save_pretrained` does.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .format.header import TensorSpec, serialize_header, tensor_nbytes
from .plan.files import group_into_shards, shard_file_names


@dataclass(frozen=True)
class Qwen2Shape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tie_word_embeddings: bool
    dtype: str = "BF16"

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


#: Shapes of the Qwen2.5 family (from their config.json files) and a tiny demo model.
SHAPES = {
    "tiny": Qwen2Shape(128, 704, 4, 4, 2, 2048, False),
    "0.5B": Qwen2Shape(896, 4864, 24, 14, 2, 151936, True),
    "1.5B": Qwen2Shape(1536, 8960, 28, 12, 2, 151936, True),
    "3B": Qwen2Shape(2048, 11008, 36, 16, 2, 151936, True),
    "7B": Qwen2Shape(3584, 18944, 28, 28, 4, 152064, False),
}


@dataclass(frozen=True)
class SyntheticTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.dtype, self.shape)


def qwen2_tensors(shape: Qwen2Shape) -> list[SyntheticTensor]:
    """Parameters in the order a Qwen2ForCausalLM state dict lists them."""
    h, kv, dt = shape.hidden, shape.kv_heads * shape.head_dim, shape.dtype
    out = [SyntheticTensor("model.embed_tokens.weight", dt, (shape.vocab, h))]
    for i in range(shape.layers):
        p = f"model.layers.{i}."
        out += [
            SyntheticTensor(p + "self_attn.q_proj.weight", dt, (h, h)),
            SyntheticTensor(p + "self_attn.q_proj.bias", dt, (h,)),
            SyntheticTensor(p + "self_attn.k_proj.weight", dt, (kv, h)),
            SyntheticTensor(p + "self_attn.k_proj.bias", dt, (kv,)),
            SyntheticTensor(p + "self_attn.v_proj.weight", dt, (kv, h)),
            SyntheticTensor(p + "self_attn.v_proj.bias", dt, (kv,)),
            SyntheticTensor(p + "self_attn.o_proj.weight", dt, (h, h)),
            SyntheticTensor(p + "mlp.gate_proj.weight", dt, (shape.intermediate, h)),
            SyntheticTensor(p + "mlp.up_proj.weight", dt, (shape.intermediate, h)),
            SyntheticTensor(p + "mlp.down_proj.weight", dt, (h, shape.intermediate)),
            SyntheticTensor(p + "input_layernorm.weight", dt, (h,)),
            SyntheticTensor(p + "post_attention_layernorm.weight", dt, (h,)),
        ]
    out.append(SyntheticTensor("model.norm.weight", dt, (h,)))
    if not shape.tie_word_embeddings:
        out.append(SyntheticTensor("lm_head.weight", dt, (shape.vocab, h)))
    return out


#: Tensors that exercise the corners of the format: 8-, 4-bit and bool types, a
#: scalar, a zero-size tensor.
EDGE_TENSORS = [
    SyntheticTensor("extra.fp8_scale", "F8_E4M3", (16, 8)),
    SyntheticTensor("extra.fp4_block", "F4", (4, 6)),
    SyntheticTensor("extra.mask", "BOOL", (5,)),
    SyntheticTensor("extra.scalar", "F32", ()),
    SyntheticTensor("extra.empty", "F16", (0, 3)),
    SyntheticTensor("extra.step", "I64", (1,)),
]


def flux_tensors(double: int = 19, single: int = 38, hidden: int = 3072, dtype: str = "BF16") -> list[SyntheticTensor]:
    """A FLUX.1 transformer in BFL's single-file layout (flux1-dev.safetensors): its key
    names and shapes (hidden 3072, 19 double and 38 single blocks: 11.9B parameters), with
    fewer blocks for a smaller file; the built-in flux recipes apply to it."""
    mlp, head = 4 * hidden, 128
    shapes: dict[str, tuple[int, ...]] = {}

    def linear(name: str, rows: int, columns: int) -> None:
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (rows, columns), (rows,)

    linear("img_in", hidden, 64)
    linear("txt_in", hidden, 4096)
    for stem, width in (("time_in", 256), ("vector_in", 768), ("guidance_in", 256)):
        linear(f"{stem}.in_layer", hidden, width)
        linear(f"{stem}.out_layer", hidden, hidden)
    for i in range(double):
        for side in ("img", "txt"):
            block = f"double_blocks.{i}.{side}"
            linear(f"{block}_mod.lin", 6 * hidden, hidden)
            linear(f"{block}_attn.qkv", 3 * hidden, hidden)
            shapes[f"{block}_attn.norm.query_norm.scale"] = shapes[f"{block}_attn.norm.key_norm.scale"] = (head,)
            linear(f"{block}_attn.proj", hidden, hidden)
            linear(f"{block}_mlp.0", mlp, hidden)
            linear(f"{block}_mlp.2", hidden, mlp)
    for i in range(single):
        block = f"single_blocks.{i}"
        linear(f"{block}.modulation.lin", 3 * hidden, hidden)
        linear(f"{block}.linear1", 3 * hidden + mlp, hidden)
        shapes[f"{block}.norm.query_norm.scale"] = shapes[f"{block}.norm.key_norm.scale"] = (head,)
        linear(f"{block}.linear2", hidden, hidden + mlp)
    linear("final_layer.linear", 64, hidden)
    linear("final_layer.adaLN_modulation.1", 2 * hidden, hidden)
    return [SyntheticTensor(name, dtype, shape) for name, shape in shapes.items()]


def qwen2_config(shape: Qwen2Shape) -> dict[str, object]:
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": shape.hidden,
        "intermediate_size": shape.intermediate,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads,
        "vocab_size": shape.vocab,
        "tie_word_embeddings": shape.tie_word_embeddings,
        "torch_dtype": {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}.get(shape.dtype, "bfloat16"),
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "hidden_act": "silu",
        "bos_token_id": 0,
        "eos_token_id": 1,
        "use_sliding_window": False,
    }


class ByteSource:
    """Deterministic pseudo-random bytes per tensor name, fast enough for 15 GB.

    A 16 MiB random pool is drawn once from the seed; each tensor reads it from a
    position derived from its name, so tensors differ and runs repeat exactly.
    """

    POOL = 16 * 1024 * 1024

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._pool: bytes | None = None

    def pool(self) -> bytes:
        if self._pool is None:
            self._pool = random.Random(self.seed).randbytes(self.POOL)
        return self._pool

    def chunks(self, name: str, nbytes: int, chunk: int = 4 * 1024 * 1024) -> Iterator[bytes]:
        pool = self.pool()
        digest = hashlib.sha256(f"{self.seed}:{name}".encode()).digest()
        position = int.from_bytes(digest[:8], "little") % self.POOL
        while nbytes > 0:
            step = min(chunk, nbytes, self.POOL - position)
            yield pool[position : position + step]
            nbytes -= step
            position = (position + step) % self.POOL

    def data(self, name: str, nbytes: int) -> bytes:
        return b"".join(self.chunks(name, nbytes))


def write_safetensors(
    path: Path, tensors: list[SyntheticTensor], source: ByteSource, metadata: dict[str, str] | None = None
) -> None:
    specs = [TensorSpec(t.name, t.dtype, t.shape, t.nbytes) for t in tensors]
    header, placed = serialize_header(specs, metadata)
    with open(path, "wb") as handle:
        handle.write(header)
        for spec, _ in placed:
            for chunk in source.chunks(spec.name, spec.nbytes):
                handle.write(chunk)


@dataclass
class SyntheticCheckpoint:
    folder: Path
    tensors: list[SyntheticTensor]
    shard_files: list[str] = field(default_factory=list)
    source: ByteSource = field(default_factory=lambda: ByteSource(0))

    def expected_bytes(self, name: str) -> bytes:
        tensor = next(t for t in self.tensors if t.name == name)
        return self.source.data(name, tensor.nbytes)


def write_checkpoint(
    folder: str | os.PathLike[str],
    shape: Qwen2Shape | str = "tiny",
    *,
    max_shard_size: int | None = 1_000_000,
    edge_tensors: bool = False,
    seed: int = 0,
    companions: bool = True,
    prefix: str = "model",
) -> SyntheticCheckpoint:
    """A Hugging Face-layout model folder: shards, index, config, tokenizer files."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shape = SHAPES[shape] if isinstance(shape, str) else shape
    tensors = qwen2_tensors(shape) + (EDGE_TENSORS if edge_tensors else [])
    source = ByteSource(seed)
    total = sum(t.nbytes for t in tensors)
    if max_shard_size is None or max_shard_size >= total:
        groups = [[t.name for t in tensors]]
    else:
        groups = group_into_shards([(t.name, t.nbytes) for t in tensors], max_shard_size)
    names = shard_file_names(prefix, len(groups))
    by_name = {t.name: t for t in tensors}
    for name, group in zip(names, groups):
        write_safetensors(folder / name, [by_name[t] for t in group], source, {"format": "pt"})
    if len(names) > 1:
        index = {
            "metadata": {"total_size": total},
            "weight_map": dict(sorted((t, name) for name, group in zip(names, groups) for t in group)),
        }
        (folder / f"{prefix}.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    if companions:
        write_companion_files(folder, shape)
    return SyntheticCheckpoint(folder, tensors, names, source)


def write_companion_files(folder: Path, shape: Qwen2Shape) -> None:
    """config.json, generation_config.json and a small but well-formed BPE tokenizer."""
    (folder / "config.json").write_text(json.dumps(qwen2_config(shape), indent=2) + "\n")
    generation = {"bos_token_id": 0, "eos_token_id": 1, "do_sample": True, "temperature": 0.7, "top_p": 0.8}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    vocab = {"<|endoftext|>": 0, "<|im_end|>": 1, **{chr(c): c - 95 for c in range(97, 123)}}
    (folder / "vocab.json").write_text(json.dumps(vocab) + "\n")
    (folder / "merges.txt").write_text("#version: 0.2\nt h\nth e\n")
    tokenizer = {
        "version": "1.0",
        "model": {"type": "BPE", "vocab": vocab, "merges": ["t h", "th e"]},
        "added_tokens": [{"id": 0, "content": "<|endoftext|>", "special": True}],
    }
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer) + "\n")
    config = {"model_max_length": 32768, "eos_token": "<|im_end|>", "tokenizer_class": "Qwen2Tokenizer"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    """`python -m shardkit.synthetic OUT [--shape tiny] [--max-shard-size BYTES]`."""
    import argparse

    parser = argparse.ArgumentParser(description="Write a Qwen2-layout checkpoint with pseudo-random weights.")
    parser.add_argument("folder", type=Path)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--max-shard-size", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    made = write_checkpoint(args.folder, args.shape, max_shard_size=args.max_shard_size, seed=args.seed)
    total = sum(t.nbytes for t in made.tensors)
    print(f"wrote {args.folder}: {len(made.tensors)} tensors, {total} bytes in {len(made.shard_files)} shard(s)")


if __name__ == "__main__":
    main()
