"""torch `.bin` checkpoints as sources: the same tensors as torch.load + convert.py.

Every file here is written by `torch.save`; the reference is what the Hub's converter
does with it: `torch.load(weights_only=True)`, safetensors' `_remove_duplicate_names`
(tied names dropped, recorded in the metadata as `dropped: kept`), `.contiguous()`.
shardkit's output must hold exactly those names, dtypes, shapes and bytes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors
import torch
from safetensors.torch import _find_shared_tensors, _is_complete, load_file

from conftest import run_cli

ALL_DTYPES = [
    torch.bool, torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64, torch.float16, torch.bfloat16,
    torch.float32, torch.float64, torch.float8_e4m3fn, torch.float8_e5m2, torch.complex64, torch.uint16,
    torch.uint32, torch.uint64,
]


def every_kind_of_tensor() -> dict[str, torch.Tensor]:
    """Tied embeddings, views (transposed, sliced with an offset, strided columns, disjoint
    rows of one storage), every dtype torch saves, a zero-size tensor, a scalar, a Parameter."""
    torch.manual_seed(0)
    embedding = torch.randn(10, 4)
    square = torch.randn(3, 5)
    base = torch.arange(20, dtype=torch.int32)
    grid = torch.randn(6, 4, dtype=torch.bfloat16)
    qkv = torch.randn(6, 4, dtype=torch.float16)
    state: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": embedding,
        "lm_head.weight": embedding,
        "transposed": square.t(),
        "slice_with_offset": base[5:12],
        "strided_columns": grid[:, 1:3],
        "q": qkv[0:2], "k": qkv[2:4], "v": qkv[4:6],
        "zero_size": torch.zeros(0, 3),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "parameter": torch.nn.Parameter(torch.randn(2, 2)),
        "big_transposed": torch.randn(300, 700).t(),  # several gather windows and rounds
    }
    for dtype in ALL_DTYPES:
        name = f"dtype.{str(dtype).removeprefix('torch.')}"
        if dtype.is_floating_point or dtype.is_complex:
            state[name] = (torch.randn(3, 4) * 100).to(dtype)
        elif dtype == torch.bool:
            state[name] = torch.randn(3, 4) > 0
        else:  # every bit pattern of the integer type
            size = torch.empty((), dtype=dtype).element_size()
            state[name] = torch.randint(0, 256, (3, 4 * size), dtype=torch.uint8).view(dtype)
    return state


def remove_duplicate_names(state: dict[str, torch.Tensor]) -> dict[str, list[str]]:
    """safetensors' bindings/python/convert.py `_remove_duplicate_names` (no preferred or
    discarded names), with its clone of a lone partial view."""
    to_remove: dict[str, list[str]] = {}
    for shared in _find_shared_tensors(state):
        complete = {name for name in shared if _is_complete(state[name])}
        if not complete:
            assert len(shared) == 1, shared
            complete = set(shared)
        keep = sorted(complete)[0]
        to_remove.setdefault(keep, []).extend(name for name in sorted(shared) if name != keep)
    return to_remove


def reference(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """What convert.py's `convert_file` writes for `path`: its tensors and metadata."""
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    metadata = {"format": "pt"}
    for kept, removed in remove_duplicate_names(loaded).items():
        for name in removed:
            metadata.setdefault(name, kept)
            del loaded[name]
    return {k: v.contiguous() for k, v in loaded.items()}, metadata


def tensor_bytes(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    return {n: (str(t.dtype), tuple(t.shape), t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
                if t.numel() else b"") for n, t in tensors.items()}


def assert_same_as_reference(output: Path, source: Path) -> None:
    expected, metadata = reference(source)
    assert tensor_bytes(load_file(output)) == tensor_bytes(expected)
    with safetensors.safe_open(output, "pt") as opened:
        assert opened.metadata() == metadata


@pytest.fixture
def bin_file(tmp_path: Path) -> Path:
    path = tmp_path / "source" / "pytorch_model.bin"
    path.parent.mkdir()
    torch.save(every_kind_of_tensor(), path)
    return path


def test_merge_of_a_bin_holds_what_convert_py_writes(tmp_path: Path, bin_file: Path) -> None:
    result = run_cli("merge", bin_file, "-o", tmp_path / "out.safetensors")
    assert result.exit_code == 0, result.stderr
    assert_same_as_reference(tmp_path / "out.safetensors", bin_file)
    expected, metadata = reference(bin_file)
    assert metadata["model.embed_tokens.weight"] == "lm_head.weight"  # the tied duplicate, written once
    assert {"q", "k", "v", "transposed", "strided_columns"} <= set(expected)


def test_a_folder_with_pytorch_model_bin_is_a_checkpoint(tmp_path: Path, bin_file: Path) -> None:
    (bin_file.parent / "training_args.bin").write_bytes(b"not weights")
    (bin_file.parent / "config.json").write_text("{}")
    result = run_cli("merge", bin_file.parent, "-o", tmp_path / "out")
    assert result.exit_code == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "model.safetensors"]
    assert_same_as_reference(tmp_path / "out" / "model.safetensors", bin_file)


def test_dtype_conversion_of_a_bin_matches_torch(tmp_path: Path, bin_file: Path) -> None:
    result = run_cli("merge", bin_file, "-o", tmp_path / "out.safetensors", "--dtype", "bf16")
    assert result.exit_code == 0, result.stderr
    expected, _ = reference(bin_file)
    floats = {torch.float16, torch.float32, torch.float64}
    converted = {n: (t.to(torch.bfloat16) if t.dtype in floats else t) for n, t in expected.items()}
    assert tensor_bytes(load_file(tmp_path / "out.safetensors")) == tensor_bytes(converted)


def test_inspect_diff_checksum_and_verify_read_a_bin(tmp_path: Path, bin_file: Path) -> None:
    out = tmp_path / "out.safetensors"
    assert run_cli("merge", bin_file, "-o", out).exit_code == 0
    report = json.loads(run_cli("inspect", bin_file, "--tensors", "--json").stdout)
    expected, _ = reference(bin_file)
    assert {row["name"] for row in report["tensor_rows"]} == set(expected)
    diff = run_cli("diff", bin_file, out)
    assert diff.exit_code == 0, diff.stdout + diff.stderr
    sums = [run_cli("checksum", source, "--tensors", "-o", tmp_path / f"{i}.json") for i, source in
            enumerate([bin_file, out])]
    assert all(s.exit_code == 0 for s in sums), [s.stderr for s in sums]
    assert (tmp_path / "0.json").read_text() == (tmp_path / "1.json").read_text()
    verify = run_cli("verify", out, "--against", bin_file)
    assert verify.exit_code == 0, verify.stdout + verify.stderr
    for source in (bin_file, bin_file.parent):  # the .bin itself, as a file and as a folder
        alone = run_cli("verify", source)
        assert alone.exit_code == 0 and f" {len(expected)} tensors" in alone.stdout, alone.stdout + alone.stderr


def test_diff_sees_a_changed_element_of_a_transposed_view(tmp_path: Path) -> None:
    weight = torch.randn(4, 6)
    torch.save({"w": weight.t()}, tmp_path / "a.pt")
    torch.save({"w": weight.t().contiguous()}, tmp_path / "same.pt")
    changed = weight.clone()
    changed[3, 5] += 1
    torch.save({"w": changed.t().contiguous()}, tmp_path / "b.pt")
    same = run_cli("diff", tmp_path / "a.pt", tmp_path / "same.pt")
    assert same.exit_code == 0, same.stdout + same.stderr
    result = run_cli("diff", tmp_path / "a.pt", tmp_path / "b.pt")
    assert result.exit_code == 1 and "w  data differs" in result.stdout, result.stdout + result.stderr


def sharded_bin(folder: Path) -> dict[str, torch.Tensor]:
    """torch.save shards and a hand-written pytorch_model.bin.index.json (transformers 5
    no longer writes .bin), grouped as save_pretrained(safe_serialization=False) did."""
    folder.mkdir(parents=True)
    torch.manual_seed(1)
    state = {f"model.layers.{i}.{part}": torch.randn(8, 8) for i in range(3) for part in ("a", "b")}
    names = sorted(state)
    groups = [names[:2], names[2:4], names[4:]]
    weight_map = {}
    for number, group in enumerate(groups, 1):
        shard = f"pytorch_model-{number:05d}-of-{len(groups):05d}.bin"
        torch.save({n: state[n] for n in group}, folder / shard)
        weight_map.update(dict.fromkeys(group, shard))
    index = {"metadata": {"total_size": sum(t.numel() * 4 for t in state.values())}, "weight_map": weight_map}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    return state


@pytest.mark.parametrize("how", ["folder", "index"])
def test_a_sharded_bin_checkpoint_merges_and_splits(tmp_path: Path, how: str) -> None:
    state = sharded_bin(tmp_path / "source")
    source = tmp_path / "source" if how == "folder" else tmp_path / "source" / "pytorch_model.bin.index.json"
    merged = run_cli("merge", source, "-o", tmp_path / "merged.safetensors")
    assert merged.exit_code == 0, merged.stderr
    assert tensor_bytes(load_file(tmp_path / "merged.safetensors")) == tensor_bytes(state)
    split = run_cli("split", source, "-o", tmp_path / "split", "--max-shard-size", "600")
    assert split.exit_code == 0, split.stderr
    found: dict[str, torch.Tensor] = {}
    for shard in sorted((tmp_path / "split").glob("*.safetensors")):
        found.update(load_file(shard))
    assert tensor_bytes(found) == tensor_bytes(state)


# ---------------------------------------------------------------------- convert


def test_convert_makes_the_folder_the_hub_converter_makes(tmp_path: Path) -> None:
    state = sharded_bin(tmp_path / "source")
    source = tmp_path / "source"
    (source / "config.json").write_text('{"model_type": "qwen2"}')
    (source / "tokenizer.json").write_text("{}")
    (source / "training_args.bin").write_bytes(b"\x80\x02}.")  # a pickle, never read nor copied
    result = run_cli("convert", source, "-o", tmp_path / "out")
    assert result.exit_code == 0, result.stderr
    out = tmp_path / "out"
    shards = [f"model-{i:05d}-of-00003.safetensors" for i in (1, 2, 3)]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [*shards, "model.safetensors.index.json", "config.json", "tokenizer.json"])
    for i, shard in enumerate(shards, 1):  # convert.py's convert_file, one shard at a time
        assert_same_as_reference(out / shard, source / f"pytorch_model-{i:05d}-of-00003.bin")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    bin_index = json.loads((source / "pytorch_model.bin.index.json").read_text())
    assert index["weight_map"] == {k: v.replace("pytorch_model", "model").replace(".bin", ".safetensors")
                                   for k, v in bin_index["weight_map"].items()}
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in state.values())


def test_convert_to_one_file_through_the_python_api(tmp_path: Path, bin_file: Path) -> None:
    import shardkit

    report = shardkit.convert(bin_file, tmp_path / "model.safetensors")
    assert_same_as_reference(tmp_path / "model.safetensors", bin_file)
    assert any("lm_head.weight" in w and "model.embed_tokens.weight" in w for w in report.warnings), report.warnings


@pytest.mark.parametrize("tie", [False, True])
def test_a_tiny_qwen2_converted_from_bin_gives_the_same_logits(tmp_path: Path, tie: bool) -> None:
    from hf_models import logits, tiny_qwen2

    model = tiny_qwen2(tie)
    model.save_pretrained(tmp_path / "reference")  # safetensors, as transformers writes it
    source = tmp_path / "bin"
    model.config.save_pretrained(source)
    torch.save(model.state_dict(), source / "pytorch_model.bin")
    result = run_cli("convert", source, "-o", tmp_path / "converted")
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "converted" / "model.safetensors").is_file()
    assert torch.equal(logits(tmp_path / "converted"), logits(tmp_path / "reference"))
