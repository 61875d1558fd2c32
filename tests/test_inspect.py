"""inspect: exact counts from headers alone, and a layer view that folds repeated layers."""

from __future__ import annotations

import json
import math
import struct
import time
from pathlib import Path

import shardkit
from conftest import assert_clean_failure, run_cli, snapshot
from shardkit.checkpoint.layers import format_indices, group_layers, split_name
from shardkit.format.header import TensorSpec, serialize_header
from shardkit.plan.files import group_into_shards, shard_file_names
from shardkit.synthetic import SHAPES, SyntheticCheckpoint, qwen2_tensors, write_checkpoint

BITS = {"BF16": 16, "F16": 16, "F32": 32, "I64": 64, "F8_E4M3": 8, "F4": 4, "BOOL": 8}
LAYER_TENSORS = [  # (suffix, shape) of one tiny Qwen2 layer: hidden 128, kv 64, intermediate 704
    ("input_layernorm.weight", [128]),
    ("mlp.down_proj.weight", [128, 704]),
    ("mlp.gate_proj.weight", [704, 128]),
    ("mlp.up_proj.weight", [704, 128]),
    ("post_attention_layernorm.weight", [128]),
    ("self_attn.k_proj.bias", [64]),
    ("self_attn.k_proj.weight", [64, 128]),
    ("self_attn.o_proj.weight", [128, 128]),
    ("self_attn.q_proj.bias", [128]),
    ("self_attn.q_proj.weight", [128, 128]),
    ("self_attn.v_proj.bias", [64]),
    ("self_attn.v_proj.weight", [64, 128]),
]


def raw_entries(path: Path) -> tuple[int, dict[str, dict]]:
    """(data start, header entries) with nothing but struct and json."""
    data = path.read_bytes()[:1_000_000]
    (length,) = struct.unpack("<Q", data[:8])
    return 8 + length, json.loads(data[8 : 8 + length])


def test_summary_counts_are_exact(checkpoint: SyntheticCheckpoint) -> None:
    report = shardkit.inspect(checkpoint.folder)
    assert report.tensors == len(checkpoint.tensors) == 57
    assert report.parameters == sum(math.prod(t.shape) for t in checkpoint.tensors) == 1_804_416 + 159
    by_dtype: dict[str, int] = {}
    for t in checkpoint.tensors:
        by_dtype[t.dtype] = by_dtype.get(t.dtype, 0) + math.prod(t.shape)
    assert report.parameters_by_dtype == by_dtype
    assert list(report.parameters_by_dtype)[0] == "BF16"  # largest first
    assert report.bytes == sum(math.prod(t.shape) * BITS[t.dtype] // 8 for t in checkpoint.tensors)
    assert report.metadata == {"format": "pt"}
    assert report.index == str(checkpoint.folder / "model.safetensors.index.json")
    assert report.index_consistent is True
    assert report.index_metadata == {"total_size": report.bytes}
    assert report.warnings == []
    assert [f.path for f in report.files] == checkpoint.shard_files
    index = json.loads((checkpoint.folder / "model.safetensors.index.json").read_text())["weight_map"]
    for f in report.files:
        path = checkpoint.folder / f.path
        data_start, entries = raw_entries(path)
        assert f.size == path.stat().st_size
        assert f.header_size == data_start - 8
        assert f.tensors == len(entries) - 1 == sum(1 for shard in index.values() if shard == f.path)
        assert f.metadata == entries["__metadata__"]
    assert report.tensor_rows is None


def test_layer_view_folds_the_layers(checkpoint: SyntheticCheckpoint) -> None:
    report = shardkit.inspect(checkpoint.folder)
    rows = [(r.pattern, r.dtype, r.shape, r.count, r.parameters, r.bytes) for r in report.layers]
    layer_rows = [
        (f"model.layers.{{0..3}}.{suffix}", "BF16", shape, 4, 4 * math.prod(shape), 8 * math.prod(shape))
        for suffix, shape in LAYER_TENSORS
    ]
    assert rows == [
        ("extra.empty", "F16", [0, 3], 1, 0, 0),
        ("extra.fp4_block", "F4", [4, 6], 1, 24, 12),
        ("extra.fp8_scale", "F8_E4M3", [16, 8], 1, 128, 128),
        ("extra.mask", "BOOL", [5], 1, 5, 5),
        ("extra.scalar", "F32", [], 1, 1, 4),
        ("extra.step", "I64", [1], 1, 1, 8),
        ("lm_head.weight", "BF16", [2048, 128], 1, 262_144, 524_288),
        ("model.embed_tokens.weight", "BF16", [2048, 128], 1, 262_144, 524_288),
        *layer_rows,
        ("model.norm.weight", "BF16", [128], 1, 128, 256),
    ]
    assert sum(r.parameters for r in report.layers) == report.parameters


def test_tensor_rows_point_at_the_tensors_bytes(checkpoint: SyntheticCheckpoint) -> None:
    report = shardkit.inspect(checkpoint.folder, tensors=True, filter="model.layers.0.*")
    assert report.tensors == 57  # the summary still covers the whole checkpoint
    assert report.matched_tensors == 12
    assert report.matched_parameters == sum(math.prod(shape) for _, shape in LAYER_TENSORS) == 320_000
    assert report.matched_bytes == 2 * 320_000
    assert [r.name for r in report.tensor_rows] == [f"model.layers.0.{suffix}" for suffix, _ in LAYER_TENSORS]
    assert [r.pattern for r in report.layers] == [f"model.layers.0.{suffix}" for suffix, _ in LAYER_TENSORS]
    index = json.loads((checkpoint.folder / "model.safetensors.index.json").read_text())["weight_map"]
    for row in report.tensor_rows:
        assert row.shard == index[row.name]
        path = checkpoint.folder / row.shard
        data_start, entries = raw_entries(path)
        begin, end = entries[row.name]["data_offsets"]
        assert row.offset == data_start + begin
        assert row.bytes == end - begin
        assert row.shape == entries[row.name]["shape"] and row.dtype == entries[row.name]["dtype"]
        assert row.parameters == math.prod(row.shape)
        with open(path, "rb") as handle:
            handle.seek(row.offset)
            assert handle.read(row.bytes) == checkpoint.expected_bytes(row.name)


def test_filter_matching_nothing(checkpoint: SyntheticCheckpoint) -> None:
    report = shardkit.inspect(checkpoint.folder, tensors=True, filter="vision.*")
    assert (report.matched_tensors, report.matched_parameters, report.tensor_rows, report.layers) == (0, 0, [], [])


def test_single_file(tmp_path: Path) -> None:
    made = write_checkpoint(tmp_path / "one", max_shard_size=None, companions=False)
    report = shardkit.inspect(made.folder / "model.safetensors", tensors=True)
    assert report.index is None and report.index_consistent is None
    assert [f.path for f in report.files] == ["model.safetensors"]
    assert report.parameters == 1_804_416
    assert {r.shard for r in report.tensor_rows} == {"model.safetensors"}


def write_sparse_checkpoint(folder: Path, shape: str) -> int:
    """Real headers and index of a Qwen2.5 checkpoint; the data is a hole in each file.

    Returns the bytes the files claim to hold (about 15 GB for 7B) while using kilobytes of disk.
    """
    folder.mkdir()
    tensors = qwen2_tensors(SHAPES[shape])
    groups = group_into_shards([(t.name, t.nbytes) for t in tensors], 5 * 10**9)
    names = shard_file_names("model", len(groups))
    by_name = {t.name: t for t in tensors}
    total = 0
    for name, group in zip(names, groups):
        specs = [TensorSpec(n, by_name[n].dtype, by_name[n].shape, by_name[n].nbytes) for n in group]
        header, _ = serialize_header(specs, {"format": "pt"})
        with open(folder / name, "wb") as handle:
            handle.write(header)
            handle.truncate(len(header) + sum(s.nbytes for s in specs))
        total += len(header) + sum(s.nbytes for s in specs)
    index = {
        "metadata": {"total_size": sum(t.nbytes for t in tensors)},
        "weight_map": {t: name for name, group in zip(names, groups) for t in group},
    }
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return total


def bytes_read() -> int:
    return int(next(line for line in Path("/proc/self/io").read_text().splitlines() if line.startswith("rchar"))
               .split()[1])


def test_a_7b_checkpoint_is_inspected_from_its_headers(tmp_path: Path) -> None:
    claimed = write_sparse_checkpoint(tmp_path / "qwen-7b", "7B")
    assert claimed > 15 * 10**9
    shardkit.inspect(tmp_path / "qwen-7b")  # warm imports
    before, started = bytes_read(), time.perf_counter()
    report = shardkit.inspect(tmp_path / "qwen-7b", tensors=True)
    elapsed = time.perf_counter() - started
    assert bytes_read() - before < 200_000  # the four headers and the index, not 15 GB
    assert elapsed < 2.0  # target 0.3 s; generous here for loaded CI machines
    # Qwen2.5-7B: 152064·3584 embedding and lm_head, 28 layers, final norm
    h, kv, ffn = 3584, 512, 18944
    per_layer = 2 * h * h + 2 * kv * h + 3 * h * ffn + h + 2 * kv + 2 * h
    assert report.parameters == 2 * 152064 * h + 28 * per_layer + h == 7_615_616_512
    assert report.bytes == 2 * report.parameters
    assert report.tensors == 339 and len(report.files) == 4
    assert len(report.layers) == 15
    up = next(r for r in report.layers if r.pattern.endswith("up_proj.weight"))
    assert (up.pattern, up.dtype, up.shape, up.count) == ("model.layers.{0..27}.mlp.up_proj.weight", "BF16",
                                                          [18944, 3584], 28)


def test_total_size_disagreement_is_reported_not_refused(checkpoint: SyntheticCheckpoint) -> None:
    index_path = checkpoint.folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["metadata"]["total_size"] += 1
    index_path.write_text(json.dumps(index))
    report = shardkit.inspect(checkpoint.folder)
    assert report.index_consistent is False
    assert any("metadata.total_size is" in w for w in report.warnings)


def test_stray_weight_file_is_a_warning(checkpoint: SyntheticCheckpoint) -> None:
    (checkpoint.folder / "model-00003-of-00004.safetensors").rename(checkpoint.folder / "stray.safetensors")
    index_path = checkpoint.folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != "model-00003-of-00004.safetensors"}
    index_path.write_text(json.dumps(index))
    report = shardkit.inspect(checkpoint.folder)
    assert any("stray.safetensors: this weight file is not part of the checkpoint" in w for w in report.warnings)
    assert len(report.files) == 3


# --------------------------------------------------------------------------- layer folding


def test_split_name_folds_every_layer_axis() -> None:
    assert split_name("model.layers.3.mlp.up_proj.weight") == ("model.layers.{}.mlp.up_proj.weight", (3,))
    assert split_name("transformer.h.11.attn.c_attn.weight") == ("transformer.h.{}.attn.c_attn.weight", (11,))
    assert split_name("model.layers.2.mlp.experts.17.w1.weight") == (
        "model.layers.{}.mlp.experts.{}.w1.weight", (2, 17)
    )
    assert split_name("down_blocks.1.resnets.0.conv1.weight") == ("down_blocks.{}.resnets.0.conv1.weight", (1,))
    assert split_name("encoder.layer.0.output.dense.bias") == ("encoder.layer.{}.output.dense.bias", (0,))
    assert split_name("blocks.4.norm1.weight") == ("blocks.{}.norm1.weight", (4,))
    assert split_name("model.embed_tokens.weight") == ("model.embed_tokens.weight", ())
    assert split_name("cache.h12.weight") == ("cache.h12.weight", ())  # only a whole segment folds


def test_format_indices() -> None:
    assert format_indices([3, 0, 1, 2]) == "{0..3}"
    assert format_indices([0, 1, 2, 5, 7, 8]) == "{0..2,5,7..8}"
    assert format_indices([4]) == "4"
    assert format_indices([1, 3]) == "{1,3}"


def test_a_layer_that_differs_gets_its_own_row() -> None:
    tensors = [(f"model.layers.{i}.mlp.up_proj.weight", "BF16", (8, 4)) for i in range(6)]
    tensors[4] = ("model.layers.4.mlp.up_proj.weight", "F32", (8, 4))
    groups = group_layers(tensors)
    assert [(g.pattern, g.dtype, g.count) for g in groups] == [
        ("model.layers.{0..3,5}.mlp.up_proj.weight", "BF16", 5),
        ("model.layers.4.mlp.up_proj.weight", "F32", 1),
    ]


def test_moe_folds_layers_and_experts() -> None:
    tensors = [
        (f"model.layers.{layer}.mlp.experts.{expert}.down_proj.weight", "BF16", (16, 32))
        for layer in range(48) for expert in range(128)
    ]
    (group,) = group_layers(tensors)
    assert group.pattern == "model.layers.{0..47}.mlp.experts.{0..127}.down_proj.weight"
    assert group.count == 48 * 128


# --------------------------------------------------------------------------- CLI


def test_cli_summary_and_layer_view(checkpoint: SyntheticCheckpoint) -> None:
    before = snapshot(checkpoint.folder)
    result = run_cli("inspect", checkpoint.folder)
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "tensors     57" in lines
    assert "parameters  1,804,575 (1.80M); BF16 1,804,416, F8_E4M3 128, F4 24, BOOL 5, F32 1, I64 1, F16 0" in lines
    assert "bytes       3,608,989 (3.61 MB)" in lines
    assert "metadata    format=pt" in lines
    row = next(line for line in lines if line.startswith("model.layers.{0..3}.mlp.up_proj.weight"))
    assert row.split() == ["model.layers.{0..3}.mlp.up_proj.weight", "BF16", "[704,", "128]", "×4", "360,448"]
    assert not any(line.startswith("model.layers.1.") for line in lines)
    assert snapshot(checkpoint.folder) == before


def test_cli_tensors_with_filter(checkpoint: SyntheticCheckpoint) -> None:
    result = run_cli("inspect", checkpoint.folder, "--tensors", "--filter", "*.q_proj.*")
    assert result.exit_code == 0, result.stderr
    assert "filter '*.q_proj.*': 8 of 57 tensors, 66,048 parameters, 132.10 kB" in result.stdout
    rows = [line for line in result.stdout.splitlines() if ".self_attn.q_proj." in line]
    assert len(rows) == 8
    assert rows[0].split()[:4] == ["model.layers.0.self_attn.q_proj.bias", "BF16", "[128]", "128"]


def test_cli_json(checkpoint: SyntheticCheckpoint) -> None:
    result = run_cli("inspect", checkpoint.folder, "--json", "--tensors")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report == shardkit.inspect(checkpoint.folder, tensors=True).to_dict()
    assert set(report) >= {"files", "tensors", "parameters", "parameters_by_dtype", "bytes", "metadata",
                           "index_consistent", "layers", "tensor_rows", "warnings"}
    assert len(report["tensor_rows"]) == 57
    assert report["tensor_rows"][0] == {
        "name": "extra.empty", "dtype": "F16", "shape": [0, 3], "parameters": 0, "bytes": 0,
        "shard": report["tensor_rows"][0]["shard"], "offset": report["tensor_rows"][0]["offset"],
    }


def test_cli_bad_inputs(tmp_path: Path) -> None:
    assert_clean_failure(run_cli("inspect", tmp_path / "nope"), 2, "nope: no such file or folder")
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(struct.pack("<Q", 10) + b'{"a": 1}  ')
    assert_clean_failure(run_cli("inspect", broken), 2, "broken.safetensors: tensor 'a': entry must be an object")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(struct.pack("<Q", 1000) + b"{}")
    assert_clean_failure(run_cli("inspect", truncated), 2, "runs past the end of the 10-byte file")


def test_help_teaches_with_an_example() -> None:
    result = run_cli("inspect", "--help")
    assert result.exit_code == 0 and "Example: shardkit inspect" in result.stdout


def test_literal_braces_in_names_are_text_not_placeholders() -> None:
    groups = group_layers(
        [
            ("m.layers.0.{}", "F16", (2,)),
            ("m.layers.1.{}", "F16", (2,)),
            ("{}.layers.0.{}{}", "F16", (2,)),
            ("m.layers.{}.w", "F16", (2,)),
        ]
    )
    assert [(g.pattern, g.count) for g in groups] == [
        ("m.layers.{0..1}.{}", 2),
        ("m.layers.{}.w", 1),
        ("{}.layers.0.{}{}", 1),
    ]


def test_layer_folding_is_the_same_whatever_the_order_and_per_skeleton() -> None:
    """group_layers caches where a name folds by its digit skeleton and sorts its own
    output: a shuffled MoE listing folds exactly like the sorted one, and every name's
    cut equals the regex's."""
    import random

    from shardkit.checkpoint import layers

    names = [f"model.layers.{i}.mlp.experts.{e}.{p}.weight" for i in range(12) for e in range(10) for p in "wv"]
    names += ["model.layers.3.x", "layers.07.x", "h.1.h.22", "x1_layers.5.y", "a-b_layers.3", "blocks.9\n", "e.٣"]
    triples = [(n, "BF16" if "experts" in n else "F32", (2,)) for n in names]
    shuffled = triples[:]
    random.Random(0).shuffle(shuffled)
    assert layers.group_layers(shuffled) == layers.group_layers(sorted(triples))
    cuts: dict = {}
    assert all(layers._cut(n, cuts) == layers._pieces(n) for n in names)
    assert len(cuts) < len(names) / 10


def test_names_with_equal_numbers_fold_in_name_order_whatever_the_input_order() -> None:
    """`layers.07` and `layers.7` have one number: the group lists them in name order."""
    names = ["m.layers.7.x", "m.layers.07.x", "m.layers.1.x", "m.layers.10.x"]
    for order in (names, names[::-1], sorted(names)):
        (group,) = group_layers([(n, "F16", (2,)) for n in order])
        assert group.names == ("m.layers.1.x", "m.layers.07.x", "m.layers.7.x", "m.layers.10.x")
        assert group.pattern == "m.layers.{1,7,10}.x"


def test_inspect_of_a_safetensors_file_loads_no_reader_or_planner_it_does_not_use(tmp_path: Path) -> None:
    """Start-up is most of a small inspect: the torch-file readers, the planners, the
    remote locations and fractions (which imports decimal) stay unloaded."""
    import subprocess
    import sys

    checkpoint = write_checkpoint(tmp_path / "ckpt")  # a folder of shards, an index and a config
    code = (
        "import sys, runpy; sys.argv = ['shardkit', 'inspect', sys.argv[1]]\n"
        "try:\n    runpy.run_module('shardkit', run_name='__main__')\n"
        "except SystemExit:\n    pass\n"
        "print(' '.join(sorted(m for m in sys.modules if m.startswith(('shardkit.', 'fractions', 'decimal')))))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(checkpoint.folder)], capture_output=True, text=True, check=True
    )
    loaded = set(done.stdout.split())
    assert "shardkit.commands.inspect" in loaded and "shardkit.cli.render" in loaded
    unused = {
        "shardkit.format.torch_pickle", "shardkit.format.torch_zip", "shardkit.plan.files",
        "shardkit.plan.conversion", "shardkit.plan.fp8_layout", "shardkit.storage.remote", "fractions", "decimal",
    }
    assert loaded & unused == set()
