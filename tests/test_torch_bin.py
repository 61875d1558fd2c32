"""torch `.bin` checkpoints as sources: the same tensors as torch.load + convert.py.

Every file here is written by `torch.save`; the reference is what the Hub's converter
does with it: `torch.load(weights_only=True)`, safetensors' `_remove_duplicate_names`
(tied names dropped, recorded in the metadata as `dropped: kept`), `.contiguous()`.
shardkit's output must hold exactly those names, dtypes, shapes and bytes.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest
import safetensors
import torch
from safetensors.torch import _find_shared_tensors, _is_complete, load_file

from conftest import assert_clean_failure, run_cli, snapshot

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


def remove_duplicate_names(state: dict[str, torch.Tensor], discard_names: Sequence[str] = ()) -> dict[str, list[str]]:
    """safetensors' bindings/python/convert.py `_remove_duplicate_names` (no preferred
    names), with its clone of a lone partial view."""
    to_remove: dict[str, list[str]] = {}
    for shared in _find_shared_tensors(state):
        complete = {name for name in shared if _is_complete(state[name])}
        if not complete:
            assert len(shared) == 1, shared
            complete = set(shared)
        keep = sorted(complete)[0]
        preferred = complete.difference(discard_names)
        if preferred:
            keep = sorted(preferred)[0]
        to_remove.setdefault(keep, []).extend(name for name in sorted(shared) if name != keep)
    return to_remove


def get_discard_names(config_path: Path) -> list[str]:
    """convert.py's `get_discard_names`: the model class's `_tied_weights_keys`, [] on any failure."""
    try:
        architecture = json.loads(config_path.read_text())["architectures"][0]
        import transformers

        return list(getattr(getattr(transformers, architecture), "_tied_weights_keys", []) or [])
    except Exception:  # noqa: BLE001 - as convert.py
        return []


def reference(path: Path, discard_names: Sequence[str] = ()) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """What convert.py's `convert_file` writes for `path`: its tensors and metadata."""
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    metadata = {"format": "pt"}
    for kept, removed in remove_duplicate_names(loaded, discard_names).items():
        for name in removed:
            metadata.setdefault(name, kept)
            del loaded[name]
    return {k: v.contiguous() for k, v in loaded.items()}, metadata


def tensor_bytes(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    return {n: (str(t.dtype), tuple(t.shape), t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
                if t.numel() else b"") for n, t in tensors.items()}


def assert_same_as_reference(output: Path, source: Path, discard_names: Sequence[str] = ()) -> None:
    expected, metadata = reference(source, discard_names)
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


# ---------------------------------------------------------------------- tied names, as the Hub converter keeps them

#: shardkit with transformers unimportable: the fallback names stand in for the model class's.
WITHOUT_TRANSFORMERS = (
    "import runpy, sys\n"
    "sys.modules['transformers'] = None\n"
    "sys.argv[0] = 'shardkit'\n"
    "runpy.run_module('shardkit', run_name='__main__', alter_sys=True)\n"
)


def run_without_transformers(*args: object) -> tuple[int, str]:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", WITHOUT_TRANSFORMERS, *map(str, args)], capture_output=True,
                          text=True, timeout=300)
    return done.returncode, done.stderr


def tied_qwen2_bin(folder: Path) -> dict[str, torch.Tensor]:
    """A tiny tied Qwen2 as a transformers folder with a .bin: its config.json and
    torch.save of its state dict (transformers 5 has no save_pretrained(safe_serialization=False))."""
    from hf_models import tiny_qwen2

    model = tiny_qwen2(True)
    model.config.architectures = [type(model).__name__]  # as save_pretrained records it
    model.config.save_pretrained(folder)
    state = model.state_dict()
    assert state["lm_head.weight"].data_ptr() == state["model.embed_tokens.weight"].data_ptr()
    torch.save(state, folder / "pytorch_model.bin")
    return state


@pytest.mark.parametrize("transformers_importable", [True, False])
def test_a_tied_transformers_model_keeps_the_name_convert_py_keeps(tmp_path: Path, transformers_importable: bool
                                                                   ) -> None:
    source = tmp_path / "source"
    tied_qwen2_bin(source)
    discard = get_discard_names(source / "config.json")
    assert "lm_head.weight" in discard  # Qwen2ForCausalLM._tied_weights_keys
    out = tmp_path / "out"
    if transformers_importable:
        result = run_cli("convert", source, "-o", out)
        assert result.exit_code == 0, result.stderr
    else:
        code, stderr = run_without_transformers("convert", source, "-o", out)
        assert code == 0, stderr
    assert_same_as_reference(out / "model.safetensors", source / "pytorch_model.bin", discard)
    with safetensors.safe_open(out / "model.safetensors", "pt") as opened:
        names = set(opened.keys())  # noqa: SIM118 - safe_open is not a dict
        assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names
        assert opened.metadata()["lm_head.weight"] == "model.embed_tokens.weight"


def test_tied_tensors_of_a_plain_torch_save_keep_the_first_name(tmp_path: Path) -> None:
    """No config.json, so no model class: convert.py's convert_generic, discard_names=[]."""
    weight = torch.randn(6, 4)
    torch.save({"model.embed_tokens.weight": weight, "lm_head.weight": weight, "z": weight}, tmp_path / "tied.pt")
    result = run_cli("convert", tmp_path / "tied.pt", "-o", tmp_path / "out.safetensors")
    assert result.exit_code == 0, result.stderr
    assert_same_as_reference(tmp_path / "out.safetensors", tmp_path / "tied.pt")
    assert list(load_file(tmp_path / "out.safetensors")) == ["lm_head.weight"]


def tied_sharded_qwen2_bin(folder: Path) -> dict[str, torch.Tensor]:
    """The tied Qwen2 as transformers 4 saved it with safe_serialization=False: shards whose
    index lists both tied names, which share one storage in the first shard."""
    state = tied_qwen2_bin(folder)
    (folder / "pytorch_model.bin").unlink()
    names = sorted(state)
    first = ["lm_head.weight", "model.embed_tokens.weight"]
    rest = [n for n in names if n not in first]
    groups = [first, rest[: len(rest) // 2], rest[len(rest) // 2:]]
    weight_map = {}
    for number, group in enumerate(groups, 1):
        shard = f"pytorch_model-{number:05d}-of-{len(groups):05d}.bin"
        torch.save({n: state[n] for n in group}, folder / shard)
        weight_map.update(dict.fromkeys(group, shard))
    index = {"metadata": {"total_size": 0}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    return state


def convert_py_index(bin_index: Path, output: Path) -> None:
    """convert.py's `convert_multi` index: the .bin index, file names renamed, every key kept."""
    data = json.loads(bin_index.read_text())
    data["weight_map"] = {k: v.replace("pytorch_model", "model").replace(".bin", ".safetensors")
                          for k, v in data["weight_map"].items()}
    output.write_text(json.dumps(data, indent=4))


def test_a_sharded_tied_bin_converts_and_its_index_names_only_what_the_shards_hold(tmp_path: Path) -> None:
    """The index deviates from convert.py's on purpose: it lists no dropped name. Both
    load alike in transformers; only ours says where every listed tensor is."""
    from hf_models import logits

    source = tmp_path / "source"
    tied_sharded_qwen2_bin(source)
    discard = get_discard_names(source / "config.json")
    out = tmp_path / "out"
    result = run_cli("convert", source, "-o", out)
    assert result.exit_code == 0, result.stderr
    for number in (1, 2, 3):
        assert_same_as_reference(out / f"model-{number:05d}-of-00003.safetensors",
                                 source / f"pytorch_model-{number:05d}-of-00003.bin", discard)
    weight_map = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    held = {n for shard in set(weight_map.values()) for n in load_file(out / shard)}
    assert set(weight_map) == held and "lm_head.weight" not in weight_map
    reference_logits = logits(out)

    hub = tmp_path / "hub"  # the same shards with convert.py's index, which lists lm_head.weight
    hub.mkdir()
    for file in out.iterdir():
        (hub / file.name).write_bytes(file.read_bytes())
    convert_py_index(source / "pytorch_model.bin.index.json", hub / "model.safetensors.index.json")
    assert "lm_head.weight" in json.loads((hub / "model.safetensors.index.json").read_text())["weight_map"]
    assert torch.equal(logits(hub), reference_logits)  # transformers loads either
    assert torch.equal(reference_logits, logits_of_state(source))
    for folder in (out, hub):  # and shardkit reads either, the Hub converter's too
        verify = run_cli("verify", folder, "--against", source)
        assert verify.exit_code == 0, verify.stdout + verify.stderr


def logits_of_state(folder: Path) -> torch.Tensor:
    """The logits of the original model: the .bin shards loaded by torch into the class."""
    import transformers

    state: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("pytorch_model-*.bin")):
        state.update(torch.load(shard, weights_only=True))
    config = transformers.AutoConfig.from_pretrained(folder)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    model.load_state_dict(state)
    with torch.no_grad():
        return model(torch.arange(16).reshape(2, 8)).logits


def test_an_index_entry_its_shard_does_not_record_as_tied_is_still_refused(tmp_path: Path) -> None:
    from conftest import assert_clean_failure, snapshot

    source = tmp_path / "source"
    tied_sharded_qwen2_bin(source)
    assert run_cli("convert", source, "-o", tmp_path / "out").exit_code == 0
    index = tmp_path / "out" / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"]["lm_head.weight"] = "model-00002-of-00003.safetensors"  # not where it was dropped
    index.write_text(json.dumps(data))
    before = snapshot(tmp_path / "out")
    result = run_cli("merge", tmp_path / "out", "-o", tmp_path / "merged.safetensors")
    assert_clean_failure(result, 2, "'lm_head.weight' is listed in weight_map for model-00002-of-00003.safetensors")
    assert not (tmp_path / "merged.safetensors").exists() and snapshot(tmp_path / "out") == before


def test_a_tensor_manifest_holds_a_views_bytes_as_written(tmp_path: Path, bin_file: Path) -> None:
    """`checksum --tensors` of a .bin and of its conversion are one manifest, and `verify
    --checksums` checks either side with either: a view's hash is of its bytes made
    contiguous (what the safetensors file holds), not of the storage range it lies in."""
    import hashlib

    out = tmp_path / "out.safetensors"
    assert run_cli("convert", bin_file, "-o", out).exit_code == 0
    manifests = {}
    for side, source in (("bin", bin_file), ("converted", out)):
        manifests[side] = tmp_path / f"{side}.tensors.json"
        result = run_cli("checksum", source, "--tensors", "-o", manifests[side])
        assert result.exit_code == 0, result.stderr
    assert manifests["bin"].read_text() == manifests["converted"].read_text()
    listed = json.loads(manifests["bin"].read_text())["tensors"]
    written = load_file(out)["transposed"]
    assert listed["transposed"]["sha256"] == hashlib.sha256(written.numpy().tobytes()).hexdigest()
    for checked in (bin_file, out):
        for manifest in manifests.values():
            result = run_cli("verify", checked, "--checksums", manifest)
            assert result.exit_code == 0, result.stdout + result.stderr
            assert "tensor-checksums" in json.loads(run_cli("verify", checked, "--checksums", manifest,
                                                             "--json").stdout)["checks"]


# ---------------------------------------------------------------------- remote .bin sources


def snapshot_of(path: Path) -> dict[str, bytes]:
    if path.is_file():
        return {path.name: path.read_bytes()}
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_a_bin_checkpoint_over_http_gives_the_bytes_of_a_local_run(tmp_path: Path, layout: str) -> None:
    """A web server on 127.0.0.1 serves a .bin (views, tied names, every dtype) or a tied
    sharded .bin with its index: merge, convert and inspect of the URL give what they give
    on the local folder, the tied name chosen through the config.json beside the files."""
    from web_server import WebServer

    source = tmp_path / "source"
    if layout == "single":
        source.mkdir()
        torch.save(every_kind_of_tensor(), source / "pytorch_model.bin")
        entry = "pytorch_model.bin"
    else:
        tied_sharded_qwen2_bin(source)
        entry = "pytorch_model.bin.index.json"
    with WebServer() as web:
        web.put_folder("/models/bin", source)
        url = web.url(f"/models/bin/{entry}")
        for side, where in (("local", source / entry), ("remote", url)):
            for command, out in (("merge", "merged.safetensors"), ("convert", "converted")):
                result = run_cli(command, where, "-o", tmp_path / side / out)
                assert result.exit_code == 0, (command, side, result.stderr)
            inspected = run_cli("inspect", where, "--tensors", "--json")
            assert inspected.exit_code == 0, inspected.stderr
            (tmp_path / side / "inspect.json").write_text(json.dumps(json.loads(inspected.stdout)["tensor_rows"]))
        assert {m for m, _, _ in web.requests} <= {"GET", "HEAD"}
    if layout == "sharded":  # a web server lists no folder: its companion files are unknown, none copied
        (tmp_path / "local" / "converted" / "config.json").unlink()
    assert snapshot_of(tmp_path / "remote") == snapshot_of(tmp_path / "local")
    expected = sorted(reference(source / entry)[0]) if layout == "single" else None
    if expected is not None:
        assert sorted(load_file(tmp_path / "remote" / "merged.safetensors")) == expected
    else:
        assert "lm_head.weight" not in load_file(tmp_path / "remote" / "merged.safetensors")


def test_every_range_of_a_gathered_view_is_its_bytes_made_contiguous(tmp_path: Path) -> None:
    """Views larger than a gather window (so boxes are cut, along the largest stride
    first), of several layouts, filled by arbitrary ranges (cut mid-element, across
    boxes), with and without a cast: the bytes torch's `.contiguous()` gives."""
    import random

    from shardkit.checkpoint.shards import open_checkpoint
    from shardkit.plan.files import plan_merge
    from shardkit.plan.fill import fill

    torch.manual_seed(3)
    cube = torch.randn(40, 96, 300)  # 4.6 MB: more than one 4 MB window
    views = {
        "permuted": cube.permute(2, 0, 1),
        "transposed_slice": torch.randn(700, 900).t()[100:650, 3:601],
        "every_other": torch.randn(300, 2000)[:, ::2],
        "expanded": torch.randn(1, 5000).expand(300, 5000),  # stride 0
        "complex": torch.randn(200, 300, dtype=torch.complex64).t(),  # 8-byte elements
        "bool_columns": (torch.randn(500, 40) > 0)[:, 5:9],
    }
    path = tmp_path / "views.pt"
    torch.save(views, path)
    checkpoint = open_checkpoint(path)
    for dtype_for in (None, lambda tensor: "BF16" if tensor.info.dtype == "F32" else tensor.info.dtype):
        planned = plan_merge(checkpoint, "out.safetensors", (), dtype_for).files[0]
        expected = bytearray(planned.size)

        def read(source: str, offset: int, into: memoryview) -> None:
            with open(source, "rb") as file:
                file.seek(offset)
                into[:] = file.read(len(into))

        fill(planned, 0, memoryview(expected), read)
        header = int.from_bytes(expected[:8], "little") + 8
        written = {n: (t.to(torch.bfloat16) if dtype_for and t.dtype == torch.float32 else t)
                   for n, t in views.items()}
        loaded = safetensors.torch.load(bytes(expected))
        assert tensor_bytes(loaded) == tensor_bytes(written)
        rng = random.Random(0)
        for _ in range(30):
            start = rng.randrange(header, planned.size)
            length = rng.randrange(1, min(planned.size - start, 6_000_000) + 1)
            part = bytearray(length)
            fill(planned, start, memoryview(part), read)
            assert part == expected[start : start + length], (start, length)


def test_a_transposed_view_is_read_once_per_range_filled(tmp_path: Path) -> None:
    """A transposed view's output rows each need elements from all over its span: the
    range a block writer fills (32 MB) is gathered in one pass over the span, not one pass
    per few hundred thousand elements (a 1.5B model's transposed embedding: > 300 s before,
    2.9 s CPU after)."""
    from shardkit.checkpoint.shards import open_checkpoint
    from shardkit.plan.files import plan_merge
    from shardkit.plan.fill import fill

    weight = torch.randn(1536, 2048, dtype=torch.bfloat16)  # 6 MB
    torch.save({"w": weight.t()}, tmp_path / "t.pt")
    planned = plan_merge(open_checkpoint(tmp_path / "t.pt"), "out.safetensors").files[0]
    read_bytes = 0

    def read(source: str, offset: int, into: memoryview) -> None:
        nonlocal read_bytes
        read_bytes += len(into)
        with open(source, "rb") as file:
            file.seek(offset)
            into[:] = file.read(len(into))

    out = bytearray(planned.size)
    fill(planned, 0, memoryview(out), read)
    assert safetensors.torch.load(bytes(out))["w"].equal(weight.t())
    assert read_bytes <= 1.01 * weight.numel() * 2 + planned.size - weight.numel() * 2


def test_convert_takes_its_output_path_as_merge_does(tmp_path: Path, bin_file: Path) -> None:
    """Missing parents are made, {name} expands, and an output named like a torch file is refused."""
    result = run_cli("convert", bin_file.parent, "-o", tmp_path / "new" / "deeper" / "{name}.safetensors")
    assert result.exit_code == 0, result.stderr
    assert_same_as_reference(tmp_path / "new" / "deeper" / "source.safetensors", bin_file)

    before = snapshot(tmp_path / "source")
    result = run_cli("convert", bin_file, "-o", tmp_path / "made" / "model.bin")
    assert_clean_failure(result, 2, "model.bin")
    assert not (tmp_path / "made").exists()  # the parent made for the run is gone again
    assert snapshot(tmp_path / "source") == before
