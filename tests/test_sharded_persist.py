"""Persistent checkpoints of a sharded optimizer (checkpoint/sharded.py), and the read-only
PersistentStore (checkpoint/persist.py, `writer=False`) it reads other ranks' files with.

Every rank writes its own snapshot tree into `root/<job_id>/zero/w<W>-r<r>/`; a step is
complete when all W ranks of one world committed it. The trees here are what a ZeRO-1
worker saves: the model (the same on every rank), the rank's slice of a known flat AdamW
state, and the layout it was saved in. Saves are made durable with `flush`, never waited
for with sleeps; a save that must stay in flight is held by a gated encoder.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from splice.agent.worker.zero import StateShard, read_range
from splice.checkpoint import persist
from splice.checkpoint.codec import encode_state
from splice.checkpoint.persist import CheckpointCorrupt, PersistentStore, PersistError
from splice.checkpoint.sharded import ShardedCheckpoints
from splice.controller.resharding import partition

JOB = "run7"
TOTAL = 1000  # elements of the flat optimizer state
FLUSH_TIMEOUT_S = 30.0


def flat_state(total: int = TOTAL) -> tuple[torch.Tensor, torch.Tensor]:
    """Known, distinct values for every element of both moments."""
    exp_avg = torch.arange(total, dtype=torch.float32)
    return exp_avg, exp_avg * 2 + 0.5


def shard_tree(step: int, world: int, rank: int, *, total: int = TOTAL, align: int = 1,
               opt_step: int | None = None) -> dict[str, Any]:
    """Rank `rank` of `world`'s snapshot of `step`, its optimizer slice cut from flat_state."""
    r = partition(total, world, align)[rank]
    exp_avg, exp_avg_sq = flat_state(total)
    return {
        "model": {"w": torch.arange(6, dtype=torch.float32) * step},
        "optimizer": {"start": r.start, "stop": r.stop,
                      "step": step if opt_step is None else opt_step,
                      "exp_avg": exp_avg[r.start:r.stop].clone(),
                      "exp_avg_sq": exp_avg_sq[r.start:r.stop].clone()},
        "rng": {"torch": torch.get_rng_state()},
        "step": step,
        "samples_seen": 16 * step,
        "zero": {"world": world, "rank": rank, "replica": None},
    }


def save(ckpts: ShardedCheckpoints, step: int, world: int, ranks: Sequence[int] | None = None,
         **tree_kw: Any) -> None:
    """`ranks` (all of `world` by default) save `step`, durably. One save per store is in
    flight at a time, so a later step never replaces this one in the queue."""
    for rank in range(world) if ranks is None else ranks:
        ckpts.save_async(step, world, rank, shard_tree(step, world, rank, **tree_kw))
    assert ckpts.flush(FLUSH_TIMEOUT_S)


def assert_trees_equal(a: Any, b: Any) -> None:
    if isinstance(a, Mapping):
        assert isinstance(b, Mapping)
        assert sorted(a) == sorted(b)
        for k in a:
            assert_trees_equal(a[k], b[k])
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor)
        assert a.dtype == b.dtype
        assert torch.equal(a, b)
    else:
        assert a == b


def entries(path: Path) -> list[str]:
    return sorted(os.listdir(path))


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    child = subprocess.Popen([sys.executable, "-c", ""])
    child.wait()
    return child.pid


@pytest.fixture
def ckpts(tmp_path: Path) -> Iterator[ShardedCheckpoints]:
    c = ShardedCheckpoints(tmp_path, job_id=JOB)
    yield c
    c.close()


# ---- what is complete ---------------------------------------------------------------------


def test_round_trip_every_rank_of_every_step(tmp_path: Path,
                                             ckpts: ShardedCheckpoints) -> None:
    save(ckpts, 5, 3)
    save(ckpts, 10, 3)

    assert ckpts.complete() == [(5, 3), (10, 3)]
    assert ckpts.newest() == (10, 3)
    assert entries(tmp_path / JOB / "zero") == ["w3-r0", "w3-r1", "w3-r2"]
    loaded = ckpts.load(10, 3, 1)
    assert_trees_equal(loaded, shard_tree(10, 3, 1))
    assert loaded["optimizer"]["start"] == 334 and loaded["optimizer"]["stop"] == 667

    # Another process, which wrote none of it, sees the same and changes nothing.
    before = {name: entries(tmp_path / name) for name in entries(tmp_path)}
    other = ShardedCheckpoints(tmp_path, job_id=JOB)
    assert other.complete() == [(5, 3), (10, 3)]
    assert other.newest() == (10, 3)
    assert_trees_equal(other.load(5, 3, 2), shard_tree(5, 3, 2))
    assert {name: entries(tmp_path / name) for name in entries(tmp_path)} == before


def test_a_step_one_rank_did_not_save_is_not_complete(ckpts: ShardedCheckpoints) -> None:
    save(ckpts, 5, 3)
    save(ckpts, 10, 3, ranks=[0, 1])

    assert ckpts.complete() == [(5, 3)]
    assert ckpts.newest() == (5, 3)
    assert ckpts.load(10, 3, 0)["step"] == 10  # what is there still loads


def test_a_world_with_a_rank_directory_absent_is_not_listed(
        tmp_path: Path, ckpts: ShardedCheckpoints) -> None:
    save(ckpts, 5, 3, ranks=[0, 2])
    save(ckpts, 5, 2)
    # Neither another job's complete world nor a rank past its world counts.
    other = ShardedCheckpoints(tmp_path, job_id="other")
    try:
        save(other, 10, 1)
    finally:
        other.close()
    (tmp_path / JOB / "zero" / "w1-r1").mkdir()
    (tmp_path / JOB / "zero" / "unrelated").mkdir()

    assert not (tmp_path / JOB / "zero" / "w3-r1").exists()
    assert ckpts.complete() == [(5, 2)]
    assert ShardedCheckpoints(tmp_path, job_id="other").complete() == [(10, 1)]


def test_each_rank_keeps_its_newest_keep_steps(tmp_path: Path) -> None:
    ckpts = ShardedCheckpoints(tmp_path, job_id=JOB, keep=2)
    try:
        for step in (5, 10, 15):
            save(ckpts, step, 3)
    finally:
        ckpts.close()

    assert ckpts.complete() == [(10, 3), (15, 3)]
    assert ShardedCheckpoints(tmp_path, job_id=JOB).complete() == [(10, 3), (15, 3)]
    for rank in range(3):
        assert entries(tmp_path / JOB / "zero" / f"w3-r{rank}") == [
            "step-000000000010.ckpt", "step-000000000010.json",
            "step-000000000015.ckpt", "step-000000000015.json"]


def test_newest_is_the_highest_step_of_any_world(ckpts: ShardedCheckpoints) -> None:
    save(ckpts, 5, 4)
    save(ckpts, 10, 2)

    assert ckpts.complete() == [(5, 4), (10, 2)]
    assert ckpts.newest() == (10, 2)


def test_one_step_complete_in_two_worlds_is_listed_for_each(
        ckpts: ShardedCheckpoints) -> None:
    save(ckpts, 10, 4)
    save(ckpts, 10, 2)

    assert ckpts.complete() == [(10, 2), (10, 4)]
    assert ckpts.newest() == (10, 4)


def test_nothing_is_complete_under_a_root_that_does_not_exist(tmp_path: Path) -> None:
    root = tmp_path / "never-written"
    ckpts = ShardedCheckpoints(root, job_id=JOB)

    assert ckpts.complete() == []
    assert ckpts.newest() is None
    with pytest.raises(PersistError, match="no checkpoint of step 5"):
        ckpts.load(5, 2, 0)
    assert not root.exists()


class HeldSave:
    """Stands in for the codec's encoder: holds one rank's save of one step until the gate
    opens, as a slow disk would; every other save goes through."""

    def __init__(self, rank: int, step: int) -> None:
        self.rank, self.step = rank, step
        self.started = threading.Semaphore(0)
        self.gate = threading.Event()

    def __call__(self, tree: Mapping[str, Any]) -> bytes:
        if tree["zero"]["rank"] == self.rank and tree["step"] == self.step:
            self.started.release()
            assert self.gate.wait(timeout=FLUSH_TIMEOUT_S), "test never opened the gate"
        return encode_state(tree)


def test_a_rank_that_lags_behind_does_not_cost_the_only_complete_checkpoint(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Story: 2 ranks, keep=2, a checkpoint every 5 steps. Both commit step 5. Rank 1's disk
    # is slow: its save of step 10 is still being written when rank 0 has committed 10 and
    # 15. A crash of the whole job now must still find step 5, the newest step every rank
    # committed: pruning is per rank, and rank 0 may not delete its part of step 5 before
    # a newer step is complete.
    held = HeldSave(rank=1, step=10)
    monkeypatch.setattr(persist, "encode_state", held)
    rank0 = ShardedCheckpoints(tmp_path, job_id=JOB, keep=2)  # one per process, as in a job
    rank1 = ShardedCheckpoints(tmp_path, job_id=JOB, keep=2)
    reader = ShardedCheckpoints(tmp_path, job_id=JOB, keep=2)
    try:
        save(rank0, 5, 2, ranks=[0])
        save(rank1, 5, 2, ranks=[1])
        assert reader.complete() == [(5, 2)]

        rank1.save_async(10, 2, 1, shard_tree(10, 2, 1))
        assert held.started.acquire(timeout=FLUSH_TIMEOUT_S), "rank 1 never started saving"
        save(rank0, 10, 2, ranks=[0])
        assert reader.complete() == [(5, 2)]
        save(rank0, 15, 2, ranks=[0])

        assert reader.newest() == (5, 2), (
            f"no complete checkpoint while rank 1's save of step 10 is in flight: "
            f"rank 0 holds {entries(tmp_path / JOB / 'zero' / 'w2-r0')}, "
            f"rank 1 holds {entries(tmp_path / JOB / 'zero' / 'w2-r1')}")
    finally:
        held.gate.set()
        assert rank1.flush(FLUSH_TIMEOUT_S)
        rank0.close()
        rank1.close()
    assert reader.newest() == (10, 2)  # rank 1's step 10 landed: complete again


# ---- loading is checked -------------------------------------------------------------------


@pytest.mark.parametrize("says", [
    {"zero": {"world": 3, "rank": 2, "replica": None}},
    {"zero": {"world": 4, "rank": 1, "replica": None}},
    {"step": 5},
    {"zero": None},
], ids=["another-rank", "another-world", "another-step", "unsharded"])
def test_load_refuses_a_tree_that_is_not_what_its_name_says(
        ckpts: ShardedCheckpoints, says: dict[str, Any]) -> None:
    tree = shard_tree(10, 3, 1) | says
    # Written on purpose into rank 1 of 3's directory, under step 10.
    ckpts.save_async(10, 3, 1, tree)
    assert ckpts.flush(FLUSH_TIMEOUT_S)

    with pytest.raises(PersistError, match=rf"{JOB}/zero/w3-r1/step-000000000010 is not "
                                           r"rank 1 of 3's"):
        ckpts.load(10, 3, 1)
    with pytest.raises(PersistError):
        ShardedCheckpoints(ckpts.root, job_id=JOB).load(10, 3, 1)


def test_a_damaged_shard_is_listed_but_refused_when_loaded(
        tmp_path: Path, ckpts: ShardedCheckpoints) -> None:
    save(ckpts, 10, 3)
    data = tmp_path / JOB / "zero" / "w3-r1" / "step-000000000010.ckpt"
    flip_byte(data, data.stat().st_size // 2)

    assert ckpts.complete() == [(10, 3)]  # decided from the manifests, without the data
    for reader in (ckpts, ShardedCheckpoints(tmp_path, job_id=JOB)):
        with pytest.raises(CheckpointCorrupt, match=str(data)):
            reader.load(10, 3, 1)
        with pytest.raises(CheckpointCorrupt):
            reader.shards_over(10, 3, partition(TOTAL, 3), 0, TOTAL)
        assert reader.load(10, 3, 0)["zero"]["rank"] == 0


# ---- the old shards a new range needs -----------------------------------------------------


@pytest.mark.parametrize(("start", "stop", "ranks"), [
    (0, TOTAL, [0, 1, 2, 3]),
    (200, 600, [0, 1, 2]),
    (250, 500, [1]),  # exactly one old shard
    (249, 251, [0, 1]),  # one element either side of a boundary
    (999, 1000, [3]),
    (300, 300, []),  # an empty range needs nothing
])
def test_shards_over_returns_exactly_the_overlapping_old_shards(
        ckpts: ShardedCheckpoints, start: int, stop: int, ranks: list[int]) -> None:
    save(ckpts, 7, 4)
    old = partition(TOTAL, 4)

    shards = ckpts.shards_over(7, 4, old, start, stop)

    assert [(s["start"], s["stop"]) for s in shards] == [(old[r].start, old[r].stop)
                                                         for r in ranks]
    for rank, shard in zip(ranks, shards, strict=True):
        assert_trees_equal(shard, shard_tree(7, 4, rank)["optimizer"])


def test_shards_over_reads_only_the_shards_it_needs(
        tmp_path: Path, ckpts: ShardedCheckpoints) -> None:
    save(ckpts, 7, 4)
    for rank in (0, 3):
        data = tmp_path / JOB / "zero" / f"w4-r{rank}" / "step-000000000007.ckpt"
        flip_byte(data, data.stat().st_size // 2)

    shards = ckpts.shards_over(7, 4, partition(TOTAL, 4), 250, 750)

    assert [(s["start"], s["stop"]) for s in shards] == [(250, 500), (500, 750)]


def test_shards_over_skips_the_empty_shards_of_ranks_past_the_data(
        ckpts: ShardedCheckpoints) -> None:
    old = partition(3, 5)  # ranks 3 and 4 hold nothing
    assert [len(r) for r in old] == [1, 1, 1, 0, 0]
    save(ckpts, 7, 5, total=3)

    shards = ckpts.shards_over(7, 5, old, 0, 3)

    assert [(s["start"], s["stop"]) for s in shards] == [(0, 1), (1, 2), (2, 3)]


@pytest.mark.parametrize("layout", [partition(TOTAL + 1, 4), partition(TOTAL, 4, align=64)],
                         ids=["another-model", "another-alignment"])
def test_shards_over_refuses_files_saved_in_another_layout(
        ckpts: ShardedCheckpoints, layout: list[range]) -> None:
    save(ckpts, 7, 4)

    with pytest.raises(PersistError, match="saved by a different model or alignment"):
        ckpts.shards_over(7, 4, layout, 0, TOTAL + 1)


@pytest.mark.parametrize("num_ranges", [3, 5])
def test_shards_over_refuses_as_many_ranges_as_not_ranks(
        ckpts: ShardedCheckpoints, num_ranges: int) -> None:
    with pytest.raises(ValueError, match=f"{num_ranges} ranges for a world of 4"):
        ckpts.shards_over(7, 4, partition(TOTAL, num_ranges), 0, TOTAL)


@pytest.mark.parametrize(("rank", "world"), [(-1, 3), (3, 3), (0, 0)])
def test_save_refuses_a_rank_outside_its_world(
        tmp_path: Path, ckpts: ShardedCheckpoints, rank: int, world: int) -> None:
    with pytest.raises(ValueError, match=f"rank {rank} is not in a world of {world}"):
        ckpts.save_async(5, world, rank, shard_tree(5, 3, 0))
    assert entries(tmp_path) == []


# ---- resharding from the files ------------------------------------------------------------


def reshard_from_files(ckpts: ShardedCheckpoints, step: int, old_world: int,
                       new_world: int, total: int, align: int) -> None:
    """Every new rank assembles its range from the old shards' files and gets exactly the
    original elements."""
    old = partition(total, old_world, align)
    exp_avg, exp_avg_sq = flat_state(total)
    for r in partition(total, new_world, align):
        shards = [StateShard(d["start"], d["stop"], d["step"], d["exp_avg"], d["exp_avg_sq"])
                  for d in ckpts.shards_over(step, old_world, old, r.start, r.stop)]
        assert {s.step for s in shards} <= {step}
        both = read_range(shards, r.start, r.stop)
        assert torch.equal(both[0], exp_avg[r.start:r.stop])
        assert torch.equal(both[1], exp_avg_sq[r.start:r.stop])


@pytest.mark.parametrize(("old_world", "new_world"), [(4, 3), (3, 4), (4, 1), (1, 4)])
def test_a_new_world_reads_its_ranges_from_the_old_worlds_files(
        tmp_path: Path, old_world: int, new_world: int) -> None:
    writer = ShardedCheckpoints(tmp_path, job_id=JOB)
    try:
        save(writer, 7, old_world)
    finally:
        writer.close()
    reader = ShardedCheckpoints(tmp_path, job_id=JOB)  # the new world wrote none of it

    assert reader.newest() == (7, old_world)
    reshard_from_files(reader, 7, old_world, new_world, TOTAL, align=1)


@settings(deadline=None, max_examples=15)  # every example writes files: time is not checked
@given(total=st.integers(0, 300), old_world=st.integers(1, 5), new_world=st.integers(1, 6),
       align=st.sampled_from([1, 4, 64]))
def test_any_reshard_from_the_files_gives_back_the_original_state(
        total: int, old_world: int, new_world: int, align: int) -> None:
    with tempfile.TemporaryDirectory() as root:
        ckpts = ShardedCheckpoints(root, job_id=JOB)
        try:
            save(ckpts, 7, old_world, total=total, align=align)
            assert ckpts.complete() == [(7, old_world)]
            reshard_from_files(ckpts, 7, old_world, new_world, total, align)
        finally:
            ckpts.close()


# ---- the read-only PersistentStore --------------------------------------------------------


def test_a_reader_of_a_missing_directory_creates_nothing_and_lists_nothing(
        tmp_path: Path) -> None:
    store = PersistentStore(tmp_path / "root", job_id=JOB, writer=False)

    assert store.list() == []
    assert store.load_latest() is None
    with pytest.raises(PersistError, match="no checkpoint of step 1"):
        store.load(1)
    assert not (tmp_path / "root").exists()


def test_a_reader_refuses_to_save(tmp_path: Path) -> None:
    store = PersistentStore(tmp_path, job_id=JOB, writer=False)
    tree = {"model": {"w": torch.ones(3)}, "step": 1}

    with pytest.raises(PersistError, match="opened to read"):
        store.save(1, tree)
    with pytest.raises(PersistError, match="opened to read"):
        store.save_async(1, tree)
    assert store.flush(FLUSH_TIMEOUT_S)
    store.close()
    assert entries(tmp_path) == []


def test_a_reader_leaves_a_dead_writers_tmp_file_and_a_writer_removes_it(
        tmp_path: Path) -> None:
    writer = PersistentStore(tmp_path, job_id=JOB)
    writer.save(1, {"model": {"w": torch.ones(3)}, "step": 1})
    stale = writer.dir / f"step-000000000002.ckpt.tmp-{dead_pid()}"
    stale.write_bytes(b"partial")

    reader = PersistentStore(tmp_path, job_id=JOB, writer=False)
    assert stale.exists()  # it may be a live writer's on another host
    assert [i.step for i in reader.list()] == [1]
    assert reader.load(1)["step"] == 1
    assert stale.exists()

    PersistentStore(tmp_path, job_id=JOB)
    assert not stale.exists()
    assert entries(writer.dir) == ["step-000000000001.ckpt", "step-000000000001.json"]
