"""Diffusers pipelines as a whole: every command on a pipeline saved by diffusers itself,
outputs loaded back with diffusers' `from_pretrained`."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("diffusers")
torch = pytest.importorskip("torch")

from conftest import assert_clean_failure, run_cli, snapshot, temporaries  # noqa: E402
from diffusers_pipelines import copy_pipeline, save_pipeline  # noqa: E402

pytestmark = pytest.mark.hf

INDEX = "diffusion_pytorch_model.safetensors.index.json"
LABELS = ["text_encoder", "text_encoder (fp16)", "unet", "unet (fp16)", "vae", "vae (fp16)"]


@pytest.fixture(scope="session")
def saved_pipeline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_pipeline(tmp_path_factory.mktemp("diffusers") / "tiny-sd")


@pytest.fixture
def pipe(saved_pipeline: Path, tmp_path: Path) -> Path:
    return copy_pipeline(saved_pipeline, tmp_path / "tiny-sd")


def _files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def _state_dicts(folder: Path, variant: str | None = None) -> dict[str, dict[str, torch.Tensor]]:
    from diffusers import StableDiffusionPipeline

    loaded = StableDiffusionPipeline.from_pretrained(folder, variant=variant, safety_checker=None)
    return {name: getattr(loaded, name).state_dict() for name in ("unet", "vae", "text_encoder")}


def _assert_same_weights(a: Path, b: Path, variant: str | None) -> None:
    left, right = _state_dicts(a, variant), _state_dicts(b, variant)
    for component in left:
        assert left[component].keys() == right[component].keys(), component
        for name, tensor in left[component].items():
            assert tensor.dtype == right[component][name].dtype
            assert torch.equal(tensor, right[component][name]), (component, name)


def _flip_data_byte(file: Path) -> None:
    """Change one byte of tensor data (the last one), keeping the header valid."""
    data = bytearray(file.read_bytes())
    data[-1] ^= 0xFF
    file.write_bytes(bytes(data))


# --------------------------------------------------------------------------- reading


def test_saved_layout_is_what_diffusers_writes(pipe: Path) -> None:
    """The fixture itself: sharded components with an index, fp16 variants beside them."""
    files = _files(pipe)
    assert "unet/diffusion_pytorch_model-00001-of-00006.safetensors" in files
    assert "unet/diffusion_pytorch_model.safetensors.index.json" in files
    assert "unet/diffusion_pytorch_model.safetensors.index.fp16.json" in files
    assert "vae/diffusion_pytorch_model.fp16.safetensors" in files
    assert "text_encoder/model.fp16.safetensors" in files


def test_inspect_gives_a_row_per_component(pipe: Path) -> None:
    result = run_cli("inspect", pipe)
    assert result.exit_code == 0, result.stderr
    assert result.stderr == ""
    rows = [line.split("  ")[0].strip() for line in result.stdout.splitlines()[1:7]]
    assert rows == LABELS
    report = json.loads(run_cli("inspect", pipe, "--json").stdout)
    assert [(c["component"], c["variant"]) for c in report["components"]] == [
        ("text_encoder", None), ("text_encoder", "fp16"), ("unet", None), ("unet", "fp16"), ("vae", None),
        ("vae", "fp16"),
    ]
    unet = report["components"][2]
    assert unet["files"] == 6
    assert unet["report"]["index"].endswith("unet/diffusion_pytorch_model.safetensors.index.json")
    fp16 = report["components"][3]["report"]
    assert fp16["parameters_by_dtype"] == {"F16": unet["parameters"]}
    assert "model_index.json" in report["copied_files"] and "scheduler/scheduler_config.json" in report["copied_files"]

    result = run_cli("inspect", pipe, "--tensors", "--filter", "final_layer_norm.*")
    assert result.exit_code == 0 and result.stderr == "", result.stderr
    assert "text_encoder (fp16): filter 'final_layer_norm.*': 2 of 36 tensors" in result.stdout
    assert "vae:" not in result.stdout  # nothing matched there: no section, no warning
    assert result.stdout.count("final_layer_norm.weight  F16") == 1


def test_verify_checks_every_component_and_every_manifest_line(pipe: Path, tmp_path: Path) -> None:
    result = run_cli("verify", pipe)
    assert result.exit_code == 0, result.stdout + result.stderr
    assert result.stdout.count(" OK ") == 6

    sums = tmp_path / "SHA256SUMS"
    assert run_cli("checksum", pipe, "-o", sums).exit_code == 0
    assert run_cli("verify", pipe, "--checksums", sums).exit_code == 0

    _flip_data_byte(pipe / "vae" / "diffusion_pytorch_model.fp16.safetensors")
    config = json.loads((pipe / "model_index.json").read_text())
    (pipe / "model_index.json").write_text(json.dumps({**config, "_diffusers_version": "0.0.1"}))
    result = run_cli("verify", pipe, "--checksums", sums)
    assert result.exit_code == 1, result.stdout + result.stderr
    assert "vae (fp16)           FAILED" in result.stdout
    assert "vae (fp16): ✗ checksums: " in result.stdout and "diffusion_pytorch_model.fp16.safetensors" in result.stdout
    assert f"✗ {pipe / 'model_index.json'}: SHA-256 is" in result.stdout
    report = json.loads(run_cli("verify", pipe, "--checksums", sums, "--json").stdout)
    assert report["ok"] is False
    assert [c["ok"] for c in report["components"]] == [True, True, True, True, True, False]


def test_checksum_covers_every_file_a_load_reads(pipe: Path, tmp_path: Path) -> None:
    sums = tmp_path / "SHA256SUMS"
    result = run_cli("checksum", pipe, "-o", sums)
    assert result.exit_code == 0, result.stderr
    listed = [line.split("  ", 1)[1] for line in sums.read_text().splitlines()]
    assert listed == _files(pipe)
    checked = subprocess.run(["sha256sum", "-c", str(sums)], cwd=pipe, capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.count(": OK") == len(listed)


def test_tensor_manifest_of_a_pipeline_says_to_name_a_component(pipe: Path, tmp_path: Path) -> None:
    before = snapshot(pipe)
    result = run_cli("checksum", pipe, "--tensors", "-o", tmp_path / "tensors.json")
    assert_clean_failure(result, 2, "run it on a component")
    assert not (tmp_path / "tensors.json").exists()
    assert snapshot(pipe) == before


def test_diff_pairs_components(pipe: Path, tmp_path: Path) -> None:
    merged = tmp_path / "merged"
    assert run_cli("merge", pipe, "-o", merged).exit_code == 0
    result = run_cli("diff", pipe, merged)
    assert result.exit_code == 0, result.stdout + result.stderr
    assert result.stdout.count("identical") == 7  # six rows and the verdict

    _flip_data_byte(merged / "unet" / "diffusion_pytorch_model.fp16.safetensors")
    (merged / "scheduler" / "scheduler_config.json").write_text("{}\n")
    result = run_cli("diff", pipe, merged)
    assert result.exit_code == 1, result.stdout + result.stderr
    assert "unet (fp16)          different" in result.stdout
    assert "unet (fp16): ≠ " in result.stdout and "data differs" in result.stdout
    assert "✗ scheduler/scheduler_config.json: differs" in result.stdout

    result = run_cli("diff", pipe, pipe / "unet")
    assert_clean_failure(result, 2, "is not a diffusers pipeline (no model_index.json), but the other side is one")


# --------------------------------------------------------------------------- writing


def test_merge_writes_each_component_under_its_loader_name(pipe: Path, tmp_path: Path) -> None:
    before = snapshot(pipe)
    out = tmp_path / "merged"
    result = run_cli("merge", pipe, "-o", out, "--sha256", "--verify")
    assert result.exit_code == 0, result.stderr
    assert _files(out) == [
        "SHA256SUMS", "model_index.json", "scheduler/scheduler_config.json",
        "text_encoder/config.json", "text_encoder/model.fp16.safetensors", "text_encoder/model.safetensors",
        "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json",
        "unet/config.json", "unet/diffusion_pytorch_model.fp16.safetensors", "unet/diffusion_pytorch_model.safetensors",
        "vae/config.json", "vae/diffusion_pytorch_model.fp16.safetensors", "vae/diffusion_pytorch_model.safetensors",
    ]
    for name in ("model_index.json", "scheduler/scheduler_config.json", "unet/config.json", "tokenizer/tokenizer.json"):
        assert (out / name).read_bytes() == (pipe / name).read_bytes()
    checked = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=out, capture_output=True, text=True)
    assert checked.returncode == 0 and checked.stdout.count(": OK") == 6, checked.stdout
    assert "unet (fp16)" in result.stdout
    assert str(out / "unet" / "diffusion_pytorch_model.fp16.safetensors") in result.stdout
    assert snapshot(pipe) == before
    assert run_cli("verify", out, "--against", pipe).exit_code == 0
    _assert_same_weights(pipe, out, None)
    _assert_same_weights(pipe, out, "fp16")


def test_split_reshards_each_component_with_its_own_names(pipe: Path, tmp_path: Path) -> None:
    out = tmp_path / "resharded"
    result = run_cli("split", pipe, "-o", out, "-s", "30KB", "--json")
    assert result.exit_code == 0, result.stderr
    files = _files(out)
    assert "unet/diffusion_pytorch_model-00001-of-00009.safetensors" in files
    assert "unet/diffusion_pytorch_model.fp16-00001-of-00004.safetensors" in files
    assert "unet/diffusion_pytorch_model.safetensors.index.fp16.json" in files
    assert "vae/diffusion_pytorch_model.fp16.safetensors" in files  # fits in one shard: no index
    assert not any(name.startswith(".") or "/." in name for name in files)
    index = json.loads((out / "unet" / "diffusion_pytorch_model.safetensors.index.fp16.json").read_text())
    assert set(index["weight_map"].values()) == {f"diffusion_pytorch_model.fp16-0000{i}-of-00004.safetensors"
                                                 for i in range(1, 5)}
    report = json.loads(result.stdout)
    assert [c["path"] for c in report["components"]][:3] == [
        str(out / "text_encoder"), str(out / "text_encoder"), str(out / "unet")
    ]
    _assert_same_weights(pipe, out, None)
    _assert_same_weights(pipe, out, "fp16")


def test_sdxl_style_second_text_encoder(pipe: Path, tmp_path: Path) -> None:
    """Components are whatever model_index.json names: text_encoder_2 and tokenizer_2 too."""
    import shutil

    shutil.copytree(pipe / "text_encoder", pipe / "text_encoder_2")
    shutil.copytree(pipe / "tokenizer", pipe / "tokenizer_2")
    config = json.loads((pipe / "model_index.json").read_text())
    config.update(text_encoder_2=["transformers", "CLIPTextModel"], tokenizer_2=["transformers", "CLIPTokenizer"])
    (pipe / "model_index.json").write_text(json.dumps(config, indent=2))
    out = tmp_path / "merged"
    report = json.loads(run_cli("merge", pipe, "-o", out, "--json").stdout)
    assert [c["component"] for c in report["components"]].count("text_encoder_2") == 2
    assert (out / "text_encoder_2" / "model.safetensors").is_file()
    assert (out / "tokenizer_2" / "tokenizer_config.json").is_file()


def test_dry_run_writes_nothing(pipe: Path, tmp_path: Path) -> None:
    result = run_cli("merge", pipe, "-o", tmp_path / "new" / "merged", "--dry-run", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["dry_run"] is True and len(report["components"]) == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-sd"]


def test_template_names_the_pipeline(pipe: Path, tmp_path: Path) -> None:
    result = run_cli("merge", pipe, "-o", tmp_path / "{slug}-{dtype}-merged", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["output"] == str(tmp_path / "tiny_sd-f32-merged")


def test_a_component_can_still_be_named(pipe: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    out = tmp_path / "unet.safetensors"
    result = run_cli("merge", pipe / "unet", "-o", out)
    assert result.exit_code == 0, result.stderr
    assert "holds the default weights and the variant(s) fp16" in result.stderr
    from diffusers import UNet2DConditionModel

    reference = UNet2DConditionModel.from_pretrained(pipe / "unet").state_dict()
    merged = load_file(out)
    assert merged.keys() == reference.keys()
    assert all(torch.equal(merged[k], reference[k]) for k in merged)

    fp16 = tmp_path / "unet-fp16.safetensors"
    index = pipe / "unet" / "diffusion_pytorch_model.safetensors.index.fp16.json"
    assert run_cli("merge", index, "-o", fp16).exit_code == 0
    assert {t.dtype for t in load_file(fp16).values()} == {torch.float16}


# --------------------------------------------------------------------------- refusals


def _assert_untouched(pipe: Path, before: dict[str, str], tmp_path: Path, out: Path) -> None:
    assert snapshot(pipe) == before
    assert temporaries(tmp_path) == []
    assert not out.exists()


def test_single_file_output_is_refused(pipe: Path, tmp_path: Path) -> None:
    before = snapshot(pipe)
    out = tmp_path / "pipe.safetensors"
    result = run_cli("merge", pipe, "-o", out)
    assert_clean_failure(result, 2, "a diffusers pipeline is written as a folder with one weight file per component")
    _assert_untouched(pipe, before, tmp_path, out)
    result = run_cli("split", pipe, "-o", tmp_path / "split", "--prefix", "diffusion_pytorch_model")
    assert_clean_failure(result, 2, "a diffusers pipeline's components keep their own names and dtypes; --prefix")
    _assert_untouched(pipe, before, tmp_path, tmp_path / "split")
    result = run_cli("merge", pipe, "-o", tmp_path / "merged", "--dtype", "bf16")
    assert_clean_failure(result, 2, "--dtype applies to one component")
    _assert_untouched(pipe, before, tmp_path, tmp_path / "merged")


def test_a_broken_component_leaves_no_output(pipe: Path, tmp_path: Path) -> None:
    """The first components are fine, the last one is truncated: nothing at all is written."""
    shard = pipe / "vae" / "diffusion_pytorch_model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])
    before = snapshot(pipe)
    for command in ("merge", "split"):
        out = tmp_path / "new" / command
        result = run_cli(command, pipe, "-o", out)
        assert result.exit_code == 2 and "Traceback" not in result.stderr, result.stderr
        assert result.stderr.count("\n") == 1 and "diffusion_pytorch_model-00002-of-00002" in result.stderr
        _assert_untouched(pipe, before, tmp_path, tmp_path / "new")


def test_a_failure_while_writing_removes_the_staged_pipeline(pipe: Path, tmp_path: Path) -> None:
    """The staging folder already exists when the first component's write is refused."""
    before = snapshot(pipe)
    for command in ("merge", "split"):
        result = run_cli(command, pipe, "-o", tmp_path / "new" / command, env={"SHARDKIT_COPY_METHOD": "bogus"})
        assert_clean_failure(result, 2, "SHARDKIT_COPY_METHOD='bogus'")
        _assert_untouched(pipe, before, tmp_path, tmp_path / "new")


def test_existing_output_needs_force(pipe: Path, tmp_path: Path) -> None:
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("mine\n")
    result = run_cli("merge", pipe, "-o", out)
    assert_clean_failure(result, 2, "already exists; pass --force to replace it")
    assert _files(out) == ["keep.txt"] and temporaries(tmp_path) == []
    # --force replaces only an earlier output: the user's own file is named and kept
    result = run_cli("merge", pipe, "-o", out, "--force")
    assert_clean_failure(result, 2, "--force replaces only an earlier output")
    assert "the folder also holds keep.txt; move those away" in result.stderr
    assert _files(out) == ["keep.txt"] and temporaries(tmp_path) == []
    (out / "keep.txt").unlink()
    assert run_cli("merge", pipe, "-o", out).exit_code == 0
    assert run_cli("merge", pipe, "-o", out, "--force").exit_code == 0  # an earlier output: replaced
    assert "unet/diffusion_pytorch_model.safetensors" in _files(out)


@pytest.mark.parametrize("command", ["merge", "split"])
def test_force_never_deletes_a_users_files_in_the_output(pipe: Path, tmp_path: Path, command: str) -> None:
    """--force replaces an earlier pipeline output; notes, `.git/` or a component this
    pipeline lacks are named and the run refused, the folder left as it was."""
    out = tmp_path / "merged"
    assert run_cli("merge", pipe, "-o", out).exit_code == 0
    mine = {"notes.txt": "mine\n", ".git/config": "[core]\n", "unet/lora.txt": "rank 4\n",
            "controlnet/config.json": "{}"}
    for name, text in mine.items():
        (out / name).parent.mkdir(exist_ok=True)
        (out / name).write_text(text)
    before, source = snapshot(out), snapshot(pipe)
    result = run_cli(command, pipe, "-o", out, "--force")
    assert_clean_failure(result, 2, "--force replaces only an earlier output")
    assert all(name in result.stderr for name in (".git/", "controlnet/", "notes.txt", "unet/lora.txt")), result.stderr
    assert snapshot(out) == before and snapshot(pipe) == source and temporaries(tmp_path) == []


def test_output_inside_the_pipeline_is_refused(pipe: Path, tmp_path: Path) -> None:
    before = snapshot(pipe)
    result = run_cli("merge", pipe, "-o", pipe)
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.stderr
    assert snapshot(pipe) == before and temporaries(tmp_path) == []


@pytest.mark.parametrize("command", ["merge", "split"])
@pytest.mark.parametrize("inside", ["scheduler", "tokenizer", "new", "unet/new"])
def test_output_in_a_folder_of_the_pipeline_is_refused(pipe: Path, tmp_path: Path, command: str, inside: str) -> None:
    """The scheduler and tokenizer folders hold no shard, yet are sources: `-o
    pipe/scheduler --force` replaced the scheduler with the whole output. Also through
    an alias of the pipeline's folder."""
    alias = tmp_path / "alias"
    alias.symlink_to(pipe)
    before = snapshot(pipe)
    for out in (pipe / inside, alias / inside):
        result = run_cli(command, pipe, "-o", out, "--force")
        assert_clean_failure(result, 2, f"{out}: output lies inside the source folder {pipe}")
        assert snapshot(pipe) == before and temporaries(tmp_path) == []


def test_pickle_only_component_is_refused(pipe: Path, tmp_path: Path) -> None:
    for file in (pipe / "vae").glob("*.safetensors*"):
        file.unlink()
    (pipe / "vae" / "diffusion_pytorch_model.bin").write_bytes(b"not unpickled")
    before = snapshot(pipe)
    out = tmp_path / "merged"
    result = run_cli("merge", pipe, "-o", out)
    assert_clean_failure(result, 2, "component 'vae' holds diffusion_pytorch_model.bin and no .safetensors")
    _assert_untouched(pipe, before, tmp_path, out)


def test_component_folder_missing(pipe: Path, tmp_path: Path) -> None:
    config = json.loads((pipe / "model_index.json").read_text())
    config["transformer"] = ["diffusers", "SD3Transformer2DModel"]
    (pipe / "model_index.json").write_text(json.dumps(config))
    before = snapshot(pipe)
    for command in ("inspect", "verify"):
        result = run_cli(command, pipe)
        assert_clean_failure(result, 2, "names component 'transformer', but there is no transformer/ folder")
    out = tmp_path / "merged"
    assert_clean_failure(run_cli("merge", pipe, "-o", out), 2, "no transformer/ folder")
    _assert_untouched(pipe, before, tmp_path, out)


def test_stray_weight_file_in_a_component(pipe: Path, tmp_path: Path) -> None:
    stray = pipe / "unet" / "unet-ema.v2.safetensors"
    stray.write_bytes((pipe / "vae" / "diffusion_pytorch_model.fp16.safetensors").read_bytes())
    before = snapshot(pipe)
    out = tmp_path / "merged"
    assert_clean_failure(run_cli("merge", pipe, "-o", out), 2, "pass --allow-unindexed to ignore it")
    _assert_untouched(pipe, before, tmp_path, out)
    result = run_cli("merge", pipe, "-o", out, "--allow-unindexed")
    assert result.exit_code == 0 and "unet-ema.v2.safetensors" in result.stderr
    assert hashlib.sha256(stray.read_bytes()).hexdigest() == before["unet/unet-ema.v2.safetensors"]


@pytest.mark.parametrize("command", ["merge", "split"])
def test_force_keeps_a_file_added_to_the_old_output_while_the_run_wrote(
    pipe: Path, tmp_path: Path, command: str
) -> None:
    """--force checks the old output holds only what shardkit writes, then writes for
    as long as the model takes; a file a user (or a training run) puts in the old output
    meanwhile must make the commit refuse, not be deleted with the old folder."""
    import os
    import signal
    import sys

    from safetensors.torch import load_file, save_file

    from conftest import sigint_as_in_a_terminal

    # A 48 MB tensor in the unet's last shard: a run long enough to be caught writing.
    shard, index = pipe / "unet" / "diffusion_pytorch_model-00006-of-00006.safetensors", pipe / "unet" / INDEX
    save_file({**load_file(shard), "zz_padding": torch.ones(12 * 1024 * 1024)}, shard)
    weight_map = json.loads(index.read_text())
    weight_map["weight_map"]["zz_padding"] = shard.name
    weight_map["metadata"]["total_size"] += 48 * 1024 * 1024
    index.write_text(json.dumps(weight_map))
    out = tmp_path / "out"
    assert run_cli(command, pipe, "-o", out).exit_code == 0
    process = subprocess.Popen(
        [sys.executable, "-m", "shardkit", command, str(pipe), "-o", str(out), "--force"],
        stderr=subprocess.PIPE, text=True, preexec_fn=sigint_as_in_a_terminal,
    )
    while not any(name.startswith(".shardkit-tmp-out.") for name in os.listdir(tmp_path)):  # the run is writing
        assert process.poll() is None, process.stderr.read()  # type: ignore[union-attr]
    process.send_signal(signal.SIGSTOP)
    (out / "unet" / "optimizer.pt").write_bytes(b"the user's optimizer state")
    before = snapshot(out)
    process.send_signal(signal.SIGCONT)
    _, stderr = process.communicate(timeout=120)

    assert process.returncode == 2, stderr
    assert "--force replaces only an earlier output" in stderr and "unet/optimizer.pt" in stderr, stderr
    assert stderr.count("\n") == 1 and "Traceback" not in stderr
    assert snapshot(out) == before and temporaries(tmp_path) == []


@pytest.mark.parametrize("name", ["model_index.json", "scheduler/scheduler_config.json", "unet/config.json"])
def test_a_pipeline_manifest_never_replaces_a_file_a_load_reads(pipe: Path, name: str) -> None:
    before = snapshot(pipe)
    result = run_cli("checksum", pipe, "-o", pipe / name, "--force")
    assert_clean_failure(result, 2, f"{pipe / name}: output would overwrite the source ")
    assert snapshot(pipe) == before and temporaries(pipe) == []
