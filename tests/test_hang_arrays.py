"""The vectorised hang diagnosis (hang.diagnose_arrays, what the controller runs over
100,000 ranks) against the one-rank-at-a-time diagnosis it replaced, kept here as the
naive reference: the same verdict, reason and evidence for any frozen picture."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence

from hypothesis import given, settings
from hypothesis import strategies as st

from splice.controller.hang import (
    _PRIORITY,
    SKIPPED,
    STOPPED,
    STUCK,
    UNLOCALIZED,
    Culprit,
    HangConfig,
    HangDetector,
    HangVerdict,
    _culprit_reason,
    _ranks,
    diagnose,
)
from splice.controller.telemetry import RankProgress


def naive_diagnose(ranks: Mapping[int, RankProgress], now: float, *, stalled_s: float,
             threshold_s: float, heartbeat_timeout_s: float) -> HangVerdict:
    """controller/hang.py's diagnosis before it was vectorised, one rank at a time."""
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
    odd = naive_minority_ops(ranks, victims)
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


def naive_minority_ops(ranks: Mapping[int, RankProgress], victims: Sequence[int]) -> set[int]:
    """Ranks inside a different call than a strict majority of those waiting with them."""
    ops = {r: ranks[r].pending_op for r in victims if ranks[r].pending_op is not None}
    if len(set(ops.values())) < 2:
        return set()
    counts = Counter(ops.values())
    (top, n), = counts.most_common(1)
    if 2 * n <= len(ops):
        return set()
    return {r for r, op in ops.items() if op != top}




@st.composite
def pictures(draw: st.DrawFn) -> dict[int, RankProgress]:
    """A frozen picture of one epoch: ranks around one collective, some inside it (maybe a
    different call), some behind or ahead, some with a stale heartbeat."""
    n = draw(st.integers(1, 9))
    ranks = draw(st.lists(st.integers(0, 40), min_size=n, max_size=n, unique=True))
    out = {}
    for r in ranks:
        entered = draw(st.integers(3, 6))
        inside = draw(st.booleans())
        since = draw(st.sampled_from([4.0, 5.5, 7.25]))
        out[r] = RankProgress(
            rank=r, epoch=2, last_seq_entered=entered,
            last_seq_exited=entered - 1 if inside else entered,
            in_collective_since_s=since if inside else None,
            last_step=draw(st.integers(1, 3)), last_progress_s=since,
            heartbeat_s=draw(st.sampled_from([None, 9.9, 5.0])),
            pending_op=draw(st.sampled_from(["all_reduce:64", "broadcast:8", None]))
            if inside else None)
    return out


@settings(max_examples=400, deadline=None)
@given(picture=pictures(), timeout_s=st.sampled_from([0.5, 3.0]))
def test_vectorised_diagnosis_matches_the_naive_one(picture: dict[int, RankProgress],
                                                    timeout_s: float) -> None:
    kw = dict(stalled_s=2.5, threshold_s=1.0, heartbeat_timeout_s=timeout_s)
    want = naive_diagnose(picture, 10.0, **kw)
    got = diagnose(dict(reversed(list(picture.items()))), 10.0, **kw)
    assert got == want
    assert dict(got.evidence) == dict(want.evidence)
    assert list(got.evidence) == list(want.evidence)


def test_a_picture_with_older_epochs_is_diagnosed_on_the_newest_only() -> None:
    newest = {r: RankProgress(rank=r, epoch=3, last_seq_entered=5, last_seq_exited=4,
                              in_collective_since_s=2.0, last_step=1, last_progress_s=2.0,
                              pending_op="all_reduce:64") for r in (0, 2)}
    old = {1: RankProgress(rank=1, epoch=2, last_seq_entered=9, last_seq_exited=9,
                           in_collective_since_s=None, last_step=4, last_progress_s=1.0)}
    v = HangDetector(HangConfig()).observe({**newest, **old}, [0.1], 10.0)
    assert isinstance(v, HangVerdict) and v.epoch == 3 and v.victims == (0, 2)
    assert v == naive_diagnose(newest, 10.0, stalled_s=8.0, threshold_s=1.0,
                               heartbeat_timeout_s=0.5)
