"""Real processes: persistent checkpoints for a cold start and when every in-memory copy is
gone. Losses after the resume must equal the uninterrupted run's, step for step."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from splice.checkpoint.persist import PersistentStore
from splice.checkpoint.sharded import ShardedCheckpoints
from splice.localjob import LocalJob
from tests.conftest import assert_losses_match, run_fault_job

pytestmark = pytest.mark.integration

STEPS = 40


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[int, float]:
    summary, records = run_fault_job(tmp_path_factory.mktemp("reference"), steps=STEPS)
    assert summary["phase"] == "complete", summary["logs"]
    return next(iter(records.values()))["losses"]


def test_a_cold_start_resumes_from_the_newest_checkpoint(
        tmp_path: Path, reference: dict[int, float]) -> None:
    ckpt = tmp_path / "ckpt"
    summary, _ = run_fault_job(tmp_path / "first", steps=22, persist_dir=str(ckpt),
                               persist_every=5)
    assert summary["phase"] == "complete", summary["logs"]
    held = [c.step for c in PersistentStore(ckpt, job_id="local").list()]
    assert held == [15, 20]  # keep=2; step 20's snapshot is the state before step 20
    # The whole job stops and starts again: every worker resumes from step 20.
    summary, records = run_fault_job(tmp_path / "second", steps=STEPS, persist_dir=str(ckpt),
                                     persist_every=5)
    assert summary["phase"] == "complete", summary["logs"]
    assert len(records) == 4
    for rec in records.values():
        assert sorted(rec["losses"]) == list(range(20, STEPS))
        assert rec["restored_from"] == "disk, step 20"
    assert_losses_match(records, reference)


def test_losing_every_in_memory_copy_falls_back_to_disk(
        tmp_path: Path, reference: dict[int, float]) -> None:
    # Both workers of a one-node job die in the same step; the agent's spares take their
    # places, but nobody holds a snapshot in memory any more.
    ckpt = tmp_path / "ckpt"
    summary, records = run_fault_job(
        tmp_path, steps=STEPS, nodes=1, nproc=2, spares=2, replace=True,
        die=["node-0/0:12:before", "node-0/1:12:before"], persist_dir=str(ckpt),
        persist_every=5)
    assert summary["phase"] == "complete", summary["message"] + summary["logs"]
    fallback = [t for k, _, t in summary["timeline"] if k == "fallback"]
    assert fallback and "FALLBACK TO DISK" in fallback[0] and "step 10" in fallback[0]
    assert sorted(records) == ["node-0/2", "node-0/3"]
    for rec in records.values():
        assert rec["restored_from"] == "disk, step 10"
        assert sorted(rec["losses"]) == list(range(10, STEPS))
    assert_losses_match(records, reference)


def test_a_sharded_optimizer_cold_starts_at_another_world_size_past_a_damaged_shard(
        tmp_path: Path, zero_reference: dict[int, float]) -> None:
    # ZeRO-1: each of the 4 ranks writes its own shard; the job then starts again with 3
    # ranks, each reading the old shards its new range overlaps. Old rank 3's shard of the
    # newest step is damaged: only new rank 2 reads it, and every member goes back to the
    # older checkpoint with it.
    ckpt = tmp_path / "ckpt"
    summary, _ = run_fault_job(tmp_path / "first", steps=22, persist_dir=str(ckpt),
                               persist_every=5, extra_args=("--zero",))
    assert summary["phase"] == "complete", summary["logs"]
    assert ShardedCheckpoints(ckpt, job_id="local").complete() == [(15, 4), (20, 4)]
    assert PersistentStore(ckpt, job_id="local").list() == []  # no unsharded checkpoint
    damaged = ckpt / "local" / "zero" / "w4-r3" / "step-000000000020.ckpt"
    raw = bytearray(damaged.read_bytes())
    raw[len(raw) // 2] ^= 0x40
    damaged.write_bytes(bytes(raw))
    summary, records = run_fault_job(tmp_path / "second", steps=STEPS, nodes=1, nproc=3,
                                     persist_dir=str(ckpt), persist_every=5,
                                     extra_args=("--zero",))
    assert summary["phase"] == "complete", summary["logs"]
    assert len(records) == 3
    assert "every member tries the older one of step 15" in summary["logs"]
    assert "read from the 4-rank sharded checkpoint of step 15" in summary["logs"]
    for rec in records.values():
        assert sorted(rec["losses"]) == list(range(15, STEPS))
        assert rec["restored_from"] == "disk, step 15"
    assert_losses_match(records, zero_reference)


def test_losing_every_copy_of_an_optimizer_shard_falls_back_to_disk(
        tmp_path: Path, zero_reference: dict[int, float]) -> None:
    # 3 nodes of one rank each: rank r's shard is replicated on rank r + 1. Losing nodes 1
    # and 2 at once loses both copies of rank 1's shard; the survivor, which still holds
    # its own snapshots, goes back to the newest sharded checkpoint and trains on alone.
    ckpt = tmp_path / "ckpt"

    def lose_two_nodes(job: LocalJob) -> None:
        for agent in job.agents[1:]:
            os.killpg(agent.pid, signal.SIGKILL)

    summary, records = run_fault_job(
        tmp_path, steps=STEPS, nodes=3, nproc=1, at_step=12, action=lose_two_nodes,
        persist_dir=str(ckpt), persist_every=5, extra_args=("--zero",))
    assert summary["phase"] == "complete", summary["message"] + summary["logs"]
    assert summary["members"] == ["node-0/0"]
    assert "FALLBACK TO DISK" in summary["logs"]
    (rec,) = records.values()
    step = int(rec["restored_from"].removeprefix("disk, step "))
    assert step in (10, 15) and step % 5 == 0  # the newest every rank had committed
    assert sorted(rec["losses"]) == list(range(STEPS))
    assert_losses_match(records, zero_reference)
