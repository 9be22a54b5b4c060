"""Policy decisions: verdicts in, actions (each with its reason) and the next state out."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from splice.controller.hang import Culprit, HangVerdict
from splice.controller.policy import Action, Mode, Policy, PolicyState, decide
from splice.controller.stragglers import LinkVerdict, StragglerVerdict


def straggler(rank: int, score: float = 1.5, *, kind: str = "compute", active: bool = True
              ) -> StragglerVerdict:
    what = "straggler" if active else "straggler, cleared"
    return StragglerVerdict(rank=rank, kind=kind, active=active, score=score, step=100,
                            evidence={"median_ratio": score},
                            reason=f"rank {rank} is a {kind} {what} at {score:.2f}x")


def hang(*culprits: int, victims: tuple[int, ...] = (0,)) -> HangVerdict:
    cs = tuple(Culprit(r, "stopped", f"rank {r} is stopped") for r in culprits)
    return HangVerdict(epoch=1, seq=10, kind="stopped" if cs else "unlocalized", culprits=cs,
                       victims=victims, stalled_s=1.2, threshold_s=1.0, evidence={},
                       reason="epoch 1 stalled 1.20 s at collective seq 10")


def assert_explained(actions: list[Action]) -> None:
    for a in actions:
        assert a.reason
        for r in a.ranks:
            assert f"rank {r}" in a.reason


# ---- stories -------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", list(Mode))
def test_hang_kills_the_culprit_whatever_the_policy_and_cool_down(mode: Mode) -> None:
    state = PolicyState(last_decision_s={3: 99.0})
    actions, state = decide([hang(3)], Policy(mode=mode), state, now=100.0)
    assert [(a.kind, a.ranks) for a in actions] == [("kill", (3,))]
    assert "crash path" in actions[0].reason and "seq 10" in actions[0].reason
    assert state.last_decision_s[3] == 100.0
    assert_explained(actions)


def test_hang_without_a_culprit_is_escalated_not_killed() -> None:
    actions, _ = decide([hang(victims=(0, 1))], Policy(mode="evict"), PolicyState(), 0.0)
    assert [a.kind for a in actions] == ["alert"] and "human" in actions[0].reason


def test_alert_policy_changes_nothing() -> None:
    state = PolicyState(shares=(1.0,) * 4)
    actions, new = decide([straggler(2)], Policy(mode="alert"), state, 0.0)
    assert [(a.kind, a.ranks) for a in actions] == [("alert", (2,))]
    assert new.shares == state.shares
    assert_explained(actions)


def test_evict_policy_evicts_the_straggler() -> None:
    actions, _ = decide([straggler(6)], Policy(mode="evict"), PolicyState(), 0.0)
    assert [(a.kind, a.ranks) for a in actions] == [("evict", (6,))]
    assert_explained(actions)


def test_replace_uses_spares_then_falls_back_to_evict() -> None:
    policy = Policy(mode=Mode.REPLACE, cooldown_s=0.0)
    actions, state = decide([straggler(1), straggler(2)], policy, PolicyState(spares=1), 0.0)
    assert [(a.kind, a.ranks) for a in actions] == [("replace", (1,)), ("evict", (2,))]
    assert state.spares == 0
    assert "no warm spare" in actions[1].reason
    assert_explained(actions)


def test_cool_down_between_decisions_per_rank() -> None:
    policy = Policy(mode="evict", cooldown_s=300.0)
    actions, state = decide([straggler(4)], policy, PolicyState(), now=1000.0)
    assert len(actions) == 1
    actions, state = decide([straggler(4), straggler(5)], policy, state, now=1100.0)
    assert [a.ranks for a in actions] == [(5,)]                 # rank 4 still cooling down
    actions, state = decide([straggler(4)], policy, state, now=1300.0)
    assert [a.ranks for a in actions] == [(4,)]


def test_rebalance_moves_share_from_the_slow_rank_and_back_when_cleared() -> None:
    policy = Policy(mode="rebalance", cooldown_s=10.0)
    state = PolicyState(shares=(1.0,) * 8)
    actions, state = decide([straggler(5, 1.5)], policy, state, now=0.0)
    assert [a.kind for a in actions] == ["rebalance"]
    assert actions[0].shares == state.shares
    assert sum(state.shares) == pytest.approx(8.0)
    assert state.shares[5] / state.shares[0] == pytest.approx(1 / 1.5)
    assert "rank 5 is a compute straggler" in actions[0].reason
    actions, state = decide([straggler(5, active=False)], policy, state, now=100.0)
    assert [a.kind for a in actions] == ["rebalance"]
    assert state.shares == pytest.approx((1.0,) * 8)
    assert_explained(actions)


def test_rebalance_continues_after_cool_down_when_capped() -> None:
    policy = Policy(mode="rebalance", cooldown_s=10.0)
    actions, state = decide([straggler(0, 5.0)], policy, PolicyState(shares=(1.0,) * 4), 0.0)
    assert state.shares[0] == pytest.approx(0.5)
    assert decide([], policy, state, now=5.0)[0] == []            # cooling down
    actions, state = decide([], policy, state, now=20.0)
    assert [a.kind for a in actions] == ["rebalance"] and "still slow" in actions[0].reason
    for t in (40.0, 60.0, 80.0):
        actions, state = decide([], policy, state, now=t)
    assert state.shares[0] / state.shares[1] == pytest.approx(0.2)
    assert decide([], policy, state, now=200.0)[0] == []          # converged: quiet


def test_link_problems_are_alerts() -> None:
    link = LinkVerdict(nodes=("A", "B"), score=4.0, evidence={}, reason="link A<->B 4x slow")
    actions, _ = decide([link, straggler(1, kind="link")], Policy(mode="evict"),
                        PolicyState(), 0.0)
    assert [a.kind for a in actions] == ["alert", "alert"]
    assert "A<->B" in actions[0].reason and "would not fix the link" in actions[1].reason


def test_policy_is_validated() -> None:
    with pytest.raises(ValueError, match="policy mode"):
        Policy(mode="reboot")
    with pytest.raises(ValueError):
        Policy(cooldown_s=-1)


# ---- properties ----------------------------------------------------------------------------

@settings(max_examples=150, deadline=None)
@given(st.sampled_from(list(Mode)), st.lists(st.tuples(
    st.integers(0, 7), st.floats(1.1, 4.0), st.booleans()), max_size=12),
    st.integers(0, 3), st.floats(0.0, 1000.0))
def test_every_action_is_explained_and_state_stays_sound(
        mode: Mode, raw: list[tuple[int, float, bool]], spares: int, cooldown_s: float) -> None:
    policy = Policy(mode=mode, cooldown_s=cooldown_s)
    state = PolicyState(shares=(1.0,) * 8, spares=spares)
    verdicts = [straggler(r, s, active=a) for r, s, a in raw]
    actions, new = decide(verdicts, policy, state, now=50.0)
    assert_explained(actions)
    assert 0 <= new.spares <= spares
    assert sum(new.shares) == pytest.approx(8.0)
    acted = [r for a in actions if a.kind in ("evict", "replace") for r in a.ranks]
    assert len(acted) == len(set(acted))        # at most one decision per rank per call
    # Deciding again at once changes nothing for the ranks just decided.
    again, _ = decide(verdicts, policy, new, now=50.0)
    assert not [r for a in again if a.kind in ("evict", "replace") for r in a.ranks
                if cooldown_s > 0]
