"""Shared fixtures: local jobs (in-process controller, agent subprocesses) for integration
tests. Every process a test starts is killed when the test ends."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from splice.localjob import LocalJob, LocalJobConfig, worker_argv
from splice.security import TLSConfig, make_dev_ca
from tests.etcd_server import etcd, etcd_shared  # noqa: F401  (fixtures for every module)

JOB_TIMEOUT_S = 120.0


def run_fault_job(tmp: Path, *, die: list[str] = (), steps: int = 40, ddp: bool = False,
                  nodes: int = 2, nproc: int = 2, lose_node_at_step: int | None = None,
                  etcd_endpoint: str = "", step_sleep_s: float = 0.0,
                  at_step: int | None = None, action: Callable[[LocalJob], None] | None = None,
                  slow: str = "", straggler_policy: str = "alert", extra_args: tuple[str, ...] = (),
                  spares: int = 0, replace: bool = False, hang_floor_s: float = 1.0,
                  persist_dir: str = "", persist_every: int = 0, tls_dir: str = "",
                  replicas: int = 0, replicate_interval_s: float = 1.0
                  ) -> tuple[dict, dict[str, dict]]:
    """Run the fault-injection worker as a local job to completion.

    `lose_node_at_step`: SIGKILL the last node's agent and all its workers at that step.
    `etcd_endpoint`: run two controller replicas on that etcd instead of one in-process.
    `action(job)` runs once some worker has completed step `at_step`.

    Returns the controller's final status (as a dict) and each surviving worker's record.
    """
    out = tmp / "out"
    out.mkdir(parents=True, exist_ok=True)
    args = ["--steps", str(steps), "--out", str(out)]
    for d in die:
        args += ["--die", d]
    if ddp:
        args.append("--ddp")
    if step_sleep_s:
        args += ["--step-sleep-s", str(step_sleep_s)]
    if slow:
        args += ["--slow", slow]
    args += list(extra_args)
    if lose_node_at_step is not None:
        at_step = lose_node_at_step
        action = lambda job: os.killpg(job.agents[-1].pid, signal.SIGKILL)  # noqa: E731
    gate = None
    if spares:
        # The job's workers wait until the spares are warm: a fault then finds one ready
        # however slowly this machine imports torch (else a test meant for a warm spare
        # may see the survivors go on, or finish, without it).
        gate = tmp / "start-gate"
        os.mkfifo(gate)
        args += ["--start-gate", str(gate)]
    cfg = LocalJobConfig(worker_command=worker_argv("tests.workers.fault_worker", args),
                         nodes=nodes, nproc=nproc, log_dir=str(tmp),
                         extra_env=(("PYTHONPATH", str(Path(__file__).parent.parent)),),
                         store="etcd" if etcd_endpoint else "memory",
                         controllers=2 if etcd_endpoint else 1, etcd_endpoint=etcd_endpoint,
                         straggler_policy=straggler_policy, spares=spares, replace=replace,
                         hang_floor_s=hang_floor_s, persist_dir=persist_dir,
                         persist_every=persist_every, tls_dir=tls_dir, replicas=replicas,
                         replicate_interval_s=replicate_interval_s)
    with LocalJob(cfg) as job, _start_gate(gate, job, spares * nodes):
        try:
            if action is not None:
                job.wait_until(lambda s: max((w.last_step for w in s.workers), default=0)
                               >= (at_step or 0), JOB_TIMEOUT_S, f"step {at_step}")
                action(job)
            status = job.wait_until(lambda s: s.phase in ("complete", "failed"), JOB_TIMEOUT_S,
                                    "the job to end")
            job.wait_agents(30)
        except BaseException:
            print(job.logs())
            raise
        logs = job.logs()
    records = {}
    for f in out.glob("*.json"):
        rec = json.loads(f.read_text())
        rec["losses"] = {int(k): v for k, v in rec["losses"].items()}
        records[rec["worker_id"]] = rec
    summary = {
        "phase": status.phase, "epoch": status.epoch, "members": list(status.members),
        "recoveries": status.recoveries, "message": status.message,
        "timeline": [(e.kind, e.epoch, e.text) for e in status.timeline],
        "pids": {w.worker_id: w.pid for w in status.workers}, "logs": logs,
        "verdicts": [(v.detector, v.kind, v.worker_id, v.action) for v in status.verdicts],
        "shares": [],
    }
    return summary, records


@contextlib.contextmanager
def _start_gate(gate: Path | None, job: LocalJob, spares: int) -> Iterator[None]:
    """Open the job workers' start gate (a FIFO they block on) once `spares` spares are
    warm, and hold it open for the job's life, so that later opens pass at once."""
    if gate is None:
        yield
        return
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while job.logs().count(" is warm") < spares:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{spares} spares not warm within {JOB_TIMEOUT_S:.0f} s:\n"
                               + job.logs())
        time.sleep(0.1)  # polling the agents' log files (an observation, like wait_until)
    fd = os.open(gate, os.O_RDWR)  # a FIFO opened read-write never blocks: gate open
    try:
        yield
    finally:
        os.close(fd)


def assert_losses_match(records: dict, reference: dict[int, float]) -> None:
    """Every step each worker logged has the uninterrupted run's global loss."""
    for wid, rec in records.items():
        for step, loss in rec["losses"].items():
            assert math.isclose(loss, reference[step], rel_tol=1e-6, abs_tol=1e-9), (
                f"{wid} step {step}: {loss} != reference {reference[step]}")


@pytest.fixture(scope="session")
def zero_reference(tmp_path_factory: pytest.TempPathFactory) -> dict[int, float]:
    """The losses of an uninterrupted 40-step run with the sharded optimizer (--zero)."""
    summary, records = run_fault_job(tmp_path_factory.mktemp("zero-reference"), steps=40,
                                     extra_args=("--zero",))
    assert summary["phase"] == "complete", summary["logs"]
    curves = [r["losses"] for r in records.values()]
    assert all(c == curves[0] for c in curves)
    return curves[0]


def role(paths: dict[str, str], name: str) -> TLSConfig:
    return TLSConfig(ca_file=paths["ca"], cert_file=paths[f"{name}_cert"],
                     key_file=paths[f"{name}_key"])


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return make_dev_ca(str(tmp_path_factory.mktemp("pki")), hosts=["127.0.0.1", "localhost"],
                       identities=["agent", "admin"])


@pytest.fixture(scope="session")
def other_pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A second, unrelated CA with the same names: trusted by nobody above."""
    return make_dev_ca(str(tmp_path_factory.mktemp("other")), hosts=["127.0.0.1", "localhost"],
                       identities=["agent", "admin"])


@pytest.fixture
def job_dir(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Integration tests start real processes; run them after the fast unit tests.
    items.sort(key=lambda it: 1 if it.get_closest_marker("integration") else 0)


__all__ = ["JOB_TIMEOUT_S", "assert_losses_match", "os", "role", "run_fault_job"]


# ---- shared-memory snapshot files (test_shm.py, test_shm_refusals.py) -----------------------

@pytest.fixture
def shm_rngs() -> Iterator[None]:
    """The shm tests' trainer draws from the global RNGs: seed them, put them back after."""
    import random

    import torch

    torch_state, py_state = torch.get_rng_state(), random.getstate()
    torch.manual_seed(0)
    random.seed(0)
    yield
    torch.set_rng_state(torch_state)
    random.setstate(py_state)


@pytest.fixture(scope="module")
def written_once(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[int, Any]]:
    import random

    import torch

    from splice.checkpoint.snapshot import SnapshotRing
    from tests.shm_files import OWNER, Trainer, capture_steps, read_meta

    directory = tmp_path_factory.mktemp("written") / "snap"
    torch_state, py_state = torch.get_rng_state(), random.getstate()
    ring = SnapshotRing(directory=str(directory), owner=OWNER)
    originals = capture_steps(ring, Trainer(), 4)
    torch.set_rng_state(torch_state)
    random.setstate(py_state)
    assert ring.steps() == [2, 3]
    assert read_meta(directory, 0).step == 2 and read_meta(directory, 1).step == 3
    return directory, originals


@pytest.fixture
def written(tmp_path: Path, written_once: tuple[Path, dict[int, Any]]
            ) -> tuple[Path, dict[int, Any]]:
    """Steps 0..3 captured by `OWNER` into tmp_path/snap (a copy of the files a ring
    wrote once for the module): slot 0 holds step 2, slot 1 step 3 (the newest, the one
    tests tamper with). The originals by step."""
    import shutil

    directory = tmp_path / "snap"
    shutil.copytree(written_once[0], directory)
    return directory, written_once[1]
