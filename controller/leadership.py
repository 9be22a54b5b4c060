"""Leadership of a controller replica: campaign, adopt the persisted jobs, step down.

A mixin of `Controller` (service.py): with an election, a replica serves only while it
leads; on taking over it adopts each job's persisted epoch and resume decision and waits
for the members' agents to re-attach; when deposed it drops its view of the jobs and
sends its agents to the new leader. Without an election it leads from the start.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

from splice.controller import job as jobs
from splice.controller.membership import Membership
from splice.controller.store import Fence, StateStore
from splice.proto import controller_pb2 as pb

log = logging.getLogger("splice.controller")


def refusal(code: str, message: str, leader: str = "") -> pb.ControllerMessage:
    return pb.ControllerMessage(refusal=pb.Refusal(code=pb.Refusal.Code.Value(code),
                                                   message=message, leader=leader))


class Leadership:
    # Provided by Controller.
    config: Any
    address: str
    metrics: Any
    leader_since_s: float
    _election: Any
    _store: StateStore
    _clock: Callable[[], float]
    _jobs: dict[str, Any]
    _events: queue.SimpleQueue[Any]
    _expected: dict[tuple[str, str], float]
    _sessions: dict[tuple[str, str], Any]
    _sessions_lock: threading.Lock
    _fence: Fence | None
    _leading: threading.Event
    _lost: threading.Event
    _stop: threading.Event

    @property
    def leading(self) -> bool:
        return self._leading.is_set()

    def wait_leading(self, timeout_s: float) -> bool:
        return self._leading.wait(timeout_s)

    def _lead(self) -> None:
        """Campaign; lead until deposed; campaign again (as a standby) until stopped."""
        assert self._election is not None
        while not self._stop.is_set():
            fence = self._election.campaign(self._stop)
            if fence is None:
                return
            self._events.put((None, "", lambda f=fence: self._become_leader(f)))
            self._lost.wait()
            self._lost.clear()

    def on_leadership_lost(self, reason: str) -> None:
        """Called by the election (any thread) when this replica no longer leads."""
        self._events.put((None, "", lambda: self._step_down(reason)))

    def _become_leader(self, fence: Fence | None) -> None:
        """Loop thread: adopt every job's persisted state and start serving agents."""
        self._fence = fence
        now = self._clock()
        for job_id, rt in self._jobs.items():
            spec = rt.state.spec
            stored = self._store.load_epoch(job_id)
            self._store.save_job_spec(job_id, {"job_id": spec.job_id,
                                               "world_size": spec.world_size,
                                               "min_world_size": spec.min_world_size})
            if stored is None:
                continue
            record = Membership(epoch=stored.epoch, members=stored.members,
                                shares=stored.shares, reason=stored.reason,
                                initial=stored.epoch == 1)
            rt.state = jobs.adopt(spec, record, self._store.load_resume(job_id))
            for node in record.nodes():
                self._expected[(job_id, node)] = now + self.config.reattach_grace_s
            rt.view.add_event(now, "takeover", record.epoch,
                              f"{self.address} leads; adopted epoch {record.epoch} "
                              f"({rt.state.phase.value}); waiting for {len(record.nodes())} "
                              f"agents to re-attach")
        self.leader_since_s = now
        self._leading.set()
        if self.metrics is not None:
            self.metrics.set_leader(True)
        log.info("controller %s is the leader", self.address)

    def _step_down(self, reason: str) -> None:
        if not self._leading.is_set():
            return
        log.error("controller %s is no longer the leader: %s", self.address, reason)
        self._leading.clear()
        self._fence = None
        if self.metrics is not None:
            self.metrics.set_leader(False)
        self._expected.clear()
        for rt in self._jobs.values():
            rt.state = jobs.JobState(spec=rt.state.spec)
        with self._sessions_lock:
            sessions = list(self._sessions.values())
        for s in sessions:
            s.outbox.put(refusal("NOT_LEADER", f"{self.address} stepped down: {reason}",
                                 leader=self._leader_hint()))
            s.outbox.put(None)
        self._lost.set()

    def _leader_hint(self) -> str:
        if self._election is None:
            return self.address if self.leading else ""
        try:
            return self._election.leader() or ""
        except Exception:  # a hint only; the store may be down
            return ""
