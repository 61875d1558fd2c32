"""A refusal names the option as its caller spelled it: the flag for a command line
(`--select 'vision.*'`, a shell word), the keyword argument for Python
(`select='vision.*'`, a literal). Each bad value goes through both, and neither
writes anything nor touches the source."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import shardkit
from conftest import assert_clean_failure, run_cli, snapshot, temporaries
from shardkit.errors import BadInputError
from shardkit.synthetic import SyntheticCheckpoint, write_checkpoint

#: (command, CLI options, what stderr says, Python keyword arguments, what the exception says)
CASES = {
    "select": ("merge", ["--select", "vision.*"], "--select 'vision.*' matches no tensor",
               {"select": ["vision.*"]}, "select='vision.*' matches no tensor"),
    "drop": ("split", ["--drop", "*ema*"], "--drop '*ema*' matches no tensor",
             {"drop": ["*ema*"]}, "drop='*ema*' matches no tensor"),
    "select and drop": ("merge", ["--select", "model.norm.weight", "--drop", "model.norm.*"],
                        "the selection leaves no tensor (--select model.norm.weight, --drop 'model.norm.*')",
                        {"select": ["model.norm.weight"], "drop": ["model.norm.*"]},
                        "the selection leaves no tensor (select=['model.norm.weight'], drop=['model.norm.*'])"),
    "rename": ("convert", ["--rename", "(", "x"], "--rename '(': not a regular expression",
               {"rename": [("(", "x")]}, "rename='(': not a regular expression"),
    "rename matching nothing": ("split", ["--rename", "layers", "x"], "--rename layers x matches no tensor name whole",
                                {"rename": [("layers", "x")]}, "rename=('layers', 'x') matches no tensor name whole"),
    "rename collision": ("merge", ["--rename", r"model\.layers\.\d+\.(.*)", r"\1"],
                         "--rename gives several tensors one name",
                         {"rename": [(r"model\.layers\.\d+\.(.*)", r"\1")]}, "rename=… gives several tensors one name"),
    "recipe": ("merge", ["--recipe", "flux-nope"], "--recipe flux-nope: neither a recipe file nor a built-in recipe",
               {"recipe": "flux-nope"}, "recipe='flux-nope': neither a recipe file nor a built-in recipe"),
    "block_size": ("split", ["--dtype", "fp8", "--block-size", "12"],
                   "--block-size 12: expected ROWSxCOLUMNS, two positive integers such as --block-size 128x128",
                   {"dtype": "fp8", "block_size": "12"},
                   "block_size='12': expected ROWSxCOLUMNS, two positive integers such as block_size='128x128'"),
    "block_size without fp8": ("split", ["--dtype", "bf16", "--block-size", "4x4"],
                               "--block-size applies to --dtype fp8 (quantisation), not to --dtype bf16",
                               {"dtype": "bf16", "block_size": "4x4"},
                               "block_size=… applies to dtype='fp8' (quantisation), not to dtype='bf16'"),
    "block_size without dtype": ("merge", ["--block-size", "4x4"],
                                 "--block-size is the block of an FP8 quantisation; pass --dtype fp8 too",
                                 {"block_size": "4x4"},
                                 "block_size=… is the block of an FP8 quantisation; pass dtype='fp8' too"),
    "dtype": ("merge", ["--dtype", "int8"], "unknown --dtype int8: choose one of bf16, fp16, fp32",
              {"dtype": "int8"}, "unknown dtype='int8': choose one of bf16, fp16, fp32"),
    "keep": ("split", ["--dtype", "bf16", "--keep", ""], "--keep '': give a glob of tensor names, e.g. --keep '*norm*'",
             {"dtype": "bf16", "keep": [""]}, "keep='': give a glob of tensor names, e.g. keep='*norm*'"),
}


def refused_both_ways(source: Path, tmp_path: Path, case: tuple[Any, ...], out: Path | None = None) -> None:
    """Run `case` through the CLI and through the API; both refuse, naming the option
    their way, and leave no output, no temporary and the source as it was."""
    command, flags, flag_message, keywords, keyword_message = case
    before = snapshot(source)
    out = out or tmp_path / ("out" if command == "split" else "out.safetensors")
    result = run_cli(command, source, "-o", out, *flags)
    assert_clean_failure(result, 2, flag_message)
    assert "=…" not in result.stderr and "='" not in result.stderr
    with pytest.raises(BadInputError) as raised:
        getattr(shardkit, command)(source, out, **keywords)
    assert keyword_message in str(raised.value)
    assert "--" not in str(raised.value)
    assert not out.exists() and temporaries(tmp_path) == []
    assert snapshot(source) == before


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_a_bad_option_is_named_as_the_caller_spells_it(
    checkpoint: SyntheticCheckpoint, tmp_path: Path, case: tuple[Any, ...]
) -> None:
    refused_both_ways(checkpoint.folder, tmp_path, case)


def test_the_flags_of_a_pipeline_refusal_are_named_as_the_caller_spells_them(tmp_path: Path) -> None:
    """A selection, a dtype or a prefix asked of a whole diffusers pipeline."""
    pipeline = tmp_path / "pipe"
    pipeline.mkdir()
    (pipeline / "model_index.json").write_text('{"_class_name": "X", "transformer": ["diffusers", "T"]}')
    write_checkpoint(pipeline / "transformer", max_shard_size=None, prefix="diffusion_pytorch_model")
    refused_both_ways(pipeline, tmp_path, (
        "merge", ["--drop", "x"], "--select, --drop, --rename and --recipe apply to one component",
        {"drop": ["x"]}, "select=…, drop=…, rename=… and recipe=… apply to one component",
    ))
    refused_both_ways(pipeline, tmp_path, (
        "merge", ["--dtype", "bf16"], "(fp16); --dtype applies to one component",
        {"dtype": "bf16"}, "(fp16); dtype=… applies to one component",
    ))
    refused_both_ways(pipeline, tmp_path, (
        "split", ["--prefix", "x"], "keep their own names and dtypes; --prefix applies to one component",
        {"prefix": "x"}, "keep their own names and dtypes; prefix=… applies to one component",
    ))


def test_a_checksum_name_too_long_names_the_option_as_the_caller_spells_it(
    checkpoint: SyntheticCheckpoint, tmp_path: Path
) -> None:
    """The output's name fits the filesystem (252 bytes); with `.sha256` added it does not."""
    out = tmp_path / ("x" * 240 + ".safetensors")
    refused_both_ways(checkpoint.folder, tmp_path, (
        "merge", ["--sha256"], "the checksum file (--sha256) name is 259 bytes",
        {"sha256": True}, "the checksum file (sha256=True) name is 259 bytes",
    ), out)


def test_a_block_size_that_is_not_text_is_refused_not_a_type_error(checkpoint: SyntheticCheckpoint, tmp_path: Path):
    """`block_size=(128, 128)` from Python raised a TypeError out of the regular expression."""
    with pytest.raises(BadInputError, match=r"block_size=\(128, 128\): expected ROWSxCOLUMNS"):
        shardkit.merge(checkpoint.folder, tmp_path / "out.safetensors", dtype="fp8", block_size=(128, 128))  # type: ignore[arg-type]
    assert temporaries(tmp_path) == [] and not (tmp_path / "out.safetensors").exists()


def test_a_python_caller_may_give_one_glob_as_a_string(tmp_path: Path) -> None:
    """`select="model.norm.*"` is the glob, not its characters (which gave `select='m'
    matches no tensor`); the same for drop and keep."""
    import json

    source = write_checkpoint(tmp_path / "src", "tiny").folder
    one, many = tmp_path / "one.safetensors", tmp_path / "many.safetensors"
    shardkit.merge(source, one, select="model.layers.0.*", drop="*.bias", dtype="fp16", keep="*norm*")
    shardkit.merge(source, many, select=["model.layers.0.*"], drop=["*.bias"], dtype="fp16", keep=["*norm*"])
    assert one.read_bytes() == many.read_bytes()
    header = json.loads(one.read_bytes()[8 : 8 + int.from_bytes(one.read_bytes()[:8], "little")])
    names = [name for name in header if name != "__metadata__"]
    assert names and all(n.startswith("model.layers.0.") and not n.endswith(".bias") for n in names)
    assert {header[n]["dtype"] for n in names if "norm" in n} != {"F16"}
    for out, globs in (("split-one", "model.layers.0.*"), ("split-many", ["model.layers.0.*"])):
        shardkit.split(source, tmp_path / out, select=globs, max_shard_size="1MB")
    assert snapshot(tmp_path / "split-one") == snapshot(tmp_path / "split-many")
