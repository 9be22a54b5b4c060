"""The controller's side of each agent's stream: attaching (the hello, its checks and the
resync of the agent's workers), the messages an agent sends (each checked, then queued as
an event for the controller's loop, or answered at once), and detaching.

A mixin of `Controller` (controller/service.py), split out by concept; it uses the
controller's jobs, sessions, event queue, clock and store.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from splice.controller import job as jobs
from splice.controller.leadership import refusal
from splice.controller.links import check_report
from splice.controller.membership import node_of, parse_worker_id, rank_order
from splice.controller.telemetry_columns import MalformedTelemetry
from splice.controller.telemetry_columns import decode as decode_telemetry
from splice.proto import controller_pb2 as pb

log = logging.getLogger("splice.controller")

PROTOCOL_VERSION = pb.PROTOCOL_VERSION_1
# Worker ids remembered per node as already checked (telemetry path); more are forgotten.
_MAX_KNOWN_WIDS = 65536


@dataclass(eq=False)
class AgentSession:
    job_id: str
    node_id: str
    outbox: queue.SimpleQueue[pb.ControllerMessage | None] = field(default_factory=queue.SimpleQueue)
    last_seen_s: float = 0.0
    closed: bool = False
    replacements_ready: int = 0  # warm spares the agent would promote (its telemetry)
    probe_address: str = ""      # its link probe server (HOST:PORT), "" if none
    snapshot_address: str = ""   # its snapshot server (HOST:PORT), "" if none
    failure_domain: str = ""     # rack, zone...; "" : the node is its own
    worker_table: tuple[str, ...] = ()  # what its telemetry columns index (its last table)


class AgentSessions:
    # Provided by Controller.
    address: str
    metrics: Any
    links: Any
    telemetry: Any
    _clock: Callable[[], float]
    _jobs: dict[str, Any]
    _events: queue.SimpleQueue[Any]
    _expected: dict[tuple[str, str], float]
    _sessions: dict[tuple[str, str], AgentSession]
    _sessions_lock: threading.Lock
    _leading: threading.Event
    _telemetry_wids: dict[str, set[str]]
    _apply: Callable[..., None]
    _to_proto: Callable[..., pb.ControllerMessage]
    _leader_hint: Callable[[], str]
    _on_corruption: Callable[[str, pb.CorruptionReport], None]
    submit: Callable[[str, Callable[[], None]], None]

    def open_session(self, hello: pb.AgentHello) -> AgentSession | pb.ControllerMessage:
        if hello.protocol_version != PROTOCOL_VERSION:
            return refusal("PROTOCOL_MISMATCH",
                           f"agent speaks protocol {hello.protocol_version}, "
                           f"this controller speaks {PROTOCOL_VERSION}")
        if hello.job_id not in self._jobs:
            return refusal("UNKNOWN_JOB", f"unknown job {hello.job_id!r}; this controller "
                                          f"serves {sorted(self._jobs)}")
        if not hello.node_id or "/" in hello.node_id:
            return refusal("MALFORMED", f"node id must be non-empty without '/': "
                                        f"{hello.node_id!r}")
        if not self._leading.is_set():
            hint = self._leader_hint()
            return refusal("NOT_LEADER", f"{self.address} is a standby"
                           + (f"; the leader is {hint}" if hint else "; no leader yet"),
                           leader=hint)
        for what, address in (("probe", hello.probe_address),
                              ("snapshot", hello.snapshot_address)):
            host, sep, port = address.rpartition(":")
            if address and (not sep or not host or not port.isdigit()
                            or not 0 < int(port) < 65536):
                return refusal("MALFORMED", f"{what} address must be HOST:PORT, got "
                                            f"{address!r}")
        if len(hello.failure_domain) > 253 or not hello.failure_domain.isprintable():
            return refusal("MALFORMED", f"failure domain must be a printable name of at most "
                                        f"253 characters, got {hello.failure_domain[:80]!r}")
        for w in hello.workers:
            problem = self._check_worker_id_of(hello.node_id, w.worker_id)
            if problem:
                return refusal("MALFORMED", f"resync: {problem}")
        key = (hello.job_id, hello.node_id)
        with self._sessions_lock:
            if key in self._sessions:
                return refusal("MALFORMED", f"node {hello.node_id!r} is already attached to "
                                            f"job {hello.job_id!r}")
            session = AgentSession(hello.job_id, hello.node_id, last_seen_s=self._clock(),
                                   probe_address=hello.probe_address,
                                   snapshot_address=hello.snapshot_address,
                                   failure_domain=hello.failure_domain)
            self._sessions[key] = session
        log.info("agent %s attached to job %s with %d workers", hello.node_id, hello.job_id,
                 hello.num_workers)
        self._events.put((None, hello.job_id,
                          lambda: self._on_attached(session, list(hello.workers))))
        return session

    def _on_attached(self, session: AgentSession, resync: list[pb.WorkerResync]) -> None:
        """Loop thread: fold a (re-)attached agent's account of its workers into the job,
        and hand it the current membership and resume decision it may have missed."""
        job_id = session.job_id
        self._expected.pop((job_id, session.node_id), None)
        S = pb.WorkerResync.State
        for w in sorted(resync, key=lambda w: rank_order(w.worker_id)):
            if w.state == S.CONNECTED:
                event: jobs.Event = jobs.WorkerResync(w.worker_id, w.pid)
            elif w.state == S.EXITED:
                event = jobs.WorkerExited(w.worker_id, w.exit_code, w.signal)
            elif w.state == S.FINISHED:
                event = jobs.WorkerFinished(w.worker_id)
            else:
                continue
            self._apply(session, job_id, event)
            if isinstance(event, jobs.WorkerResync):
                self._jobs[job_id].view.worker_seen(w.worker_id, session.node_id, w.pid)
        state = self._jobs[job_id].state
        m = state.membership
        if resync:
            self._jobs[job_id].view.add_event(
                self._clock(), "reattach", state.epoch,
                f"agent {session.node_id} re-attached with {len(resync)} workers")
        if resync and m is not None and session.node_id in m.nodes():
            session.outbox.put(self._to_proto(job_id, m))
            if state.phase is jobs.Phase.RUNNING and state.resume_step is not None \
                    and not m.initial:
                session.outbox.put(self._to_proto(job_id, jobs.Resume(
                    m.epoch, state.resume_step, "resume decided before the takeover")))

    def close_session(self, session: AgentSession, reason: str) -> None:
        with self._sessions_lock:
            if session.closed:
                return
            session.closed = True
            self._sessions.pop((session.job_id, session.node_id), None)
        session.outbox.put(None)
        log.info("agent %s detached: %s", session.node_id, reason)
        self._events.put((None, session.job_id, jobs.NodeLost(session.node_id, reason)))

    def on_agent_message(self, session: AgentSession, msg: pb.AgentMessage) -> None:
        """Validate one message from an agent and queue what it means. Called per stream."""
        session.last_seen_s = self._clock()
        kind = msg.WhichOneof("kind")
        job_id = session.job_id
        if kind == "heartbeat":
            return
        if kind == "worker_event":
            ev = msg.worker_event
            problem = self._check_worker_id(session, ev.worker_id)
            if problem:
                session.outbox.put(refusal("MALFORMED", problem))
                return
            K = pb.WorkerEvent.Kind
            if ev.kind == K.READY:
                self._events.put((session, job_id, jobs.WorkerReady(ev.worker_id, ev.pid)))
            elif ev.kind == K.EXITED:
                self._events.put((session, job_id,
                                  jobs.WorkerExited(ev.worker_id, ev.exit_code, ev.signal)))
            elif ev.kind == K.FINISHED:
                self._events.put((session, job_id, jobs.WorkerFinished(ev.worker_id)))
            elif ev.kind == K.STARTED:
                self._jobs[job_id].view.worker_seen(ev.worker_id, session.node_id, ev.pid)
                self._events.put((session, job_id, jobs.WorkerStarted(ev.worker_id, ev.pid)))
            else:
                session.outbox.put(refusal("MALFORMED", f"worker event without a kind from "
                                                        f"{session.node_id}"))
            return
        if kind == "step_report":
            rep = msg.step_report
            problem = self._check_worker_id(session, rep.worker_id)
            if problem:
                session.outbox.put(refusal("MALFORMED", problem))
                return
            rt = self._jobs[job_id]
            if rep.epoch != rt.state.epoch:
                session.outbox.put(refusal("STALE_EPOCH", f"step report of {rep.worker_id} for "
                                           f"epoch {rep.epoch}; the job is at epoch "
                                           f"{rt.state.epoch}"))
                return
            rt.view.step_reported(rep, rt.state.epoch)
            return
        if kind == "telemetry":
            self._on_telemetry(session, msg.telemetry)
            return
        if kind == "corruption":
            report = msg.corruption
            try:
                for wid in report.culprits:
                    parse_worker_id(wid)
            except ValueError as e:
                session.outbox.put(refusal("MALFORMED", f"corruption report: {e}"))
                return
            problem = self._check_worker_id(session, report.worker_id)
            if problem:
                session.outbox.put(refusal("MALFORMED", problem))
                return
            self.submit(job_id, lambda: self._on_corruption(job_id, report))
            return
        if kind == "recovery_ready":
            rr = msg.recovery_ready
            problem = self._check_worker_id(session, rr.worker_id)
            if problem:
                session.outbox.put(refusal("MALFORMED", problem))
                return
            self._events.put((session, job_id, jobs.RecoveryReady(
                rr.worker_id, rr.epoch, tuple(rr.snapshot_steps),
                rr.persisted_step if rr.has_persisted else None)))
            return
        if kind == "link_probes":
            problem = check_report(session.node_id, msg.link_probes)
            if problem:
                session.outbox.put(refusal("MALFORMED", problem))
                return
            if self.metrics is not None:
                for r in msg.link_probes.results:
                    if r.error:
                        self.metrics.link_probe_failed(job_id)
                    else:
                        self.metrics.link_probe(job_id, r.rtt_s, r.bandwidth_bytes_per_s)
            self.links.on_report(job_id, session.node_id, msg.link_probes)
            return
        session.outbox.put(refusal("MALFORMED", f"unexpected message {kind!r} after hello"))

    def _on_telemetry(self, session: AgentSession, batch: pb.Telemetry) -> None:
        """A batch from one agent: steps feed the status view (stale epochs are dropped:
        in a batch they are expected around every recovery), progress feeds detectors."""
        rt = self._jobs[session.job_id]
        epoch = rt.state.epoch
        # Columns name workers by index in the newest table the agent sent (telemetry_columns).
        table = session.worker_table
        if batch.HasField("workers"):
            table = tuple(batch.workers.worker_ids)
        problem = self._check_worker_ids(
            session, [r.worker_id for r in batch.steps] + [p.worker_id for p in batch.progress]
            + list(table if table is not session.worker_table else ()))
        if not problem:
            try:
                decoded = decode_telemetry(batch, table)
            except MalformedTelemetry as e:
                problem = f"telemetry from {session.node_id}: {e}"
        if problem:  # the whole batch is refused: none of it is applied
            session.outbox.put(refusal("MALFORMED", problem))
            return
        session.worker_table = table
        session.replacements_ready = batch.replacements_ready
        rt.view.step_columns_reported(decoded.worker_ids, decoded.steps, epoch)
        if self.metrics is not None:
            self.metrics.telemetry_batch(decoded.num_records, batch.dropped)
        if self.telemetry is not None:
            self.telemetry.observe(session.job_id, session.node_id, decoded, epoch)

    def _check_worker_ids(self, session: AgentSession, wids: list[str]) -> str:
        """The first problem with these worker ids, in order ("" if none). The ids already
        accepted from each node are remembered (bounded), so a steady stream of telemetry
        costs one set test per batch instead of parsing every id."""
        cache: dict[str, set[str]] | None = getattr(self, "_telemetry_wids", None)
        if cache is None:
            cache = self._telemetry_wids = {}
        known = cache.get(session.node_id)
        if known is not None and known.issuperset(wids):
            return ""
        for wid in wids:
            problem = self._check_worker_id(session, wid)
            if problem:
                return problem
        if known is None or len(known) + len(wids) > _MAX_KNOWN_WIDS:
            known = cache[session.node_id] = set()
        known.update(wids)
        return ""

    @staticmethod
    def _check_worker_id(session: AgentSession, wid: str) -> str:
        return AgentSessions._check_worker_id_of(session.node_id, wid)

    @staticmethod
    def _check_worker_id_of(node_id: str, wid: str) -> str:
        try:
            parse_worker_id(wid)
        except ValueError as e:
            return str(e)
        if node_of(wid) != node_id:
            return f"agent {node_id} cannot speak for worker {wid} of another node"
        return ""

