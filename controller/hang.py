"""Hang detection: the job stopped progressing, and which rank is to blame.

A collective timeout (30 s to 30 min by default) is far too late, and it names no one. The
hook keeps per-rank sequence counters in shared memory, so even a rank wedged in C++ shows
how far it got. A hang is declared when *no* rank made progress for longer than an
adaptive threshold; the counters then say who never entered the collective the others wait
in, or who moved on without it. `HangDetector.observe` is deterministic given its small
state (the hangs already reported) and the observations; the clock is passed in.

The diagnosis works on arrays over the ranks (`RankArrays`: what the controller's telemetry
hub keeps per rank), so that a stall of 100,000 ranks is diagnosed in tens of
milliseconds; only culprits become Python objects, and the per-rank evidence is built when
read. `diagnose` takes the same picture as RankProgress records.

Every age here (stall, idle, heartbeat, time inside a collective) is `now` minus a rank's
time, so the times must be on the clock `now` is read from. The controller's hub moves
each rank's times onto its own clock by the offset of the batch that carried them (its
clock when it took the batch minus the batch's sent_at_s): a rank is then as old as its
agent saw it when sending, plus the controller time since, and a controller that reads
its telemetry seconds late does not take every healthy rank for a stopped one.
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from splice.controller.telemetry import RankProgress

# Kinds of culprit, most specific first (the verdict's kind is its first culprit's).
SKIPPED = "skipped-collective"   # moved past a collective the others still wait in
STOPPED = "stopped"              # the process itself does not run (SIGSTOP, wedged)
STUCK = "stuck-in-compute"       # alive, but never reached the collective
UNLOCALIZED = "unlocalized"      # every rank waits inside the same collective
_PRIORITY = (SKIPPED, STOPPED, STUCK)


@dataclass(frozen=True, kw_only=True)
class HangConfig:
    # The threshold is this multiple of the median recent step time: a healthy rank goes
    # at most about one step without touching a counter (a forward pass has no
    # collectives), and occasional 2-3x slow steps (GC, data loading, page faults) must
    # not look like hangs. 3x is the design target's own bound.
    multiple: float = 3.0
    # ... but never below this: with millisecond steps, scheduler and agent polling jitter
    # (tens to hundreds of ms on a loaded host) would otherwise dominate.
    floor_s: float = 1.0
    # Before any step has completed there is no step time to scale: the first steps
    # include compilation, warm-up and data-loader start, so wait this long.
    cold_start_s: float = 60.0
    # Median over this many most recent step times: long enough to ignore a few slow
    # steps, short enough to follow a real change of pace (a new batch size, a rebalance).
    window_steps: int = 50
    # A heartbeat older than this marks the process as not running. The hook beats
    # every 0.1 s; five missed beats is not scheduling noise.
    heartbeat_timeout_s: float = 0.5
    # The first step of an epoch that members joined (a replacement, a new node) includes
    # their start-up and the transfer of a peer's snapshot: the threshold is at least this.
    join_grace_s: float = 20.0

    def __post_init__(self) -> None:
        if self.multiple < 1.0:
            raise ValueError(f"multiple must be >= 1 (a normal step is not a hang), got "
                             f"{self.multiple}")
        if self.floor_s <= 0 or self.cold_start_s <= 0 or self.heartbeat_timeout_s <= 0:
            raise ValueError("floor_s, cold_start_s and heartbeat_timeout_s must be > 0")
        if self.window_steps < 1:
            raise ValueError(f"window_steps must be >= 1, got {self.window_steps}")


@dataclass(frozen=True)
class Culprit:
    rank: int
    kind: str
    reason: str


@dataclass(frozen=True, kw_only=True)
class HangVerdict:
    epoch: int
    seq: int                          # the collective the job is stuck at
    kind: str                         # the first culprit's kind, or "unlocalized"
    culprits: tuple[Culprit, ...]     # empty when unlocalized
    victims: tuple[int, ...]          # ranks waiting inside the collective
    stalled_s: float                  # time since any rank last progressed
    threshold_s: float
    evidence: Mapping[int, Mapping[str, float | int | None]] = field(repr=False)
    reason: str

    @property
    def culprit_ranks(self) -> tuple[int, ...]:
        return tuple(c.rank for c in self.culprits)


@dataclass(frozen=True, eq=False)
class RankArrays:
    """Ranks' progress as parallel arrays, one entry per rank in rank order: the fields of
    RankProgress, with None as a mask (`has_heartbeat`; a collective's start only counts
    where seq_entered > seq_exited, and pending_op is None there otherwise). Times are on
    the clock of the `now` they are judged against (see the module's docstring)."""
    rank: np.ndarray
    epoch: np.ndarray
    seq_entered: np.ndarray
    seq_exited: np.ndarray               # <= seq_entered
    in_collective_since_s: np.ndarray    # float: read only inside a collective
    last_step: np.ndarray
    last_progress_s: np.ndarray
    heartbeat_s: np.ndarray              # float: read only where has_heartbeat
    has_heartbeat: np.ndarray
    pending_op: np.ndarray               # object: str or None

    @classmethod
    def of(cls, progress: Mapping[int, RankProgress]) -> RankArrays:
        ps = [progress[r] for r in sorted(progress)]

        def col(get: Any, dtype: Any = None) -> np.ndarray:
            return np.array([get(p) for p in ps], dtype=dtype)

        return cls(
            rank=col(lambda p: p.rank, np.int64), epoch=col(lambda p: p.epoch),
            seq_entered=col(lambda p: p.last_seq_entered),
            seq_exited=col(lambda p: p.last_seq_exited),
            in_collective_since_s=col(lambda p: p.in_collective_since_s or 0.0, float),
            last_step=col(lambda p: p.last_step),
            last_progress_s=col(lambda p: p.last_progress_s, float),
            heartbeat_s=col(lambda p: p.heartbeat_s or 0.0, float),
            has_heartbeat=col(lambda p: p.heartbeat_s is not None, bool),
            pending_op=col(lambda p: p.pending_op, object))

    def __len__(self) -> int:
        return len(self.rank)

    @property
    def in_collective(self) -> np.ndarray:
        return self.seq_entered > self.seq_exited

    def select(self, rows: np.ndarray) -> RankArrays:
        return RankArrays(**{f: getattr(self, f)[rows] for f in self.__dataclass_fields__})

    def progress(self, i: int) -> RankProgress:
        """Row i as a record."""
        inside = bool(self.seq_entered[i] > self.seq_exited[i])
        return RankProgress(
            rank=int(self.rank[i]), epoch=self.epoch[i].item(),
            last_seq_entered=self.seq_entered[i].item(),
            last_seq_exited=self.seq_exited[i].item(),
            in_collective_since_s=self.in_collective_since_s[i].item() if inside else None,
            last_step=self.last_step[i].item(), last_progress_s=self.last_progress_s[i].item(),
            heartbeat_s=self.heartbeat_s[i].item() if self.has_heartbeat[i] else None,
            pending_op=self.pending_op[i])


class _Evidence(Mapping[int, Mapping[str, float | int | None]]):
    """rank -> what its counters said at the diagnosis, built when read: a stall of 100,000
    ranks must not build 100,000 dictionaries that nobody looks at."""

    def __init__(self, arrays: RankArrays, now: float) -> None:
        self._a, self._now = arrays, now
        self._row = {r: i for i, r in enumerate(arrays.rank.tolist())}

    def __getitem__(self, rank: int) -> Mapping[str, float | int | None]:
        p, now = self._a.progress(self._row[rank]), self._now
        return {"last_seq_entered": p.last_seq_entered,
                "last_seq_exited": p.last_seq_exited,
                "last_step": p.last_step,
                "in_collective_for_s": (None if p.in_collective_since_s is None
                                        else round(now - p.in_collective_since_s, 6)),
                "idle_s": round(now - p.last_progress_s, 6),
                "heartbeat_age_s": (None if p.heartbeat_s is None
                                    else round(now - p.heartbeat_s, 6))}

    def __iter__(self) -> Iterator[int]:
        return iter(self._row)

    def __len__(self) -> int:
        return len(self._row)


def threshold_s(config: HangConfig, step_times: Sequence[float]) -> float:
    """max(floor, multiple x median of the recent step times); cold start without any."""
    recent = [t for t in step_times[-config.window_steps:]]
    if not recent:
        return config.cold_start_s
    return max(config.floor_s, config.multiple * statistics.median(recent))


class HangDetector:
    def __init__(self, config: HangConfig) -> None:
        self.config = config
        self._reported: set[tuple[int, int]] = set()   # (epoch, seq) already reported

    def observe(self, progress: Mapping[int, RankProgress] | RankArrays,
                step_times: Sequence[float], now: float, *, min_threshold_s: float = 0.0
                ) -> HangVerdict | None:
        """A verdict the first time the job is seen stalled at a given (epoch, seq)."""
        ranks = progress if isinstance(progress, RankArrays) else RankArrays.of(progress)
        if not len(ranks):
            return None
        epochs = ranks.epoch.tolist()
        epoch = max(epochs)
        # Records of an older epoch are leftovers of a membership that no longer trains.
        if min(epochs) != epoch:
            ranks = ranks.select(ranks.epoch == epoch)
        limit = max(min_threshold_s, threshold_s(self.config, step_times))
        stalled = now - max(ranks.last_progress_s.tolist())
        if stalled <= limit:
            return None
        verdict = diagnose_arrays(ranks, now, stalled_s=stalled, threshold_s=limit,
                                  heartbeat_timeout_s=self.config.heartbeat_timeout_s)
        key = (verdict.epoch, verdict.seq)
        if key in self._reported:
            return None
        self._reported = {k for k in self._reported if k[0] == epoch} | {key}
        return verdict


def diagnose(ranks: Mapping[int, RankProgress], now: float, *, stalled_s: float,
             threshold_s: float, heartbeat_timeout_s: float) -> HangVerdict:
    """Name culprits and victims of a stall, from the frozen counters of one epoch."""
    return diagnose_arrays(RankArrays.of(ranks), now, stalled_s=stalled_s,
                           threshold_s=threshold_s, heartbeat_timeout_s=heartbeat_timeout_s)


def diagnose_arrays(a: RankArrays, now: float, *, stalled_s: float, threshold_s: float,
                    heartbeat_timeout_s: float) -> HangVerdict:
    """`diagnose` over arrays (ranks in rank order, one epoch), vectorised over the ranks."""
    epoch = a.epoch[0].item()
    inside = a.in_collective
    entered, step_of = a.seq_entered, a.last_step
    if inside.any():
        seq = entered[inside].min().item()
        step = step_of[inside & (entered == seq)].min().item()
    else:
        # Nobody is inside a collective: the job is stuck between collectives, at the
        # collective the least advanced rank would enter next.
        seq = entered.min().item() + 1
        step = step_of.min().item()
    victim = inside & (entered == seq) & (step_of == step)
    stopped = a.has_heartbeat & (now - a.heartbeat_s > heartbeat_timeout_s)

    # Every other rank: moved past the others (skipped), behind them and not inside a
    # collective (stopped or stuck), or merely not running (stopped).
    other = ~victim
    skipped = other & ((step_of > step) | (entered > seq))
    behind = other & ~skipped & (entered < seq) & ~inside
    kinds = {SKIPPED: skipped, STOPPED: other & ~skipped & stopped,
             STUCK: behind & ~stopped}
    # Same seq, different call: the ranks in the minority skipped one collective.
    odd = _minority_ops(a, np.flatnonzero(victim))
    if len(odd):
        kinds[SKIPPED] = kinds[SKIPPED].copy()
        kinds[SKIPPED][odd] = True
        victim = victim.copy()
        victim[odd] = False
    # A process that is not running at all is the strongest evidence there is: it holds
    # everyone, and a rank one step ahead of the rest is then only a ring all-reduce that
    # completed on some ranks before the stop (seen with a SIGSTOP mid-collective).
    if stopped.any():
        none = np.zeros(len(a), dtype=bool)
        kinds = {SKIPPED: none, STOPPED: stopped, STUCK: none}
        victim = inside & ~stopped
    victims = tuple(a.rank[victim].tolist())

    culprits = tuple(Culprit(int(a.rank[i]), k,
                             _culprit_reason(int(a.rank[i]), k, a.progress(i), seq, step, now))
                     for k in _PRIORITY for i in np.flatnonzero(kinds[k]).tolist())
    head = (f"epoch {epoch} stalled {stalled_s:.2f} s (threshold {threshold_s:.2f} s) "
            f"at collective seq {seq}")
    wait = (f"; rank {_ranks(victims)} wait inside seq {seq} (step {step})" if victims
            else "")
    if culprits:
        reason = head + ": " + "; ".join(c.reason for c in culprits) + wait
        kind = culprits[0].kind
    else:
        reason = (head + wait + "; every rank entered it and none is stopped, so no single "
                  "rank is to blame: suspect the transport or the network")
        kind = UNLOCALIZED
    return HangVerdict(epoch=epoch, seq=seq, kind=kind, culprits=culprits, victims=victims,
                       stalled_s=stalled_s, threshold_s=threshold_s,
                       evidence=_Evidence(a, now), reason=reason)


def _culprit_reason(rank: int, kind: str, p: RankProgress, seq: int, step: int,
                    now: float) -> str:
    idle = f"no progress for {now - p.last_progress_s:.2f} s"
    if kind == SKIPPED and p.last_step == step and p.last_seq_entered == seq:
        return (f"rank {rank} skipped a collective: its seq {seq} is {p.pending_op!r}, "
                f"a different call from the one the others wait in")
    if kind == SKIPPED:
        return (f"rank {rank} skipped collective seq {seq}: it moved on to step {p.last_step}"
                f" / seq {p.last_seq_entered} while the others wait in step {step}")
    beat = ("" if p.heartbeat_s is None
            else f", heartbeat {now - p.heartbeat_s:.2f} s old")
    if kind == STOPPED:
        where = (f"inside seq {p.last_seq_entered}" if p.in_collective
                 else f"after seq {p.last_seq_exited}")
        return f"rank {rank} is stopped {where} ({idle}{beat})"
    return (f"rank {rank} is stuck in compute: it never entered seq {seq}, its last was "
            f"seq {p.last_seq_entered} ({idle}{beat or ', no heartbeat to tell a stopped '}"
            f"{'' if beat else 'process from a long step'})")


def _minority_ops(a: RankArrays, victims: np.ndarray) -> np.ndarray:
    """Rows (among `victims`, in rank order) inside a different call than a strict
    majority of those waiting with them."""
    ops = a.pending_op[victims]
    if not len(ops) or (ops == ops[0]).all():   # the common case: one call
        return victims[:0]
    named = {int(i): op for i, op in zip(victims.tolist(), ops.tolist(), strict=True)
             if op is not None}
    if len(set(named.values())) < 2:
        return victims[:0]
    counts = Counter(named.values())
    (top, n), = counts.most_common(1)
    if 2 * n <= len(named):
        return victims[:0]
    return np.array([i for i, op in named.items() if op != top], dtype=np.int64)


def _ranks(ranks: Sequence[int]) -> str:
    return ", ".join(str(r) for r in ranks)
