"""The local plan, proven by replaying it on bytes in memory.

A planned file is a sequence of steps (literal bytes, copies of source ranges,
transforms of tensors). `fill` is the one function every executor uses to make bytes
from them, so replaying plans here with `fill`, over any tiling of the file, against
an independent reading of the steps (and against what the CLI wrote to disk), proves
the bytes every executor writes.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import shardkit
from conftest import run_cli
from plan_replay import memory_read, planned_bytes, replay
from shardkit.checkpoint.shards import open_checkpoint
from shardkit.plan.files import Copy, Literal, PlannedFile, check_planned_file, plan_merge, plan_split
from shardkit.plan.fill import fill, ordered_chunks
from shardkit.plan.multipart import CopyPart, PartLimits, UploadPart, check_object_plan, plan_object

SMALL = PartLimits(min_part=100, max_part=1000, max_parts=10_000, chain_limit=300, upload_part=400)


def source_bytes(plan) -> dict[str, bytes]:
    return {s.path: Path(s.path).read_bytes() for s in plan.sources}


def tiled(planned: PlannedFile, sources: dict[str, bytes], cuts: list[int]) -> bytes:
    """The file made by `fill` range by range, cut at `cuts`."""
    bounds = [0, *sorted(c for c in set(cuts) if 0 < c < planned.size), planned.size]
    out = bytearray(planned.size)
    for lo, hi in zip(bounds, bounds[1:]):
        fill(planned, lo, memoryview(out)[lo:hi], memory_read(sources))
    return bytes(out)


def test_a_merge_plan_replayed_in_any_tiling_is_what_the_cli_writes(checkpoint, tmp_path: Path) -> None:
    plan = plan_merge(open_checkpoint(checkpoint.folder), "model.safetensors")
    (planned,) = plan.files
    check_planned_file(planned)
    sources = source_bytes(plan)
    written = tmp_path / "merged.safetensors"
    assert run_cli("merge", checkpoint.folder, "-o", written).exit_code == 0
    expected = written.read_bytes()
    assert planned_bytes(planned, sources) == expected
    rng = random.Random(0)
    for _ in range(20):
        cuts = [rng.randrange(planned.size) for _ in range(rng.randrange(1, 40))]
        assert tiled(planned, sources, cuts) == expected


@pytest.mark.parametrize("target", ["fp16", "fp32"])
def test_a_conversion_made_in_pieces_of_any_read_size_is_what_the_cli_writes(checkpoint, tmp_path: Path, target):
    """The block writer converts L2-sized pieces (cast_read), remote reads keep larger
    ones: the bytes and the loss counts must not depend on it, even for pieces smaller
    than an element or cut across one."""
    from shardkit.plan.conversion import choose_dtypes

    opened = open_checkpoint(checkpoint.folder)
    plan = plan_merge(opened, "model.safetensors", dtype_for=choose_dtypes(opened, target))
    (planned,) = plan.files
    sources = source_bytes(plan)
    written = tmp_path / "converted.safetensors"
    assert run_cli("merge", checkpoint.folder, "-o", written, "--dtype", target).exit_code == 0
    expected = written.read_bytes()
    read = memory_read(sources)
    counted = []
    for cast_read in (4096, 1 << 18, 1 << 30):
        out = bytearray(planned.size)
        bounds = [0, *range(7, planned.size, 100_003), planned.size]
        stats: dict = {}
        for lo, hi in zip(bounds, bounds[1:]):
            for name, lost in fill(planned, lo, memoryview(out)[lo:hi], read, cast_read=cast_read).items():
                stats[name] = stats[name] + lost if name in stats else lost
        assert bytes(out) == expected, cast_read
        counted.append(stats)
    assert counted[0] and all(each == counted[0] for each in counted)
    # pieces of one element or less, in a window that starts and ends inside elements
    lo, hi = planned.header_size + 4097, planned.header_size + 9001
    for cast_read in (1, 3):
        window = bytearray(hi - lo)
        fill(planned, lo, memoryview(window), read, cast_read=cast_read)
        assert bytes(window) == expected[lo:hi]


def test_a_split_plan_tiles_every_shard_and_names_its_sources_and_writes(checkpoint, tmp_path: Path) -> None:
    plan = plan_split(open_checkpoint(checkpoint.folder), 300_000)
    assert len(plan.files) > 1
    shardkit.split(checkpoint.folder, tmp_path / "out", max_shard_size=300_000)
    sources = source_bytes(plan)
    for planned in plan.files:
        check_planned_file(planned)
        assert isinstance(planned.steps[0], Literal) and planned.steps[0].length == planned.header_size
        written = (tmp_path / "out" / planned.name).read_bytes()
        assert tiled(planned, sources, list(range(0, planned.size, 4093))) == written
    # weight files, then companions, then the index last: it never names a shard not there yet
    assert plan.writes[: len(plan.files)] == tuple(f.name for f in plan.files)
    assert plan.writes[-1] == plan.index_name
    seen = {s.path: s for s in plan.sources}
    for shard in open_checkpoint(checkpoint.folder).shards:
        stat = Path(shard.path).stat()
        assert seen[shard.path].identity() == {
            "size": stat.st_size, "device": stat.st_dev, "inode": stat.st_ino, "mtime_ns": stat.st_mtime_ns,
            "ctime_ns": stat.st_ctime_ns,
        }


def test_dry_run_json_prints_the_plan_itself(checkpoint, tmp_path: Path) -> None:
    result = run_cli("split", checkpoint.folder, "-o", tmp_path / "out", "-s", "300000", "--dry-run", "--json")
    assert result.exit_code == 0, result.stderr
    dumped = json.loads(result.stdout)["plan"]
    plan = plan_split(open_checkpoint(checkpoint.folder), 300_000)
    expected = json.loads(json.dumps(plan.to_dict()))  # planned here without the companion files
    assert {k: dumped[k] for k in ("sources", "files", "index_name", "index")} == {
        k: expected[k] for k in ("sources", "files", "index_name", "index")
    }
    assert {c["name"] for c in dumped["copies"]} >= {"config.json"}
    assert [f["name"] for f in dumped["files"]] == [f.name for f in plan.files]
    first = dumped["files"][0]["steps"]
    assert first[0]["kind"] == "literal" and {s["kind"] for s in first[1:]} == {"copy"}
    assert dumped["writes"][-1] == plan.index_name
    assert not (tmp_path / "out").exists()


@st.composite
def random_files(draw) -> tuple[PlannedFile, dict[str, bytes]]:
    """Any sequence of literal and copy steps (literals anywhere: headers, padding)."""
    rng = random.Random(draw(st.integers(0, 2**32 - 1)))
    sources = {f"/src/{i}": rng.randbytes(5000) for i in range(3)}
    steps, offset = [], 0
    for kind, length in draw(st.lists(st.tuples(st.sampled_from("lc"), st.integers(1, 1200)), min_size=1, max_size=20)):
        if kind == "l":
            steps.append(Literal(offset, rng.randbytes(length)))
        else:
            source = rng.choice(sorted(sources))
            steps.append(Copy(offset, length, source, rng.randrange(0, 5000 - length + 1)))
        offset += length
    return PlannedFile("f", tuple(steps), (), offset), sources


@settings(max_examples=200, deadline=None)
@given(made=random_files(), cuts=st.lists(st.integers(0, 30_000), max_size=12))
def test_fill_makes_any_range_of_any_plan(made, cuts: list[int]) -> None:
    planned, sources = made
    check_planned_file(planned)
    assert tiled(planned, sources, cuts) == planned_bytes(planned, sources)


@settings(max_examples=200, deadline=None)
@given(made=random_files())
def test_made_runs_anywhere_become_client_parts_and_copies_stay_server_side(made) -> None:
    """Literal steps in the middle stand for converted tensors: the store cannot copy them."""
    planned, sources = made
    plan = plan_object(planned, SMALL)
    check_object_plan(plan, SMALL)
    assert replay(plan, planned, sources, SMALL) == planned_bytes(planned, sources)
    literal = sum(s.length for s in planned.steps if isinstance(s, Literal))
    assert plan.uploaded_bytes >= literal  # every made byte goes through the client, once
    assert all(p.size <= SMALL.upload_part for _, parts in plan.uploads() for p in parts if isinstance(p, UploadPart))
    for _, parts in plan.uploads():
        for part in parts:
            if isinstance(part, CopyPart) and not part.span.source.startswith("staged-"):
                assert part.span.source in sources


def test_ordered_chunks_streams_the_file_in_order_in_bounded_pieces() -> None:
    rng = random.Random(5)
    sources = {"/a": rng.randbytes(50_000)}
    steps = [Literal(0, b"h" * 100), Copy(100, 40_000, "/a", 7), Literal(40_100, b"t" * 3)]
    planned = PlannedFile("f", tuple(steps), (), 40_103, 100)
    chunks = list(ordered_chunks(planned, memory_read(sources), chunk=4096, workers=3, max_buffered=3 * 4096))
    assert all(len(c) <= 4096 for c in chunks)
    assert b"".join(chunks) == planned_bytes(planned, sources)


@pytest.mark.parametrize(
    "broken, message",
    [
        (PlannedFile("f", (Literal(0, b"ab"), Copy(3, 4, "/a", 0)), (), 7), "starts at 3, expected 2"),
        (PlannedFile("f", (Literal(0, b"ab"),), (), 5), "steps end at 2"),
        (PlannedFile("f", (Literal(0, b""),), (), 0), "is empty"),
    ],
)
def test_plans_that_do_not_tile_their_file_are_refused(broken: PlannedFile, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_planned_file(broken)
