"""The node agent: launches and supervises workers, relays between them and the controller.

`splice agent --controller HOST:PORT --nproc N -- python train.py ...` starts N workers,
each told (through the environment) its worker id and the agent's Unix socket. Worker exits
are reported to the controller the moment they happen; controller messages (memberships,
resume decisions) are relayed to the workers at once. Survivors are never killed. If the
controller goes away the workers train on and the agent reconnects to whichever controller
replica leads, telling it what happened meanwhile.

This module holds the agent's configuration, its own resources (directories, servers) and
its run; the controller stream is in agent/controller_stream.py, the worker processes in
agent/workers.py.
"""

from __future__ import annotations

import collections
import logging
import os
import queue
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace

import grpc

from splice.agent import linkprobe
from splice.agent.controller_stream import ControllerStream
from splice.agent.health import NodeHealthProbe
from splice.agent.local_server import LocalServer
from splice.agent.metrics import AgentMetrics
from splice.agent.progress import ProgressReader
from splice.agent.snapshots import NodeSnapshots
from splice.agent.supervisor import Supervisor
from splice.agent.upstream import AgentRefused, Upstream
from splice.agent.workers import SPARE_REFILL_DELAY_S as SPARE_REFILL_DELAY_S
from splice.agent.workers import LocalWorkers, _Worker
from splice.controller.membership import worker_id
from splice.proto import controller_pb2 as pb
from splice.proto import local_pb2 as lpb
from splice.security import TLSConfig

log = logging.getLogger("splice.agent")

__all__ = ["Agent", "AgentConfig", "AgentRefused", "run_agent"]


@dataclass(frozen=True, kw_only=True)
class AgentConfig:
    # HOST:PORT of the controller, or a comma-separated list of controller replicas.
    controller: str
    command: tuple[str, ...]        # the worker command line
    nproc: int = 1                  # workers on this node
    job_id: str = "default"
    node_id: str = field(default_factory=socket.gethostname)
    # Address this node's workers bind their gloo connections to (reachable by peers).
    gloo_host: str = "127.0.0.1"
    # How long to keep retrying the first connection to the controller.
    connect_timeout_s: float = 30.0
    max_message_bytes: int = 4 * 1024 * 1024
    # Telemetry is batched: progress counters and step reports go up this often.
    telemetry_interval_s: float = 0.1
    # Step reports held while the controller is slow or away; the oldest are dropped
    # (and counted) beyond this, so the agent's memory stays bounded.
    max_buffered_steps: int = 10_000
    # Prometheus /metrics port on 127.0.0.1-or-metrics_host; 0 picks a free one, -1: none.
    metrics_port: int = -1
    metrics_host: str = "0.0.0.0"
    # Warm spares: worker processes started ahead of time (torch imported, the script run
    # up to splice.init()) that wait, unannounced, to take a crashed worker's place.
    spares: int = 0
    # When a worker crashes: promote a spare (or, without one, start a fresh process) that
    # joins at the next step boundary with a peer's snapshot. Off: survivors shrink.
    replace: bool = False
    # Persistent checkpoints: the hook's rank 0 (with a sharded optimizer, every rank its
    # shard) saves every `persist_every` steps under `persist_dir` (storage every node can
    # read); empty: off.
    persist_dir: str = ""
    persist_every: int = 0
    # Host memory each worker's in-memory snapshots may take (MB); 0: unlimited.
    snapshot_budget_mb: float = 0.0
    # The link probe server (on gloo_host) answers each ping and each MiB this much later:
    # a simulated slow link to this node, for tests and demos (SPLICE_PROBE_DELAY_S).
    probe_delay_s: float = 0.0
    # Replicas ahead of a fault: push each local worker's newest committed snapshot to this
    # many peer agents on other nodes (0: off), at most every `replicate_interval_s`, and
    # hold peers' replicas within `replica_budget_mb` (0: unlimited).
    replicas: int = 0
    # The failure domain this node shares with others (rack, zone): peers' replicas of its
    # snapshots go to other domains first ("": the node is its own).
    failure_domain: str = ""
    replica_budget_mb: float = 0.0
    replicate_interval_s: float = 1.0
    # Mutual TLS (the agent's --tls-* files): to the controller, on the snapshot server,
    # and for this node's workers fetching snapshots from other nodes' agents.
    tls: TLSConfig | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.probe_delay_s <= 10:
            raise ValueError(f"probe delay must be in [0, 10] s, got {self.probe_delay_s}")
        if self.snapshot_budget_mb < 0:
            raise ValueError(f"--snapshot-budget-mb must be >= 0, got {self.snapshot_budget_mb}")
        if self.persist_every < 0 or (self.persist_every and not self.persist_dir):
            raise ValueError("--persist-every must be >= 0 and needs --persist-dir")
        if self.replicas < 0 or self.replica_budget_mb < 0 or self.replicate_interval_s <= 0:
            raise ValueError(f"--replicas and --replica-budget-mb must be >= 0 and "
                             f"--replicate-interval-s > 0, got {self.replicas}, "
                             f"{self.replica_budget_mb}, {self.replicate_interval_s}")
        if self.nproc < 1:
            raise ValueError(f"--nproc must be >= 1, got {self.nproc}")
        if self.spares < 0:
            raise ValueError(f"--spares must be >= 0, got {self.spares}")
        if not self.command:
            raise ValueError("no worker command given (put it after --)")
        if not self.node_id or "/" in self.node_id:
            raise ValueError(f"node id must be non-empty without '/': {self.node_id!r}")
        for address in self.addresses:
            host, sep, port = address.rpartition(":")
            if not sep or not host or not port.isdigit():
                raise ValueError(f"--controller must be HOST:PORT[,HOST:PORT...], "
                                 f"got {self.controller!r}")

    @property
    def addresses(self) -> list[str]:
        return [a.strip() for a in self.controller.split(",") if a.strip()]


SHM_PREFIX = "splice-agent-"
OWNER_FILE = "owner.pid"


def sweep_stale_dirs(root: str) -> list[str]:
    """Remove the shared-memory directories of agents that are gone (killed, so they could
    not clean up): each names its owner's pid; a directory whose owner still runs, or
    without an owner file, is left alone. Returns the directories removed."""
    removed = []
    try:
        entries = [e for e in os.scandir(root) if e.name.startswith(SHM_PREFIX) and e.is_dir()]
    except OSError:
        return removed
    for entry in entries:
        try:
            with open(os.path.join(entry.path, OWNER_FILE)) as f:
                pid = int(f.read().strip() or 0)
        except (OSError, ValueError):
            continue
        if pid <= 0:
            continue
        try:
            os.kill(pid, 0)
            continue  # still running (or a pid reused: left for its owner)
        except ProcessLookupError:
            pass
        except PermissionError:
            continue  # another user's live process
        shutil.rmtree(entry.path, ignore_errors=True)
        removed.append(entry.path)
    if removed:
        log.info("removed %d shared-memory directories of agents that are gone",
                 len(removed))
    return removed


class Agent(ControllerStream, LocalWorkers):
    def __init__(self, config: AgentConfig,
                 credentials: grpc.ChannelCredentials | None = None) -> None:
        self.config = config
        self._workers = [worker_id(config.node_id, i) for i in range(config.nproc)]
        self._next_local = config.nproc
        # Spares launched and not promoted: worker id -> hello received (pid) or 0.
        self._spares: dict[str, int] = {}
        # Workers killed for corrupted state: their snapshots go to nobody.
        self._tainted: set[str] = set()
        self._replacements = 0
        self._done_training = False  # the controller said the job is complete
        self._dir = tempfile.mkdtemp(prefix="splice-agent-")
        # Progress counters live in shared memory when the platform has it.
        shm_root = "/dev/shm" if os.path.isdir("/dev/shm") else None
        sweep_stale_dirs(shm_root or tempfile.gettempdir())
        self._shm_dir = tempfile.mkdtemp(prefix=SHM_PREFIX, dir=shm_root)
        with open(os.path.join(self._shm_dir, OWNER_FILE), "w") as f:
            f.write(str(os.getpid()))
        self._expected = set(self._workers)  # shared with the local server; grows with spares
        self._local = LocalServer(os.path.join(self._dir, "agent.sock"), self._expected,
                                  self._on_worker_message, self._on_worker_disconnect)
        self._supervisor = Supervisor(self._on_exit)
        self._upstream = Upstream(config.addresses, self._hello, credentials=credentials,
                                  max_message_bytes=config.max_message_bytes)
        self._lock = threading.Lock()
        self._state = {w: _Worker() for w in self._workers}  # workers the controller knows
        self._latest: dict[str, lpb.AgentToWorker] = {}
        self._pending_ready: dict[str, pb.RecoveryReady] = {}
        self._epoch = 0
        self._attached_once = False
        self._outbox: queue.SimpleQueue[pb.AgentMessage | None] | None = None
        self._stopping = threading.Event()
        self._attached = threading.Event()
        self._steps: collections.deque[pb.StepReport] = collections.deque()
        self._dropped = 0
        self._readers: dict[str, ProgressReader] = {}
        self.health = NodeHealthProbe()
        self.metrics: AgentMetrics | None = None
        self.metrics_address = ""
        if config.metrics_port >= 0:
            metrics = AgentMetrics(config.job_id, config.node_id)
            try:
                port = metrics.serve(config.metrics_host, config.metrics_port)
                self.metrics = metrics
                self.metrics_address = f"{config.metrics_host}:{port}"
                log.info("agent %s serves metrics on %s", config.node_id, self.metrics_address)
            except OSError as e:  # metrics are worth a warning, not the node's workers
                log.warning("agent %s: cannot serve metrics on port %d: %s", config.node_id,
                            config.metrics_port, e)
        self.reconnects = 0
        # Link probes: a server peers measure this node's links with, and one thread that
        # runs the controller's probe requests one after another (at most a few queued).
        self._probe_server: linkprobe.ProbeServer | None = None
        self.probe_address = ""
        try:
            self._probe_server = linkprobe.ProbeServer(config.gloo_host, 0,
                                                       delay_s=config.probe_delay_s)
            self.probe_address = self._probe_server.address
        except OSError as e:  # links go unmeasured; the node's workers matter more
            log.warning("agent %s: cannot serve link probes on %s: %s", config.node_id,
                        config.gloo_host, e)
        # Snapshots: served to joining workers elsewhere, handed over, replicated to peers.
        self.snapshots = NodeSnapshots(config, self._shm_dir, self.metrics, self._members_now)
        self.snapshot_address = self.snapshots.address
        self._probe_cv = threading.Condition()
        self._probe_requests: collections.deque[pb.ProbeLinks] = collections.deque()
        self._probes_closed = False
        self._prober: threading.Thread | None = None

    def _members_now(self) -> list[str]:
        """The local workers connected now (whose snapshots are replicated)."""
        with self._lock:
            return [w for w, st in self._state.items()
                    if st.state == pb.WorkerResync.CONNECTED]

    # ---- main ---------------------------------------------------------------------------
    def _release(self) -> None:
        """Close the servers and remove the agent's directories (the snapshots' memory)."""
        self._local.close()
        self._close_probes()
        for reader in self._readers.values():
            reader.close()
        if self.metrics is not None:
            self.metrics.close()
        shutil.rmtree(self._shm_dir, ignore_errors=True)
        shutil.rmtree(self._dir, ignore_errors=True)

    def run(self) -> int:
        """Run until every worker has ended. Returns 0 if any worker finished training."""
        try:
            attached = self._upstream.attach(
                self._stopping, lambda: [],
                deadline_s=time.monotonic() + self.config.connect_timeout_s, first_time=True)
        except AgentRefused as e:
            log.error("agent %s: %s", self.config.node_id, e)
            self._release()
            return 2
        if attached is None:
            log.error("agent %s: no controller reachable at %s within %.0f s",
                      self.config.node_id, self.config.controller, self.config.connect_timeout_s)
            self._release()
            return 2
        log.info("agent %s attached to %s (job %s)", self.config.node_id, attached.address,
                 self.config.job_id)
        with self._lock:
            self._attached_once = True
        self._outbox = attached.outbox
        self._attached.set()
        threading.Thread(target=self._stay_attached, args=(attached,), daemon=True,
                         name="splice-agent-upstream").start()
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda s, _f: self._supervisor.signal_all(s))
        threading.Thread(target=self._telemetry, daemon=True, name="splice-telemetry").start()
        self._prober = threading.Thread(target=self._run_probes, daemon=True,
                                        name="splice-link-probes")
        self._prober.start()
        self.snapshots.start()
        for local_rank, wid in enumerate(self._workers):
            self._launch(wid, local_rank, spare=False)
        for _ in range(self.config.spares):
            self._launch_spare()
        if self.metrics is not None:
            self.metrics.set_workers(len(self._workers))
        self._wait_workers()
        # The workers' final states must reach a controller: if none is attached right now
        # (a failover in progress), wait for the re-attach, whose resync carries them.
        if not self._attached.wait(self.config.connect_timeout_s):
            log.error("agent %s: no controller to report the workers' end to",
                      self.config.node_id)
        self._stopping.set()
        outbox = self._outbox
        if outbox is not None:
            outbox.put(None)
        self._release()
        with self._lock:
            finished = sum(w.state == pb.WorkerResync.FINISHED for w in self._state.values())
        log.info("agent %s: all workers ended (%d finished training)", self.config.node_id,
                 finished)
        return 0 if finished else 1


def run_agent(config: AgentConfig, credentials: grpc.ChannelCredentials | None = None) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    delay = os.environ.get("SPLICE_PROBE_DELAY_S")
    if delay:  # the process edge: tests and demos slow this node's links with it
        config = replace(config, probe_delay_s=linkprobe.delay_from_env(delay))
    return Agent(config, credentials).run()
