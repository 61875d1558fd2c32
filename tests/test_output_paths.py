"""-o as users write it: name templates, missing parent folders, foreign weight suffixes,
and subfolders of a checkpoint folder that are not part of it."""

from __future__ import annotations

import datetime
import json
import shutil
from pathlib import Path

import pytest
from safetensors import safe_open

import shardkit
from conftest import assert_clean_failure, run_cli, snapshot, temporaries
from shardkit.errors import BadInputError
from shardkit.plan.output_path import dominant_dtype, slug, source_name
from shardkit.synthetic import SyntheticCheckpoint, write_checkpoint

_DEC_1_2026 = datetime.datetime(2026, 12, 1, 15, tzinfo=datetime.timezone.utc)
DEC_1_2026 = {"SOURCE_DATE_EPOCH": str(int(_DEC_1_2026.timestamp()))}


@pytest.fixture
def qwen(tmp_path: Path) -> SyntheticCheckpoint:
    """A checkpoint folder named as the Hub names it, dots and capitals included."""
    return write_checkpoint(tmp_path / "Qwen2.5-7B-Instruct")


def _dominant_dtype_by_reference(file: Path) -> str:
    """The dtype holding the most bytes, read with the reference library."""
    by_dtype: dict[str, int] = {}
    with safe_open(file, framework="numpy") as handle:
        for name in handle.keys():  # noqa: SIM118 - safe_open has no __iter__
            info = handle.get_slice(name)
            count = 1
            for dim in info.get_shape():
                count *= dim
            dtype = info.get_dtype()
            width = {"BF16": 2, "F16": 2, "F32": 4, "I64": 8}[dtype]
            by_dtype[dtype] = by_dtype.get(dtype, 0) + count * width
    return max(by_dtype, key=by_dtype.__getitem__).lower()


# --------------------------------------------------------------------------- templates


def test_merge_guide_name_from_a_template(qwen: SyntheticCheckpoint, tmp_path: Path) -> None:
    """The README's example: `-o '{slug}_v{date}.safetensors'`, date fixed by SOURCE_DATE_EPOCH."""
    result = run_cli("merge", qwen.folder, "-o", "{slug}_v{date}.safetensors", cwd=tmp_path, env=DEC_1_2026)
    assert result.exit_code == 0, result.stderr
    written = tmp_path / "qwen2_5_7b_instruct_v20261201.safetensors"
    assert written.is_file()
    assert "qwen2_5_7b_instruct_v20261201.safetensors" in result.stdout
    assert "{" not in result.stdout
    plain = tmp_path / "plain.safetensors"
    shardkit.merge(qwen.folder, plain)
    assert written.read_bytes() == plain.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Qwen2.5-7B-Instruct", "plain.safetensors", written.name]


def test_date_is_today_in_utc_without_source_date_epoch(qwen: SyntheticCheckpoint, tmp_path: Path) -> None:
    before = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d")
    result = run_cli("merge", qwen.folder, "-o", tmp_path / "{date}.safetensors", "--json")
    after = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d")
    assert result.exit_code == 0, result.stderr
    output = Path(json.loads(result.stdout)["output"])
    assert output.name in (f"{before}.safetensors", f"{after}.safetensors")
    assert output.is_file()


def test_name_and_dtype_placeholders(qwen: SyntheticCheckpoint, tmp_path: Path) -> None:
    result = run_cli("merge", qwen.folder, "-o", tmp_path / "out" / "{name}-{dtype}", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    folder = Path(report["output"])
    merged = folder / "model.safetensors"
    assert folder.name == f"Qwen2.5-7B-Instruct-{_dominant_dtype_by_reference(merged)}"
    assert folder.name == "Qwen2.5-7B-Instruct-bf16"
    assert report["files"][0]["path"] == str(merged)


def test_dtype_placeholder_names_the_converted_output(qwen: SyntheticCheckpoint, tmp_path: Path) -> None:
    result = run_cli("merge", qwen.folder, "-o", tmp_path / "{slug}-{dtype}.safetensors", "--dtype", "fp32")
    assert result.exit_code == 0, result.stderr
    written = tmp_path / "qwen2_5_7b_instruct-f32.safetensors"
    assert _dominant_dtype_by_reference(written) == "f32"


def test_split_takes_a_template_too(qwen: SyntheticCheckpoint, tmp_path: Path) -> None:
    result = run_cli("split", qwen.folder, "-o", tmp_path / "{slug}-{dtype}-500kb", "-s", "500KB")
    assert result.exit_code == 0, result.stderr
    out = tmp_path / "qwen2_5_7b_instruct-bf16-500kb"
    assert (out / "model.safetensors.index.json").is_file()
    assert str(out) in result.stdout


def test_template_in_the_python_api(qwen: SyntheticCheckpoint, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", DEC_1_2026["SOURCE_DATE_EPOCH"])
    report = shardkit.merge(qwen.folder, tmp_path / "{slug}_v{date}.safetensors")
    assert report.output == str(tmp_path / "qwen2_5_7b_instruct_v20261201.safetensors")
    assert Path(report.output).is_file()
    with pytest.raises(BadInputError, match=r"unknown placeholder \{version\}"):
        shardkit.merge(qwen.folder, tmp_path / "{version}.safetensors")


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("{slgu}_v1.safetensors", "unknown placeholder {slgu}; the known ones are {name}, {slug}, {date}, {dtype}"),
        ("{date:%Y}.safetensors", "placeholder {date} takes no format or conversion"),
        ("{slug.safetensors", "not a valid name template"),
    ],
)
def test_bad_template_is_a_one_line_error(
    qwen: SyntheticCheckpoint, tmp_path: Path, template: str, message: str
) -> None:
    before = snapshot(qwen.folder)
    out = tmp_path / "out"
    out.mkdir()
    for command in ("merge", "split"):
        result = run_cli(command, qwen.folder, "-o", out / template)
        assert_clean_failure(result, 2, message)
    assert list(out.iterdir()) == []
    assert temporaries(tmp_path) == []
    assert snapshot(qwen.folder) == before


def test_literal_braces_are_doubled(qwen: SyntheticCheckpoint, tmp_path: Path) -> None:
    report = shardkit.merge(qwen.folder, tmp_path / "{{v2}}-{slug}.safetensors")
    assert Path(report.output).name == "{v2}-qwen2_5_7b_instruct.safetensors"


def test_name_rules() -> None:
    assert slug("Qwen2.5-7B-Instruct") == "qwen2_5_7b_instruct"
    assert slug("--Meta Llama 3.1 (8B)--") == "meta_llama_3_1_8b"
    assert source_name("/models/Qwen2.5-7B-Instruct/") == "Qwen2.5-7B-Instruct"
    assert source_name("/models/Qwen2.5-7B-Instruct/model.safetensors.index.json") == "Qwen2.5-7B-Instruct"
    assert source_name("/models/Qwen2.5-7B-Instruct/model-00001-of-00004.safetensors") == "Qwen2.5-7B-Instruct"
    assert source_name("/models/Qwen2.5-7B-Instruct/model.safetensors") == "Qwen2.5-7B-Instruct"
    assert source_name("/downloads/mistral-7b-v0.3.safetensors") == "mistral-7b-v0.3"
    assert source_name("hf://Qwen/Qwen2.5-0.5B@main") == "Qwen2.5-0.5B"
    assert source_name("s3://models/llama/Llama-3.1-8B/") == "Llama-3.1-8B"


def test_dominant_dtype_counts_bytes_not_tensors() -> None:
    assert dominant_dtype([("F32", 4)] * 10 + [("BF16", 200)]) == "bf16"


# --------------------------------------------------------------------------- output paths


def test_missing_parent_folders_are_created(qwen: SyntheticCheckpoint, tmp_path: Path) -> None:
    file_out = tmp_path / "a" / "b" / "merged.safetensors"
    assert run_cli("merge", qwen.folder, "-o", file_out).exit_code == 0
    assert file_out.is_file()
    folder_out = tmp_path / "c" / "d" / "merged"
    assert run_cli("merge", qwen.folder, "-o", folder_out).exit_code == 0
    assert (folder_out / "model.safetensors").is_file() and (folder_out / "config.json").is_file()
    split_out = tmp_path / "e" / "f" / "sharded"
    assert run_cli("split", qwen.folder, "-o", split_out, "-s", "500KB").exit_code == 0
    assert (split_out / "model.safetensors.index.json").is_file()


def test_created_parents_are_removed_when_the_run_fails(qwen: SyntheticCheckpoint, tmp_path: Path) -> None:
    """A failure after the parents were made (here: a refused copy method) leaves none of them."""
    before = snapshot(qwen.folder)
    for command in ("merge", "split"):
        result = run_cli(command, qwen.folder, "-o", tmp_path / "new" / "deeper" / "out",
                         env={"SHARDKIT_COPY_METHOD": "bogus"})
        assert_clean_failure(result, 2, "SHARDKIT_COPY_METHOD='bogus'")
        assert not (tmp_path / "new").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Qwen2.5-7B-Instruct"]
    assert snapshot(qwen.folder) == before


def test_dry_run_creates_no_parent(qwen: SyntheticCheckpoint, tmp_path: Path) -> None:
    result = run_cli("merge", qwen.folder, "-o", tmp_path / "new" / "out.safetensors", "--dry-run")
    assert result.exit_code == 0, result.stderr
    assert not (tmp_path / "new").exists()


def test_parent_that_is_a_file_is_refused(qwen: SyntheticCheckpoint, tmp_path: Path) -> None:
    (tmp_path / "taken").write_text("a file\n")
    result = run_cli("merge", qwen.folder, "-o", tmp_path / "taken" / "sub" / "out.safetensors")
    assert result.exit_code == 2 and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and "taken" in result.stderr, result.stderr
    assert (tmp_path / "taken").read_text() == "a file\n"


@pytest.mark.parametrize("name", ["out.bin", "model.pt", "model.pth", "model.ckpt", "model.gguf", "tf_model.h5",
                                  "flax_model.msgpack", "model.onnx", "OUT.BIN"])
def test_foreign_weight_suffix_is_refused(qwen: SyntheticCheckpoint, tmp_path: Path, name: str) -> None:
    before = snapshot(qwen.folder)
    suffix = "." + name.rsplit(".", 1)[1].lower()
    for command in ("merge", "split"):
        result = run_cli(command, qwen.folder, "-o", tmp_path / name)
        assert_clean_failure(result, 2, f"shardkit writes safetensors, not {suffix}")
        assert not (tmp_path / name).exists()
    assert temporaries(tmp_path) == []
    assert snapshot(qwen.folder) == before


# --------------------------------------------------------------------------- nested folders


def test_a_subfolder_of_the_checkpoint_folder_is_left_alone(qwen: SyntheticCheckpoint, tmp_path: Path) -> None:
    """An earlier split output inside the folder: neither its config nor its shards are taken."""
    assert run_cli("split", qwen.folder, "-o", tmp_path / "resharded", "-s", "500KB").exit_code == 0
    shutil.move(tmp_path / "resharded", qwen.folder / "resharded")
    (qwen.folder / "original").mkdir()
    (qwen.folder / "original" / "params.json").write_text("{}\n")
    top_level = sorted(
        p.name for p in qwen.folder.iterdir()
        if p.is_file() and not p.name.endswith(".safetensors") and ".index." not in p.name
    )
    before = snapshot(qwen.folder)

    merged = tmp_path / "merged"
    result = run_cli("merge", qwen.folder, "-o", merged, "--json")
    assert result.exit_code == 0, result.stderr
    written = sorted(p.relative_to(merged).as_posix() for p in merged.rglob("*"))
    assert written == sorted([*top_level, "model.safetensors"])
    assert json.loads(result.stdout)["copied_files"] == top_level

    split = tmp_path / "split"
    assert run_cli("split", qwen.folder, "-o", split, "-s", "100GB").exit_code == 0
    assert not (split / "resharded").exists() and not (split / "original").exists()
    assert snapshot(qwen.folder) == before


def test_a_parent_another_process_made_meanwhile_is_not_removed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """`mkdir` loses a race: the folder is someone else's, and stays when this run fails."""
    from shardkit.plan.output_path import parents_created

    theirs = tmp_path / "shared"
    real_mkdir = Path.mkdir

    def mkdir_after_them(self: Path, *args: object, **kwargs: object) -> None:
        if self == theirs:
            real_mkdir(self)  # the other process wins
        real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir_after_them)
    with pytest.raises(BadInputError), parents_created(theirs / "mine" / "out.safetensors"):
        assert (theirs / "mine").is_dir()
        raise BadInputError("the run fails")
    assert theirs.is_dir() and not (theirs / "mine").exists()


def test_name_of_a_url_ending_in_dot_dot_is_refused(qwen: SyntheticCheckpoint, tmp_path: Path) -> None:
    """`http://host/models/x/../model.safetensors.index.json`: `{name}` would be `..`,
    and `out/{name}/model.safetensors` would be written beside `out/`, not in it."""
    from web_server import WebServer

    with WebServer() as web:
        web.put_folder("/models/x/..", qwen.folder)
        url = web.url("/models/x/../model.safetensors.index.json")
        for command in ("merge", "split"):
            result = run_cli(command, url, tmp_path / "out" / "{name}" / "model.safetensors")
            assert_clean_failure(result, 2, "{name} of source http://")
            assert "is '..', not a folder name" in result.stderr
            assert sorted(p.name for p in tmp_path.iterdir()) == ["Qwen2.5-7B-Instruct"]
    assert temporaries(tmp_path) == []
