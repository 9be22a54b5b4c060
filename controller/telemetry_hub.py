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
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from splice.controller import job as jobs
from splice.controller.hang import HangConfig, HangDetector, HangVerdict, threshold_s
from splice.controller.policy import Policy, PolicyState, decide
from splice.controller.stragglers import (
    StragglerConfig,
    StragglerDetector,
    StragglerVerdict,
)
from splice.controller.telemetry import RankProgress
from splice.proto import controller_pb2 as pb

if TYPE_CHECKING:
    from splice.controller.service import Controller

log = logging.getLogger("splice.controller")

POLICIES = ("alert", "rebalance", "evict", "replace")


@dataclass(frozen=True, kw_only=True)
class DetectionConfig:
    hang: HangConfig = field(default_factory=HangConfig)
    straggler: StragglerConfig = field(default_factory=StragglerConfig)
    # What a straggler verdict does: alert (record it only), rebalance (fewer micro-batches
    # for the slow rank, global batch unchanged), evict (shrink the job without it).
    straggler_policy: str = "alert"
    # No second straggler decision about the same rank within this long (see policy.py).
    straggler_cooldown_s: float = 300.0
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
    policy_state: PolicyState = field(default_factory=PolicyState)
    freshest_s: float = 0.0   # newest last_progress_s seen from any rank of this epoch
    steps_in_epoch: int = 0   # step reports of this epoch (0: its first step is running)
    node_sent_s: dict[str, float] = field(default_factory=dict)  # last batch per agent
    shares: Any = None                 # the membership's shares as an array (cached)
    shares_of: tuple[float, ...] | None = None
    nodes: frozenset[str] = frozenset()   # the members' nodes (cached)
    nodes_of: tuple[str, ...] | None = None
    # freshest_s when the hang detector last diagnosed a stall: until some rank moves,
    # diagnosing again would find the same (already reported) stall.
    diagnosed_at: float | None = None


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
        ranks = m._ranks
        ep = m.epoch
        with self._lock:
            t = self._fresh(job_id, ep)
            progress, freshest = t.progress, t.freshest_s
            for wp in batch.progress:
                progress[wp.worker_id] = wp
                last = wp.last_progress_s
                if last > freshest:
                    freshest = last
            t.freshest_s = freshest
            pending, step_times = t.pending, t.step_times
            touched = set()
            n = 0
            for rep in batch.steps:
                if rep.epoch != ep:
                    continue
                wid = rep.worker_id
                if wid not in ranks:
                    continue
                step_times.append(rep.step_time_s)
                n += 1
                step = rep.step
                reports = pending.get(step)
                if reports is None:
                    reports = pending[step] = {}
                reports[wid] = rep
                touched.add(step)
            t.steps_in_epoch += n
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
            t.diagnosed_at = None
            t.steps_in_epoch = 0
            m = self._c.job_state(job_id).membership
            members = m.members if m is not None else ()
            if t.stragglers is None or members != t.members:
                # Other members: ranks name other workers now, so what the detector learnt
                # per rank no longer applies. (A rebalance keeps the members and its memory.)
                t.stragglers = StragglerDetector(self.config.straggler)
                t.scores.clear()
                t.policy_state = PolicyState()  # its cool-downs are per rank
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
            # The step's records as arrays over its ranks (what StepRecord would hold:
            # negative times read as 0, compute compared per unit of batch share).
            n = len(reports)
            ranks = np.fromiter(map(m._ranks.__getitem__, reports), dtype=np.int64, count=n)
            reps = list(reports.values())
            compute = np.fromiter([r.compute_s for r in reps], dtype=float, count=n)
            wait = np.fromiter([r.wait_s for r in reps], dtype=float, count=n)
            compute = np.where(compute > 0.0, compute, 0.0)
            wait = np.where(wait > 0.0, wait, 0.0)
            out += t.stragglers.observe_arrays(step, ranks, compute, wait,
                                               self._shares(t, m)[ranks])
        if len(t.pending) > self.config.max_pending_steps:
            for step in sorted(t.pending)[:-self.config.max_pending_steps]:
                del t.pending[step]
        return out

    @staticmethod
    def _shares(t: _JobTelemetry, m: jobs.Membership) -> np.ndarray:
        if t.shares_of is not m.shares:
            t.shares, t.shares_of = np.asarray(m.shares, dtype=float), m.shares
            if len(t.shares) and not (t.shares > 0).all():
                raise ValueError(f"step record share must be > 0: {m.shares}")
        return t.shares

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
                step_times = list(t.step_times)
                # The first step after members joined includes building their model and
                # receiving a peer's snapshot: not a hang unless it outlasts the grace.
                grace_s = (self.config.hang.join_grace_s
                           if state.joined and t.steps_in_epoch == 0 else 0.0)
                # Nor closer until nothing has moved for the detector's own threshold, and
                # not again for a stall already diagnosed (nobody moved since): a walk over
                # every rank is then done once per stall, not every tick.
                limit = max(grace_s, threshold_s(self.config.hang, step_times))
                if now - t.freshest_s <= limit or t.diagnosed_at == t.freshest_s:
                    continue
                # A controller that fell behind must not mistake stale telemetry for a
                # stall: every agent must have reported after the stall outlasted the
                # threshold (by the agents' clocks, not by when their batches were read;
                # this costs at most one telemetry interval of detection latency).
                if t.nodes_of is not m.members:
                    t.nodes, t.nodes_of = m.nodes(), m.members
                sent = t.node_sent_s
                if min(sent.get(n, 0.0) for n in t.nodes) - t.freshest_s <= limit:
                    continue
                progress, ep = t.progress, m.epoch
                ranks = {}
                for r, w in enumerate(m.members):
                    wp = progress.get(w)
                    if wp is not None and wp.epoch == ep:
                        ranks[r] = to_rank_progress(r, wp)
                detector = t.hang
                if detector is not None and len(ranks) >= m.world_size:
                    t.diagnosed_at = t.freshest_s
            if detector is None or len(ranks) < m.world_size:
                continue
            verdict = detector.observe(ranks, step_times, now, min_threshold_s=grace_s)
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
        """Loop thread: the job's policy (controller/policy.py) decides what a straggler
        verdict does: alert, rebalance (a new epoch with new shares) or evict, at most once
        per cool-down per rank; link verdicts only alert, and start a link probe round."""
        state = self._c.job_state(job_id)
        m = state.membership
        if m is None or v.rank >= m.world_size:
            return
        wid = m.members[v.rank]
        with self._lock:
            t = self._jobs[job_id]
            if v.active:
                t.scores[wid] = v.score
            else:
                t.scores.pop(wid, None)
            pstate = replace(t.policy_state, shares=m.shares)
        if self.config.straggler_policy == "replace":
            pstate = replace(pstate, spares=self._c.spare_capacity(job_id))
        metrics = self._c.metrics
        if metrics is not None:
            if v.active:
                metrics.straggler_score(job_id, v.rank, v.score)
            else:
                metrics.clear_straggler(job_id, v.rank)
        actions: list[Any] = []
        if v.kind == "compute":
            # Link verdicts only alert, and must not use up the rank's cool-down: a
            # compute verdict that follows is a decision of its own.
            policy = Policy(mode=self.config.straggler_policy,
                            cooldown_s=self.config.straggler_cooldown_s)
            actions, pstate = decide([v], policy, pstate, self._clock())
            with self._lock:
                self._jobs[job_id].policy_state = pstate
        elif v.active:
            # Which link? Have the agents measure every node pair (at most once per
            # cool-down per job); a slow pair is recorded as a "link" verdict.
            self._c.maybe_probe_links(job_id, f"link straggler: {v.reason}")
        running = state.phase is jobs.Phase.RUNNING
        events: list[jobs.Event] = []
        taken = "alert" if v.active else "cleared"
        for a in actions:
            if a.kind == "rebalance" and a.shares is not None and running:
                events.append(jobs.Rebalance(m.epoch, a.shares, a.reason))
                taken = "rebalance"
            elif a.kind in ("evict", "replace") and running:
                # Replace: the evicted worker exits and its agent (--replace) puts a warm
                # spare in its place, or a ready standby is admitted.
                events += [jobs.Evict(m.epoch, m.members[r], a.reason) for r in a.ranks]
                taken = a.kind
        self._c.record_verdict(job_id, pb.Verdict(
            at_s=self._clock(), detector="straggler", kind=v.kind, rank=v.rank,
            worker_id=wid, score=v.score, action=taken, reason=v.reason),
            fault="straggler" if v.active else "")
        for event in events:
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
