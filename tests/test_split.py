"""split / reshard: Hugging Face shards that the reference reader accepts, byte for byte."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from huggingface_hub.serialization._base import MAX_SHARD_SIZE as HUB_MAX_SHARD_SIZE
from huggingface_hub.serialization._base import parse_size_to_int, split_state_dict_into_shards_factory
from safetensors import deserialize, safe_open

import shardkit
from conftest import assert_clean_failure, run_cli, snapshot, temporaries
from shardkit.checkpoint.layers import natural_key, natural_keys_distinct
from shardkit.errors import BadInputError
from shardkit.format.header import read_header
from shardkit.sizes import DEFAULT_MAX_SHARD_SIZE, parse_size
from shardkit.synthetic import ByteSource, SyntheticCheckpoint, SyntheticTensor, write_checkpoint, write_safetensors

COMPANIONS = ["config.json", "generation_config.json", "merges.txt", "tokenizer.json", "tokenizer_config.json",
              "vocab.json"]


def hub_grouping(tensors: list[SyntheticTensor], max_shard_size: int) -> dict[str, list[str]]:
    """What huggingface_hub itself does with these tensors, taken in name order."""
    ordered = sorted(tensors, key=lambda t: natural_key(t.name))
    split = split_state_dict_into_shards_factory(
        {t.name: t.nbytes for t in ordered},
        get_storage_size=lambda size: size,
        filename_pattern="model{suffix}.safetensors",
        max_shard_size=max_shard_size,
    )
    return {name: list(tensors) for name, tensors in split.filename_to_tensors.items()}


def shard_layout(folder: Path) -> dict[str, list[str]]:
    """file → tensor names (sorted), read back with the reference reader."""
    layout = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, framework="numpy") as handle:
            layout[path.name] = sorted(handle.keys())
    return layout


def assert_holds_exactly(folder: Path, made: SyntheticCheckpoint) -> None:
    """Every shard parses in the reference reader and every tensor has its source bytes."""
    seen = {}
    for path in sorted(folder.glob("*.safetensors")):
        for name, entry in deserialize(path.read_bytes()):
            assert name not in seen, f"{name} in {seen.get(name)} and {path.name}"
            seen[name] = path.name
            tensor = next(t for t in made.tensors if t.name == name)
            assert entry["dtype"] == tensor.dtype
            assert tuple(entry["shape"]) == tensor.shape
            assert bytes(entry["data"]) == made.expected_bytes(name), name
        with safe_open(path, framework="numpy") as handle:
            assert handle.metadata() == {"format": "pt"}
    assert set(seen) == {t.name for t in made.tensors}


# --------------------------------------------------------------------------- sizes


@pytest.mark.parametrize(
    ("text", "expected"),
    [("5GB", 5 * 10**9), ("4GiB", 4 * 2**30), ("100", 100), (123, 123), ("1.5GB", 1_500_000_000),
     ("200MB", 200 * 10**6), ("512KiB", 512 * 1024), ("2 TB", 2 * 10**12), ("10kb", 10_000), ("7B", 7)],
)
def test_parse_size(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["5GB", "200MB", "10KB", "1TB", "1.5GB"])
def test_decimal_units_agree_with_huggingface_hub(text: str) -> None:
    assert parse_size(text) == parse_size_to_int(text)


def test_default_shard_size_is_huggingface_hubs() -> None:
    assert DEFAULT_MAX_SHARD_SIZE == HUB_MAX_SHARD_SIZE
    assert parse_size(DEFAULT_MAX_SHARD_SIZE) == 5 * 10**9


@pytest.mark.parametrize("text", ["5XB", "GB", "-1", "0", "five", "", "1e9"])
def test_bad_sizes_are_refused(text: str) -> None:
    with pytest.raises(BadInputError, match="size"):
        parse_size(text)


# --------------------------------------------------------------------------- packing


def sized_checkpoint(folder: Path, sizes: dict[str, int]) -> SyntheticCheckpoint:
    """One file holding F32 vectors of the given byte sizes."""
    folder.mkdir(parents=True)
    tensors = [SyntheticTensor(name, "F32", (size // 4,)) for name, size in sizes.items()]
    source = ByteSource(7)
    write_safetensors(folder / "model.safetensors", tensors, source, {"format": "pt"})
    return SyntheticCheckpoint(folder, tensors, ["model.safetensors"], source)


def test_packing_follows_huggingface_hub_exactly(tmp_path: Path) -> None:
    # t.2 is bigger than the limit: a shard of its own, placed before the shard being
    # filled; t.1 + t.3 fill a shard to exactly the limit; t.10 sorts after t.4.
    made = sized_checkpoint(tmp_path / "src", {"t.1": 400, "t.2": 1200, "t.3": 600, "t.4": 400, "t.10": 200})
    report = shardkit.split(made.folder, tmp_path / "out", max_shard_size=1000)
    expected = {
        "model-00001-of-00003.safetensors": ["t.2"],
        "model-00002-of-00003.safetensors": ["t.1", "t.3"],
        "model-00003-of-00003.safetensors": ["t.4", "t.10"],
    }
    assert report.layout == expected
    assert report.layout == hub_grouping(made.tensors, 1000)
    assert shard_layout(tmp_path / "out") == {name: sorted(group) for name, group in expected.items()}
    assert_holds_exactly(tmp_path / "out", made)
    sizes = {Path(f.path).name: read_header(f.path).data_size for f in report.files}
    assert sizes == {
        "model-00001-of-00003.safetensors": 1200,
        "model-00002-of-00003.safetensors": 1000,
        "model-00003-of-00003.safetensors": 600,
    }


def test_the_layout_of_names_that_tie_in_the_natural_order(tmp_path: Path) -> None:
    """`a.001.w`, `a.01.w` and `a.1.w` have one natural key: they are packed in name
    order, and a shard holding them all lists them as the natural sort of its tensors
    in data order (F32 before the 2-byte dtypes) has always listed them. The layout
    otherwise reuses the planner's order instead of sorting again; this keeps the one
    case where the two differ as it was."""
    folder = tmp_path / "src"
    folder.mkdir()
    tensors = [SyntheticTensor("a.001.w", "F16", (2,)), SyntheticTensor("a.01.w", "F32", (4,)),
               SyntheticTensor("a.1.w", "BF16", (4,)), SyntheticTensor("b.10", "F32", (3,)),
               SyntheticTensor("b.2", "F32", (3,))]
    write_safetensors(folder / "model.safetensors", tensors, ByteSource(3), {"format": "pt"})
    one_each = shardkit.split(folder, tmp_path / "each", max_shard_size=1, dry_run=True)
    assert [names for names in one_each.layout.values()] == [["a.001.w"], ["a.01.w"], ["a.1.w"], ["b.2"], ["b.10"]]
    together = shardkit.split(folder, tmp_path / "one", max_shard_size=1000, dry_run=True)
    assert together.layout == {"model.safetensors": ["a.01.w", "a.1.w", "a.001.w", "b.2", "b.10"]}
    result = run_cli("split", folder, "-o", tmp_path / "one", "-s", "1000", "--dry-run")
    assert "model.safetensors        5  388 B  a.01.w … b.10" in result.stdout
    assert not (tmp_path / "one").exists() and not (tmp_path / "each").exists()


@pytest.mark.parametrize(
    ("names", "distinct"),
    [(["model.layers.10.mlp.experts.0.w", "model.layers.2.x", "b.0", "x0", "10.0", "a.100.b"], True),
     (["a.01", "a.1"], False), (["a.00"], False), (["01.x"], False), (["a.٣", "a.3"], False), (["é"], False)],
)
def test_names_that_can_share_a_natural_key_are_found(names: list[str], distinct: bool) -> None:
    assert natural_keys_distinct(names) is distinct
    keys = [natural_key(n) for n in names]
    if distinct:  # the claim itself: no two keys equal
        assert all(a != b for i, a in enumerate(keys) for b in keys[i + 1:])


@pytest.mark.parametrize("limit", [1, 200_000, 300_000, 524_288, 1_000_000, 2_000_000, 3_700_000])
def test_grouping_matches_huggingface_hub_on_a_model(checkpoint: SyntheticCheckpoint, tmp_path: Path,
                                                      limit: int) -> None:
    out = tmp_path / "out"
    report = shardkit.split(checkpoint.folder, out, max_shard_size=limit)
    expected = hub_grouping(checkpoint.tensors, limit)
    assert report.layout == expected
    assert shard_layout(out) == {name: sorted(group) for name, group in expected.items()}
    assert_holds_exactly(out, checkpoint)
    for f in report.files:  # over the limit only when a single tensor is
        header = read_header(f.path)
        assert header.data_size <= limit or len(header.tensors) == 1


def test_index_is_exactly_what_hugging_face_writes(checkpoint: SyntheticCheckpoint, tmp_path: Path) -> None:
    out = tmp_path / "out"
    shardkit.split(checkpoint.folder, out, max_shard_size="1MB")
    grouping = hub_grouping(checkpoint.tensors, 1_000_000)
    expected = {
        "metadata": {"total_size": sum(t.nbytes for t in checkpoint.tensors)},
        "weight_map": {name: file for file, names in grouping.items() for name in names},
    }
    text = (out / "model.safetensors.index.json").read_text()
    assert text == json.dumps(expected, indent=2, sort_keys=True) + "\n"
    assert list(json.loads(text)["weight_map"]) == sorted(expected["weight_map"])
    assert sorted(p.name for p in out.iterdir()) == sorted([*COMPANIONS, *grouping, "model.safetensors.index.json"])
    for name in COMPANIONS:
        assert (out / name).read_bytes() == (checkpoint.folder / name).read_bytes()


def test_other_index_metadata_is_kept_and_total_size_recomputed(checkpoint: SyntheticCheckpoint,
                                                                tmp_path: Path) -> None:
    index_path = checkpoint.folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["metadata"].update({"total_parameters": 1234, "quantization": {"bits": 8}})
    index_path.write_text(json.dumps(index))
    out = tmp_path / "out"
    shardkit.split(checkpoint.folder, out, max_shard_size="2MB")
    metadata = json.loads((out / "model.safetensors.index.json").read_text())["metadata"]
    assert metadata == {
        "total_size": sum(t.nbytes for t in checkpoint.tensors),
        "total_parameters": 1234,
        "quantization": {"bits": 8},
    }


def test_everything_in_one_shard_is_a_plain_file_without_index(checkpoint: SyntheticCheckpoint,
                                                               tmp_path: Path) -> None:
    out = tmp_path / "out"
    report = shardkit.split(checkpoint.folder, out, max_shard_size="5GB")
    assert report.index is None
    assert sorted(p.name for p in out.iterdir()) == sorted([*COMPANIONS, "model.safetensors"])
    assert_holds_exactly(out, checkpoint)
    # one shard is laid out exactly as merge lays out its single file
    shardkit.merge(checkpoint.folder, tmp_path / "merged.safetensors")
    assert (out / "model.safetensors").read_bytes() == (tmp_path / "merged.safetensors").read_bytes()


def test_prefix_names_shards_and_index(tmp_path: Path) -> None:
    made = write_checkpoint(tmp_path / "unet", max_shard_size=None, prefix="diffusion_pytorch_model",
                            companions=False)
    out = tmp_path / "out"
    shardkit.split(made.folder, out, max_shard_size="1MB", prefix="diffusion_pytorch_model")
    names = sorted(p.name for p in out.iterdir())
    assert names[-1] == "diffusion_pytorch_model.safetensors.index.json"
    assert names[:-1] == [f"diffusion_pytorch_model-{i:05d}-of-00005.safetensors" for i in range(1, 6)]
    assert_holds_exactly(out, made)


# --------------------------------------------------------------------------- round trips


def test_merge_of_split_holds_the_same_tensors(checkpoint: SyntheticCheckpoint, tmp_path: Path) -> None:
    shardkit.split(checkpoint.folder, tmp_path / "split", max_shard_size="700KB")
    shardkit.merge(tmp_path / "split", tmp_path / "merged.safetensors")
    loaded = dict(deserialize((tmp_path / "merged.safetensors").read_bytes()))
    assert set(loaded) == {t.name for t in checkpoint.tensors}
    for tensor in checkpoint.tensors:
        assert loaded[tensor.name]["dtype"] == tensor.dtype
        assert tuple(loaded[tensor.name]["shape"]) == tensor.shape
        assert bytes(loaded[tensor.name]["data"]) == checkpoint.expected_bytes(tensor.name)
    assert shardkit.diff(checkpoint.folder, tmp_path / "merged.safetensors").identical


def test_split_of_merge_reproduces_a_split_byte_for_byte(checkpoint: SyntheticCheckpoint, tmp_path: Path) -> None:
    shardkit.split(checkpoint.folder, tmp_path / "y", max_shard_size="800KB")
    shardkit.merge(tmp_path / "y", tmp_path / "merged.safetensors")
    shardkit.split(tmp_path / "merged.safetensors", tmp_path / "again", max_shard_size="800KB")
    weights = {name: digest for name, digest in snapshot(tmp_path / "y").items() if ".safetensors" in name}
    again = {name: digest for name, digest in snapshot(tmp_path / "again").items() if ".safetensors" in name}
    assert len(weights) == 7  # six shards and the index
    assert again == weights


def test_reshard_four_into_eight_into_one(checkpoint: SyntheticCheckpoint, tmp_path: Path) -> None:
    assert len(checkpoint.shard_files) == 4
    eight = shardkit.split(checkpoint.folder, tmp_path / "eight", max_shard_size="500KB")
    assert len(eight.files) == 8
    assert eight.layout == hub_grouping(checkpoint.tensors, 500_000)
    assert_holds_exactly(tmp_path / "eight", checkpoint)
    one = shardkit.split(tmp_path / "eight", tmp_path / "one", max_shard_size="10GB")
    assert [Path(f.path).name for f in one.files] == ["model.safetensors"]
    assert not list((tmp_path / "one").glob("*.index.json"))
    assert_holds_exactly(tmp_path / "one", checkpoint)
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == sorted([*COMPANIONS, "model.safetensors"])
    diff = shardkit.diff(checkpoint.folder, tmp_path / "one")
    assert diff.identical and diff.data_equal == len(checkpoint.tensors)


# --------------------------------------------------------------------------- output folder


def test_replacing_an_output_leaves_no_stale_shard_or_index(checkpoint: SyntheticCheckpoint, tmp_path: Path) -> None:
    out = tmp_path / "out"
    shardkit.split(checkpoint.folder, out, max_shard_size="300KB")
    assert len(list(out.glob("model-*.safetensors"))) == 14
    before = snapshot(checkpoint.folder)

    refused = run_cli("split", checkpoint.folder, "-o", out, "--max-shard-size", "1MB")
    assert_clean_failure(refused, 2, "already exists; pass --force to replace it")
    assert len(list(out.glob("model-*.safetensors"))) == 14

    result = run_cli("split", checkpoint.folder, "-o", out, "--max-shard-size", "1MB", "--force")
    assert result.exit_code == 0, result.stderr
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert shards == [f"model-{i:05d}-of-00005.safetensors" for i in range(1, 6)]
    weight_map = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(weight_map.values()) == set(shards)
    assert_holds_exactly(out, checkpoint)
    assert snapshot(checkpoint.folder) == before
    assert temporaries(tmp_path) == []


def test_output_inside_the_source_folder_is_refused(checkpoint: SyntheticCheckpoint) -> None:
    """It would become part of the folder it was made from (a stray weight file for the next run)."""
    out = checkpoint.folder / "resharded"
    before = snapshot(checkpoint.folder)
    result = run_cli("split", checkpoint.folder, "-o", out, "-s", "2MB")
    assert_clean_failure(result, 2, f"{out}: output lies inside the source folder {checkpoint.folder}")
    assert snapshot(checkpoint.folder) == before and temporaries(checkpoint.folder) == []


def test_sha256_and_verify(checkpoint: SyntheticCheckpoint, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = run_cli("split", checkpoint.folder, "-o", out, "-s", "1MB", "--sha256", "--verify", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["verified"] is True
    assert report["checksum_file"] == str(out / "SHA256SUMS")
    check = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=out, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert check.stdout.count(": OK") == 5


# --------------------------------------------------------------------------- CLI


def test_dry_run_prints_the_layout_and_writes_nothing(checkpoint: SyntheticCheckpoint, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = run_cli("split", checkpoint.folder, "-o", out, "--max-shard-size", "1MB", "--dry-run")
    assert result.exit_code == 0, result.stderr
    assert not out.exists() and temporaries(tmp_path) == []
    grouping = hub_grouping(checkpoint.tensors, 1_000_000)
    lines = result.stdout.splitlines()
    for file, names in grouping.items():
        line = next(line for line in lines if line.startswith(file))
        assert line.split()[1] == str(len(names))
        assert line.endswith(names[0] if len(names) == 1 else f"{names[0]} … {names[-1]}")
    assert "would write 5 shard(s) and an index of at most 1.00 MB" in result.stdout

    as_json = run_cli("split", checkpoint.folder, "-o", out, "-s", "1MB", "--dry-run", "--json")
    report = json.loads(as_json.stdout)
    assert report["dry_run"] is True and report["layout"] == grouping
    assert report["max_shard_size"] == 1_000_000
    assert report["index"] == str(out / "model.safetensors.index.json")
    assert [f["tensors"] for f in report["files"]] == [len(g) for g in grouping.values()]
    assert not out.exists()


def test_reshard_is_an_alias(checkpoint: SyntheticCheckpoint, tmp_path: Path) -> None:
    result = run_cli("reshard", checkpoint.folder, "-o", tmp_path / "out", "-s", "2MB", "--quiet")
    assert result.exit_code == 0, result.stderr
    assert result.stdout == ""
    assert_holds_exactly(tmp_path / "out", checkpoint)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--max-shard-size", "5XB"], "cannot read size '5XB'"),
        (["--max-shard-size", "0"], "size '0' must be greater than zero"),
        (["--prefix", "../evil"], "prefix '../evil' must be a plain file name start"),
        (["--prefix", "model.safetensors"], "must not end in .safetensors"),
    ],
)
def test_bad_options_fail_cleanly(checkpoint: SyntheticCheckpoint, tmp_path: Path, args: list[str],
                                  message: str) -> None:
    before = snapshot(checkpoint.folder)
    result = run_cli("split", checkpoint.folder, "-o", tmp_path / "out", *args)
    assert_clean_failure(result, 2, message)
    assert not (tmp_path / "out").exists()
    assert temporaries(tmp_path) == []
    assert snapshot(checkpoint.folder) == before


def test_bad_outputs_and_sources_fail_cleanly(checkpoint: SyntheticCheckpoint, tmp_path: Path) -> None:
    before = snapshot(checkpoint.folder)
    result = run_cli("split", checkpoint.folder, "-o", tmp_path / "x.safetensors")
    assert_clean_failure(result, 2, "split writes a folder of shards")
    result = run_cli("split", checkpoint.folder, "-o", checkpoint.folder, "--force")
    assert_clean_failure(result, 2, "output is the source folder")
    result = run_cli("split", tmp_path / "missing", "-o", tmp_path / "out")
    assert_clean_failure(result, 2, "missing: no such file or folder")
    (checkpoint.folder / "model-00003-of-00004.safetensors").unlink()
    result = run_cli("split", checkpoint.folder, "-o", tmp_path / "out")
    assert_clean_failure(result, 2, "shard model-00003-of-00004.safetensors named in weight_map does not exist")
    assert not (tmp_path / "out").exists() and not (tmp_path / "x.safetensors").exists()
    assert temporaries(tmp_path) == []
    del before["model-00003-of-00004.safetensors"]
    assert snapshot(checkpoint.folder) == before


def test_help_teaches_with_an_example() -> None:
    for command in ("split", "reshard"):
        result = run_cli(command, "--help")
        assert result.exit_code == 0
        assert "Example: shardkit" in result.stdout
        assert "--max-shard-size" in result.stdout
