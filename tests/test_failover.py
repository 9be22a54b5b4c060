"""Controller high availability with a real etcd: two controller replicas, real agents and
gloo workers. The leader is SIGKILLed mid-training, etcd is restarted, a worker dies while
no controller leads; training must go on and end with the uninterrupted run's losses."""

from __future__ import annotations

import math
import os
import signal
from pathlib import Path

import pytest

from splice.localjob import LocalJob
from tests.conftest import run_fault_job
from tests.etcd_server import EtcdServer

pytestmark = pytest.mark.integration

STEPS = 50
SLEEP_S = 0.04  # ~2.5 s of training: room for a ~1 s failover in the middle


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[int, float]:
    summary, records = run_fault_job(tmp_path_factory.mktemp("reference"), steps=STEPS)
    assert summary["phase"] == "complete", summary["logs"]
    return next(iter(records.values()))["losses"]


def assert_same_losses(records: dict, reference: dict[int, float]) -> None:
    for wid, rec in records.items():
        assert sorted(rec["losses"]) == list(range(STEPS)), wid
        for step, loss in rec["losses"].items():
            assert math.isclose(loss, reference[step], rel_tol=1e-6, abs_tol=1e-9), (
                wid, step, loss, reference[step])


def kill_leader(job: LocalJob) -> str:
    leader = job.status().controller
    assert leader in job.controller_procs
    job.kill_controller(leader)
    return leader


def test_leader_killed_mid_training(tmp_path: Path, etcd: EtcdServer,
                                    reference: dict[int, float]) -> None:
    killed: list[str] = []
    summary, records = run_fault_job(
        tmp_path, steps=STEPS, step_sleep_s=SLEEP_S, etcd_endpoint=etcd.endpoint, at_step=10,
        action=lambda job: killed.append(kill_leader(job)))
    assert summary["phase"] == "complete", summary["logs"]
    # Nothing was lost: same epoch, same members, no recovery; a takeover happened.
    assert summary["epoch"] == 1 and len(summary["members"]) == 4
    assert any(kind == "takeover" for kind, _, _ in summary["timeline"])
    assert len(records) == 4
    assert_same_losses(records, reference)


def test_worker_crash_during_failover(tmp_path: Path, etcd: EtcdServer,
                                      reference: dict[int, float]) -> None:
    """A worker dies while no controller leads: its agent reports it on re-attaching, and
    the new leader recovers the job."""

    def leader_then_worker(job: LocalJob) -> None:
        status = job.status()
        victim = job.worker(status, "node-1/0").pid
        kill_leader(job)
        os.kill(victim, signal.SIGKILL)

    summary, records = run_fault_job(
        tmp_path, steps=STEPS, step_sleep_s=SLEEP_S, etcd_endpoint=etcd.endpoint, at_step=10,
        action=leader_then_worker)
    assert summary["phase"] == "complete", summary["logs"]
    assert summary["epoch"] == 2 and "node-1/0" not in summary["members"]
    assert set(records) == set(summary["members"]) and len(records) == 3
    assert_same_losses(records, reference)


def test_etcd_restarted_mid_training(tmp_path: Path, etcd: EtcdServer,
                                     reference: dict[int, float]) -> None:
    """etcd goes away and comes back: training never needed it; the controllers re-elect
    a leader and the job ends normally."""
    summary, records = run_fault_job(
        tmp_path, steps=STEPS, step_sleep_s=SLEEP_S, etcd_endpoint=etcd.endpoint, at_step=10,
        action=lambda job: etcd.restart())
    assert summary["phase"] == "complete", summary["logs"]
    assert summary["epoch"] == 1 and len(records) == 4
    assert_same_losses(records, reference)
