"""Resharding plans (controller/resharding.py): who sends which element ranges when the
world goes from N to M ranks.

Failure stories as examples, then Hypothesis properties checked against a deliberately
naive reference that decides every element on its own.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from splice.controller.resharding import Missing, Move, ReshardPlan, partition, plan_reshard

# The naive reference is slow by design, and a 2-core machine running other suites can push
# one example past Hypothesis' 200 ms deadline: time is not what these tests check.
unhurried = settings(deadline=None)

# ---- the naive reference ------------------------------------------------------------------


def reference(old: Sequence[range], holders: Mapping[int, Sequence[int]],
              new: Sequence[range]) -> dict[tuple[int, int], int | None]:
    """(new rank, element) -> the rank it comes from (itself for a keep), None if missing."""
    out: dict[tuple[int, int], int | None] = {}
    for dst, shard in enumerate(new):
        for e in shard:
            owner = next(s for s, r in enumerate(old) if e in r)
            ranks = sorted(holders.get(owner, ()))
            out[dst, e] = dst if dst in ranks else (ranks[0] if ranks else None)
    return out


def expand(plan: ReshardPlan) -> dict[tuple[int, int], int | None]:
    """The plan element by element; fails if any element is covered twice."""
    out: dict[tuple[int, int], int | None] = {}
    pieces: list[tuple[int, int, int, int | None]] = [
        (m.dst_rank, m.start, m.stop, m.src_rank) for m in plan.moves]
    pieces += [(m.dst_rank, m.start, m.stop, None) for m in plan.missing]
    for dst, start, stop, src in pieces:
        assert start < stop, "empty pieces are noise"
        for e in range(start, stop):
            assert (dst, e) not in out, f"element {e} of rank {dst} covered twice"
            out[dst, e] = src
    return out


# ---- strategies ---------------------------------------------------------------------------


@st.composite
def tilings(draw: st.DrawFn, total: int) -> list[range]:
    """Either a balanced partition or arbitrary cuts (empty shards included)."""
    world = draw(st.integers(min_value=1, max_value=8))
    if draw(st.booleans()):
        return partition(total, world, draw(st.sampled_from([1, 2, 4, 8])))
    cuts = sorted(draw(st.lists(st.integers(0, total), min_size=world - 1,
                                max_size=world - 1)))
    bounds = [0, *cuts, total]
    return [range(a, b) for a, b in zip(bounds, bounds[1:], strict=False)]


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[list[range], dict[int, list[int]], list[range]]:
    total = draw(st.integers(min_value=0, max_value=120))
    old, new = draw(tilings(total)), draw(tilings(total))
    holders = {s: draw(st.lists(st.integers(0, len(new) - 1), max_size=3))
               for s in range(len(old)) if draw(st.integers(0, 5)) > 0}
    return old, holders, new


# ---- partition ----------------------------------------------------------------------------


@unhurried
@given(total=st.integers(0, 5_000), world=st.integers(1, 64), align=st.integers(1, 64))
def test_partition_tiles_the_buffer_in_aligned_balanced_shards(total: int, world: int,
                                                               align: int) -> None:
    shards = partition(total, world, align)
    assert len(shards) == world
    assert [e for r in shards for e in r] == list(range(total))  # contiguous, in rank order
    assert all(r.start % align == 0 for r in shards if r.start < total)
    blocks = [-(-len(r) // align) for r in shards]
    assert max(blocks) - min(blocks) <= 1
    assert blocks == sorted(blocks, reverse=True)  # earlier ranks take the extra blocks


@pytest.mark.parametrize(("total", "world", "align"), [(-1, 1, 1), (1, 0, 1), (1, 1, 0)])
def test_partition_rejects_nonsense(total: int, world: int, align: int) -> None:
    with pytest.raises(ValueError):
        partition(total, world, align)


# ---- stories ------------------------------------------------------------------------------


def test_rank_2_of_4_lost_with_its_replica_on_rank_3() -> None:
    old, new = partition(12, 4), partition(12, 3)  # [0,3) [3,6) [6,9) [9,12) -> 4 each
    # survivors 0, 1, 3 become new ranks 0, 1, 2; old rank 3 also held rank 2's replica
    plan = plan_reshard(old, {0: [0], 1: [1], 2: [2], 3: [2]}, new)
    assert plan.moves == (Move(0, 0, 0, 3), Move(1, 0, 3, 4), Move(1, 1, 4, 6),
                          Move(2, 1, 6, 8), Move(2, 2, 8, 12))
    assert plan.missing == ()
    assert (plan.elems_kept, plan.elems_sent) == (9, 3)
    assert plan.reason == ("reshard 4 -> 3 ranks: 9 elements kept in place, "
                           "3 sent in 2 transfers")


def test_a_shard_lost_with_every_copy_is_reported_missing_loudly() -> None:
    plan = plan_reshard(partition(12, 4), {0: [0], 1: [1], 3: [2]}, partition(12, 3))
    assert plan.missing == (Missing(1, 6, 8, 2), Missing(2, 8, 9, 2))
    assert plan.elems_missing == 3
    assert "MISSING" in plan.reason and "old rank 2" in plan.reason
    assert "persistent checkpoint" in plan.reason


def test_growing_back_sends_only_to_the_newcomer_and_rebalanced_edges() -> None:
    plan = plan_reshard(partition(12, 3), {0: [0], 1: [1], 2: [2]}, partition(12, 4))
    # [0,4) [4,8) [8,12) -> [0,3) [3,6) [6,9) [9,12): edges shift right, rank 3 is new
    assert plan.transfers == (Move(0, 1, 3, 4), Move(1, 2, 6, 8), Move(2, 3, 9, 12))
    assert plan.elems_sent == 6


def test_unchanged_world_moves_nothing() -> None:
    shards = partition(1000, 8, 16)
    plan = plan_reshard(shards, {s: [s] for s in range(8)}, shards)
    assert plan.transfers == () and plan.elems_kept == 1000


@pytest.mark.parametrize(("old", "holders", "new"), [
    ([range(0, 4), range(3, 6)], {}, [range(0, 6)]),           # old shards overlap
    ([range(0, 6, 2)], {}, [range(0, 6, 2)]),                   # not contiguous
    ([range(0, 6)], {0: [1]}, [range(0, 6)]),                   # holder is no new rank
    ([range(0, 6)], {1: [0]}, [range(0, 6)]),                   # no such old rank
    ([range(0, 6)], {0: [0]}, [range(0, 8)]),                   # buffer grew
])
def test_bad_layouts_are_refused(old: list[range], holders: dict[int, list[int]],
                                 new: list[range]) -> None:
    with pytest.raises(ValueError):
        plan_reshard(old, holders, new)


# ---- properties against the reference -----------------------------------------------------


@unhurried
@given(scenarios())
def test_every_element_is_covered_exactly_once_by_the_reference_choice(
        case: tuple[list[range], dict[int, list[int]], list[range]]) -> None:
    old, holders, new = case
    assert expand(plan_reshard(old, holders, new)) == reference(old, holders, new)


@unhurried
@given(scenarios())
def test_nothing_is_sent_to_a_rank_that_holds_it_and_only_holders_send(
        case: tuple[list[range], dict[int, list[int]], list[range]]) -> None:
    old, holders, new = case
    plan = plan_reshard(old, holders, new)
    for m in plan.moves:
        for e in range(m.start, m.stop):
            owner = next(s for s, r in enumerate(old) if e in r)
            assert m.src_rank in holders[owner]
            if not m.local:
                assert m.dst_rank not in holders[owner], "needless movement"
    ref = reference(old, holders, new)
    needed = sum(1 for (dst, _), src in ref.items() if src is not None and src != dst)
    assert plan.elems_sent == needed
    assert plan.elems_missing == sum(1 for src in ref.values() if src is None)


@unhurried
@given(scenarios())
def test_ranges_are_maximal_and_ordered(
        case: tuple[list[range], dict[int, list[int]], list[range]]) -> None:
    old, holders, new = case
    plan = plan_reshard(old, holders, new)
    assert list(plan.moves) == sorted(plan.moves, key=lambda m: (m.dst_rank, m.start))
    for a, b in zip(plan.moves, plan.moves[1:], strict=False):
        assert (a.src_rank, a.dst_rank, a.stop) != (b.src_rank, b.dst_rank, b.start)


@unhurried
@given(scenarios(), st.randoms(use_true_random=False))
def test_plan_is_deterministic_whatever_the_order_of_holders(
        case: tuple[list[range], dict[int, list[int]], list[range]],
        rnd: random.Random) -> None:
    old, holders, new = case
    shuffled = {s: rnd.sample(ranks, len(ranks)) for s, ranks in
                rnd.sample(sorted(holders.items()), len(holders))}
    assert plan_reshard(old, holders, new) == plan_reshard(old, shuffled, new)
