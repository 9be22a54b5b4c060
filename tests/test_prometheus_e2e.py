"""The metrics as Prometheus and Grafana see them: a real Prometheus scrapes a controller's
and two agents' /metrics, and every query of the Grafana dashboard must parse and show data.

The exporters are fed a synthetic but realistic story: a 4-rank job trains, a worker is
killed, the job recovers at epoch 2 with 3 ranks; after Prometheus's first scrape a second
crash is detected and recovered (epoch 3), a rank is flagged as a straggler, training goes
on. rate() and increase() need two samples that differ, so the test waits for two scrapes
of every target after the second part of the story (it polls Prometheus; no fixed sleeps).
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from splice.agent.metrics import AgentMetrics
from splice.controller.metrics import ControllerMetrics
from tests.prometheus_server import (
    PrometheusServer,
    check_dashboard_against,
    require_prometheus_binary,
)

DASHBOARD = Path(__file__).resolve().parent.parent / "manifests" / "grafana" / "dashboard.json"
JOB = "mlp"
NAMESPACE = "splice-e2e"
SCRAPE_TIMEOUT_S = 15.0   # a scrape a second; generous for a loaded 2-core machine


@dataclass
class Exporters:
    controller: ControllerMetrics
    agents: list[AgentMetrics]
    targets: list[str]
    target_labels: dict[str, dict[str, str]]   # what a PodMonitor's relabelling adds


@pytest.fixture
def exporters() -> Iterator[Exporters]:
    controller = ControllerMetrics()
    agents = [AgentMetrics(JOB, f"node-{i}") for i in range(2)]
    pods = [f"{JOB}-controller-0", *(f"{JOB}-node-{i}" for i in range(2))]
    try:
        ports = [m.serve() for m in (controller, *agents)]
        targets = [f"127.0.0.1:{p}" for p in ports]
        yield Exporters(controller, agents, targets,
                        {t: {"namespace": NAMESPACE, "pod": pod}
                         for t, pod in zip(targets, pods, strict=True)})
    finally:
        for m in (controller, *agents):
            m.close()


def train(agents: list[AgentMetrics], rng: random.Random, *, steps: int,
          workers_per_agent: int, slow_agent: int | None = None) -> None:
    """`steps` steps of every worker: ~120 ms, ~25 % of it in an all-reduce of 4 MiB."""
    for _ in range(steps):
        for i, agent in enumerate(agents):
            for _ in range(workers_per_agent):
                compute_s = rng.uniform(0.085, 0.095) * (1.3 if i == slow_agent else 1.0)
                wait_s = rng.uniform(0.02, 0.04)
                agent.step(compute_s + wait_s, compute_s, wait_s, 4 << 20)


def first_part(e: Exporters, rng: random.Random) -> None:
    """Before Prometheus starts: epoch 1 trains, node-1/0 is killed, epoch 2 resumes."""
    c = e.controller
    c.set_leader(True)
    c.set_membership(JOB, epoch=1, world_size=4)
    for agent in e.agents:
        agent.set_workers(2)
        agent.node_health(memory_used_ratio=0.41, cpu_throttled_ratio=0.0)
    train(e.agents, rng, steps=20, workers_per_agent=2)
    e.agents[1].worker_exit("killed")
    e.agents[1].set_workers(1)
    c.fault(JOB, "crash")
    c.verdict(JOB, "hang", "recover")
    c.recovery(JOB, "crash", "resumed", duration_s=0.031)
    c.set_membership(JOB, epoch=2, world_size=3)
    c.telemetry_batch(num_records=120, dropped=0)
    c.set_goodput(JOB, 0.96)
    for agent in e.agents:
        agent.snapshot(num_bytes=48 << 20, age_s=0.12)


def second_part(e: Exporters, rng: random.Random) -> None:
    """After the first scrape: another crash and recovery, a straggler, more training."""
    c = e.controller
    train(e.agents, rng, steps=10, workers_per_agent=1, slow_agent=0)
    c.fault(JOB, "crash")
    c.recovery(JOB, "crash", "resumed", duration_s=0.044)
    c.set_membership(JOB, epoch=3, world_size=3)
    c.straggler_score(JOB, rank=0, score=1.31)
    c.verdict(JOB, "straggler", "report")
    c.telemetry_batch(num_records=95, dropped=2)
    c.set_goodput(JOB, 0.94)
    e.agents[0].worker_exit("crash")
    for agent in e.agents:
        agent.snapshot(num_bytes=48 << 20, age_s=0.09)
        agent.node_health(memory_used_ratio=0.43, cpu_throttled_ratio=0.02)


def test_every_dashboard_query_shows_data_scraped_from_splice_exporters(
        exporters: Exporters) -> None:
    binary = require_prometheus_binary()
    rng = random.Random(0)
    first_part(exporters, rng)
    started_s = time.time()
    with PrometheusServer(binary, exporters.targets, exporters.target_labels) as prom:
        n = len(exporters.targets)
        # Prometheus 2.42 applies its scrape targets ~5 s after start (its reload ticker).
        prom.wait_for_scrapes(after_s=started_s, count=1, num_targets=n, timeout_s=SCRAPE_TIMEOUT_S)
        second_part(exporters, rng)
        prom.wait_for_scrapes(after_s=time.time(), count=2, num_targets=n,
                              timeout_s=SCRAPE_TIMEOUT_S)

        failures = check_dashboard_against(prom, DASHBOARD, require_numbers=True)
        assert not failures, "\n".join(failures)

        # The story came through as told, with the labels the dashboard filters on.
        [epoch] = prom.query(f'splice_epoch{{job_name="{JOB}", namespace="{NAMESPACE}"}}')
        assert epoch["value"][1] == "3" and epoch["metric"]["pod"] == f"{JOB}-controller-0"
        [crashes] = prom.query('splice_faults_total{kind="crash"}')
        assert crashes["value"][1] == "2"
        [straggler] = prom.query("splice_straggler_score")
        assert straggler["metric"]["rank"] == "0"
        assert len(prom.query("splice_step_duration_seconds_count")) == 2   # one per agent
