"""The controller's telemetry shell: agents' batches in, detector verdicts and actions out.

Agents' telemetry (progress counters, completed steps) arrives on gRPC threads, decoded into
columns (telemetry_columns.py), and is kept here as arrays indexed by rank, bounded: at
100,000 ranks nothing here touches a Python object per rank per batch. The pure detectors
(hang.py, stragglers.py) decide; this module only feeds them and carries out what the
job's policy says: a hang's culprit is killed (recovery then takes the crash path), a
straggler is alerted on, rebalanced away from or evicted. Every verdict is recorded with its
reason in the job's status and in the metrics.
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
from splice.controller.hang import (
    HangConfig,
    HangDetector,
    HangVerdict,
    RankArrays,
    threshold_s,
)
from splice.controller.policy import Policy, PolicyState, decide
from splice.controller.stragglers import (
    StragglerConfig,
    StragglerDetector,
    StragglerVerdict,
)
from splice.controller.telemetry import RankProgress
from splice.controller.telemetry_columns import Batch, Progress
from splice.proto import controller_pb2 as pb

if TYPE_CHECKING:
    from splice.controller.service import Controller

log = logging.getLogger("splice.controller")

POLICIES = ("alert", "rebalance", "evict", "replace")
_STEP_TIMES_KEPT = 200   # recent step times, for the hang threshold


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


class ProgressArrays:
    """Every member's newest progress record of the epoch, as arrays indexed by rank.

    The times are kept as the agent sent them, with the offset of the batch that carried
    them (the controller's clock when the hub took the batch minus the batch's sent_at_s):
    `rank_arrays` moves them onto the controller's clock with it. A rank's ages are then
    what its agent saw when it sent the batch, plus the controller time since the hub took
    it, so a controller that reads its telemetry seconds late does not see every heartbeat
    seconds old; a heartbeat that stops advancing still ages, batch after batch, and one
    whose agent stops sending ages with the controller's clock.
    """

    def __init__(self, world_size: int) -> None:
        n = world_size
        self.seen = np.zeros(n, dtype=bool)
        self.epoch = np.zeros(n, dtype=np.uint64)
        self.step = np.zeros(n, dtype=np.uint64)
        self.seq_entered = np.zeros(n, dtype=np.uint64)
        self.seq_exited = np.zeros(n, dtype=np.uint64)
        self.in_collective_since_s = np.zeros(n)
        self.last_progress_s = np.zeros(n)
        self.heartbeat_s = np.zeros(n)
        self.op = np.full(n, "", dtype=object)
        self.op_bytes = np.zeros(n, dtype=np.uint64)
        self.clock_offset_s = np.zeros(n)   # the record's batch's: controller minus agent

    _COLUMNS = ("epoch", "step", "seq_entered", "seq_exited", "in_collective_since_s",
                "last_progress_s", "heartbeat_s", "op_bytes")

    def update(self, ranks: np.ndarray, batch: Progress, rows: np.ndarray | None,
               clock_offset_s: float = 0.0) -> None:
        """Records `rows` of the batch's progress (all if None) are ranks `ranks`' newest;
        `clock_offset_s`: the controller's clock when the batch was taken minus its
        sent_at_s."""
        def pick(a: np.ndarray) -> np.ndarray:
            return a if rows is None else a[rows]
        self.seen[ranks] = True
        for name in self._COLUMNS:
            getattr(self, name)[ranks] = pick(getattr(batch, name))
        self.op[ranks] = np.array(batch.ops, dtype=object)[pick(batch.op)]
        self.clock_offset_s[ranks] = clock_offset_s

    def of_epoch(self, epoch: int) -> np.ndarray:
        """The ranks whose newest record is of `epoch`."""
        return self.seen & (self.epoch == epoch)

    def newest_progress_s(self) -> float:
        """The newest last_progress_s of any rank, on the controller's clock."""
        return float(np.max(self.last_progress_s + self.clock_offset_s, initial=-np.inf))

    def rank_arrays(self) -> RankArrays:
        """A copy of every rank's record as the hang detector takes it (what
        to_rank_progress makes of one record, for all ranks at once), its times on the
        controller's clock (0.0 stays "none")."""
        entered, exited = self.seq_entered.copy(), self.seq_exited
        inside = entered > exited
        offset, since, beat = self.clock_offset_s, self.in_collective_since_s, self.heartbeat_s
        last = self.last_progress_s
        pending = np.full(len(entered), None, dtype=object)
        if inside.any():
            pending[inside] = (self.op[inside] + ":"
                               + self.op_bytes[inside].astype(str).astype(object))
        return RankArrays(
            rank=np.arange(len(entered)), epoch=self.epoch.copy(), seq_entered=entered,
            seq_exited=np.minimum(exited, entered),
            in_collective_since_s=np.where(since != 0.0, since, last) + offset,
            last_step=self.step.copy(), last_progress_s=last + offset,
            heartbeat_s=np.where(beat != 0.0, beat + offset, 0.0), has_heartbeat=beat != 0.0,
            pending_op=pending)


class _PendingStep:
    """One step's reports so far: which ranks reported, and their values in chunks."""

    __slots__ = ("chunks", "count", "seen")

    def __init__(self, world_size: int) -> None:
        self.seen = np.zeros(world_size, dtype=bool)
        self.count = 0
        self.chunks: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def add(self, ranks: np.ndarray, compute_s: np.ndarray, wait_s: np.ndarray) -> None:
        self.seen[ranks] = True
        self.count = int(np.count_nonzero(self.seen))
        self.chunks.append((ranks, compute_s, wait_s))

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ranks, compute_s, wait_s), one entry per rank: a rank's last report wins."""
        ranks, compute, wait = (np.concatenate(c) for c in zip(*self.chunks, strict=True))
        if len(ranks) != self.count:   # a rank reported twice: keep its last report
            _, first_of_reversed = np.unique(ranks[::-1], return_index=True)
            keep = len(ranks) - 1 - first_of_reversed
            ranks, compute, wait = ranks[keep], compute[keep], wait[keep]
        return ranks, compute, wait


@dataclass
class _JobTelemetry:
    epoch: int = 0
    progress: ProgressArrays = field(default_factory=lambda: ProgressArrays(0))
    step_times: collections.deque[float] = field(
        default_factory=lambda: collections.deque(maxlen=_STEP_TIMES_KEPT))
    pending: dict[int, _PendingStep] = field(default_factory=dict)
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
    # node -> (its worker table, the members, each table entry's rank or -1): a table is
    # mapped to ranks once per membership, not once per batch.
    ranks_of: dict[str, tuple[tuple[str, ...], tuple[str, ...], np.ndarray]] = field(
        default_factory=dict)


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
    def observe(self, job_id: str, node_id: str, batch: Batch, epoch: int) -> None:
        state = self._c.job_state(job_id)
        m = state.membership
        if m is None:
            return
        verdicts: list[StragglerVerdict] = []
        ep = m.epoch
        with self._lock:
            t = self._fresh(job_id, m)
            ranks_of = self._ranks_of(t, node_id, batch.worker_ids, m)
            p = batch.progress
            if len(p):
                # Any record counts as movement (not only members' of this epoch).
                t.freshest_s = float(np.fmax.reduce(p.last_progress_s, initial=t.freshest_s))
                ranks = ranks_of[p.worker]
                # The records' times are the agent's, as of sent_at_s; the hang detector
                # ages them from when they are taken here, not from when they were sent
                # (ProgressArrays): a controller behind its telemetry is not a hang.
                offset_s = self._clock() - batch.sent_at_s
                if (ranks >= 0).all():
                    t.progress.update(ranks, p, None, offset_s)
                else:
                    rows = np.flatnonzero(ranks >= 0)
                    t.progress.update(ranks[rows], p, rows, offset_s)
            touched: set[int] = set()
            s = batch.steps
            if len(s):
                ranks = ranks_of[s.worker]
                rows = np.flatnonzero((s.epoch == ep) & (ranks >= 0))
                if len(rows):
                    t.step_times.extend(s.step_time_s[rows][-_STEP_TIMES_KEPT:].tolist())
                    t.steps_in_epoch += len(rows)
                    touched = self._add_steps(t, m, ranks[rows], s.step[rows],
                                              s.compute_s[rows], s.wait_s[rows])
            t.node_sent_s[node_id] = batch.sent_at_s
            verdicts = self._complete_steps(t, m, touched)
        for v in verdicts:
            self._c.submit(job_id, lambda v=v: self._act_on_straggler(job_id, v))

    @staticmethod
    def _ranks_of(t: _JobTelemetry, node_id: str, wids: tuple[str, ...], m: jobs.Membership
                  ) -> np.ndarray:
        cached = t.ranks_of.get(node_id)
        if cached is not None and cached[0] is wids and cached[1] is m.members:
            return cached[2]
        get = m._ranks.get
        ranks = np.fromiter([get(w, -1) for w in wids], dtype=np.int64, count=len(wids))
        t.ranks_of[node_id] = (wids, m.members, ranks)
        return ranks

    @staticmethod
    def _add_steps(t: _JobTelemetry, m: jobs.Membership, ranks: np.ndarray,
                   steps: np.ndarray, compute_s: np.ndarray, wait_s: np.ndarray) -> set[int]:
        """Members' step reports of the epoch into their steps' pending records."""
        first = int(steps[0])
        groups: list[tuple[int, Any]]
        if (steps == steps[0]).all():   # the common case: one step per batch
            groups = [(first, slice(None))]
        else:
            groups = [(int(k), steps == k) for k in np.unique(steps)]
        for step, rows in groups:
            pending = t.pending.get(step)
            if pending is None:
                pending = t.pending[step] = _PendingStep(m.world_size)
            pending.add(ranks[rows], compute_s[rows], wait_s[rows])
        return {step for step, _ in groups}

    def _fresh(self, job_id: str, m: jobs.Membership) -> _JobTelemetry:
        t = self._jobs[job_id]
        if t.epoch != m.epoch:  # a new epoch: counters restart
            t.epoch = m.epoch
            t.progress = ProgressArrays(m.world_size)
            t.pending.clear()
            t.ranks_of.clear()
            t.hang = HangDetector(self.config.hang)
            t.freshest_s = 0.0
            t.diagnosed_at = None
            t.steps_in_epoch = 0
            members = m.members
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
            pending = t.pending.get(step)
            # Only members' reports are kept, so a full count means a complete step.
            if pending is None or pending.count != m.world_size:
                continue
            del t.pending[step]
            # The step's records as arrays over its ranks (what StepRecord would hold:
            # negative times read as 0, compute compared per unit of batch share).
            ranks, compute, wait = pending.arrays()
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
                t = self._fresh(job_id, m)
                if not t.node_sent_s or t.freshest_s == 0.0:
                    continue
                # Only look closer once nothing has moved for the floor: the common case
                # costs O(1), not a walk over every rank every tick. (freshest_s is on the
                # agents' clocks: a controller behind its telemetry passes these first
                # gates more often, and the stall is judged below without its lag.)
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
                # Only with every member's record of this epoch (the array has a slot per
                # member, so all of them), and once the stall outlasts the threshold as the
                # detector judges it too: each rank's records aged from when they were
                # taken here (until then the stall is not diagnosed, so it is looked at
                # again next tick).
                detector = t.hang
                if detector is None or not t.progress.of_epoch(m.epoch).all():
                    continue
                if now - t.progress.newest_progress_s() <= limit:
                    continue
                ranks = t.progress.rank_arrays()
                t.diagnosed_at = t.freshest_s
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
