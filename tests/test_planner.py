"""Recovery planning (controller/planner.py) and memberships (controller/membership.py).

Pure functions, so: examples for the stories a human reads, and Hypothesis properties
checked against deliberately naive references.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from splice.controller.membership import (
    Membership,
    StaleEpochError,
    node_of,
    parse_worker_id,
    rank_order,
    worker_id,
)
from splice.controller.planner import (
    NoCommonSnapshot,
    NoQuorum,
    ResumePlan,
    plan_initial,
    plan_resume,
    plan_without,
)

# ---- strategies ---------------------------------------------------------------------------

node_names = st.sampled_from(["a", "b", "c", "node-10", "node-2"])
local_ranks = st.integers(min_value=0, max_value=12)
worker_ids = st.builds(worker_id, node_names, local_ranks)
distinct_workers = st.lists(worker_ids, min_size=1, max_size=12, unique=True)
shares_values = st.floats(min_value=0.01, max_value=100.0, allow_nan=False)


@st.composite
def memberships(draw: st.DrawFn) -> Membership:
    members = tuple(draw(distinct_workers))
    shares = tuple(draw(st.lists(shares_values, min_size=len(members), max_size=len(members))))
    epoch = draw(st.integers(min_value=1, max_value=1_000))
    return Membership(epoch=epoch, members=members, shares=shares, reason="drawn")


def naive_rank_key(wid: str) -> tuple[str, int]:
    node, _, local = wid.rpartition("/")
    return node, int(local)


# ---- membership ---------------------------------------------------------------------------

@given(node=st.text(min_size=1), local=local_ranks)
def test_worker_id_round_trips(node: str, local: int) -> None:
    assert parse_worker_id(worker_id(node, local)) == (node, local)
    assert node_of(worker_id(node, local)) == node


@pytest.mark.parametrize("bad", ["", "a", "/0", "a/", "a/x", "a/-1", "a/1.0", "a/ 1"])
def test_malformed_worker_id_is_a_value_error_that_says_what_is_expected(bad: str) -> None:
    with pytest.raises(ValueError, match="NODE/LOCAL_RANK"):
        parse_worker_id(bad)


def test_rank_order_sorts_local_ranks_numerically_not_lexically() -> None:
    ids = ["b/0", "a/10", "a/2", "a/0"]
    assert sorted(ids, key=rank_order) == ["a/0", "a/2", "a/10", "b/0"]


@pytest.mark.parametrize("alias", ["a/01", "a/\u0661"])  # '01' and ARABIC-INDIC DIGIT ONE
def test_rank_order_key_is_unique_per_worker_id(alias: str) -> None:
    # Either refuse the alias, or it must not collide with the canonical id "a/1".
    try:
        key = rank_order(alias)
    except ValueError:
        return
    assert key != rank_order("a/1")


def test_membership_views() -> None:
    m = Membership(epoch=3, members=("a/0", "a/1", "b/0"), shares=(1.0, 1.0, 2.0), reason="r")
    assert m.world_size == 3
    assert [m.rank_of(w) for w in m.members] == [0, 1, 2]
    assert m.nodes() == frozenset({"a", "b"})


@pytest.mark.parametrize("kwargs", [
    {"epoch": 0, "members": ("a/0",), "shares": (1.0,)},
    {"epoch": 1, "members": ("a/0", "a/1"), "shares": (1.0,)},
    {"epoch": 1, "members": ("a/0", "a/0"), "shares": (1.0, 1.0)},
])
def test_membership_invariants_are_asserted(kwargs: dict) -> None:
    with pytest.raises(AssertionError):
        Membership(reason="r", **kwargs)


def test_stale_epoch_error_names_both_epochs() -> None:
    e = StaleEpochError(got=2, current=5)
    assert (e.got, e.current) == (2, 5)
    assert "2" in str(e) and "5" in str(e)


# ---- plan_initial -------------------------------------------------------------------------

def test_plan_initial_waits_until_the_world_is_ready() -> None:
    assert plan_initial(["a/0", "a/1", "b/0"], world_size=4) is None


def test_plan_initial_forms_epoch_one_in_rank_order() -> None:
    m = plan_initial(["b/1", "a/1", "b/0", "a/0"], world_size=4)
    assert m is not None
    assert m.epoch == 1 and m.initial
    assert m.members == ("a/0", "a/1", "b/0", "b/1")
    assert m.shares == (1.0, 1.0, 1.0, 1.0)
    assert m.reason.strip()


@given(ready=distinct_workers, world_size=st.integers(min_value=1, max_value=12))
def test_plan_initial_matches_naive_reference(ready: list[str], world_size: int) -> None:
    m = plan_initial(ready, world_size)
    if len(ready) < world_size:
        assert m is None
        return
    assert m is not None
    assert m.members == tuple(sorted(ready, key=naive_rank_key)[:world_size])
    assert m.epoch == 1 and m.initial and m.world_size == world_size
    assert m.shares == (1.0,) * world_size
    assert m.reason.strip()


@given(ready=distinct_workers, world_size=st.integers(min_value=1, max_value=12))
def test_plan_initial_does_not_depend_on_arrival_order(ready: list[str], world_size: int
                                                       ) -> None:
    assert plan_initial(ready, world_size) == plan_initial(list(reversed(ready)), world_size)


# ---- plan_without -------------------------------------------------------------------------

def test_plan_without_rank_two_killed() -> None:
    m = Membership(epoch=1, members=("a/0", "a/1", "b/0", "b/1"), shares=(1.0,) * 4,
                   reason="initial", initial=True)
    plan = plan_without(m, ["b/0"], min_world_size=2)
    assert isinstance(plan, Membership)
    assert plan.epoch == 2
    assert plan.members == ("a/0", "a/1", "b/1")
    assert not plan.initial
    assert "b/0" in plan.reason and "rank 2" in plan.reason


def test_plan_without_below_minimum_is_no_quorum_with_reason() -> None:
    m = Membership(epoch=4, members=("a/0", "a/1", "b/0"), shares=(1.0,) * 3, reason="r")
    plan = plan_without(m, ["a/0", "b/0"], min_world_size=2)
    assert isinstance(plan, NoQuorum)
    assert "a/0" in plan.reason and "b/0" in plan.reason and "minimum" in plan.reason


def test_plan_without_everyone_is_no_quorum_even_with_min_zero() -> None:
    m = Membership(epoch=1, members=("a/0",), shares=(1.0,), reason="r")
    assert isinstance(plan_without(m, ["a/0"], min_world_size=0), NoQuorum)


@given(data=st.data(), current=memberships(), min_world_size=st.integers(0, 13))
def test_plan_without_matches_naive_reference(data: st.DataObject, current: Membership,
                                              min_world_size: int) -> None:
    lost_members = data.draw(st.lists(st.sampled_from(current.members), min_size=1,
                                      unique=True))
    outsiders = data.draw(st.lists(worker_ids.filter(lambda w: w not in current.members),
                                   max_size=3))
    lost = data.draw(st.permutations(lost_members + outsiders))

    plan = plan_without(current, lost, min_world_size=min_world_size)

    survivors = [(w, s) for w, s in zip(current.members, current.shares, strict=True)
                 if w not in lost_members]
    if len(survivors) < max(1, min_world_size):
        assert isinstance(plan, NoQuorum)
        assert plan.reason.strip()
        return
    assert isinstance(plan, Membership)
    assert plan.epoch == current.epoch + 1
    assert list(zip(plan.members, plan.shares, strict=True)) == survivors
    assert not plan.initial
    assert plan.reason.strip()
    for w in lost_members:
        assert w in plan.reason


# ---- plan_resume --------------------------------------------------------------------------

def test_plan_resume_picks_newest_common_step_and_names_who_rolls_back() -> None:
    plan = plan_resume({"a/0": [40, 41], "a/1": [40, 41], "b/1": [39, 40]})
    assert plan == ResumePlan(step=40, reason=plan.reason)
    assert "40" in plan.reason and "a/0" in plan.reason and "a/1" in plan.reason


def test_plan_resume_without_common_step_says_so() -> None:
    plan = plan_resume({"a/0": [41, 42], "b/0": [39, 40], "c/0": []})
    assert isinstance(plan, NoCommonSnapshot)
    assert "persistent checkpoint" in plan.reason and "none" in plan.reason


steps_sets = st.lists(st.integers(min_value=0, max_value=30), max_size=4)


@given(held=st.dictionaries(worker_ids, steps_sets, min_size=1, max_size=8))
def test_plan_resume_is_max_of_intersection(held: dict[str, list[int]]) -> None:
    common = None
    for steps in held.values():  # naive: intersect one member at a time
        common = set(steps) if common is None else {s for s in common if s in steps}
    plan = plan_resume(held)
    if not common:
        assert isinstance(plan, NoCommonSnapshot)
    else:
        assert isinstance(plan, ResumePlan)
        assert plan.step == max(common)
    assert plan.reason.strip()
