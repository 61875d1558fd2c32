"""`http(s)://` sources against a real web server on 127.0.0.1 (tests/web_server.py).

An honest server gives the bytes of a local run; a lying one (another range than asked,
200 instead of 206, a short body, a file replaced mid-run) fails the run in one line,
with nothing written, instead of copying wrong bytes with exit 0.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import assert_clean_failure, run_cli, snapshot, temporaries
from shardkit.synthetic import SyntheticCheckpoint, write_checkpoint
from web_server import WebServer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> SyntheticCheckpoint:
    return write_checkpoint(tmp_path_factory.mktemp("http") / "tiny", edge_tensors=True)


@pytest.fixture(scope="module")
def local_merge(tiny: SyntheticCheckpoint, tmp_path_factory: pytest.TempPathFactory) -> bytes:
    import shardkit

    out = tmp_path_factory.mktemp("http-local") / "merged.safetensors"
    shardkit.merge(tiny.folder, out)
    return out.read_bytes()


@pytest.fixture
def web(tiny: SyntheticCheckpoint) -> Iterator[WebServer]:
    with WebServer() as server:
        server.put_folder("/models/tiny", tiny.folder)
        yield server


def index_url(web: WebServer) -> str:
    return web.url("/models/tiny/model.safetensors.index.json")


def test_merge_of_an_index_url_reads_the_shards_beside_it(web: WebServer, tiny, local_merge: bytes, tmp_path: Path):
    out = tmp_path / "merged.safetensors"
    inspected = run_cli("inspect", index_url(web), "--json")
    merged = run_cli("merge", index_url(web), "-o", out)
    split = run_cli("split", index_url(web), "-o", tmp_path / "split", "--max-shard-size", "100kB")

    assert inspected.exit_code == 0, inspected.stderr
    assert json.loads(inspected.stdout)["tensors"] == len(tiny.tensors)
    assert merged.exit_code == 0, merged.stderr
    assert out.read_bytes() == local_merge
    assert split.exit_code == 0, split.stderr
    local_split = run_cli("split", tiny.folder, "-o", tmp_path / "local-split", "--max-shard-size", "100kB")
    assert local_split.exit_code == 0, local_split.stderr
    for shard in sorted((tmp_path / "local-split").glob("*.safetensors*")):
        assert (tmp_path / "split" / shard.name).read_bytes() == shard.read_bytes(), shard.name
    assert {m for m, _, _ in web.requests} == {"GET"}


def test_every_data_read_is_conditional_on_the_version_first_seen(web: WebServer, tmp_path: Path) -> None:
    assert run_cli("merge", index_url(web), "-o", tmp_path / "m.safetensors").exit_code == 0
    shards = [(p, h) for _, p, h in web.requests if p.endswith("-of-00004.safetensors")]
    data_reads = [(p, h) for p, h in shards if not h["Range"].startswith("bytes=0-")]
    assert len({p for p, _ in data_reads}) == 4
    assert [h.get("If-Match") for p, h in data_reads] == [web.files[p].etag for p, _ in data_reads]


LIES = {
    "ignore-range": (1, "the server answered HTTP 200 and the whole file instead of 206 Partial Content"),
    "shifted-range": (1, "the server answered Content-Range: bytes "),
    "short-body": (1, "bytes at offset"),
    "changed": (1, "changed while being read (its ETag is now"),
    "changed-ignoring-conditions": (1, "changed while being read (its ETag is now"),
}


@pytest.mark.parametrize("fault", sorted(LIES))
def test_a_lying_server_fails_the_run_and_nothing_is_written(
    web: WebServer, tiny: SyntheticCheckpoint, tmp_path: Path, fault: str
) -> None:
    before = snapshot(tiny.folder)
    served = {path: file.data for path, file in web.files.items()}
    web.fault = fault
    out = tmp_path / "out" / "merged.safetensors"
    out.parent.mkdir()

    result = run_cli("merge", index_url(web), "-o", out)

    code, message = LIES[fault]
    assert_clean_failure(result, code, message)
    assert "/models/tiny/model-0000" in result.stderr  # names the shard
    assert list(out.parent.iterdir()) == [] and temporaries(tmp_path) == []
    assert snapshot(tiny.folder) == before
    assert {m for m, _, _ in web.requests} == {"GET"}  # nothing but reads reached the server
    if not fault.startswith("changed"):
        assert {path: file.data for path, file in web.files.items()} == served


def test_a_file_replaced_on_a_server_without_etags_is_caught_by_if_range(tiny, tmp_path: Path) -> None:
    with WebServer() as web:
        web.put_folder("/models/tiny", tiny.folder, etag=False)
        web.fault = "changed"
        out = tmp_path / "merged.safetensors"

        result = run_cli("merge", index_url(web), "-o", out)

        assert_clean_failure(result, 1, "changed while being read (its Last-Modified is now")
        assert not out.exists() and temporaries(tmp_path) == []
        assert any("If-Range" in h for _, _, h in web.requests)


def test_a_wrong_total_in_the_first_answer_is_refused(tiny, tmp_path: Path) -> None:
    """The header read checks its Content-Range too: a shard claiming another size than
    its bytes is refused before anything is planned."""
    with WebServer() as web:
        web.put_folder("/models/tiny", tiny.folder)
        original = web.serve_file

        def lying_total(handler, path, *, head, extra=None):  # noqa: ANN001, ANN202
            if path.endswith("00001-of-00004.safetensors"):
                data = web.files[path].data
                handler.send(206, {"Content-Range": f"bytes 0-{len(data) - 1}/{len(data) + 4096}"}, data)
                return
            original(handler, path, head=head, extra=extra)

        web.serve_file = lying_total  # type: ignore[method-assign]
        result = run_cli("inspect", index_url(web))

    answered = "model-00001-of-00004.safetensors: asked for bytes=0-0, the server answered Content-Range: bytes 0-"
    assert_clean_failure(result, 1, answered)


def test_shard_names_that_are_not_url_safe_are_quoted(tiny: SyntheticCheckpoint, local_merge: bytes, tmp_path: Path):
    """The index names files; a space, `#`, `?` or `%` in a name must not become URL syntax."""
    folder = tmp_path / "odd names"
    folder.mkdir()
    renames = {name: f"part #{i} ?%20 {name}" for i, name in enumerate(tiny.shard_files)}
    for old, new in renames.items():
        (folder / new).write_bytes((tiny.folder / old).read_bytes())
    index = json.loads((tiny.folder / "model.safetensors.index.json").read_text())
    index["weight_map"] = {tensor: renames[shard] for tensor, shard in index["weight_map"].items()}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    out = tmp_path / "merged.safetensors"
    with WebServer() as web:
        web.put_folder("/models/odd", folder)

        result = run_cli("merge", web.url("/models/odd/model.safetensors.index.json"), "-o", out)

    assert result.exit_code == 0, result.stderr
    assert out.read_bytes() == local_merge


@pytest.mark.parametrize("port", ["80x", "99999"])
def test_a_url_with_a_bad_port_is_a_one_line_error(port: str, tmp_path: Path) -> None:
    for command in ("inspect", "merge"):
        args = ("-o", tmp_path / "out.safetensors") if command == "merge" else ()
        result = run_cli(command, f"http://127.0.0.1:{port}/models/model.safetensors", *args)
        assert_clean_failure(result, 2, f"the port in '127.0.0.1:{port}' is not a number from 0 to 65535")
    assert list(tmp_path.iterdir()) == []
