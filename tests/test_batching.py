"""Constant global batch (agent/worker/batching.py): partitioning properties.

Checked against naive references: a rank-by-rank walk over sample positions, and the
exact (rational) proportional quota of each rank.
"""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from splice.agent.worker.batching import BatchConfig, assign_micro_batches

realistic_shares = st.floats(min_value=0.05, max_value=20.0, allow_nan=False)


@st.composite
def world_and_shares(draw: st.DrawFn) -> tuple[int, list[float]]:
    shares = draw(st.lists(realistic_shares, min_size=1, max_size=16))
    n = draw(st.integers(min_value=len(shares), max_value=len(shares) * 12))
    return n, shares


@st.composite
def batch_configs(draw: st.DrawFn) -> BatchConfig:
    global_batch = draw(st.integers(min_value=1, max_value=512))
    micro = draw(st.integers(min_value=1, max_value=global_batch))
    return BatchConfig(global_batch_size=global_batch, micro_batch_size=micro)


def counts(ranges: list[range]) -> list[int]:
    return [len(r) for r in ranges]


# ---- BatchConfig --------------------------------------------------------------------------

@pytest.mark.parametrize(("global_batch", "micro"), [(0, 1), (1, 0), (-4, 2), (4, 5)])
def test_batch_config_rejects_bad_sizes(global_batch: int, micro: int) -> None:
    with pytest.raises(ValueError):
        BatchConfig(global_batch_size=global_batch, micro_batch_size=micro)


def test_last_micro_batch_may_be_smaller() -> None:
    cfg = BatchConfig(global_batch_size=10, micro_batch_size=4)
    assert cfg.num_micro_batches == 3
    assert [cfg.micro_batch_positions(2, i) for i in range(3)] == [
        range(20, 24), range(24, 28), range(28, 30)]


@given(cfg=batch_configs(), step=st.integers(min_value=0, max_value=10_000))
def test_micro_batches_of_a_step_cover_its_samples_exactly_once(cfg: BatchConfig, step: int
                                                                 ) -> None:
    positions = [p for i in range(cfg.num_micro_batches)
                 for p in cfg.micro_batch_positions(step, i)]
    g = cfg.global_batch_size
    assert positions == list(range(step * g, (step + 1) * g))
    assert all(len(cfg.micro_batch_positions(step, i)) >= 1
               for i in range(cfg.num_micro_batches))


@given(cfg=batch_configs(),
       worlds=st.lists(st.lists(realistic_shares, min_size=1, max_size=8), min_size=1,
                       max_size=6))
def test_world_size_changes_between_steps_skip_and_repeat_nothing(
        cfg: BatchConfig, worlds: list[list[float]]) -> None:
    """Each step runs on a different world; the union of what every rank read, rank by
    rank, is exactly the sample stream up to the last step."""
    seen: list[int] = []
    for step, shares in enumerate(worlds):
        if cfg.num_micro_batches < len(shares):
            shares = shares[: cfg.num_micro_batches]
        for rank_range in assign_micro_batches(cfg.num_micro_batches, shares):
            for index in rank_range:
                seen.extend(cfg.micro_batch_positions(step, index))
    assert sorted(seen) == list(range(len(worlds) * cfg.global_batch_size))
    assert len(seen) == len(set(seen))


# ---- assign_micro_batches -----------------------------------------------------------------

@given(world_and_shares())
def test_assignment_is_a_contiguous_partition_with_at_least_one_each(
        case: tuple[int, list[float]]) -> None:
    n, shares = case
    ranges = assign_micro_batches(n, shares)
    assert len(ranges) == len(shares)
    walk = 0  # naive reference: ranks take consecutive runs starting at 0
    for r in ranges:
        assert r.step == 1 and r.start == walk and len(r) >= 1
        walk = r.stop
    assert walk == n


@given(n=st.integers(min_value=1, max_value=500), world=st.integers(min_value=1, max_value=64),
       share=realistic_shares)
def test_equal_shares_differ_by_at_most_one_and_lower_ranks_get_the_extra(
        n: int, world: int, share: float) -> None:
    if n < world:
        n, world = world, n
    c = counts(assign_micro_batches(n, [share] * world))
    assert max(c) - min(c) <= 1
    assert c == sorted(c, reverse=True)
    assert sum(c) == n


@given(world_and_shares())
def test_counts_follow_the_documented_rule(case: tuple[int, list[float]]) -> None:
    """Largest remainder on the exact quotas, then the min-one rule: every rank gets at
    least one micro-batch, and a rank never gets more than its quota rounded up."""
    n, shares = case
    exact = [Fraction(s) for s in shares]
    total = sum(exact)
    c = counts(assign_micro_batches(n, shares))
    assert min(c) >= 1 and sum(c) == n
    for got, s in zip(c, exact, strict=True):
        assert got <= max(1, math.ceil(n * s / total))


@given(world_and_shares())
@example((13, [1.0, 1.0, 1.0, 10.0]))
@example((100, [1.0] * 9 + [91.0]))
def test_quota_rule_when_min_one_does_not_bind(case: tuple[int, list[float]]) -> None:
    """With every exact quota n*share/total >= 1, each count is its quota rounded down or
    up (largest remainder's quota rule); the min-one rule costs nothing here."""
    n, shares = case
    exact = [Fraction(s) for s in shares]
    total = sum(exact)
    quotas = [n * s / total for s in exact]
    if min(quotas) < 1:
        return
    for c, q in zip(counts(assign_micro_batches(n, shares)), quotas, strict=True):
        assert math.floor(q) <= c <= math.ceil(q), (c, q)


def test_exact_remainder_ties_go_to_the_lower_rank() -> None:
    assert counts(assign_micro_batches(5, [4.0, 1.0, 1.0])) == [3, 1, 1]


@pytest.mark.parametrize("shares", [[1e308, 1e308], [1e308, 1.0]])
def test_large_finite_shares_are_assigned(shares: list[float]) -> None:
    c = counts(assign_micro_batches(10, shares))
    assert sum(c) == 10 and min(c) >= 1


def test_min_one_rule_gives_a_tiny_share_one_micro_batch() -> None:
    assert counts(assign_micro_batches(4, [1000.0, 1.0, 1.0, 1.0])) == [1, 1, 1, 1]
    assert counts(assign_micro_batches(10, [1000.0, 0.001])) == [9, 1]


@pytest.mark.parametrize(("n", "shares", "match"), [
    (4, [], "no ranks"),
    (2, [1.0, 1.0, 1.0], "cannot be spread"),
    (4, [1.0, 0.0], "positive and finite"),
    (4, [1.0, -1.0], "positive and finite"),
    (4, [1.0, math.inf], "positive and finite"),
    (4, [1.0, math.nan], "positive and finite"),
])
def test_bad_assignment_input_is_a_value_error(n: int, shares: list[float], match: str
                                               ) -> None:
    with pytest.raises(ValueError, match=match):
        assign_micro_batches(n, shares)


@settings(deadline=None)  # the first example imports torch
@given(st.integers(min_value=0, max_value=2**63 - 2))
def test_the_micro_batch_seed_leaves_the_rng_as_torch_manual_seed_does(seed: int) -> None:
    # The session seeds each micro-batch with its own cheaper call (gradients._seed):
    # dropout masks and anything else drawn in the loss must not change with it.
    import torch

    from splice.agent.worker.gradients import _seed

    _seed(seed)
    ours = (torch.get_rng_state(), torch.rand(3))
    torch.manual_seed(seed)
    theirs = (torch.get_rng_state(), torch.rand(3))
    assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])
