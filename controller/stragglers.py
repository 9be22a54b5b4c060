"""Straggler detection: which rank slows the job down, and is it its compute or its link.

In synchronous data parallelism every step waits for the slowest rank, so one rank 20 %
slow costs the whole job 20 %. Step times are noisy (jitter, garbage collection, a slow
batch), so the detector compares each rank with the *group* at the same step (robust to
job-wide slowdowns), scores it with a median/MAD z-score (robust to one wild rank), and
accumulates evidence in a one-sided CUSUM per rank, so a small persistent slowdown is
found in tens of steps while isolated spikes are not. A flag needs the CUSUM over its
threshold *and* several consecutive steps of evidence, and is cleared only after many
clean steps: no flapping. Everything here is deterministic; no clock is read.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from splice.controller.telemetry import LinkProbe, StepRecord

COMPUTE = "compute"
LINK = "link"
_MAD_TO_SIGMA = 1.4826   # MAD of a normal distribution x this = its standard deviation


@dataclass(frozen=True, kw_only=True)
class StragglerConfig:
    # Slowdowns below this fraction are noise we accept: the CUSUM drifts down by it every
    # step, so a clean rank with ~5 % jitter never accumulates. Half of the 1.2x target
    # shift is the textbook CUSUM choice; a little less still catches 1.1x.
    slack: float = 0.06
    # CUSUM decision threshold, in units of "fraction of a step": a 1.2x rank adds
    # ~0.14 per step (about 12 steps to cross), a clean rank essentially never gets there.
    threshold: float = 1.5
    # One step adds at most this much to the CUSUM, so a single 3x spike (a GC pause, a
    # page fault storm) is worth no more than a few slow steps.
    max_increment: float = 0.5
    # Consecutive steps of evidence (ratio above 1 + slack and robust z above z_min)
    # needed with the CUSUM: spikes are isolated, a straggler is not.
    persistence_steps: int = 4
    # Robust z-score a step must reach to count as evidence: the rank stands out from
    # this step's group, not merely from its own history.
    z_min: float = 1.5
    # Floor of the robust spread, as a fraction of the median: with identical ranks the
    # MAD is ~0 and every tiny difference would have an infinite z-score.
    min_rel_spread: float = 0.01
    # Clean steps (no evidence) before a flagged rank is cleared: long enough that a
    # straggler that is intermittently fast does not flap between flagged and cleared.
    clear_after_steps: int = 50
    # Steps whose ratios are kept per rank: a flag's score is their median over the
    # evidence streak, a clear's over the whole window.
    score_window_steps: int = 20
    # Fewer ranks than this have no majority to call "normal".
    min_ranks: int = 3

    def __post_init__(self) -> None:
        if not 0 < self.slack < 1:
            raise ValueError(f"slack must be in (0, 1), got {self.slack}")
        if self.threshold <= 0 or self.max_increment <= self.slack:
            raise ValueError("threshold must be > 0 and max_increment > slack")
        if self.persistence_steps < 1 or self.clear_after_steps < 1:
            raise ValueError("persistence_steps and clear_after_steps must be >= 1")
        if self.z_min < 0 or self.min_rel_spread <= 0 or self.score_window_steps < 1:
            raise ValueError("z_min must be >= 0, min_rel_spread and score_window_steps > 0")
        if self.min_ranks < 3:
            raise ValueError(f"min_ranks must be >= 3 (a median of two is no majority), "
                             f"got {self.min_ranks}")


@dataclass(frozen=True, kw_only=True)
class StragglerVerdict:
    rank: int
    kind: str                 # "compute" | "link"
    active: bool              # True: flagged now; False: cleared
    score: float              # estimated slowdown ratio (1.5 = 1.5x slower than the group)
    step: int
    evidence: Mapping[str, float | int | str] = field(repr=False)
    reason: str


class _Tracks:
    """What the detector remembers about every rank for one kind of slowness, as arrays
    indexed by rank (grown on demand): the per-step update is vectorised over ranks."""

    def __init__(self, window: int) -> None:
        self.window = window
        self.exists = np.zeros(0, dtype=bool)   # the rank has been observed
        self.cusum = np.zeros(0)
        self.streak = np.zeros(0, dtype=np.int64)   # consecutive evidence steps
        self.clean = np.zeros(0, dtype=np.int64)    # consecutive clean steps while flagged
        self.flagged = np.zeros(0, dtype=bool)
        self.count = np.zeros(0, dtype=np.int64)    # ratios ever recorded
        self.ring = np.zeros((0, window))           # the last `window` ratios, circular

    def grow(self, size: int) -> None:
        old = len(self.cusum)
        if size <= old:
            return
        size = max(size, 2 * old)
        pad = size - old
        self.exists = np.concatenate([self.exists, np.zeros(pad, dtype=bool)])
        self.cusum = np.concatenate([self.cusum, np.zeros(pad)])
        self.streak = np.concatenate([self.streak, np.zeros(pad, dtype=np.int64)])
        self.clean = np.concatenate([self.clean, np.zeros(pad, dtype=np.int64)])
        self.flagged = np.concatenate([self.flagged, np.zeros(pad, dtype=bool)])
        self.count = np.concatenate([self.count, np.zeros(pad, dtype=np.int64)])
        self.ring = np.concatenate([self.ring, np.zeros((pad, self.window))])

    def ratios(self, rank: int) -> list[float]:
        """The rank's kept ratios, oldest first."""
        n = int(self.count[rank])
        k = min(n, self.window)
        return [float(self.ring[rank, i % self.window]) for i in range(n - k, n)]

    def is_flagged(self, rank: int) -> bool:
        return rank < len(self.flagged) and bool(self.flagged[rank])


class StragglerDetector:
    def __init__(self, config: StragglerConfig, node_of: Mapping[int, str] | None = None
                 ) -> None:
        self.config = config
        self.node_of = dict(node_of or {})
        self._tracks = {COMPUTE: _Tracks(config.score_window_steps),
                        LINK: _Tracks(config.score_window_steps)}

    @property
    def flagged(self) -> dict[int, str]:
        """Ranks flagged now, with the kind of slowness (link wins when both are)."""
        c, li = self._tracks[COMPUTE].flagged, self._tracks[LINK].flagged
        out: dict[int, str] = {}
        for r in np.flatnonzero(c).tolist():
            out[r] = COMPUTE
        for r in np.flatnonzero(li).tolist():
            out[r] = LINK
        return dict(sorted(out.items()))

    def observe(self, steps: Sequence[StepRecord]) -> list[StragglerVerdict]:
        """Feed one step's records (one per rank); verdicts for ranks flagged or cleared."""
        if len(steps) < self.config.min_ranks:
            return []
        last = {s.rank: s for s in steps}   # one record per rank (the last one)
        return self.observe_arrays(
            max(s.step for s in steps), np.fromiter(last, dtype=np.int64, count=len(last)),
            np.array([s.compute_s for s in last.values()], dtype=float),
            np.array([s.wait_s for s in last.values()], dtype=float),
            np.array([s.share for s in last.values()], dtype=float))

    def observe_arrays(self, step: int, ranks: np.ndarray, compute_s: np.ndarray,
                       wait_s: np.ndarray, share: np.ndarray) -> list[StragglerVerdict]:
        """`observe` over parallel arrays (one entry per rank, ranks distinct, compute and
        wait >= 0, share > 0): the same statistics, vectorised over the ranks."""
        cfg = self.config
        if len(ranks) < cfg.min_ranks:
            return []
        # Compute time per unit of batch share: a rebalanced rank keeps its true speed.
        compute = compute_s / share
        # Time in collectives not explained by waiting for slower peers: a rank that
        # finished computing early waits (max compute - its compute) before anyone can
        # move; what is left is its own transfer time.
        slowest = compute_s.max()
        transfer = np.maximum(0.0, wait_s - (slowest - compute_s))
        c_med = _median(compute)
        if c_med <= 0:
            return []
        step_med = _median(compute_s + transfer)
        c_z = _robust_z(compute, cfg.min_rel_spread * c_med)
        # A slow link between two of four nodes slows half the ranks: the median would sit
        # between the two groups, so transfers are compared with the lower quartile.
        t_base, t_z = _robust_z_low(transfer, cfg.min_rel_spread * step_med)
        c_ratio = compute / c_med
        # The link "ratio": how much longer this rank's step is because of its own
        # transfers, relative to the median step.
        l_ratio = (1.0 + (transfer - t_base) / step_med if step_med > 0
                   else np.ones(len(ranks)))
        changes = {COMPUTE: self._update(COMPUTE, ranks, c_ratio, c_z),
                   LINK: self._update(LINK, ranks, l_ratio, t_z)}
        zs = {COMPUTE: c_z, LINK: t_z}
        todo = sorted({(int(ranks[i]), kind, i, what) for kind, ch in changes.items()
                       for what, idx in ch.items() for i in idx.tolist()})
        # Rare: flags and clears, applied in rank order (compute before link), as a rank
        # at a time would see them.
        verdicts = []
        for rank, kind, i, what in todo:
            v = self._transition(rank, kind, what, float(zs[kind][i]), step)
            if v is not None:
                verdicts.append(v)
        # A slow link drags compute-normal ranks only; a compute flag explains both.
        return [v for v in verdicts
                if not (v.kind == LINK and v.active and self._is_flagged(v.rank, COMPUTE))]

    def _is_flagged(self, rank: int, kind: str) -> bool:
        return self._tracks[kind].is_flagged(rank)

    def _update(self, kind: str, ranks: np.ndarray, ratio: np.ndarray, z: np.ndarray
                ) -> dict[str, np.ndarray]:
        """Every rank's CUSUM, streak and clean count; the positions (into `ranks`) of the
        ranks that now qualify to be flagged or cleared."""
        cfg = self.config
        t = self._tracks[kind]
        t.grow(int(ranks.max()) + 1)
        t.exists[ranks] = True
        count = t.count[ranks]
        t.ring[ranks, count % t.window] = ratio
        t.count[ranks] = count + 1
        excess = np.minimum(ratio - 1.0, cfg.max_increment)
        cusum = np.maximum(0.0, t.cusum[ranks] + excess - cfg.slack)
        t.cusum[ranks] = cusum
        evidence = (ratio - 1.0 > cfg.slack) & (z >= cfg.z_min)
        streak = np.where(evidence, t.streak[ranks] + 1, 0)
        t.streak[ranks] = streak
        flagged = t.flagged[ranks]
        clean = np.where(flagged, np.where(evidence, 0, t.clean[ranks] + 1), t.clean[ranks])
        t.clean[ranks] = clean
        flag = ~flagged & (cusum >= cfg.threshold) & (streak >= cfg.persistence_steps)
        clear = flagged & (clean >= cfg.clear_after_steps)
        return {"flag": np.flatnonzero(flag), "clear": np.flatnonzero(clear)}

    def _transition(self, rank: int, kind: str, what: str, z: float, step: int
                    ) -> StragglerVerdict | None:
        t = self._tracks[kind]
        if what == "flag":
            if kind == LINK and self._is_flagged(rank, COMPUTE):
                return None
            t.flagged[rank], t.clean[rank] = True, 0
            return self._verdict(rank, kind, t, z, step, active=True)
        t.flagged[rank], t.cusum[rank], t.streak[rank] = False, 0.0, 0
        return self._verdict(rank, kind, t, z, step, active=False)

    def _verdict(self, rank: int, kind: str, t: _Tracks, z: float, step: int, *,
                 active: bool) -> StragglerVerdict:
        cfg = self.config
        ratios = t.ratios(rank)
        streak, cusum = int(t.streak[rank]), float(t.cusum[rank])
        # Flagging: the slowdown over the evidence streak (older steps may predate it).
        # Clearing: over the whole window.
        recent = ratios[-streak:] if active and streak else ratios
        score = statistics.median(recent)
        node = self.node_of.get(rank)
        evidence: dict[str, float | int | str] = {
            "median_ratio": round(score, 4), "last_ratio": round(ratios[-1], 4),
            "robust_z": round(z, 2), "cusum": round(cusum, 3),
            "cusum_threshold": cfg.threshold, "evidence_steps": streak,
            "window_steps": len(ratios)}
        if node is not None:
            evidence["node"] = node
        where = f" on node {node}" if node is not None else ""
        if kind == LINK and active:
            nodes = sorted({self.node_of[r] for r in np.flatnonzero(t.flagged).tolist()
                            if r in self.node_of})
            if nodes:
                evidence["link_flagged_nodes"] = ",".join(nodes)
                where += f" (link-slow ranks so far on node {', '.join(nodes)})"
        what = ("compute time per sample" if kind == COMPUTE
                else "time in its own transfers (compute normal)")
        if active:
            reason = (f"rank {rank}{where} is a {kind} straggler at step {step}: its {what} "
                      f"is {score:.2f}x the group median over the last {len(recent)} "
                      f"steps (robust z {z:.1f}; CUSUM {cusum:.2f} >= {cfg.threshold} "
                      f"after {streak} consecutive slow steps)")
        else:
            reason = (f"rank {rank}{where} cleared as a {kind} straggler at step {step}: "
                      f"{cfg.clear_after_steps} consecutive clean steps, median ratio now "
                      f"{score:.2f}x")
        return StragglerVerdict(rank=rank, kind=kind, active=active, score=score, step=step,
                                evidence=evidence, reason=reason)


def _median(values: np.ndarray) -> float:
    """The median as statistics.median computes it (the mean of the middle two)."""
    n = len(values)
    k = n // 2
    if n % 2:
        return float(np.partition(values, k)[k])
    part = np.partition(values, (k - 1, k))
    return (float(part[k - 1]) + float(part[k])) / 2


def _robust_z(values: np.ndarray, min_spread: float) -> np.ndarray:
    """(value - median) / (1.4826 MAD), the spread floored at `min_spread`."""
    med = _median(values)
    mad = _median(np.abs(values - med))
    sigma = max(_MAD_TO_SIGMA * mad, min_spread, 1e-12)
    return (values - med) / sigma


def _robust_z_low(values: np.ndarray, min_spread: float) -> tuple[float, np.ndarray]:
    """Lower quartile as the baseline, spread (MAD) of the lower half: robust while up to
    three quarters of the ranks are affected."""
    ordered = np.sort(values)
    base = float(ordered[(len(ordered) - 1) // 4])
    lower = ordered[:(len(ordered) + 1) // 2]
    mid = _median(lower)
    mad = _median(np.abs(lower - mid))
    sigma = max(_MAD_TO_SIGMA * mad, min_spread, 1e-12)
    return base, (values - base) / sigma


# ---- links --------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class LinkConfig:
    # A pair this many times slower than the median pair (bandwidth, or round trip) is
    # slow: probes are noisy at the 10-20 % level, a degraded link (a flapping port, a
    # NIC fallen back to a lower speed) is 2x or worse.
    slowdown: float = 1.5
    # Probes older than this are ignored: link health changes, and a stale probe of a
    # fixed link must not keep accusing it.
    max_age_s: float = 60.0
    # Fewer pairs have no majority to call "normal" (three nodes give three pairs).
    min_pairs: int = 3

    def __post_init__(self) -> None:
        if self.slowdown <= 1 or self.max_age_s <= 0 or self.min_pairs < 3:
            raise ValueError("slowdown must be > 1, max_age_s > 0, min_pairs >= 3")


@dataclass(frozen=True, kw_only=True)
class LinkVerdict:
    nodes: tuple[str, str]
    score: float              # slowdown vs the median pair (the worse of bandwidth and rtt)
    evidence: Mapping[str, float] = field(repr=False)
    reason: str


def localise_slow_link(probes: Sequence[LinkProbe], now: float,
                       config: LinkConfig | None = None) -> LinkVerdict | None:
    """The slowest node pair if it is `slowdown` x worse than the median pair, else None."""
    cfg = config or LinkConfig()
    latest: dict[tuple[str, str], LinkProbe] = {}
    for p in sorted(probes, key=lambda p: p.at_s):
        if now - p.at_s <= cfg.max_age_s:
            latest[p.pair] = p
    if len(latest) < cfg.min_pairs:
        return None
    bw_med = statistics.median(p.bandwidth_bytes_per_s for p in latest.values())
    rtt_med = statistics.median(p.rtt_s for p in latest.values())

    def slowdown(p: LinkProbe) -> float:
        rtt = p.rtt_s / rtt_med if rtt_med > 0 else 1.0
        return max(bw_med / p.bandwidth_bytes_per_s, rtt)

    pair, worst = max(latest.items(), key=lambda kv: (slowdown(kv[1]), kv[0]))
    score = slowdown(worst)
    if score < cfg.slowdown:
        return None
    evidence = {"bandwidth_bytes_per_s": worst.bandwidth_bytes_per_s,
                "median_bandwidth_bytes_per_s": bw_med, "rtt_s": worst.rtt_s,
                "median_rtt_s": rtt_med, "probe_age_s": now - worst.at_s,
                "pairs": float(len(latest))}
    return LinkVerdict(
        nodes=pair, score=score, evidence=evidence,
        reason=(f"link {pair[0]}<->{pair[1]} is {score:.1f}x slower than the median of "
                f"{len(latest)} node pairs: {worst.bandwidth_bytes_per_s / 1e9:.2f} GB/s vs "
                f"{bw_med / 1e9:.2f} GB/s, rtt {worst.rtt_s * 1e3:.2f} ms vs "
                f"{rtt_med * 1e3:.2f} ms ({now - worst.at_s:.0f} s ago)"))


# ---- rebalancing --------------------------------------------------------------------------

@dataclass(frozen=True)
class Rebalance:
    shares: tuple[float, ...]
    reason: str


def rebalance_shares(current_shares: Sequence[float], slowdown_by_rank: Mapping[int, float],
                     *, max_change: float = 2.0) -> Rebalance:
    """New batch shares proportional to each rank's speed, one bounded move at a time.

    Speed is 1 / slowdown (ranks not named run at 1.0). Shares are relative: their sum is
    kept, so the global batch is unchanged. No share moves by more than `max_change` x in
    one decision (a wrong measurement cannot starve a rank at once); the next decision
    continues from where this one stopped. Exact: a scale factor is found by bisection so
    that the clamped targets sum to the old total.
    """
    if max_change < 1:
        raise ValueError(f"max_change must be >= 1, got {max_change}")
    if not current_shares or any(s <= 0 for s in current_shares):
        raise ValueError(f"shares must be positive, got {tuple(current_shares)}")
    bad = {r: x for r, x in slowdown_by_rank.items()
           if not 0 <= r < len(current_shares) or x <= 0}
    if bad:
        raise ValueError(f"slowdowns must be > 0 for ranks of the job, got {bad}")
    current = [float(s) for s in current_shares]
    total = sum(current)
    speed = [1.0 / slowdown_by_rank.get(r, 1.0) for r in range(len(current))]

    def clamped(scale: float) -> list[float]:
        return [min(max(scale * v, c / max_change), c * max_change)
                for v, c in zip(speed, current, strict=True)]

    lo, hi = 0.0, max_change * total / min(speed)
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if sum(clamped(mid)) < total else (lo, mid)
    shares = clamped((lo + hi) / 2)
    fix = total / sum(shares)     # float residue only; keeps the sum exact-ish
    shares = [s * fix for s in shares]
    moved = {r: (current[r], shares[r]) for r in range(len(current))
             if abs(shares[r] - current[r]) > 1e-9 * total}
    slow = ", ".join(f"rank {r} {x:.2f}x" for r, x in sorted(slowdown_by_rank.items()))
    changes = ", ".join(f"rank {r} {a:.3f}->{b:.3f}" for r, (a, b) in sorted(moved.items()))
    bounded = any(abs(b / a - max_change) < 1e-6 or abs(a / b - max_change) < 1e-6
                  for a, b in moved.values())
    reason = (f"shares follow measured speed ({slow or 'all ranks even'}): "
              f"{changes or 'no change'}; global batch unchanged (total {total:.3f})"
              + (f"; capped at {max_change}x per decision" if bounded else ""))
    return Rebalance(shares=tuple(shares), reason=reason)
