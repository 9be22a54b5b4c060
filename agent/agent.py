"""The node agent: launches and supervises workers, relays between them and the controller.

`splice agent --controller HOST:PORT --nproc N -- python train.py ...` starts N workers,
each told (through the environment) its worker id and the agent's Unix socket. Worker exits
are reported to the controller the moment they happen; controller messages (memberships,
resume decisions) are relayed to the workers at once. Survivors are never killed. If the
controller goes away the workers train on and the agent reconnects to whichever controller
replica leads, telling it what happened meanwhile.
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

from splice.agent import linkprobe, progress
from splice.agent.health import NodeHealthProbe
from splice.agent.local_server import LocalServer
from splice.agent.metrics import AgentMetrics
from splice.agent.progress import ProgressReader
from splice.agent.snapshots import NodeSnapshots
from splice.agent.supervisor import Exit, Supervisor
from splice.agent.upstream import AgentRefused, Attached, Upstream
from splice.controller import telemetry_columns
from splice.controller.membership import worker_id
from splice.proto import controller_pb2 as pb
from splice.proto import local_pb2 as lpb
from splice.security import TLSConfig

log = logging.getLogger("splice.agent")

SPARE_REFILL_DELAY_S = 5.0

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


@dataclass
class _Worker:
    pid: int = 0
    state: int = pb.WorkerResync.STARTING
    exit_code: int = 0
    signal: int = 0


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


class Agent:
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

    # ---- upstream -----------------------------------------------------------------------
    def _hello(self) -> pb.AgentHello:
        hello = pb.AgentHello(
            protocol_version=pb.PROTOCOL_VERSION_1, job_id=self.config.job_id,
            node_id=self.config.node_id, num_workers=self.config.nproc,
            hostname=socket.gethostname(), probe_address=self.probe_address,
            snapshot_address=self.snapshot_address, failure_domain=self.config.failure_domain)
        with self._lock:
            if self._attached_once:  # a re-attach: tell the controller what it missed
                hello.epoch = self._epoch
                for wid, w in self._state.items():
                    hello.workers.append(pb.WorkerResync(
                        worker_id=wid, state=w.state, pid=w.pid,  # type: ignore[arg-type]
                        exit_code=w.exit_code, signal=w.signal))
        return hello

    def _resend_after_hello(self) -> list[pb.AgentMessage]:
        with self._lock:
            return [pb.AgentMessage(recovery_ready=r) for r in self._pending_ready.values()]

    def _send_up(self, msg: pb.AgentMessage) -> None:
        outbox = self._outbox
        if outbox is not None:  # while detached, the resync on re-attach carries the state
            outbox.put(msg)

    def _relay_down(self, attached: Attached) -> None:
        try:
            for msg in attached.responses:
                kind = msg.WhichOneof("kind")
                if kind == "refusal":
                    log.info("controller refused: %s: %s",
                             pb.Refusal.Code.Name(msg.refusal.code), msg.refusal.message)
                    continue
                if kind == "shutdown":
                    if msg.shutdown.complete:
                        self._release_standbys(msg.shutdown.reason)
                        continue
                    log.warning("controller asks to shut down: %s", msg.shutdown.reason)
                    self._supervisor.signal_all(signal.SIGTERM)
                    continue
                if kind == "kill":
                    if msg.kill.epoch >= self._epoch:
                        log.warning("controller kills worker %s: %s", msg.kill.worker_id,
                                    msg.kill.reason)
                        if msg.kill.discard_snapshots:
                            with self._lock:
                                self._tainted.add(msg.kill.worker_id)
                        self._supervisor.signal(msg.kill.worker_id, signal.SIGKILL)
                    else:
                        log.info("ignoring a kill of epoch %d (now %d)", msg.kill.epoch,
                                 self._epoch)
                    continue
                if kind == "probe_links":
                    self._queue_probes(msg.probe_links)
                    continue
                if kind == "check_replicas":
                    log.info("controller asks for a replica check: %s",
                             msg.check_replicas.reason)
                    self._local.broadcast(lpb.AgentToWorker(check_replicas=msg.check_replicas))
                    continue
                if kind == "membership":
                    with self._lock:
                        self._epoch = max(self._epoch, msg.membership.epoch)

                        self._pending_ready = {w: r for w, r in self._pending_ready.items()
                                               if r.epoch >= msg.membership.epoch}
                    self.snapshots.on_membership(msg.membership)
                    down = lpb.AgentToWorker(membership=msg.membership)
                elif kind == "resume":
                    with self._lock:
                        self._pending_ready = {w: r for w, r in self._pending_ready.items()
                                               if r.epoch > msg.resume.epoch}
                    down = lpb.AgentToWorker(resume=msg.resume)
                else:
                    continue
                with self._lock:
                    self._latest[kind] = down
                self._local.broadcast(down)
        except grpc.RpcError as e:
            if not self._stopping.is_set():
                log.warning("lost the controller stream to %s (%s); workers keep training",
                            attached.address, e.code().name)

    def _stay_attached(self, first: Attached) -> None:
        """Relay until the stream ends, then re-attach (to the new leader) and go on."""
        attached: Attached | None = first
        while attached is not None and not self._stopping.is_set():
            self._outbox = attached.outbox
            self._attached.set()
            threading.Thread(target=self._heartbeats, args=(attached,), daemon=True,
                             name="splice-heartbeat").start()
            self._relay_down(attached)
            self._attached.clear()
            self._outbox = None
            attached.outbox.put(None)
            attached.channel.close()
            if self._stopping.is_set():
                return
            attached = self._upstream.attach(self._stopping, self._resend_after_hello,
                                             deadline_s=None, first_time=False)
            if attached is not None:
                self.reconnects += 1
                log.info("agent %s re-attached to %s", self.config.node_id, attached.address)

    def _telemetry(self) -> None:
        """Every interval: the workers' progress counters and the steps completed since, as
        columns (controller/telemetry_columns.py: the controller decodes them in bulk). The
        worker table the columns index goes up with the first batch of every attach (each
        has its own outbox) and again whenever a worker it lacks appears."""
        table: dict[str, int] = {}       # worker id -> index, as last sent on table_outbox
        table_outbox = None
        while not self._stopping.wait(self.config.telemetry_interval_s):  # a period
            batch = pb.Telemetry(sent_at_s=time.time(), health=self.health.read())
            if self.config.replace:
                with self._lock:
                    batch.replacements_ready = sum(1 for pid in self._spares.values() if pid)
            if self.metrics is not None:
                self.metrics.node_health(batch.health.memory_used_ratio,
                                         batch.health.cpu_throttled_ratio)
                self.metrics.set_workers(self._supervisor.live)
            progress = []
            for wid, reader in list(self._readers.items()):
                p = reader.read()
                if p is None or p.pid == 0:
                    continue
                progress.append((wid, p))
            outbox = self._outbox
            steps: list[pb.StepReport] = []
            with self._lock:
                if outbox is not None:
                    steps = list(self._steps)
                    self._steps.clear()
                    batch.dropped, self._dropped = self._dropped, 0
            if outbox is None or not (progress or steps or batch.dropped):
                continue
            wids = [w for w, _ in progress] + [r.worker_id for r in steps]
            if outbox is not table_outbox or not table.keys() >= set(wids):
                # This node's workers now, and any whose last steps are still on their way.
                table = {w: i for i, w in enumerate(dict.fromkeys([*self._readers, *wids]))}
                batch.workers.worker_ids.extend(table)
                table_outbox = outbox
            if progress:
                telemetry_columns.encode_progress(batch.progress_columns,
                                                  [(table[w], p) for w, p in progress])
            if steps:
                telemetry_columns.encode_steps(batch.step_columns,
                                               [(table[r.worker_id], r) for r in steps])
            outbox.put(pb.AgentMessage(telemetry=batch))

    def _heartbeats(self, attached: Attached) -> None:
        while not self._stopping.is_set() and self._outbox is attached.outbox:
            self._stopping.wait(attached.heartbeat_interval_s)  # a period, not a sync
            attached.outbox.put(pb.AgentMessage(heartbeat=pb.Heartbeat(
                epoch=self._epoch, sent_at_s=time.time())))

    # ---- link probes --------------------------------------------------------------------
    _MAX_QUEUED_PROBE_REQUESTS = 2   # a controller asks once per cool-down; more is stale
    _MAX_PROBE_TARGETS = 1024        # a round names each other node at most once

    def _queue_probes(self, req: pb.ProbeLinks) -> None:
        with self._probe_cv:
            if len(self._probe_requests) >= self._MAX_QUEUED_PROBE_REQUESTS:
                log.warning("agent %s: dropping link probe round %d: %d rounds queued",
                            self.config.node_id, req.round, len(self._probe_requests))
                return
            self._probe_requests.append(req)
            self._probe_cv.notify()

    def _run_probes(self) -> None:
        """One request at a time: its targets one after another (concurrent probes would
        share this node's link and measure each other), then one report up."""
        while True:
            with self._probe_cv:
                self._probe_cv.wait_for(lambda: self._probe_requests or self._probes_closed)
                if self._probes_closed:
                    return
                req = self._probe_requests.popleft()
            payload = min(max(req.payload_bytes, 1), linkprobe.MAX_BULK_BYTES)
            timeout_s = min(max(req.timeout_s, 0.1), 60.0) if req.timeout_s > 0 else 10.0
            report = pb.LinkProbeReport(round=req.round)
            for t in req.targets[:self._MAX_PROBE_TARGETS]:
                if self._probes_closed:
                    return
                if t.node_id == self.config.node_id:
                    continue
                res = pb.LinkProbeResult(from_node=self.config.node_id, to_node=t.node_id,
                                         at_s=time.time())
                try:
                    res.rtt_s, res.bandwidth_bytes_per_s = linkprobe.probe(
                        t.address, payload, timeout_s)
                except (linkprobe.ProbeError, ValueError) as e:
                    res.error = str(e)[:500]
                report.results.append(res)
            log.info("agent %s: link probe round %d: %s", self.config.node_id, req.round,
                     ", ".join(f"{r.to_node} " + (f"failed ({r.error})" if r.error else
                                                  f"{r.bandwidth_bytes_per_s / 1e6:.0f} MB/s"
                                                  f" rtt {r.rtt_s * 1e3:.2f} ms")
                               for r in report.results) or "no targets")
            self._send_up(pb.AgentMessage(link_probes=report))

    def _close_probes(self) -> None:
        with self._probe_cv:
            self._probes_closed = True
            self._probe_cv.notify_all()
        if self._probe_server is not None:
            self._probe_server.close()
        self.snapshots.close()
        if self._prober is not None:
            # A probe in flight ends within its timeout (the peer's server may be gone).
            self._prober.join(timeout=1.0)

    # ---- workers ------------------------------------------------------------------------
    def _on_exit(self, ex: Exit) -> None:
        how = f"signal {ex.signal}" if ex.signal else f"code {ex.exit_code}"
        clean = ex.exit_code == 0 and not ex.signal
        with self._lock:
            was_spare = self._spares.pop(ex.worker_id, None) is not None
        if was_spare:
            log.log(logging.INFO if self._stopping.is_set() else logging.WARNING,
                    "spare %s (pid %d) exited: %s", ex.worker_id, ex.pid, how)
            return
        with self._lock:
            known = self._state.get(ex.worker_id)
            replaceable = (known is not None and known.state != pb.WorkerResync.FINISHED
                           and not self._done_training)
        self.snapshots.discard_staging(ex.worker_id)
        if not clean and replaceable and self.config.replace and not self._stopping.is_set():
            # The replacement is announced before the exit, so the controller can put it
            # in the lost worker's place in the same epoch.
            self._replace(ex.worker_id)
        else:  # nobody takes its place here: its snapshots' memory goes back
            shutil.rmtree(self.snapshots.directory(ex.worker_id), ignore_errors=True)
        log.log(logging.INFO if clean else logging.WARNING,
                "worker %s (pid %d) exited: %s", ex.worker_id, ex.pid, how)
        if self.metrics is not None:
            self.metrics.worker_exit("clean" if clean else "killed" if ex.signal else "crash")
        with self._lock:
            w = self._state[ex.worker_id]
            if not (clean and w.state == pb.WorkerResync.FINISHED):
                w.state, w.exit_code, w.signal = pb.WorkerResync.EXITED, ex.exit_code, ex.signal
            self._pending_ready.pop(ex.worker_id, None)
        self._send_up(pb.AgentMessage(worker_event=pb.WorkerEvent(
            worker_id=ex.worker_id, kind=pb.WorkerEvent.EXITED, pid=ex.pid,
            exit_code=ex.exit_code, signal=ex.signal, at_s=time.time())))

    # ---- spares and replacements --------------------------------------------------------
    def _launch(self, wid: str, local_rank: int, *, spare: bool) -> int:
        progress_path = os.path.join(self._shm_dir, f"progress-{local_rank}")
        progress.create(progress_path)
        self._readers[wid] = ProgressReader(progress_path)
        env = dict(os.environ)
        env.update({
            "SPLICE_AGENT_SOCKET": self._local.path, "SPLICE_WORKER_ID": wid,
            "SPLICE_JOB_ID": self.config.job_id, "SPLICE_NODE_ID": self.config.node_id,
            "SPLICE_LOCAL_RANK": str(local_rank), "SPLICE_GLOO_HOST": self.config.gloo_host,
            "SPLICE_PROGRESS_PATH": progress_path, "SPLICE_SPARE": "1" if spare else "0",
            "SPLICE_SNAPSHOT_DIR": self.snapshots.directory(wid),
        })
        if self.config.snapshot_budget_mb:
            env["SPLICE_SNAPSHOT_BUDGET_MB"] = str(self.config.snapshot_budget_mb)
        if self.config.persist_dir:
            env["SPLICE_PERSIST_DIR"] = self.config.persist_dir
            env["SPLICE_PERSIST_EVERY"] = str(self.config.persist_every)
        if self.config.tls is not None:
            env["SPLICE_TLS_CA"] = self.config.tls.ca_file
            env["SPLICE_TLS_CERT"] = self.config.tls.cert_file
            env["SPLICE_TLS_KEY"] = self.config.tls.key_file
        env.setdefault("OMP_NUM_THREADS", "1")
        with self._lock:
            self._expected.add(wid)
            if spare:
                self._spares[wid] = 0
        pid = self._supervisor.launch(wid, self.config.command, env)
        if not spare:
            self._announce(wid, pid)
        return pid

    def _hand_over_snapshots(self, lost: str, to: str) -> None:
        with self._lock:
            tainted = lost in self._tainted
        self.snapshots.hand_over(lost, to, tainted=tainted)

    def _announce(self, wid: str, pid: int) -> None:
        with self._lock:
            self._state[wid] = _Worker(pid=pid)
        self._send_up(pb.AgentMessage(worker_event=pb.WorkerEvent(
            worker_id=wid, kind=pb.WorkerEvent.STARTED, pid=pid, at_s=time.time())))

    def _new_local_rank(self) -> tuple[str, int]:
        with self._lock:
            local = self._next_local
            self._next_local += 1
        return worker_id(self.config.node_id, local), local

    def _launch_spare(self) -> None:
        if self._stopping.is_set():
            return
        wid, local = self._new_local_rank()
        pid = self._launch(wid, local, spare=True)
        log.info("agent %s: warm spare %s started (pid %d)", self.config.node_id, wid, pid)

    def _replace(self, lost: str) -> None:
        """Put a worker in the place of `lost`: the warmest spare, else a fresh process."""
        with self._lock:
            ready = [w for w, pid in self._spares.items() if pid]
            waiting = [w for w, pid in self._spares.items() if not pid]
            wid = (ready or waiting or [None])[0]
            pid = self._spares.pop(wid) if wid is not None else 0
            self._replacements += 1
        if wid is None:
            wid, local = self._new_local_rank()
            self._hand_over_snapshots(lost, wid)
            pid = self._launch(wid, local, spare=False)
            log.warning("agent %s: no warm spare; started %s (pid %d) to replace %s",
                        self.config.node_id, wid, pid, lost)
            return
        self._hand_over_snapshots(lost, wid)
        log.warning("agent %s: spare %s takes the place of %s", self.config.node_id, wid,
                    lost)
        self._announce(wid, pid or self._supervisor.pids().get(wid, 0))
        if pid:  # already connected: it is ready now
            with self._lock:
                self._state[wid].state = pb.WorkerResync.CONNECTED
            self._send_up(pb.AgentMessage(worker_event=pb.WorkerEvent(
                worker_id=wid, kind=pb.WorkerEvent.READY, pid=pid, at_s=time.time())))
        # Refill the spare once the replacement has joined: a process importing torch
        # now would compete for the CPU with the recovery it is meant to speed up.
        refill = threading.Timer(SPARE_REFILL_DELAY_S, self._launch_spare)
        refill.daemon = True
        refill.start()

    def _release_standbys(self, why: str) -> None:
        """The job is over: stop every process that is not a finished member (spares,
        standbys that were never admitted). Finished workers exit on their own."""
        with self._lock:
            self._done_training = True
            finished = {w for w, st in self._state.items()
                        if st.state in (pb.WorkerResync.FINISHED, pb.WorkerResync.EXITED)}
        alive = set(self._supervisor.pids())
        for wid in sorted(alive - finished):
            if self._supervisor.signal(wid, signal.SIGTERM):
                log.info("agent %s: stopping %s: %s", self.config.node_id, wid, why)

    def _wait_workers(self) -> None:
        """Until every worker the controller knows has ended; then the spares go."""
        def ended(alive: set[str]) -> bool:
            with self._lock:
                return not (alive & set(self._state))
        self._supervisor.wait_until(ended)
        with self._lock:
            spares = list(self._spares)
        for wid in spares:
            self._supervisor.signal(wid, signal.SIGTERM)
        if not self._supervisor.wait_all(10.0):
            self._supervisor.kill_all()
            self._supervisor.wait_all()

    def _on_worker_message(self, wid: str, msg: lpb.WorkerToAgent) -> None:
        kind = msg.WhichOneof("kind")
        if kind == "hello":
            with self._lock:
                if wid in self._spares:  # a spare is warm; it stays unannounced
                    self._spares[wid] = msg.hello.pid
                    log.info("agent %s: spare %s is warm", self.config.node_id, wid)
                    return
                self._state[wid].state = pb.WorkerResync.CONNECTED
                self._state[wid].pid = msg.hello.pid
                latest = [self._latest[k] for k in ("membership", "resume") if k in self._latest]
            self._send_up(pb.AgentMessage(worker_event=pb.WorkerEvent(
                worker_id=wid, kind=pb.WorkerEvent.READY, pid=msg.hello.pid, at_s=time.time())))
            for down in latest:
                self._local.send(wid, down)
        elif kind == "step_report":  # batched into the next telemetry message
            if msg.step_report.worker_id == wid:
                r = msg.step_report
                self.snapshots.trained(r.epoch)
                if self.metrics is not None:
                    self.metrics.step(r.step_time_s, r.compute_s, r.wait_s, r.collective_bytes)
                    if r.snapshot_at_s:
                        self.metrics.snapshot(r.snapshot_bytes,
                                              max(0.0, time.time() - r.snapshot_at_s))
                with self._lock:
                    if len(self._steps) >= self.config.max_buffered_steps:
                        self._steps.popleft()
                        self._dropped += 1
                    self._steps.append(msg.step_report)
        elif kind == "recovery_ready":
            if msg.recovery_ready.worker_id == wid:
                with self._lock:
                    self._pending_ready[wid] = msg.recovery_ready
                self._send_up(pb.AgentMessage(recovery_ready=msg.recovery_ready))
        elif kind == "corruption":
            if msg.corruption.worker_id == wid:
                self._send_up(pb.AgentMessage(corruption=msg.corruption))
        elif kind == "finished":
            with self._lock:
                self._state[wid].state = pb.WorkerResync.FINISHED
                # Its last steps go up before the news that it finished.
                steps = list(self._steps)
                self._steps.clear()
            if steps:
                self._send_up(pb.AgentMessage(telemetry=pb.Telemetry(
                    sent_at_s=time.time(), steps=steps)))
            self._send_up(pb.AgentMessage(worker_event=pb.WorkerEvent(
                worker_id=wid, kind=pb.WorkerEvent.FINISHED, at_s=time.time())))

    def _on_worker_disconnect(self, wid: str) -> None:
        log.debug("worker %s closed its channel", wid)

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
