"""Detectors on real processes: a hang (a SIGSTOPped worker) is found, its culprit named and
killed, and the job recovers; a slow worker is flagged and work rebalanced away from it. In
both cases every step's loss equals the uninterrupted run's."""

from __future__ import annotations

import math
import os
import signal
import time
from pathlib import Path

import pytest

from splice.localjob import LocalJob, LocalJobConfig, worker_argv
from tests.conftest import run_fault_job
from tests.prometheus_server import (
    PrometheusServer,
    check_dashboard_against,
    require_prometheus_binary,
)

pytestmark = pytest.mark.integration

STEPS = 60
DASHBOARD = Path(__file__).resolve().parent.parent / "manifests" / "grafana" / "dashboard.json"


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[int, float]:
    summary, records = run_fault_job(tmp_path_factory.mktemp("reference"), steps=STEPS)
    assert summary["phase"] == "complete", summary["logs"]
    return next(iter(records.values()))["losses"]


def assert_parity(records: dict, reference: dict[int, float]) -> None:
    for wid, rec in records.items():
        assert sorted(rec["losses"]) == list(range(STEPS)), wid
        for step, loss in rec["losses"].items():
            assert math.isclose(loss, reference[step], rel_tol=1e-6, abs_tol=1e-9), (wid, step)


def test_hang_culprit_is_named_and_killed(tmp_path: Path, reference: dict[int, float]) -> None:
    def stop_worker(job: LocalJob) -> None:
        os.kill(job.worker(job.status(), "node-1/0").pid, signal.SIGSTOP)

    summary, records = run_fault_job(tmp_path, steps=STEPS, step_sleep_s=0.01, at_step=15,
                                     action=stop_worker)
    assert summary["phase"] == "complete", summary["logs"]
    hangs = [v for v in summary["verdicts"] if v[0] == "hang"]
    assert hangs, summary["verdicts"]
    detector, kind, culprit, action = hangs[0]
    assert (kind, culprit, action) == ("stopped", "node-1/0", "kill")
    assert "node-1/0" not in summary["members"] and len(summary["members"]) == 3
    assert_parity(records, reference)


def test_straggler_is_flagged_and_work_rebalanced(tmp_path: Path,
                                                  reference: dict[int, float]) -> None:
    summary, records = run_fault_job(tmp_path, steps=STEPS, slow="node-1/1:8:10",
                                     straggler_policy="rebalance")
    assert summary["phase"] == "complete", summary["logs"]
    flagged = [v for v in summary["verdicts"]
               if v[0] == "straggler" and v[1] == "compute" and v[3] != "cleared"]
    assert flagged and flagged[0][2] == "node-1/1", summary["verdicts"]
    assert flagged[0][3] == "rebalance"
    assert any(kind == "epoch" and "rebalance" in text for kind, _, text in summary["timeline"])
    assert len(summary["members"]) == 4  # nobody was evicted
    # Different shares, same samples and weights: the losses do not move.
    assert_parity(records, reference)


def test_silent_data_corruption_is_caught_before_it_spreads(
        tmp_path: Path, reference: dict[int, float]) -> None:
    """A bit flips in one replica's weights: the per-step fingerprint comparison names it
    before any of its gradients reach the others, it is removed, and the survivors'
    losses stay exactly those of the uninterrupted run."""
    summary, records = run_fault_job(
        tmp_path, steps=STEPS, extra_args=("--sdc-every", "1", "--bitflip", "node-0/1:20"))
    assert summary["phase"] == "complete", summary["logs"]
    sdc = [v for v in summary["verdicts"] if v[0] == "sdc"]
    assert sdc and sdc[0][1:] == ("bitflip", "node-0/1", "kill"), summary["verdicts"]
    assert "node-0/1" not in summary["members"] and len(summary["members"]) == 3
    assert_parity(records, reference)


def test_dashboard_queries_return_series_from_a_real_job(tmp_path: Path) -> None:
    """Prometheus scrapes a running job's controller and agents (with one crash for the
    fault and recovery series); every dashboard expression must parse and return data."""
    binary = require_prometheus_binary()
    cfg = LocalJobConfig(
        worker_command=worker_argv("splice.examples.train_mlp", [
            "--steps", "100000", "--log-every", "1000000", "--step-sleep-s", "0.02",
            "--slow-worker", "node-0/1:6:20"]),  # a straggler, for its score and verdicts
        log_dir=str(tmp_path), job_id="dash", metrics=True)
    with LocalJob(cfg) as job:
        job.wait_until(lambda s: s.phase == "running" and
                       max((w.last_step for w in s.workers), default=0) >= 5, 120, "training")
        targets = job.controller_metrics + job.agent_metrics
        labels = {t: {"namespace": "local", "pod": f"pod-{i}"} for i, t in enumerate(targets)}
        with PrometheusServer(binary, targets, labels) as prom:
            prom.wait_for_scrapes(after_s=time.time(), count=2, num_targets=len(targets),
                                  timeout_s=60)
            # Faults and recoveries while Prometheus watches (epoch changes, counters move).
            job.kill_worker("node-1/1")
            status = job.wait_until(lambda s: s.recoveries >= 1, 120, "the recovery")
            resumed = max(e.at_s for e in status.timeline if e.kind == "resume")
            # The new membership's straggler detector flags the slow worker again.
            job.wait_until(lambda s: any(
                v.detector == "straggler" and v.kind == "compute" and v.at_s > resumed
                and v.action != "cleared" for v in s.verdicts), 120, "a straggler verdict")
            prom.wait_for_scrapes(after_s=time.time(), count=2, num_targets=len(targets),
                                  timeout_s=60)
            failures = check_dashboard_against(prom, DASHBOARD)
    assert not failures, "\n".join(failures)


def test_replica_check_on_demand(tmp_path: Path) -> None:
    """No periodic check: a bit flip goes unnoticed until an operator asks for a check
    (`splice check-replicas`); the request rides on the next gradient all-reduce, every
    rank compares fingerprints at the same step, and the corrupted replica is named."""
    requested: list[float] = []

    def ask(job: LocalJob) -> None:
        assert job.controller is not None
        requested.append(time.time())
        job.controller.check_replicas(job.config.job_id, "test")

    summary, records = run_fault_job(
        tmp_path, steps=STEPS, step_sleep_s=0.01, extra_args=("--bitflip", "node-0/1:5"),
        at_step=10, action=ask)
    assert summary["phase"] == "complete", summary["logs"]
    kinds = [k for k, _, _ in summary["timeline"]]
    assert "sdc_check" in kinds
    sdc = [v for v in summary["verdicts"] if v[0] == "sdc"]
    assert sdc and sdc[0][1:] == ("bitflip", "node-0/1", "kill"), summary["verdicts"]
    assert "node-0/1" not in summary["members"] and len(summary["members"]) == 3
    assert len(records) == 3
