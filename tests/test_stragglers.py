"""Straggler and slow-link detection, and rebalancing: stories as data, and properties."""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from splice.controller.stragglers import (
    LinkConfig,
    StragglerConfig,
    StragglerDetector,
    StragglerVerdict,
    localise_slow_link,
    rebalance_shares,
)
from splice.controller.telemetry import LinkProbe, StepRecord

NODE_OF = {r: "ABCD"[r // 2] for r in range(8)}


def run(steps: int, compute: Callable[[int, int], float], *, n: int = 8,
        transfer: Callable[[int, int], float] = lambda r, k: 0.02,
        detector: StragglerDetector | None = None) -> list[StragglerVerdict]:
    """Feed `steps` steps of `n` ranks; compute(rank, step) and transfer(rank, step) in s."""
    det = detector or StragglerDetector(StragglerConfig(), node_of=NODE_OF)
    out = []
    now = 0.0
    for k in range(steps):
        c = [compute(r, k) for r in range(n)]
        t = [transfer(r, k) for r in range(n)]
        now += max(c) + max(t)
        out += det.observe([StepRecord(rank=r, epoch=1, step=k, compute_s=c[r],
                                       wait_s=max(c) - c[r] + t[r], end_s=now)
                            for r in range(n)])
    return out


def noisy(seed: int, slow: Mapping[int, float] | None = None, from_step: int = 100,
          until_step: int = 10**9) -> Callable[[int, int], float]:
    """Lognormal 5 % jitter, 2-3x spikes on 0.5 % of rank-steps, `slow` ranks' factors."""
    rng = random.Random(seed)

    def compute(r: int, k: int) -> float:
        x = 0.1 * rng.lognormvariate(0, 0.05)
        if rng.random() < 0.005:
            x *= rng.uniform(2, 3)
        if slow and r in slow and from_step <= k < until_step:
            x *= slow[r]
        return x

    return compute


def assert_explained(v: StragglerVerdict) -> None:
    assert f"rank {v.rank}" in v.reason and v.kind in v.reason
    assert f"{v.score:.2f}x" in v.reason
    assert {"median_ratio", "robust_z", "cusum"} <= set(v.evidence)


# ---- stories -------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(5))
def test_rank_15x_slower_from_step_100_is_flagged_within_ten_steps(seed: int) -> None:
    verdicts = run(300, noisy(seed, {5: 1.5}))
    assert [(v.rank, v.kind, v.active) for v in verdicts] == [(5, "compute", True)]
    v = verdicts[0]
    assert 100 <= v.step < 110
    assert v.score == pytest.approx(1.5, rel=0.08)
    assert v.evidence["node"] == "C" and "node C" in v.reason
    assert_explained(v)


def test_clean_noisy_ranks_raise_no_alarm() -> None:
    assert run(2000, noisy(7)) == []


def test_slow_link_between_node_a_and_node_b() -> None:
    # Node pair A-B carries transfers 3x slower from step 100; compute is normal.
    rng = random.Random(3)

    def transfer(r: int, k: int) -> float:
        return 0.02 * rng.lognormvariate(0, 0.05) * (3 if k >= 100 and r < 4 else 1)

    verdicts = run(300, noisy(3), transfer=transfer)
    assert {(v.rank, v.kind, v.active) for v in verdicts} == \
        {(r, "link", True) for r in range(4)}
    assert all(100 <= v.step < 130 for v in verdicts)
    last = max(verdicts, key=lambda v: (v.step, v.rank))
    assert last.evidence["link_flagged_nodes"] == "A,B" and "node A, B" in last.reason
    for v in verdicts:
        assert_explained(v)


def test_compute_straggler_is_not_mistaken_for_a_slow_link() -> None:
    # Everyone else waits for rank 2: their waits grow, but that is not their links.
    verdicts = run(300, noisy(4, {2: 2.0}))
    assert [(v.rank, v.kind) for v in verdicts] == [(2, "compute")]


def test_recovered_rank_is_cleared_after_clean_steps_without_flapping() -> None:
    cfg = StragglerConfig()
    verdicts = run(400, noisy(5, {1: 1.5}, from_step=100, until_step=200))
    assert [(v.rank, v.active) for v in verdicts] == [(1, True), (1, False)]
    cleared = verdicts[1]
    assert cleared.step >= 200 + cfg.clear_after_steps - 1
    assert "cleared" in cleared.reason and "rank 1" in cleared.reason


def test_intermittently_slow_rank_stays_flagged() -> None:
    # 1.5x slow on 4 steps of every 10: evidence stops and starts, the flag holds.
    base = noisy(6)
    verdicts = run(600, lambda r, k: base(r, k) * (1.5 if r == 4 and k % 10 < 6 else 1.0))
    assert [(v.rank, v.active) for v in verdicts] == [(4, True)]


def test_rebalanced_rank_stays_flagged_per_sample() -> None:
    det = StragglerDetector(StragglerConfig())
    for k in range(200):
        share = 0.7 if k >= 50 else 1.0
        flagged_before = dict(det.flagged)
        det.observe([StepRecord(rank=r, epoch=1, step=k, end_s=k, wait_s=0.0,
                                share=share if r == 0 else 1.0,
                                compute_s=0.1 * (1.5 * share if r == 0 else 1.0) *
                                (1 + 0.01 * ((k * 7 + r * 3) % 5 - 2)))
                     for r in range(4)])
        if k >= 50:
            assert flagged_before == det.flagged == {0: "compute"}


def test_fewer_than_three_ranks_have_no_majority() -> None:
    assert run(200, lambda r, k: 0.1 * (2 if r == 0 else 1), n=2) == []


# ---- links ---------------------------------------------------------------------------------

def probes(bw: Mapping[tuple[str, str], float], at_s: float = 100.0) -> list[LinkProbe]:
    return [LinkProbe(src_node=a, dst_node=b, rtt_s=1e-4, bandwidth_bytes_per_s=x,
                      at_s=at_s) for (a, b), x in bw.items()]


PAIRS = [("A", "B"), ("A", "C"), ("A", "D"), ("B", "C"), ("B", "D"), ("C", "D")]


def test_localise_slow_link_names_the_pair() -> None:
    bw = {p: 10e9 * (1 + 0.05 * i) for i, p in enumerate(PAIRS)}
    bw[("B", "A")] = 2e9                # a newer probe of A-B (reversed direction)
    ps = probes({p: x for p, x in bw.items() if p != ("A", "B")}) + \
        probes({("A", "B"): 10e9}, at_s=50.0) + probes({("B", "A"): 2e9}, at_s=101.0)
    v = localise_slow_link(ps, now=110.0)
    assert v is not None and v.nodes == ("A", "B")
    assert v.score == pytest.approx(5.5, rel=0.1)
    assert "A<->B" in v.reason and "2.00 GB/s" in v.reason


def test_no_slow_link_among_even_or_stale_probes() -> None:
    even = probes({p: 10e9 * (1 + 0.03 * i) for i, p in enumerate(PAIRS)})
    assert localise_slow_link(even, now=110.0) is None
    slow = probes({p: (1e9 if p == ("C", "D") else 10e9) for p in PAIRS}, at_s=0.0)
    assert localise_slow_link(slow, now=100.0) is None              # all older than 60 s
    assert localise_slow_link(slow[:2], now=0.0) is None            # two pairs: no majority


def test_high_round_trip_alone_marks_a_link_slow() -> None:
    ps = [LinkProbe(src_node=a, dst_node=b, rtt_s=(5e-3 if (a, b) == ("B", "D") else 1e-4),
                    bandwidth_bytes_per_s=10e9, at_s=0.0) for a, b in PAIRS]
    v = localise_slow_link(ps, now=1.0, config=LinkConfig(slowdown=2.0))
    assert v is not None and v.nodes == ("B", "D") and v.score == pytest.approx(50.0)


# ---- rebalancing ---------------------------------------------------------------------------

def test_rebalance_follows_speed_and_keeps_the_global_batch() -> None:
    plan = rebalance_shares([1.0] * 8, {5: 1.5})
    assert sum(plan.shares) == pytest.approx(8.0)
    assert plan.shares[5] / plan.shares[0] == pytest.approx(1 / 1.5)
    assert "rank 5 1.50x" in plan.reason and "global batch unchanged" in plan.reason


def test_rebalance_is_bounded_per_decision_and_converges() -> None:
    shares: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0)
    plan = rebalance_shares(shares, {0: 5.0})
    assert plan.shares[0] == pytest.approx(0.5) and "capped at 2.0x" in plan.reason
    for _ in range(3):
        plan = rebalance_shares(plan.shares, {0: 5.0})
    assert plan.shares[0] / plan.shares[1] == pytest.approx(0.2)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0.05, 5.0), min_size=1, max_size=12).flatmap(
    lambda shares: st.tuples(st.just(shares), st.dictionaries(
        st.integers(0, len(shares) - 1), st.floats(0.2, 5.0)))))
def test_rebalance_properties(case: tuple[list[float], dict[int, float]]) -> None:
    shares, slow = case
    plan = rebalance_shares(shares, slow)
    assert sum(plan.shares) == pytest.approx(sum(shares), rel=1e-9)
    for old, new in zip(shares, plan.shares, strict=True):
        assert old / 2 * (1 - 1e-9) <= new <= old * 2 * (1 + 1e-9)
    # Reference: unbounded proportional shares; where no bound binds, equal to it.
    speed = [1 / slow.get(r, 1.0) for r in range(len(shares))]
    naive = [sum(shares) * v / sum(speed) for v in speed]
    if all(o / 2 < x < 2 * o for o, x in zip(shares, naive, strict=True)):
        assert plan.shares == pytest.approx(naive, rel=1e-6)


def test_rebalance_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        rebalance_shares([1.0, 0.0], {})
    with pytest.raises(ValueError):
        rebalance_shares([1.0, 1.0], {7: 1.5})


# ---- properties of the detector ------------------------------------------------------------

def _steps(seed: int, slow: dict[int, float], n: int, k: int) -> list[StepRecord]:
    rng = random.Random(seed * 1000 + k)
    c = [0.1 * rng.lognormvariate(0, 0.05) * (slow.get(r, 1.0) if k >= 20 else 1.0)
         for r in range(n)]
    return [StepRecord(rank=r, epoch=1, step=k, compute_s=c[r], wait_s=max(c) - c[r] + 0.01,
                       end_s=float(k)) for r in range(n)]


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10**6), st.integers(3, 8), st.dictionaries(
    st.integers(0, 7), st.floats(1.0, 2.0), max_size=2), st.randoms(use_true_random=False),
    st.floats(0.01, 100.0))
def test_verdicts_permute_with_ranks_and_ignore_the_time_scale(
        seed: int, n: int, slow: dict[int, float], rnd: random.Random, k: float) -> None:
    perm = list(range(n))
    rnd.shuffle(perm)
    a, b, c = (StragglerDetector(StragglerConfig()) for _ in range(3))
    va, vb, vc = [], [], []
    for step in range(80):
        recs = _steps(seed, slow, n, step)
        va += [(v.rank, v.kind, v.active, v.step, round(v.score, 9)) for v in a.observe(recs)]
        vb += [(v.rank, v.kind, v.active, v.step, round(v.score, 9))
               for v in b.observe([StepRecord(rank=perm[s.rank], epoch=1, step=s.step,
                                              compute_s=s.compute_s, wait_s=s.wait_s,
                                              end_s=s.end_s) for s in recs])]
        vc += [(v.rank, v.kind, v.active, v.step, round(v.score, 9))
               for v in c.observe([StepRecord(rank=s.rank, epoch=1, step=s.step,
                                              compute_s=s.compute_s * k, wait_s=s.wait_s * k,
                                              end_s=s.end_s * k) for s in recs])]
    assert sorted((perm[r], *rest) for r, *rest in va) == sorted(vb)
    assert [x[:4] for x in va] == [x[:4] for x in vc]


@settings(max_examples=50, deadline=None)
@given(st.integers(3, 16), st.integers(0, 10**6), st.floats(0.001, 1000.0))
def test_no_verdict_on_identical_ranks_with_noise_below_slack(n: int, seed: int,
                                                              base: float) -> None:
    cfg = StragglerConfig()
    rng = random.Random(seed)
    # Every compute time within +-slack/3 of the same base: no ratio exceeds 1 + slack.
    assert run(150, lambda r, k: base * (1 + rng.uniform(-1, 1) * cfg.slack / 3), n=n,
               transfer=lambda r, k: 0.0, detector=StragglerDetector(cfg)) == []


@pytest.mark.parametrize("bad", [dict(slack=0), dict(threshold=0), dict(max_increment=0.01),
                                 dict(persistence_steps=0), dict(min_ranks=2),
                                 dict(clear_after_steps=0)])
def test_config_is_validated(bad: dict) -> None:
    with pytest.raises(ValueError):
        StragglerConfig(**bad)


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 10**6), st.integers(3, 40))
def test_observe_arrays_matches_observe_records(seed: int, n: int) -> None:
    """The hub feeds parallel arrays; records in any order give the same verdicts."""
    import numpy as np

    rng = random.Random(seed)
    slow = {rng.randrange(n): rng.uniform(1.2, 2.0)}
    a, b = StragglerDetector(StragglerConfig()), StragglerDetector(StragglerConfig())
    for step in range(60):
        recs = _steps(seed, slow, n, step)
        rng.shuffle(recs)
        va = a.observe(recs)
        vb = b.observe_arrays(step, np.array([s.rank for s in recs]),
                              np.array([s.compute_s for s in recs]),
                              np.array([s.wait_s for s in recs]), np.ones(len(recs)))
        assert [(v.rank, v.kind, v.active, v.score, v.reason) for v in va] == \
            [(v.rank, v.kind, v.active, v.score, v.reason) for v in vb]
        assert a.flagged == b.flagged
