"""A whole splice job on this machine: an in-process controller and agent subprocesses.

Used by `splice demo`, the benchmarks and the integration tests. Every process it starts
is in a session of its own and is killed, with its workers, when the job is closed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from splice.controller.job import JobSpec
from splice.controller.service import Controller, ControllerConfig
from splice.controller.store import InMemoryStateStore
from splice.proto import controller_pb2 as pb


@dataclass(frozen=True, kw_only=True)
class LocalJobConfig:
    worker_command: tuple[str, ...]
    nodes: int = 2
    nproc: int = 2
    job_id: str = "local"
    min_world_size: int = 1
    log_dir: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="splice-job-"))
    extra_env: tuple[tuple[str, str], ...] = ()

    @property
    def world_size(self) -> int:
        return self.nodes * self.nproc


def node_name(i: int) -> str:
    return f"node-{i}"


class LocalJob:
    def __init__(self, config: LocalJobConfig) -> None:
        self.config = config
        self.controller = Controller(
            ControllerConfig(listen="127.0.0.1:0", jobs=(JobSpec(
                job_id=config.job_id, world_size=config.world_size,
                min_world_size=config.min_world_size),)),
            InMemoryStateStore())
        self.agents: list[subprocess.Popen[bytes]] = []
        self._logs: list[object] = []

    def __enter__(self) -> LocalJob:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        self.controller.start()
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", "1")
        env.update(dict(self.config.extra_env))
        for i in range(self.config.nodes):
            log = open(os.path.join(self.config.log_dir, f"{node_name(i)}.log"), "wb")
            self._logs.append(log)
            argv = [sys.executable, "-m", "splice", "agent",
                    "--controller", f"127.0.0.1:{self.controller.port}",
                    "--job", self.config.job_id, "--node-id", node_name(i),
                    "--nproc", str(self.config.nproc), "--", *self.config.worker_command]
            self.agents.append(subprocess.Popen(argv, env=env, stdout=log,
                                                stderr=subprocess.STDOUT,
                                                start_new_session=True))

    def status(self) -> pb.JobStatus:
        return self.controller.job_status(self.config.job_id)

    def wait_until(self, predicate: Callable[[pb.JobStatus], bool], timeout_s: float,
                   what: str) -> pb.JobStatus:
        """Poll the controller's view until `predicate` holds; raises TimeoutError."""
        deadline = time.monotonic() + timeout_s
        while True:
            status = self.status()
            if predicate(status):
                return status
            if status.phase == "failed":
                raise RuntimeError(f"job failed while waiting for {what}: {status.message}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}; "
                                   f"phase {status.phase}, logs in {self.config.log_dir}")
            time.sleep(0.02)  # polling a status view, not synchronising processes

    def worker(self, status: pb.JobStatus, worker_id: str) -> pb.WorkerStatus:
        for w in status.workers:
            if w.worker_id == worker_id:
                return w
        raise KeyError(worker_id)

    def kill_worker(self, worker_id: str, sig: int = signal.SIGKILL) -> float:
        """Send `sig` to a worker process; returns the wall-clock time it was sent."""
        pid = self.worker(self.status(), worker_id).pid
        t = time.time()
        os.kill(pid, sig)
        return t

    def wait_agents(self, timeout_s: float) -> list[int]:
        deadline = time.monotonic() + timeout_s
        codes = []
        for a in self.agents:
            codes.append(a.wait(timeout=max(0.1, deadline - time.monotonic())))
        return codes

    def logs(self) -> str:
        out = []
        for i in range(self.config.nodes):
            path = os.path.join(self.config.log_dir, f"{node_name(i)}.log")
            if os.path.exists(path):
                with open(path, errors="replace") as f:
                    out.append(f"==== {path}\n{f.read()}")
        return "\n".join(out)

    def close(self) -> None:
        for a in self.agents:
            if a.poll() is None:
                try:
                    os.killpg(a.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            a.wait()
        # Workers are in their agent's process group: killpg reached them too; make sure.
        for a in self.agents:
            try:
                os.killpg(a.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        for log in self._logs:
            log.close()  # type: ignore[attr-defined]
        self.controller.stop(grace_s=0.2)


def timeline_time(status: pb.JobStatus, kind: str, epoch: int | None = None) -> float | None:
    for ev in status.timeline:
        if ev.kind == kind and (epoch is None or ev.epoch == epoch):
            return ev.at_s
    return None


def member_losses(status: pb.JobStatus) -> list[float]:
    return [w.last_loss for w in status.workers if w.worker_id in set(status.members)]


def worker_argv(module: str, args: Sequence[str]) -> tuple[str, ...]:
    return (sys.executable, "-m", module, *args)
