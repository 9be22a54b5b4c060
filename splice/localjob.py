"""A whole splice job on this machine: controller(s) and agent subprocesses.

With the in-memory store the controller runs in this process. With etcd, `controllers`
replicas run as subprocesses (so one can be SIGKILLed) against a given etcd, and agents are
given all their addresses. Used by `splice demo`, the benchmarks and the integration tests.
Every process it starts is in a session of its own and is killed, with its workers, when
the job is closed.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import grpc

from splice.controller.hang import HangConfig
from splice.controller.job import JobSpec
from splice.controller.service import Controller, ControllerConfig
from splice.controller.store import InMemoryStateStore
from splice.controller.telemetry_hub import DetectionConfig
from splice.proto import controller_pb2 as pb
from splice.proto import controller_pb2_grpc as pb_grpc
from splice.security import TLSConfig, make_dev_ca, open_channel, server_credentials


@dataclass(frozen=True, kw_only=True)
class LocalJobConfig:
    worker_command: tuple[str, ...]
    nodes: int = 2
    nproc: int = 2
    job_id: str = "local"
    min_world_size: int = 1
    log_dir: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="splice-job-"))
    extra_env: tuple[tuple[str, str], ...] = ()
    # (node index, name, value): environment for one node's agent (and its workers) only,
    # e.g. (2, "SPLICE_PROBE_DELAY_S", "0.05") to slow the links to node-2.
    node_env: tuple[tuple[int, str, str], ...] = ()
    # "memory": one in-process controller. "etcd": `controllers` replicas as subprocesses
    # electing a leader through the etcd at `etcd_endpoint`.
    store: str = "memory"
    controllers: int = 1
    etcd_endpoint: str = ""
    lease_ttl_s: float = 1.0
    # Serve Prometheus metrics from the controller(s) and every agent, on free ports.
    metrics: bool = False
    # What a detected straggler triggers: alert, rebalance or evict.
    straggler_policy: str = "alert"
    # A hang is declared after max(this, 3 x median step) without progress.
    hang_floor_s: float = 1.0
    # Warm spares per agent, and whether agents replace a crashed worker.
    spares: int = 0
    replace: bool = False
    # Persistent checkpoints (agents' --persist-dir / --persist-every).
    persist_dir: str = ""
    persist_every: int = 0
    # Mutual TLS everywhere (controller, agents, the agents' snapshot servers): a
    # development CA and certificates are written to this folder unless it has them.
    tls_dir: str = ""
    # Agents push replicas of their workers' snapshots to this many peers (--replicas).
    replicas: int = 0
    replicate_interval_s: float = 1.0

    def __post_init__(self) -> None:
        if self.store not in ("memory", "etcd"):
            raise ValueError(f"store must be memory or etcd, got {self.store!r}")
        if self.store == "memory" and self.controllers != 1:
            raise ValueError("several controllers need the etcd store")
        if self.store == "etcd" and not self.etcd_endpoint:
            raise ValueError("the etcd store needs etcd_endpoint")

    @property
    def world_size(self) -> int:
        return self.nodes * self.nproc


def node_name(i: int) -> str:
    return f"node-{i}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalJob:
    def __init__(self, config: LocalJobConfig) -> None:
        self.config = config
        self.tls = _dev_certs(config.tls_dir) if config.tls_dir else None
        self.controller: Controller | None = None
        self.controller_procs: dict[str, subprocess.Popen[bytes]] = {}
        if config.store == "memory":
            self.controller = Controller(
                ControllerConfig(listen="127.0.0.1:0", jobs=(JobSpec(
                    job_id=config.job_id, world_size=config.world_size,
                    min_world_size=config.min_world_size),)),
                InMemoryStateStore(),
                detection=DetectionConfig(straggler_policy=config.straggler_policy,
                                          hang=HangConfig(floor_s=config.hang_floor_s)),
                server_credentials=(server_credentials(self.tls["controller"])
                                    if self.tls else None))
        self.agent_metrics: list[str] = []
        self.controller_metrics: list[str] = []
        self.agents: list[subprocess.Popen[bytes]] = []
        self._logs: list[object] = []
        self._channels: dict[str, grpc.Channel] = {}

    def __enter__(self) -> LocalJob:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def addresses(self) -> list[str]:
        if self.controller is not None:
            return [f"127.0.0.1:{self.controller.port}"]
        return list(self.controller_procs)

    def _start_controllers(self, env: dict[str, str]) -> None:
        c = self.config
        for i in range(c.controllers):
            address = f"127.0.0.1:{_free_port()}"
            log = open(os.path.join(c.log_dir, f"controller-{i}.log"), "wb")
            self._logs.append(log)
            argv = [sys.executable, "-m", "splice", "controller", "--store", "etcd",
                    "--etcd", c.etcd_endpoint, "--etcd-prefix", f"/splice-{c.job_id}",
                    "--listen", address, "--job", c.job_id,
                    "--world-size", str(c.world_size), "--min-world-size",
                    str(c.min_world_size), "--lease-ttl-s", str(c.lease_ttl_s),
                    "--straggler-policy", c.straggler_policy,
                    "--hang-floor-s", str(c.hang_floor_s)]
            if c.metrics:
                port = _free_port()
                argv += ["--metrics-port", str(port), "--metrics-host", "127.0.0.1"]
                self.controller_metrics.append(f"127.0.0.1:{port}")
            else:
                argv += ["--metrics-port", "-1"]
            if self.tls:
                argv += _tls_flags(self.tls["controller"])
            self.controller_procs[address] = subprocess.Popen(
                argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def start(self) -> None:
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", "1")
        env.update(dict(self.config.extra_env))
        if self.controller is not None:
            self.controller.start()
            if self.config.metrics:
                self.controller_metrics.append(self.controller.serve_metrics())
        else:
            self._start_controllers(env)
        self._env = env
        for i in range(self.config.nodes):
            self._start_agent(i)

    def _start_agent(self, i: int) -> None:
        log = open(os.path.join(self.config.log_dir, f"{node_name(i)}.log"), "wb")
        self._logs.append(log)
        argv = [sys.executable, "-m", "splice", "agent",
                "--controller", ",".join(self.addresses),
                "--job", self.config.job_id, "--node-id", node_name(i),
                "--nproc", str(self.config.nproc), "--spares", str(self.config.spares)]
        if self.config.replace:
            argv.append("--replace")
        if self.config.persist_dir:
            argv += ["--persist-dir", self.config.persist_dir,
                     "--persist-every", str(self.config.persist_every)]
        if self.config.metrics:
            port = _free_port()
            argv += ["--metrics-port", str(port), "--metrics-host", "127.0.0.1"]
            self.agent_metrics.append(f"127.0.0.1:{port}")
        else:
            argv += ["--metrics-port", "-1"]
        if self.tls:
            argv += _tls_flags(self.tls["agent"])
        if self.config.replicas:
            argv += ["--replicas", str(self.config.replicas),
                     "--replicate-interval-s", str(self.config.replicate_interval_s)]
        argv += ["--", *self.config.worker_command]
        env = {**self._env, **{k: v for n, k, v in self.config.node_env if n == i}}
        self.agents.append(subprocess.Popen(argv, env=env, stdout=log,
                                            stderr=subprocess.STDOUT,
                                            start_new_session=True))

    def add_node(self) -> str:
        """Start one more agent (a node joining the running job); returns its node id."""
        i = len(self.agents)
        self._start_agent(i)
        return node_name(i)

    def kill_node(self, i: int) -> float:
        """SIGKILL node i's agent and its workers at once (they share its process group),
        like a machine that lost power. Returns the wall-clock time of the kill."""
        at = time.time()
        os.killpg(self.agents[i].pid, signal.SIGKILL)
        return at

    def status(self) -> pb.JobStatus:
        """The leader's view of the job (with replicas: whichever answers as leader; if
        none does right now, the freshest standby answer)."""
        if self.controller is not None:
            return self.controller.job_status(self.config.job_id)
        answers = []
        for address, proc in self.controller_procs.items():
            if proc.poll() is not None:
                continue
            try:
                status = self.controller_status(address)
            except grpc.RpcError:
                continue
            if status.leader:
                return status
            answers.append(status)
        if answers:
            return answers[0]
        return pb.JobStatus(job_id=self.config.job_id, phase="unreachable")

    def controller_status(self, address: str, timeout_s: float = 1.0) -> pb.JobStatus:
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = open_channel(
                address, self.tls["admin"] if self.tls else None)
        return pb_grpc.ControllerStub(channel).GetJobStatus(
            pb.JobStatusRequest(job_id=self.config.job_id), timeout=timeout_s)

    def kill_controller(self, address: str) -> float:
        """SIGKILL one controller replica; returns the wall-clock time it was sent."""
        proc = self.controller_procs[address]
        t = time.time()
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return t

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
        names = [f"{node_name(i)}.log" for i in range(len(self.agents))]
        names += [f"controller-{i}.log" for i in range(len(self.controller_procs))]
        for name in names:
            path = os.path.join(self.config.log_dir, name)
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
        for proc in self.controller_procs.values():
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        # Agents killed above could not remove their shared memory (snapshots): do it.
        from splice.agent.agent import sweep_stale_dirs

        sweep_stale_dirs("/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir())
        for channel in self._channels.values():
            channel.close()
        for log in self._logs:
            log.close()  # type: ignore[attr-defined]
        if self.controller is not None:
            self.controller.stop(grace_s=0.2)


def timeline_time(status: pb.JobStatus, kind: str, epoch: int | None = None) -> float | None:
    for ev in status.timeline:
        if ev.kind == kind and (epoch is None or ev.epoch == epoch):
            return ev.at_s
    return None


def member_losses(status: pb.JobStatus) -> list[float]:
    return [w.last_loss for w in status.workers if w.worker_id in set(status.members)]


def _dev_certs(folder: str) -> dict[str, TLSConfig]:
    """A development CA's certificates in `folder` (written first if it has none), as the
    TLS configuration of the controller, the agents and the job's own status client."""
    if not os.path.exists(os.path.join(folder, "ca.pem")):
        make_dev_ca(folder, hosts=["127.0.0.1", "localhost"], identities=["agent", "admin"])
    ca = os.path.join(folder, "ca.pem")
    return {role: TLSConfig(ca_file=ca, cert_file=os.path.join(folder, f"{role}.pem"),
                            key_file=os.path.join(folder, f"{role}-key.pem"))
            for role in ("controller", "agent", "admin")}


def _tls_flags(tls: TLSConfig) -> list[str]:
    return ["--tls-ca", tls.ca_file, "--tls-cert", tls.cert_file, "--tls-key", tls.key_file]


def worker_argv(module: str, args: Sequence[str]) -> tuple[str, ...]:
    return (sys.executable, "-m", module, *args)
