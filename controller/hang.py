"""Hang detection: the job stopped progressing, and which rank is to blame.

A collective timeout (30 s to 30 min by default) is far too late, and it names no one. The
hook keeps per-rank sequence counters in shared memory, so even a rank wedged in C++ shows
how far it got. A hang is declared when *no* rank made progress for longer than an
adaptive threshold; the counters then say who never entered the collective the others wait
in, or who moved on without it. `HangDetector.observe` is deterministic given its small
state (the hangs already reported) and the observations; the clock is passed in.
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

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

    def observe(self, progress: Mapping[int, RankProgress], step_times: Sequence[float],
                now: float, *, min_threshold_s: float = 0.0) -> HangVerdict | None:
        """A verdict the first time the job is seen stalled at a given (epoch, seq)."""
        if not progress:
            return None
        epoch = max(p.epoch for p in progress.values())
        # Records of an older epoch are leftovers of a membership that no longer trains.
        ranks = {r: p for r, p in progress.items() if p.epoch == epoch}
        limit = max(min_threshold_s, threshold_s(self.config, step_times))
        stalled = now - max(p.last_progress_s for p in ranks.values())
        if stalled <= limit:
            return None
        verdict = diagnose(ranks, now, stalled_s=stalled, threshold_s=limit,
                           heartbeat_timeout_s=self.config.heartbeat_timeout_s)
        key = (verdict.epoch, verdict.seq)
        if key in self._reported:
            return None
        self._reported = {k for k in self._reported if k[0] == epoch} | {key}
        return verdict


def diagnose(ranks: Mapping[int, RankProgress], now: float, *, stalled_s: float,
             threshold_s: float, heartbeat_timeout_s: float) -> HangVerdict:
    """Name culprits and victims of a stall, from the frozen counters of one epoch."""
    epoch = next(iter(ranks.values())).epoch
    waiting = {r: p for r, p in ranks.items() if p.in_collective}
    if waiting:
        seq = min(p.last_seq_entered for p in waiting.values())
        step = min(p.last_step for p in waiting.values() if p.last_seq_entered == seq)
    else:
        # Nobody is inside a collective: the job is stuck between collectives, at the
        # collective the least advanced rank would enter next.
        seq = min(p.last_seq_entered for p in ranks.values()) + 1
        step = min(p.last_step for p in ranks.values())
    victims = tuple(sorted(r for r, p in waiting.items() if p.last_seq_entered == seq
                           and p.last_step == step))

    def stopped(p: RankProgress) -> bool:
        return p.heartbeat_s is not None and now - p.heartbeat_s > heartbeat_timeout_s

    kinds: dict[int, str] = {}
    waiting_here = set(victims)  # a set: this loop runs over every rank (100k of them)
    for r, p in ranks.items():
        if r in waiting_here:
            continue
        if p.last_step > step or p.last_seq_entered > seq:
            kinds[r] = SKIPPED
        elif p.last_seq_entered < seq and not p.in_collective:
            kinds[r] = STOPPED if stopped(p) else STUCK
        elif stopped(p):
            kinds[r] = STOPPED
    # Same seq, different call: the ranks in the minority skipped one collective.
    odd = _minority_ops(ranks, victims)
    for r in odd:
        kinds[r] = SKIPPED
    victims = tuple(r for r in victims if r not in odd)
    # A process that is not running at all is the strongest evidence there is: it holds
    # everyone, and a rank one step ahead of the rest is then only a ring all-reduce that
    # completed on some ranks before the stop (seen with a SIGSTOP mid-collective).
    halted = {r for r, p in ranks.items() if stopped(p)}
    if halted:
        kinds = {r: STOPPED for r in halted}
        victims = tuple(sorted({r for r, p in ranks.items() if p.in_collective} - halted))

    evidence = {r: {"last_seq_entered": p.last_seq_entered,
                    "last_seq_exited": p.last_seq_exited,
                    "last_step": p.last_step,
                    "in_collective_for_s": (None if p.in_collective_since_s is None
                                            else round(now - p.in_collective_since_s, 6)),
                    "idle_s": round(now - p.last_progress_s, 6),
                    "heartbeat_age_s": (None if p.heartbeat_s is None
                                        else round(now - p.heartbeat_s, 6))}
                for r, p in sorted(ranks.items())}
    culprits = tuple(Culprit(r, k, _culprit_reason(r, k, ranks[r], seq, step, now))
                     for k in _PRIORITY for r in sorted(kinds) if kinds[r] == k)
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
                       stalled_s=stalled_s, threshold_s=threshold_s, evidence=evidence,
                       reason=reason)


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


def _minority_ops(ranks: Mapping[int, RankProgress], victims: Sequence[int]) -> set[int]:
    """Ranks inside a different call than a strict majority of those waiting with them."""
    ops = {r: ranks[r].pending_op for r in victims if ranks[r].pending_op is not None}
    if len(set(ops.values())) < 2:
        return set()
    counts = Counter(ops.values())
    (top, n), = counts.most_common(1)
    if 2 * n <= len(ops):
        return set()
    return {r for r, op in ops.items() if op != top}


def _ranks(ranks: Sequence[int]) -> str:
    return ", ".join(str(r) for r in ranks)
