"""The exact reduction's accumulation (agent/worker/gradients.py `_accumulate`): widening
each gradient through a small staging buffer gives the sums of widening them all at once,
bit for bit, whatever the chunk boundaries."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from splice.agent.worker.gradients import _accumulate


def _params(sizes: list[int], seed: int, missing: set[int]) -> list[nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    params = []
    for i, n in enumerate(sizes):
        p = nn.Parameter(torch.zeros(n))
        if i not in missing:
            # Magnitudes far apart, so that a float32 sum would round where float64 is exact.
            p.grad = torch.randn(n, generator=g) * 10.0 ** torch.randint(-8, 8, (n,), generator=g)
        params.append(p)
    return params


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(1, 300), min_size=1, max_size=6),
       chunk=st.integers(1, 64), rounds=st.integers(1, 3), seed=st.integers(0, 2**16),
       missing=st.sets(st.integers(0, 5), max_size=2))
def test_chunked_widening_sums_like_widening_everything_first(
        sizes: list[int], chunk: int, rounds: int, seed: int, missing: set[int]) -> None:
    total = sum(sizes)
    acc = torch.zeros(total + 2, dtype=torch.float64)
    expected = torch.zeros(total + 2, dtype=torch.float64)
    scratch = torch.empty(chunk, dtype=torch.float64)
    for r in range(rounds):
        params = _params(sizes, seed + r, missing)
        grads = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]
        expected[:-2] += torch.cat(grads).double()
        _accumulate(acc, params, scratch)
        # Each gradient is zeroed for the next micro-batch; a missing one stays missing.
        for i, p in enumerate(params):
            assert (p.grad is None) == (i in missing)
            if p.grad is not None:
                assert not p.grad.any()
    assert torch.equal(acc, expected)
    assert not acc[-2:].any()  # the loss and flag slots are left alone


def test_without_a_staging_buffer_the_gradients_are_added_directly() -> None:
    params = _params([5, 7], 3, set())
    want = torch.cat([p.grad.clone() for p in params]).double()
    acc = torch.zeros(14, dtype=torch.float64)
    _accumulate(acc, params, None)  # the path a GPU accumulator takes
    assert torch.equal(acc[:-2], want)


def test_a_non_contiguous_gradient_is_summed_in_row_major_order() -> None:
    p = nn.Parameter(torch.zeros(3, 4))
    p.grad = torch.arange(12, dtype=torch.float32).reshape(4, 3).t()  # strides (1, 3)
    acc = torch.zeros(14, dtype=torch.float64)
    _accumulate(acc, [p], torch.empty(5, dtype=torch.float64))
    assert torch.equal(acc[:12], torch.arange(12, dtype=torch.float64).reshape(4, 3).t().reshape(-1))
