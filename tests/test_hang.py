"""Hang detector: failure stories as data, and properties against a naive reference."""

from __future__ import annotations

import random
import statistics
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from splice.controller.hang import HangConfig, HangDetector, HangVerdict, threshold_s
from splice.controller.telemetry import RankProgress

STEP_S = 0.2                      # median step: threshold = max(1 s, 3 x 0.2 s) = 1 s
STEPS = [STEP_S] * 20


def waiting(rank: int, seq: int, since: float, *, step: int = 5, beat: float | None = None,
            op: str | None = None) -> RankProgress:
    """A rank inside collective `seq` since `since` (its last progress)."""
    return RankProgress(rank=rank, epoch=1, last_seq_entered=seq, last_seq_exited=seq - 1,
                        in_collective_since_s=since, last_step=step, last_progress_s=since,
                        heartbeat_s=beat, pending_op=op)


def computing(rank: int, last_seq: int, since: float, *, step: int = 5,
              beat: float | None = None) -> RankProgress:
    """A rank between collectives, last progress (exit of `last_seq`) at `since`."""
    return RankProgress(rank=rank, epoch=1, last_seq_entered=last_seq,
                        last_seq_exited=last_seq, in_collective_since_s=None, last_step=step,
                        last_progress_s=since, heartbeat_s=beat)


def job(*ranks: RankProgress) -> dict[int, RankProgress]:
    return {p.rank: p for p in ranks}


def first_verdict(progress: dict[int, RankProgress], start: float, end: float,
                  step_times: list[float] = STEPS, config: HangConfig | None = None,
                  dt: float = 0.01) -> tuple[float, HangVerdict] | None:
    """Poll a fresh detector on a simulated clock; the first verdict and when."""
    det = HangDetector(config or HangConfig())
    for i in range(round((end - start) / dt) + 1):
        now = start + i * dt
        v = det.observe(progress, step_times, now)
        if v is not None:
            return now, v
    return None


def assert_explained(v: HangVerdict) -> None:
    assert f"seq {v.seq}" in v.reason
    for c in v.culprits:
        assert f"rank {c.rank}" in c.reason and f"rank {c.rank}" in v.reason
        assert c.rank in v.evidence
    for r in v.victims:
        assert str(r) in v.reason


# ---- stories -------------------------------------------------------------------------------

def test_stopped_rank_is_named_with_its_victims() -> None:
    # Rank 2 was SIGSTOPped at t=9.9 in the forward pass; the others entered seq 10 at 10.0.
    progress = job(waiting(0, 10, 10.0, beat=11.9), waiting(1, 10, 10.0, beat=11.9),
                   computing(2, 9, 9.8, beat=9.9), waiting(3, 10, 10.0, beat=11.9))
    hit = first_verdict(progress, 10.0, 12.0)
    assert hit is not None
    now, v = hit
    assert now == pytest.approx(11.0 + 0.01)        # stall 1 s (the floor), first poll past
    assert (v.kind, v.culprit_ranks, v.victims, v.seq) == ("stopped", (2,), (0, 1, 3), 10)
    assert v.evidence[2]["last_seq_entered"] == 9
    assert "heartbeat" in v.culprits[0].reason
    assert_explained(v)


def test_rank_sleeping_inside_a_step_is_stuck_in_compute() -> None:
    progress = job(waiting(0, 10, 10.0, beat=11.95), computing(1, 9, 9.8, beat=11.95),
                   waiting(2, 10, 10.0, beat=11.95))
    hit = first_verdict(progress, 10.0, 12.0)
    assert hit is not None
    _, v = hit
    assert (v.kind, v.culprit_ranks, v.victims) == ("stuck-in-compute", (1,), (0, 2))
    assert "never entered seq 10" in v.reason
    assert_explained(v)


def test_without_a_heartbeat_a_behind_rank_is_reported_stuck_and_says_so() -> None:
    progress = job(waiting(0, 10, 10.0), computing(1, 9, 9.8), waiting(2, 10, 10.0))
    hit = first_verdict(progress, 10.0, 12.0)
    assert hit is not None and hit[1].kind == "stuck-in-compute"
    assert "no heartbeat" in hit[1].reason


def test_rank_that_skipped_a_step_moved_on_while_the_others_wait() -> None:
    # Rank 3 skipped step 6's collectives (a NaN guard's `continue`) and waits in step 7's
    # first collective, which its own counter also numbers 10.
    progress = job(waiting(0, 10, 10.0), waiting(1, 10, 10.0), waiting(2, 10, 10.0),
                   waiting(3, 10, 10.1, step=6))
    hit = first_verdict(progress, 10.0, 12.0)
    assert hit is not None
    _, v = hit
    assert (v.kind, v.culprit_ranks, v.victims) == ("skipped-collective", (3,), (0, 1, 2))
    assert "moved on to step 6" in v.reason
    assert_explained(v)


def test_rank_that_skipped_one_collective_is_in_a_different_call() -> None:
    a, b = "all_reduce#bucket1:26214400", "all_reduce#bucket2:9437184"
    progress = job(waiting(0, 10, 10.0, op=a), waiting(1, 10, 10.0, op=b),
                   waiting(2, 10, 10.0, op=a), waiting(3, 10, 10.0, op=a))
    hit = first_verdict(progress, 10.0, 12.0)
    assert hit is not None
    _, v = hit
    assert (v.kind, v.culprit_ranks, v.victims) == ("skipped-collective", (1,), (0, 2, 3))
    assert b in v.reason
    assert_explained(v)


def test_rank_stopped_inside_the_collective_holds_the_others() -> None:
    progress = job(waiting(0, 10, 10.0, beat=11.9), waiting(1, 10, 10.0, beat=10.05),
                   waiting(2, 10, 10.0, beat=11.9))
    hit = first_verdict(progress, 10.0, 12.0)
    assert hit is not None
    _, v = hit
    assert (v.kind, v.culprit_ranks, v.victims) == ("stopped", (1,), (0, 2))
    assert "inside seq 10" in v.reason


def test_everyone_inside_and_alive_is_unlocalized() -> None:
    progress = job(*(waiting(r, 10, 10.0, beat=11.9) for r in range(4)))
    hit = first_verdict(progress, 10.0, 12.0)
    assert hit is not None
    _, v = hit
    assert (v.kind, v.culprits, v.victims) == ("unlocalized", (), (0, 1, 2, 3))
    assert "network" in v.reason


def test_no_hang_when_everyone_is_slow_but_progressing() -> None:
    # Steps suddenly take 0.9 s (4.5x the history) but counters keep moving.
    det = HangDetector(HangConfig())
    for i in range(200):
        now = 10.0 + i * 0.05
        tick = 10.0 + (i // 18) * 0.9            # some counter moves every 0.9 s
        progress = job(*(waiting(r, 10 + i // 18, tick) for r in range(4)))
        assert det.observe(progress, STEPS, now) is None


def test_threshold_adapts_to_step_time() -> None:
    progress = job(waiting(0, 10, 10.0), computing(1, 9, 9.0), waiting(2, 10, 10.0))
    slow = [2.0] * 30                                         # threshold 3 x 2 s = 6 s
    hit = first_verdict(progress, 10.0, 20.0, step_times=slow, dt=0.1)
    assert hit is not None and hit[0] == pytest.approx(16.1)
    assert hit[1].threshold_s == pytest.approx(6.0)
    fast = [0.01] * 30                                        # floor: 1 s
    hit = first_verdict(progress, 10.0, 20.0, step_times=fast, dt=0.1)
    assert hit is not None and hit[0] == pytest.approx(11.1)
    # The median ignores a few very slow steps; only the recent window counts.
    assert threshold_s(HangConfig(), [0.5] * 40 + [30.0] * 5) == pytest.approx(1.5)
    assert threshold_s(HangConfig(window_steps=10), [30.0] * 40 + [0.5] * 10) == 1.5
    assert threshold_s(HangConfig(), []) == HangConfig().cold_start_s


def test_a_hang_is_reported_once_and_a_new_one_again() -> None:
    det = HangDetector(HangConfig())
    progress = job(waiting(0, 10, 10.0), computing(1, 9, 9.0), waiting(2, 10, 10.0))
    assert det.observe(progress, STEPS, 11.5) is not None
    assert all(det.observe(progress, STEPS, 11.5 + i) is None for i in range(1, 30))
    # It recovered and hung again at a later collective: a new report.
    later = job(waiting(0, 20, 50.0), computing(1, 19, 49.0), waiting(2, 20, 50.0))
    v = det.observe(later, STEPS, 51.5)
    assert v is not None and v.seq == 20


def test_records_of_an_older_epoch_are_ignored() -> None:
    old = replace(computing(1, 3, 0.0), epoch=0)
    progress = {0: replace(waiting(0, 10, 10.0), epoch=2), 1: old,
                2: replace(waiting(2, 10, 10.0), epoch=2)}
    v = HangDetector(HangConfig()).observe(progress, STEPS, 11.5)
    assert v is not None and v.epoch == 2 and 1 not in v.evidence


@pytest.mark.parametrize("bad", [dict(multiple=0.5), dict(floor_s=0), dict(window_steps=0),
                                 dict(heartbeat_timeout_s=-1)])
def test_config_is_validated(bad: dict) -> None:
    with pytest.raises(ValueError):
        HangConfig(**bad)


def test_progress_record_rejects_inconsistent_counters() -> None:
    with pytest.raises(ValueError, match="in_collective_since_s"):
        RankProgress(rank=0, epoch=1, last_seq_entered=3, last_seq_exited=3,
                     in_collective_since_s=1.0, last_step=0, last_progress_s=1.0)


# ---- properties ----------------------------------------------------------------------------

@st.composite
def stalls(draw: st.DrawFn) -> tuple[dict[int, RankProgress], float]:
    """A job of 3-8 ranks frozen in some mix of states, and `now`."""
    n = draw(st.integers(3, 8))
    seq = draw(st.integers(2, 50))
    ranks = []
    for r in range(n):
        t = draw(st.floats(5.0, 10.0))
        beat = draw(st.one_of(st.none(), st.floats(5.0, 20.0)))
        state = draw(st.sampled_from(["waiting", "behind", "ahead"]))
        if state == "waiting":
            ranks.append(waiting(r, seq, t, beat=beat))
        elif state == "behind":
            ranks.append(computing(r, seq - 1, t, beat=beat))
        else:
            ranks.append(waiting(r, seq, t, step=6, beat=beat))
    return job(*ranks), draw(st.floats(10.0, 20.0))


def _relabel(p: RankProgress, rank: int) -> RankProgress:
    return replace(p, rank=rank)


@settings(max_examples=150, deadline=None)
@given(stalls(), st.randoms(use_true_random=False), st.lists(st.floats(0.01, 3.0),
                                                            max_size=60))
def test_fires_exactly_when_the_naive_rule_says_and_permutes_with_ranks(
        case: tuple[dict[int, RankProgress], float], rnd: random.Random,
        step_times: list[float]) -> None:
    progress, now = case
    cfg = HangConfig()
    v = HangDetector(cfg).observe(progress, step_times, now)
    recent = step_times[-cfg.window_steps:]
    limit = max(1.0, 3 * statistics.median(recent)) if recent else cfg.cold_start_s
    stalled = now - max(p.last_progress_s for p in progress.values())
    assert (v is not None) == (stalled > limit)
    perm = list(progress)
    rnd.shuffle(perm)
    mapping = dict(zip(progress, perm, strict=True))
    permuted = {mapping[r]: _relabel(p, mapping[r]) for r, p in progress.items()}
    w = HangDetector(cfg).observe(permuted, step_times, now)
    if v is None:
        assert w is None
        return
    assert w is not None and w.kind == v.kind and w.seq == v.seq
    assert sorted((mapping[c.rank], c.kind) for c in v.culprits) == \
        sorted((c.rank, c.kind) for c in w.culprits)
    assert sorted(mapping[r] for r in v.victims) == list(w.victims)
    assert_explained(v)


@settings(max_examples=100, deadline=None)
@given(stalls(), st.floats(0.1, 50.0))
def test_scaling_every_time_scales_nothing_in_the_verdict(
        case: tuple[dict[int, RankProgress], float], k: float) -> None:
    progress, now = case
    cfg = HangConfig(floor_s=0.5)
    scaled_cfg = HangConfig(floor_s=0.5 * k, heartbeat_timeout_s=0.5 * k)

    def scale(p: RankProgress) -> RankProgress:
        return replace(p, last_progress_s=p.last_progress_s * k,
                       in_collective_since_s=(None if p.in_collective_since_s is None
                                              else p.in_collective_since_s * k),
                       heartbeat_s=None if p.heartbeat_s is None else p.heartbeat_s * k)

    v = HangDetector(cfg).observe(progress, STEPS, now)
    w = HangDetector(scaled_cfg).observe({r: scale(p) for r, p in progress.items()},
                                         [t * k for t in STEPS], now * k)
    assert (v is None) == (w is None)
    if v is not None and w is not None:
        assert (v.kind, v.victims, v.seq) == (w.kind, w.victims, w.seq)
        assert [(c.rank, c.kind) for c in v.culprits] == [(c.rank, c.kind) for c in w.culprits]
        assert w.stalled_s == pytest.approx(v.stalled_s * k)


def test_a_stopped_rank_inside_the_collective_is_blamed_not_the_rank_ahead_of_it() -> None:
    """Seen for real with SIGSTOP mid all-reduce: the ring completed on rank 0, which went
    on to the next step's collective; ranks 1 and 3 wait with rank 2, whose process is
    stopped. The stopped process is the culprit; rank 0 is one more victim."""
    t = 100.0
    progress = job(
        waiting(0, 36, t, step=104, beat=t + 5),
        waiting(1, 35, t, step=103, beat=t + 5),
        waiting(2, 35, t, step=103, beat=t),        # heartbeat stopped with the process
        waiting(3, 35, t, step=103, beat=t + 5),
    )
    found = first_verdict(progress, t, t + 5)
    assert found is not None
    _, v = found
    assert v.culprit_ranks == (2,) and v.kind == "stopped"
    assert set(v.victims) == {0, 1, 3}
    assert_explained(v)
