"""The server-side part planner, proven without a server.

Each plan is replayed on bytes in memory with S3's rules (part sizes, part count,
staged objects built before use): the object it assembles must be the planned file,
byte for byte, and the client must upload no more than the first part. The parts the
client makes are made as the executor makes them, by `fill` from the planned steps.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from plan_replay import planned_bytes, replay
from shardkit.checkpoint.shards import Checkpoint, SourceTensor
from shardkit.format.header import Header, TensorSpec, parse_header, serialize_header
from shardkit.plan.files import Copy, Literal, PlannedFile, group_into_shards, plan_merge, plan_split
from shardkit.plan.multipart import CopyPart, ObjectPlan, PartLimits, Span, UploadPart, check_object_plan, plan_object
from shardkit.synthetic import SHAPES, qwen2_tensors

MiB = 1024 * 1024
#: Tiny limits keep the replay cheap while exercising every rule.
SMALL = PartLimits(min_part=100, max_part=1000, max_parts=10_000, chain_limit=300)


def random_planned(rng: random.Random, lengths: list[int], header: int) -> tuple[PlannedFile, dict[str, bytes]]:
    sources = {f"s3://b/src-{i}": rng.randbytes(4000) for i in range(3)}
    steps, dest = [Literal(0, rng.randbytes(header))], header
    for length in lengths:
        source = rng.choice(sorted(sources))
        offset = rng.randrange(0, 4000 - length + 1)
        steps.append(Copy(dest, length, source, offset))
        dest += length
    planned = PlannedFile("model.safetensors", tuple(steps), (), dest, header)
    return planned, sources


@settings(max_examples=300, deadline=None)
@given(
    lengths=st.lists(st.one_of(st.integers(1, 99), st.integers(100, 2500)), max_size=25),
    header=st.integers(8, 250),
    seed=st.integers(0, 2**32 - 1),
)
def test_any_layout_assembles_to_the_planned_bytes(lengths: list[int], header: int, seed: int) -> None:
    planned, sources = random_planned(random.Random(seed), lengths, header)
    plan = plan_object(planned, SMALL)

    assert replay(plan, planned, sources, SMALL) == planned_bytes(planned, sources)
    # Only the first part goes through the client: the header and what fills it up.
    assert plan.uploaded_bytes == min(planned.size, max(SMALL.min_part, header))
    assert plan.fetched_bytes(planned) == plan.uploaded_bytes - header
    # Every staged chain step copies a bounded amount, so the store's work stays linear.
    assert all(s.size <= SMALL.chain_limit + SMALL.min_part for s in plan.staged)


def test_small_ranges_between_big_ones_are_chained_inside_the_store() -> None:
    planned, sources = random_planned(random.Random(4), [500, 30, 40, 50, 500], header=50)
    plan = plan_object(planned, SMALL)
    # header + 50 bytes uploaded; 350 copied; the last 100 of that range + 30 + 40 + 50
    # assembled in three staged steps and copied in whole; the last range copied.
    assert [type(p).__name__ for p in plan.parts] == ["UploadPart", "CopyPart", "CopyPart", "CopyPart"]
    assert [p.size for p in plan.parts] == [100, 350, 220, 500]
    assert [s.size for s in plan.staged] == [130, 170, 220]
    assert plan.uploaded_bytes == 100
    assert replay(plan, planned, sources, SMALL) == planned_bytes(planned, sources)


def test_a_range_beyond_the_largest_part_is_cut_into_equal_copies() -> None:
    planned, sources = random_planned(random.Random(1), [3500], header=120)
    plan = plan_object(planned, SMALL)
    copies = [p.size for p in plan.parts if isinstance(p, CopyPart)]
    assert copies == [875, 875, 875, 875]  # the 120-byte header alone fills the first part
    assert replay(plan, planned, sources, SMALL) == planned_bytes(planned, sources)


def test_too_many_parts_are_grouped_into_staged_objects() -> None:
    limits = PartLimits(min_part=100, max_part=1000, max_parts=5, chain_limit=300)
    planned, sources = random_planned(random.Random(2), [400] * 9, header=50)
    plan = plan_object(planned, limits)
    assert len(plan.parts) <= 5 and plan.staged
    assert replay(plan, planned, sources, limits) == planned_bytes(planned, sources)


def test_a_file_under_the_minimum_part_is_one_upload() -> None:
    planned, sources = random_planned(random.Random(3), [10, 20, 30], header=16)
    plan = plan_object(planned, SMALL)
    assert plan.parts == (UploadPart(0, planned.size),)
    assert not plan.staged


def test_plans_that_break_a_rule_are_refused() -> None:
    small_first = ObjectPlan((CopyPart(Span("a", 0, 50)), CopyPart(Span("a", 0, 500))))
    with pytest.raises(ValueError, match="part 1 holds 50 bytes"):
        check_object_plan(small_first, SMALL)
    unbuilt = ObjectPlan((CopyPart(Span("staged-00001", 0, 500)),))
    with pytest.raises(ValueError, match="before it is built"):
        check_object_plan(unbuilt, SMALL)


def qwen_checkpoint(shape: str, shard_bytes: int) -> Checkpoint:
    """Headers of a Hugging Face-sharded Qwen2.5 checkpoint, no data: planning needs none."""
    tensors = qwen2_tensors(SHAPES[shape])
    by_name = {t.name: t for t in tensors}
    headers = []
    for i, group in enumerate(group_into_shards([(t.name, t.nbytes) for t in tensors], shard_bytes)):
        specs = [TensorSpec(n, by_name[n].dtype, by_name[n].shape, by_name[n].nbytes) for n in group]
        prefix, _ = serialize_header(specs, {"format": "pt"})
        path = f"s3://bucket/{shape}/model-{i:05d}.safetensors"
        metadata, infos = parse_header(prefix[8:], path)
        headers.append(Header(path, len(prefix) - 8, len(prefix) + sum(s.nbytes for s in specs), metadata, infos))
    found = {t.name: SourceTensor(t, h) for h in headers for t in h.tensors}
    return Checkpoint(None, None, {}, tuple(headers), dict(sorted(found.items())))  # type: ignore[arg-type]


@pytest.mark.parametrize("shape", ["0.5B", "7B"])
def test_merging_a_real_layout_moves_one_part_through_the_client(shape: str) -> None:
    """Whatever the model size, a server-side merge uploads 5 MiB and downloads less."""
    checkpoint = qwen_checkpoint(shape, 2_000_000_000 if shape == "7B" else 200_000_000)
    (planned,) = plan_merge(checkpoint, "model.safetensors").files
    plan = plan_object(planned)
    check_object_plan(plan)
    assert plan.uploaded_bytes == 5 * MiB
    assert plan.fetched_bytes(planned) < 5 * MiB
    assert plan.uploaded_bytes + plan.copied_bytes >= planned.size
    assert len(plan.parts) < 1000


def test_resharding_plans_each_shard_the_same_way() -> None:
    checkpoint = qwen_checkpoint("0.5B", 200_000_000)
    split = plan_split(checkpoint, 300_000_000)
    for planned in split.files:
        plan = plan_object(planned)
        check_object_plan(plan)
        assert plan.uploaded_bytes == 5 * MiB
