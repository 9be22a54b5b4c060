"""Real processes: persistent checkpoints for a cold start and when every in-memory copy is
gone. Losses after the resume must equal the uninterrupted run's, step for step."""

from __future__ import annotations

from pathlib import Path

import pytest

from splice.checkpoint.persist import PersistentStore
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
