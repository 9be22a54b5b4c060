"""The controller process: gRPC service, one event loop per controller, and the job states.

Agents attach with one bidirectional stream each. Everything they send becomes an event on
a single queue; one loop thread applies events to the pure job state machine, persists new
epochs through the state store and only then sends. Decisions are thus serialised and never
announced unpersisted.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc

from splice.controller import job as jobs
from splice.controller.agent_sessions import (  # noqa: F401 (API kept here too)
    PROTOCOL_VERSION,
    AgentSession,
    AgentSessions,
)
from splice.controller.leadership import Leadership, refusal
from splice.controller.links import LinkProbeConfig, LinkProber
from splice.controller.membership import Membership, node_of
from splice.controller.rendezvous import RendezvousStore
from splice.controller.status import JobView
from splice.controller.store import (
    EpochConflict,
    EpochRecord,
    Fence,
    NotLeader,
    StateStore,
    StoreUnavailable,
)
from splice.controller.telemetry_columns import Batch
from splice.controller.telemetry_hub import DetectionConfig, TelemetryHub
from splice.proto import controller_pb2 as pb
from splice.proto import controller_pb2_grpc as pb_grpc

log = logging.getLogger("splice.controller")


class Election(Protocol):
    """Leader election among controller replicas (controller/leader.py on etcd)."""

    def campaign(self, stop: threading.Event) -> Fence | None: ...
    def resign(self) -> None: ...
    def leader(self) -> str | None: ...


AdminCheck = Callable[[grpc.ServicerContext, str], None]


class TelemetrySink(Protocol):
    def observe(self, job_id: str, node_id: str, batch: Batch, epoch: int) -> None: ...
    def tick(self) -> None: ...
    def scores(self, job_id: str) -> dict[str, float]: ...


def allow_everyone(context: grpc.ServicerContext, action: str) -> None:
    """Without TLS there is no identity to check: whoever reaches the port is admin."""
    del context, action



@dataclass(frozen=True, kw_only=True)
class ControllerConfig:
    # host:port to serve gRPC on; port 0 picks a free one (see Controller.port).
    listen: str = "127.0.0.1:29400"
    # The address workers dial for the rendezvous store; must be reachable from every node.
    advertise_host: str = "127.0.0.1"
    # Port of the rendezvous store; 0 picks a free one.
    store_port: int = 0
    # Agents send a heartbeat this often; the controller tells them in its welcome.
    heartbeat_interval_s: float = 1.0
    # An agent silent this long (no heartbeat, no event) is declared lost with its workers.
    node_timeout_s: float = 10.0
    # Larger messages are refused by gRPC before they reach any handler.
    max_message_bytes: int = 4 * 1024 * 1024
    # After taking over as leader, how long members' agents have to re-attach before
    # their workers are counted lost.
    reattach_grace_s: float = 5.0
    # A member that has not reported ready this long after a new epoch was announced
    # (a stopped or wedged process cannot) is killed and the job goes on without it.
    recovery_timeout_s: float = 10.0
    # Ready standbys wait at most this long for other workers of their node still
    # starting, so that a joining node is admitted in one re-formation.
    admit_wait_s: float = 5.0
    jobs: tuple[jobs.JobSpec, ...] = ()

    def __post_init__(self) -> None:
        host, sep, port = self.listen.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"listen address must be HOST:PORT, got {self.listen!r}")
        if self.node_timeout_s <= self.heartbeat_interval_s:
            raise ValueError("node_timeout_s must exceed heartbeat_interval_s")
        if not self.jobs:
            raise ValueError("a controller needs at least one job")
        ids = [j.job_id for j in self.jobs]
        if len(set(ids)) != len(ids):
            raise ValueError(f"duplicate job ids: {ids}")



@dataclass
class _JobRuntime:
    state: jobs.JobState
    view: JobView
    # For metrics: when the fault being recovered from happened, and time lost so far.
    fault_at_s: float | None = None
    fault_kind: str = ""
    lost_s: float = 0.0
    started_at_s: float | None = None
    # When the job entered its current recovery (for the recovery timeout).
    recovering_since_s: float | None = None
    # (epoch, step) of corruption findings already acted on.
    corruptions: set[tuple[int, int]] = field(default_factory=set)
    # Since when ready standbys have been waiting to be admitted.
    standby_since_s: float | None = None


# Queue items: (session that sent it or None, job id, event or callable run on the loop).
_Item = tuple[AgentSession | None, str, "jobs.Event | Callable[[], None]"]


class Controller(Leadership, AgentSessions):
    def __init__(self, config: ControllerConfig, store: StateStore,
                 clock: Callable[[], float] = time.time, *, election: Election | None = None,
                 server_credentials: grpc.ServerCredentials | None = None,
                 admin_check: AdminCheck = allow_everyone,
                 attach_check: AdminCheck = allow_everyone,
                 detection: DetectionConfig | None = None,
                 links: LinkProbeConfig | None = None) -> None:
        self.config = config
        self._store = store
        self._clock = clock
        self._election = election
        self._credentials = server_credentials
        self._admin_check = admin_check
        # May the authenticated peer attach as node `action`? (a certificate's identity
        # must not let it speak for somebody else's node)
        self._attach_check = attach_check
        self._jobs = {
            spec.job_id: _JobRuntime(jobs.JobState(spec=spec), JobView()) for spec in config.jobs
        }
        if election is None:
            for spec in config.jobs:
                if store.load_epoch(spec.job_id) is not None:
                    raise RuntimeError(
                        f"job {spec.job_id!r} already has epochs in the state store; a job "
                        "is taken over only by an elected controller (run with an election)")
        # Detectors fed by telemetry (controller/telemetry_hub.py).
        self.telemetry: TelemetrySink | None = TelemetryHub(self, detection, clock)
        # Link probe rounds between the agents (controller/links.py).
        self.links = LinkProber(self, links, clock)
        # Prometheus metrics (controller/metrics.py); None: not exported.
        self.metrics: Any = None
        self.metrics_address = ""
        self._fence: Fence | None = None
        self._leading = threading.Event()
        self._lost = threading.Event()
        self._stop = threading.Event()
        self.leader_since_s = 0.0
        # (job, node) -> wall-clock deadline for re-attaching after a takeover
        self._expected: dict[tuple[str, str], float] = {}
        self._sessions: dict[tuple[str, str], AgentSession] = {}
        self._sessions_lock = threading.Lock()
        self._events: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._server: grpc.Server | None = None
        self._loop: threading.Thread | None = None
        self.rendezvous: RendezvousStore | None = None
        self.port = 0

    # ---- lifecycle ----------------------------------------------------------------------
    def start(self) -> None:
        host, _, port = self.config.listen.rpartition(":")
        self.rendezvous = RendezvousStore(self.config.advertise_host, self.config.store_port)
        opts = [("grpc.max_receive_message_length", self.config.max_message_bytes),
                ("grpc.max_send_message_length", self.config.max_message_bytes),
                ("grpc.so_reuseport", 0)]
        self._executor = futures.ThreadPoolExecutor(max_workers=256,
                                                    thread_name_prefix="splice-grpc")
        self._server = grpc.server(self._executor, options=opts)
        from splice.controller.servicer import ControllerServicer

        pb_grpc.add_ControllerServicer_to_server(ControllerServicer(self), self._server)
        if self._credentials is not None:
            self.port = self._server.add_secure_port(f"{host}:{port}", self._credentials)
        else:
            self.port = self._server.add_insecure_port(f"{host}:{port}")
        if self.port == 0:
            raise OSError(f"cannot listen on {self.config.listen}")
        self.address = f"{self.config.advertise_host}:{self.port}"
        self._loop = threading.Thread(target=self._run_loop, name="splice-controller-loop",
                                      daemon=True)
        self._loop.start()
        self._server.start()
        if self._election is None:
            self._become_leader(None)
        else:
            threading.Thread(target=self._lead, name="splice-election", daemon=True).start()
        log.info("controller serving on %s:%d, rendezvous store on %s:%d", host, self.port,
                 self.rendezvous.host, self.rendezvous.port)

    def serve_metrics(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Export Prometheus metrics on http://HOST:PORT/metrics; returns HOST:PORT."""
        from splice.controller.metrics import ControllerMetrics

        self.metrics = ControllerMetrics()
        self.metrics.set_leader(self.leading)
        bound = self.metrics.serve(host, port)
        self.metrics_address = f"{host}:{bound}"
        return self.metrics_address

    def stop(self, grace_s: float = 1.0) -> None:
        """Stop serving; a leader resigns first so that a standby takes over at once."""
        self._stop.set()
        self._lost.set()
        if self._election is not None:
            try:
                self._election.resign()
            except Exception as e:  # the store may be gone; the lease then just expires
                log.warning("could not resign leadership: %s", e)
        with self._sessions_lock:
            for s in self._sessions.values():
                s.outbox.put(None)
        if self._server is not None:
            self._server.stop(grace_s).wait()
            self._executor.shutdown(wait=False)
        self._events.put(None)
        if self._loop is not None:
            self._loop.join(timeout=5)
        if self.rendezvous is not None:
            self.rendezvous.close()
        if self.metrics is not None:
            self.metrics.close()

    def wait_for_termination(self) -> None:
        assert self._server is not None
        self._server.wait_for_termination()

    # ---- read side ----------------------------------------------------------------------
    def job_state(self, job_id: str) -> jobs.JobState:
        return self._jobs[job_id].state

    def job_status(self, job_id: str) -> pb.JobStatus:
        rt = self._jobs.get(job_id)
        if rt is None:
            raise KeyError(job_id)
        state = rt.state
        m = state.membership
        status = pb.JobStatus(job_id=job_id, phase=state.phase.value, epoch=state.epoch,
                              members=list(m.members) if m else [],
                              recoveries=state.recoveries, message=state.message,
                              controller=getattr(self, "address", ""), leader=self.leading,
                              leader_since_s=self.leader_since_s, metrics=self.metrics_address)
        if not self.leading:
            status.phase = "standby"
            status.message = f"standby; the leader is {self._leader_hint() or 'unknown'}"
        rt.view.fill(status)
        scores = self.telemetry.scores(job_id) if self.telemetry is not None else {}
        for w in status.workers:
            w.straggler_score = scores.get(w.worker_id, 0.0)
            rec = state.workers.get(w.worker_id)
            w.state = rec.state.value if rec else "starting"
            w.rank = m.rank_of(w.worker_id) if m and w.worker_id in m.members else -1
        return status

    # ---- for the telemetry hub ------------------------------------------------------------
    def submit(self, job_id: str, fn: Callable[[], None]) -> None:
        """Run `fn` on the loop thread, in order with every other event."""
        self._events.put((None, job_id, fn))

    def apply_event(self, job_id: str, event: jobs.Event) -> None:
        """Loop thread only: apply a job event decided by a policy."""
        if self._leading.is_set():
            self._apply(None, job_id, event)

    def kill_worker(self, job_id: str, worker_id: str, epoch: int, reason: str, *,
                    discard_snapshots: bool = False) -> None:
        with self._sessions_lock:
            session = self._sessions.get((job_id, node_of(worker_id)))
        if session is None:
            log.warning("cannot kill %s: its agent is not attached", worker_id)
            return
        log.warning("[%s] killing %s: %s", job_id, worker_id, reason)
        session.outbox.put(pb.ControllerMessage(kill=pb.KillWorker(
            worker_id=worker_id, epoch=epoch, reason=reason,
            discard_snapshots=discard_snapshots)))

    def record_verdict(self, job_id: str, verdict: pb.Verdict, fault: str = "") -> None:
        rt = self._jobs[job_id]
        rt.view.add_verdict(verdict)
        rt.view.add_event(verdict.at_s, verdict.detector, rt.state.epoch,
                          f"{verdict.action}: {verdict.reason}")
        log.warning("[%s] %s verdict (%s): %s", job_id, verdict.detector, verdict.action,
                    verdict.reason)
        if self.metrics is not None:
            self.metrics.verdict(job_id, verdict.detector, verdict.action)
            if fault:
                self.metrics.fault(job_id, fault)

    def _on_corruption(self, job_id: str, report: pb.CorruptionReport) -> None:
        """Loop thread: replicas disagree. Kill the culprits (their ranks then leave
        through the crash path); every member reports the same finding, act once."""
        rt = self._jobs[job_id]
        m = rt.state.membership
        if m is None or report.epoch != m.epoch or not self._leading.is_set():
            return
        key = (report.epoch, report.step)
        if key in rt.corruptions:
            return
        rt.corruptions.add(key)
        culprits = [w for w in report.culprits if m.has(w)]
        for w in culprits:
            # Its snapshots were taken from the corrupted state: its replacement must
            # get a healthy member's, not adopt them.
            self.kill_worker(job_id, w, m.epoch, f"silent data corruption: {report.reason}",
                             discard_snapshots=True)
        first = culprits[0] if culprits else ""
        self.record_verdict(job_id, pb.Verdict(
            at_s=self._clock(), detector="sdc", kind="bitflip",
            rank=m.rank_of(first) if first else -1, worker_id=first, score=len(culprits),
            action="kill" if culprits else "alert", reason=report.reason), fault="bitflip")

    def check_replicas(self, job_id: str, reason: str) -> pb.JobStatus:
        """Have every worker compare replica fingerprints at the next step boundary."""
        if job_id not in self._jobs:
            raise KeyError(job_id)
        rt = self._jobs[job_id]
        epoch = rt.state.epoch
        with self._sessions_lock:
            targets = [s for (j, _), s in self._sessions.items() if j == job_id]
        rt.view.add_event(self._clock(), "sdc_check", epoch,
                          f"replica check requested: {reason}")
        for s in targets:
            s.outbox.put(pb.ControllerMessage(check_replicas=pb.CheckReplicas(
                epoch=epoch, reason=reason)))
        return self.job_status(job_id)

    def probe_links(self, job_id: str, reason: str = "requested") -> int:
        """Have the job's agents probe every pair of nodes now; a slow link found becomes
        a "link" verdict. Returns the number of pairs asked for."""
        if job_id not in self._jobs:
            raise KeyError(job_id)
        return self._start_probe_round(job_id, reason, respect_cooldown=False)

    def maybe_probe_links(self, job_id: str, reason: str) -> int:
        """`probe_links`, unless a round started within the cool-down (a detector's ask)."""
        return self._start_probe_round(job_id, reason, respect_cooldown=True)

    def _start_probe_round(self, job_id: str, reason: str, *, respect_cooldown: bool) -> int:
        pairs = self.links.start_round(job_id, reason, respect_cooldown=respect_cooldown)
        if pairs and self.metrics is not None:
            self.metrics.link_probe_round(job_id)
        return pairs

    def probe_targets(self, job_id: str
                      ) -> dict[str, tuple[str, Callable[[pb.ControllerMessage], None]]]:
        """Attached agents of the job: node -> (probe server address, send to it)."""
        with self._sessions_lock:
            return {n: (s.probe_address, s.outbox.put)
                    for (j, n), s in self._sessions.items() if j == job_id}

    def spare_capacity(self, job_id: str) -> int:
        """Workers that could take a member's place now: ready standbys the controller
        knows, plus warm spares agents running with --replace report."""
        with self._sessions_lock:
            spares = sum(s.replacements_ready for (j, _), s in self._sessions.items()
                         if j == job_id)
        return spares + len(jobs.standbys(self._jobs[job_id].state))

    def check_admin(self, context: grpc.ServicerContext, action: str) -> None:
        self._admin_check(context, action)

    def stop_job(self, job_id: str, reason: str) -> pb.JobStatus:
        """Tell every agent of the job to shut its workers down."""
        if job_id not in self._jobs:
            raise KeyError(job_id)
        with self._sessions_lock:
            targets = [s for (j, _), s in self._sessions.items() if j == job_id]
        self._jobs[job_id].view.add_event(self._clock(), "stop", self._jobs[job_id].state.epoch,
                                          f"job stopped: {reason}")
        for s in targets:
            s.outbox.put(pb.ControllerMessage(shutdown=pb.Shutdown(reason=reason)))
        return self.job_status(job_id)

    # ---- the loop -----------------------------------------------------------------------
    def _run_loop(self) -> None:
        tick_s = min(0.1, self.config.heartbeat_interval_s)
        while True:
            try:
                item = self._events.get(timeout=tick_s)
            except queue.Empty:
                self._check_liveness()
                continue
            if item is None:
                return
            try:
                sender, job_id, event = item
                if callable(event):
                    event()
                elif self._leading.is_set():
                    self._apply(sender, job_id, event)
            except Exception:  # a bug in one event must not stop the controller
                log.exception("controller failed to apply %r", item)
            self._check_liveness()

    def _check_liveness(self) -> None:
        if self.telemetry is not None and self._leading.is_set():
            self.telemetry.tick()
        now = self._clock()
        with self._sessions_lock:
            silent = [s for s in self._sessions.values()
                      if now - s.last_seen_s > self.config.node_timeout_s]
        for s in silent:
            self.close_session(s, f"no heartbeat for {now - s.last_seen_s:.1f} s")
        for job_id, rt in self._jobs.items():
            if (rt.standby_since_s is not None and self._leading.is_set()
                    and now - rt.standby_since_s > self.config.admit_wait_s
                    and jobs.wants_admit(rt.state, force=True)):
                # Standbys waited long enough for their node's other workers.
                self._apply(None, job_id, jobs.Admit(force=True))
            since = rt.recovering_since_s
            m = rt.state.membership
            if (since is None or m is None or not self._leading.is_set()
                    or now - since <= self.config.recovery_timeout_s):
                continue
            rt.recovering_since_s = now  # one attempt per timeout period
            late = [w for w in m.members if w not in rt.state.ready]
            why = (f"not ready {now - since:.1f} s after epoch {m.epoch} was announced "
                   f"(recovery timeout {self.config.recovery_timeout_s:.0f} s)")
            for w in late:
                self.kill_worker(job_id, w, m.epoch, why)
            if late:
                self._apply(None, job_id, jobs.Evict(m.epoch, late[0], why))
        # Only the loop thread touches _expected.
        for (job_id, node), deadline in list(self._expected.items()):
            if now > deadline:
                del self._expected[(job_id, node)]
                self._events.put((None, job_id, jobs.NodeLost(
                    node, f"did not re-attach within {self.config.reattach_grace_s:.1f} s "
                          "of the takeover")))

    def _apply(self, sender: AgentSession | None, job_id: str, event: jobs.Event) -> None:
        rt = self._jobs[job_id]
        now = self._clock()
        old = rt.state
        new, ready = jobs.step(old, event, now)
        try:
            if ready.persist is not None:
                m = ready.persist
                record = EpochRecord(job_id=job_id, epoch=m.epoch, members=m.members,
                                     shares=m.shares, reason=m.reason, decided_at_s=now)
                self._store.commit_epoch(record, expected_epoch=old.epoch, fence=self._fence)
            if ready.persist_resume is not None:
                r = ready.persist_resume
                self._store.commit_resume(job_id, r.epoch, r.step, fence=self._fence)
        except NotLeader as e:
            self._step_down(f"the store refused a write: {e}")
            return
        except EpochConflict as e:
            # Someone else advanced the job: our view is stale. Never announce it.
            self._step_down(f"epoch conflict in job {job_id}: {e}")
            return
        except StoreUnavailable as e:
            # Nothing was written, so nothing is announced; try the same event again later.
            log.warning("state store unavailable (%s); retrying %s in %.2f s", e,
                        type(event).__name__, e.retry_after_s)
            timer = threading.Timer(e.retry_after_s, self._events.put,
                                    args=((sender, job_id, event),))
            timer.daemon = True
            timer.start()
            return
        rt.state = new
        if new.phase is jobs.Phase.RECOVERING:
            if old.phase is not jobs.Phase.RECOVERING or new.epoch != old.epoch:
                rt.recovering_since_s = now
        else:
            rt.recovering_since_s = None
        if self.metrics is not None:
            self._count(job_id, old, new, ready, event, now)
        for entry in ready.timeline:
            rt.view.add_event(now, entry.kind, entry.epoch, entry.text)
            self._store.append_decision(job_id, f"{now:.6f} {entry.kind} e{entry.epoch} {entry.text}")
            log.info("[%s] %s: %s", job_id, entry.kind, entry.text)
        if ready.refuse is not None:
            if sender is not None:
                sender.outbox.put(refusal(ready.refuse.code, ready.refuse.message))
        elif isinstance(event, jobs.WorkerReady):
            rt.view.worker_seen(event.worker_id, node_of(event.worker_id), event.pid)
        for nodes, message in ready.send:
            out = self._to_proto(job_id, message)
            with self._sessions_lock:
                targets = [s for (j, n), s in self._sessions.items() if j == job_id and n in nodes]
            for s in targets:
                s.outbox.put(out)
        if new.phase is jobs.Phase.COMPLETE and old.phase is not jobs.Phase.COMPLETE:
            # Standbys and spares wait for a membership that will not come: release them.
            with self._sessions_lock:
                targets = [s for (j, _), s in self._sessions.items() if j == job_id]
            for s in targets:
                s.outbox.put(pb.ControllerMessage(shutdown=pb.Shutdown(
                    reason="the job is complete", complete=True)))
        if not jobs.standbys(rt.state):
            rt.standby_since_s = None
        elif rt.standby_since_s is None:
            rt.standby_since_s = now
        if jobs.wants_admit(rt.state) and not isinstance(event, jobs.Admit):
            # Standbys wait while the world is short: a promoted spare, a node that joined.
            self._apply(None, job_id, jobs.Admit())

    def _count(self, job_id: str, old: jobs.JobState, new: jobs.JobState, ready: jobs.Ready,
               event: jobs.Event, now: float) -> None:
        """Metrics of one applied event: memberships, faults, recoveries, goodput."""
        m, rt = self.metrics, self._jobs[job_id]
        if new.membership is not None and new.epoch != old.epoch:
            m.set_membership(job_id, new.epoch, new.membership.world_size)
        if any(e.kind == "fault" for e in ready.timeline):
            kind = ("node_lost" if isinstance(event, jobs.NodeLost)
                    else "straggler" if isinstance(event, jobs.Evict) else "crash")
            m.fault(job_id, kind)
            if rt.fault_at_s is None:
                rt.fault_at_s, rt.fault_kind = now, kind
        if isinstance(event, (jobs.Rebalance, jobs.Admit)) and ready.persist is not None:
            rt.fault_at_s = now
            rt.fault_kind = "rebalance" if isinstance(event, jobs.Rebalance) else "join"
        if ready.persist_resume is not None and rt.fault_at_s is not None:
            m.recovery(job_id, rt.fault_kind, "resumed", now - rt.fault_at_s)
            rt.lost_s += now - rt.fault_at_s
            rt.fault_at_s = None
        if new.phase is jobs.Phase.FAILED and old.phase is not jobs.Phase.FAILED:
            m.recovery(job_id, rt.fault_kind or "crash", "failed",
                       now - (rt.fault_at_s or now))
        if rt.started_at_s is None and new.membership is not None:
            rt.started_at_s = now
        if rt.started_at_s is not None and now > rt.started_at_s:
            # Goodput: the share of the job's wall time not spent recovering.
            m.set_goodput(job_id, max(0.0, 1.0 - rt.lost_s / (now - rt.started_at_s)))

    def _holders(self, job_id: str, src: str, resume: jobs.Resume) -> list[pb.SnapshotHolder]:
        """Where a joining worker fetches the resume step's snapshot: `src`'s agent, then
        the other holders' (their agents serve it from shared memory). Empty, so `src`
        sends it over the group, when `src`'s agent serves no snapshots."""
        with self._sessions_lock:
            address = {n: s.snapshot_address for (j, n), s in self._sessions.items()
                       if j == job_id}
        if not address.get(node_of(src)):
            return []
        order = [src] + [w for w in resume.holders if w != src]
        return [pb.SnapshotHolder(worker_id=w, address=address[node_of(w)])
                for w in order if address.get(node_of(w))]

    def _to_proto(self, job_id: str, message: Membership | jobs.Resume) -> pb.ControllerMessage:
        if isinstance(message, jobs.Resume):
            return pb.ControllerMessage(resume=pb.Resume(
                epoch=message.epoch, step=message.step, reason=message.reason,
                transfers=[pb.StateTransfer(to_worker=dst, from_worker=src,
                                            holders=self._holders(job_id, src, message))
                           for dst, src in message.transfers],
                from_disk=message.from_disk))
        assert self.rendezvous is not None
        with self._sessions_lock:
            agent = {n: s for (j, n), s in self._sessions.items() if j == job_id}
        nodes = sorted({node_of(w) for w in message.members})
        return pb.ControllerMessage(membership=pb.Membership(
            epoch=message.epoch, members=list(message.members), shares=list(message.shares),
            store_host=self.rendezvous.host, store_port=self.rendezvous.port,
            store_prefix=self.rendezvous.prefix(job_id, message.epoch),
            reason=message.reason, initial=message.initial,
            agents=[pb.PeerAgent(node_id=n, snapshot_address=agent[n].snapshot_address,
                                 failure_domain=agent[n].failure_domain)
                    if n in agent else pb.PeerAgent(node_id=n) for n in nodes]))
