"""The controller's telemetry shell: agents' batches in, detector verdicts and actions out.

Agents' telemetry (progress counters, completed steps) arrives on gRPC threads and is kept
here, bounded. The pure detectors (hang.py, stragglers.py) decide; this module only feeds
them and carries out what the job's policy says: a hang's culprit is killed (recovery then
takes the crash path), a straggler is alerted on, rebalanced away from or evicted. Every
verdict is recorded with its reason in the job's status and in the metrics.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from splice.controller import job as jobs
from splice.controller.hang import HangConfig, HangDetector, HangVerdict
from splice.controller.stragglers import (
    StragglerConfig,
    StragglerDetector,
    StragglerVerdict,
    rebalance_shares,
)
from splice.controller.telemetry import RankProgress, StepRecord
from splice.proto import controller_pb2 as pb

if TYPE_CHECKING:
    from splice.controller.service import Controller

log = logging.getLogger("splice.controller")

POLICIES = ("alert", "rebalance", "evict")


@dataclass(frozen=True, kw_only=True)
class DetectionConfig:
    hang: HangConfig = field(default_factory=HangConfig)
    straggler: StragglerConfig = field(default_factory=StragglerConfig)
    # What a straggler verdict does: alert (record it only), rebalance (fewer micro-batches
    # for the slow rank, global batch unchanged), evict (shrink the job without it).
    straggler_policy: str = "alert"
    # Hangs are looked for this often (the agents' telemetry comes every 0.1 s).
    tick_s: float = 0.1
    # Steps whose records have not all arrived after this many newer steps are given up.
    max_pending_steps: int = 64

    def __post_init__(self) -> None:
        if self.straggler_policy not in POLICIES:
            raise ValueError(f"straggler policy must be one of {POLICIES}, "
                             f"got {self.straggler_policy!r}")


@dataclass
class _JobTelemetry:
    epoch: int = 0
    progress: dict[str, pb.WorkerProgress] = field(default_factory=dict)
    step_times: collections.deque[float] = field(
        default_factory=lambda: collections.deque(maxlen=200))
    pending: dict[int, dict[str, pb.StepReport]] = field(default_factory=dict)
    hang: HangDetector | None = None
    stragglers: StragglerDetector | None = None
    scores: dict[str, float] = field(default_factory=dict)
    members: tuple[str, ...] = ()
    freshest_s: float = 0.0   # newest last_progress_s seen from any rank of this epoch
    node_sent_s: dict[str, float] = field(default_factory=dict)  # last batch per agent


class TelemetryHub:
    def __init__(self, controller: Controller, config: DetectionConfig | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self._c = controller
        self.config = config or DetectionConfig()
        self._clock = clock
        self._lock = threading.Lock()
        self._jobs: dict[str, _JobTelemetry] = collections.defaultdict(_JobTelemetry)
        self._last_tick = 0.0

    # ---- input (gRPC threads) ---------------------------------------------------------------
    def observe(self, job_id: str, node_id: str, batch: pb.Telemetry, epoch: int) -> None:
        state = self._c.job_state(job_id)
        m = state.membership
        if m is None:
            return
        verdicts: list[StragglerVerdict] = []
        with self._lock:
            t = self._fresh(job_id, m.epoch)
            for wp in batch.progress:
                t.progress[wp.worker_id] = wp
            touched = set()
            for rep in batch.steps:
                if rep.epoch != m.epoch or not m.has(rep.worker_id):
                    continue
                t.step_times.append(rep.step_time_s)
                t.pending.setdefault(rep.step, {})[rep.worker_id] = rep
                touched.add(rep.step)
            for wp in batch.progress:
                t.freshest_s = max(t.freshest_s, wp.last_progress_s)
            t.node_sent_s[node_id] = batch.sent_at_s
            verdicts = self._complete_steps(t, m, touched)
        for v in verdicts:
            self._c.submit(job_id, lambda v=v: self._act_on_straggler(job_id, v))

    def _fresh(self, job_id: str, epoch: int) -> _JobTelemetry:
        t = self._jobs[job_id]
        if t.epoch != epoch:  # a new epoch: counters restart
            t.epoch = epoch
            t.progress.clear()
            t.pending.clear()
            t.hang = HangDetector(self.config.hang)
            t.freshest_s = 0.0
            m = self._c.job_state(job_id).membership
            members = m.members if m is not None else ()
            if t.stragglers is None or members != t.members:
                # Other members: ranks name other workers now, so what the detector learnt
                # per rank no longer applies. (A rebalance keeps the members and its memory.)
                t.stragglers = StragglerDetector(self.config.straggler)
                t.scores.clear()
            t.members = members
        return t

    def _complete_steps(self, t: _JobTelemetry, m: jobs.Membership, touched: set[int]
                        ) -> list[StragglerVerdict]:
        assert t.stragglers is not None
        out: list[StragglerVerdict] = []
        for step in sorted(touched):
            reports = t.pending.get(step)
            # Only members' reports are kept, so a full count means a complete step.
            if reports is None or len(reports) != m.world_size:
                continue
            del t.pending[step]
            records = [StepRecord(rank=m.rank_of(w), epoch=m.epoch, step=step,
                                  compute_s=max(0.0, r.compute_s), wait_s=max(0.0, r.wait_s),
                                  end_s=r.completed_at_s, share=m.shares[m.rank_of(w)])
                       for w, r in reports.items()]
            out += t.stragglers.observe(records)
        if len(t.pending) > self.config.max_pending_steps:
            for step in sorted(t.pending)[:-self.config.max_pending_steps]:
                del t.pending[step]
        return out

    # ---- hangs (the controller's loop thread) -------------------------------------------------
    def tick(self) -> None:
        now = self._clock()
        if now - self._last_tick < self.config.tick_s:
            return
        self._last_tick = now
        for job_id in list(self._jobs):
            state = self._c.job_state(job_id)
            m = state.membership
            if m is None or state.phase is not jobs.Phase.RUNNING:
                continue
            with self._lock:
                t = self._fresh(job_id, m.epoch)
                if not t.node_sent_s or t.freshest_s == 0.0:
                    continue
                # Only look closer once nothing has moved for the floor: the common case
                # costs O(1), not a walk over every rank every tick.
                if now - t.freshest_s <= self.config.hang.floor_s:
                    continue
                # A controller that fell behind must not mistake stale telemetry for a
                # stall: every agent must have reported since the apparent stall began.
                if min(t.node_sent_s.get(n, 0.0) for n in m.nodes()) < t.freshest_s:
                    continue
                ranks = {}
                for w in m.members:
                    wp = t.progress.get(w)
                    if wp is not None and wp.epoch == m.epoch:
                        ranks[m.rank_of(w)] = to_rank_progress(m.rank_of(w), wp)
                step_times = list(t.step_times)
                detector = t.hang
            if detector is None or len(ranks) < m.world_size:
                continue
            verdict = detector.observe(ranks, step_times, now)
            if verdict is not None:
                self._act_on_hang(job_id, m, verdict)

    def _act_on_hang(self, job_id: str, m: jobs.Membership, v: HangVerdict) -> None:
        action = "kill" if v.culprits else "alert"
        for c in v.culprits:
            wid = m.members[c.rank]
            self._c.kill_worker(job_id, wid, m.epoch, f"hang culprit: {c.reason}")
        first = v.culprits[0].rank if v.culprits else -1
        self._c.record_verdict(job_id, pb.Verdict(
            at_s=self._clock(), detector="hang", kind=v.kind, rank=first,
            worker_id=m.members[first] if first >= 0 else "", score=v.stalled_s,
            action=action, reason=v.reason), fault="hang")

    def _act_on_straggler(self, job_id: str, v: StragglerVerdict) -> None:
        """Loop thread: apply the job's straggler policy to one verdict."""
        state = self._c.job_state(job_id)
        m = state.membership
        if m is None or v.rank >= m.world_size:
            return
        wid = m.members[v.rank]
        with self._lock:
            if v.active:
                self._jobs[job_id].scores[wid] = v.score
            else:
                self._jobs[job_id].scores.pop(wid, None)
        metrics = self._c.metrics
        if metrics is not None:
            if v.active:
                metrics.straggler_score(job_id, v.rank, v.score)
            else:
                metrics.clear_straggler(job_id, v.rank)
        # A slow link is not the rank's fault: moving its work or evicting it would not
        # help, so link verdicts are alerts whatever the policy.
        policy = self.config.straggler_policy if v.active and v.kind == "compute" else "alert"
        action = policy
        event: jobs.Event | None = None
        if policy == "rebalance" and state.phase is jobs.Phase.RUNNING:
            plan = rebalance_shares(m.shares, {v.rank: v.score})
            event = jobs.Rebalance(m.epoch, plan.shares, plan.reason)
        elif policy == "evict" and state.phase is jobs.Phase.RUNNING:
            event = jobs.Evict(m.epoch, wid, v.reason)
        elif policy != "alert":
            action = "alert"  # not while a recovery is in progress
        self._c.record_verdict(job_id, pb.Verdict(
            at_s=self._clock(), detector="straggler", kind=v.kind, rank=v.rank,
            worker_id=wid, score=v.score, action=action if v.active else "cleared",
            reason=v.reason), fault="straggler" if v.active else "")
        if event is not None:
            self._c.apply_event(job_id, event)

    def scores(self, job_id: str) -> dict[str, float]:
        with self._lock:
            return dict(self._jobs[job_id].scores) if job_id in self._jobs else {}


def to_rank_progress(rank: int, wp: pb.WorkerProgress) -> RankProgress:
    inside = wp.seq_entered > wp.seq_exited
    since = (wp.in_collective_since_s or wp.last_progress_s) if inside else None
    return RankProgress(
        rank=rank, epoch=wp.epoch, last_seq_entered=wp.seq_entered,
        last_seq_exited=min(wp.seq_exited, wp.seq_entered), in_collective_since_s=since,
        last_step=wp.step, last_progress_s=wp.last_progress_s,
        heartbeat_s=wp.heartbeat_s or None,
        pending_op=f"{wp.op}:{wp.op_bytes}" if inside else None)
