"""The agent's side of its stream to the controller: the hello (with the resync of its
workers on a re-attach), relaying the controller's messages down to the workers, staying
attached across controller failovers, the batched telemetry and heartbeats that go up, and
the link probe rounds the controller asks this node to run.

A mixin of `Agent` (agent/agent.py), split out by concept; it uses the agent's config,
lock, worker states, upstream, local server, supervisor and snapshots.
"""

from __future__ import annotations

import collections
import logging
import queue
import signal
import socket
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import grpc

from splice.agent import linkprobe
from splice.agent.health import NodeHealthProbe
from splice.agent.local_server import LocalServer
from splice.agent.metrics import AgentMetrics
from splice.agent.progress import ProgressReader
from splice.agent.snapshots import NodeSnapshots
from splice.agent.supervisor import Supervisor
from splice.agent.upstream import Attached, Upstream
from splice.controller import telemetry_columns
from splice.proto import controller_pb2 as pb
from splice.proto import local_pb2 as lpb

if TYPE_CHECKING:
    from splice.agent.agent import AgentConfig
    from splice.agent.workers import _Worker

log = logging.getLogger("splice.agent")


class ControllerStream:
    # Provided by Agent.
    config: AgentConfig
    health: NodeHealthProbe
    metrics: AgentMetrics | None
    reconnects: int
    probe_address: str
    snapshot_address: str
    snapshots: NodeSnapshots
    _lock: threading.Lock
    _state: dict[str, _Worker]
    _spares: dict[str, int]
    _tainted: set[str]
    _latest: dict[str, lpb.AgentToWorker]
    _pending_ready: dict[str, pb.RecoveryReady]
    _epoch: int
    _attached_once: bool
    _outbox: queue.SimpleQueue[pb.AgentMessage | None] | None
    _stopping: threading.Event
    _attached: threading.Event
    _steps: collections.deque[pb.StepReport]
    _dropped: int
    _readers: dict[str, ProgressReader]
    _local: LocalServer
    _supervisor: Supervisor
    _upstream: Upstream
    _probe_server: linkprobe.ProbeServer | None
    _probe_cv: threading.Condition
    _probe_requests: collections.deque[pb.ProbeLinks]
    _probes_closed: bool
    _prober: threading.Thread | None
    # Provided by LocalWorkers (agent/workers.py).
    _release_standbys: Callable[[str], None]

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
