"""Replacement workers and scale-up: standbys taking lost ranks' places, `Admit` while the
world is short, and joining members receiving a holder's snapshot at resume.

Covers `planner.plan_with`, `planner.plan_resume(held, joining)`, the join paths of the
job state machine (controller/job.py) and the hang detector's join grace. Every job step
goes through `tests.test_job.check_step`, so the invariants of all other stories hold here
too.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from splice.controller.hang import HangConfig, HangDetector
from splice.controller.job import (
    Admit,
    Event,
    JobSpec,
    JobState,
    NodeLost,
    Phase,
    Ready,
    Rebalance,
    RecoveryReady,
    Resume,
    WorkerExited,
    WorkerFinished,
    WorkerReady,
    WorkerState,
    standbys,
    step,
    wants_admit,
)
from splice.controller.membership import Membership
from splice.controller.planner import NoCommonSnapshot, ResumePlan, plan_resume, plan_with
from tests.test_hang import STEPS, computing, job, waiting
from tests.test_job import check_step

SIGKILL = 9
FOUR = ("a/0", "a/1", "b/0", "b/1")


def apply(state: JobState, event: Event, now: float = 0.0) -> tuple[JobState, Ready]:
    after, ready = step(state, event, now)
    check_step(state, event, after, ready)
    # Join-specific invariants, on every step.
    if after.membership is not None:
        assert after.joining <= set(after.membership.members), after.joining
        assert after.membership.world_size <= after.spec.world_size
    if after.phase is Phase.RUNNING:
        assert not after.joining, "newcomers get their state at the resume that runs them"
    return after, ready


def running(world_size: int = 4, min_world_size: int = 1,
            workers: tuple[str, ...] = FOUR) -> JobState:
    state = JobState(spec=JobSpec(job_id="j", world_size=world_size,
                                  min_world_size=min_world_size))
    for pid, w in enumerate(workers, start=100):
        state, _ = apply(state, WorkerReady(w, pid))
    assert state.phase is Phase.RUNNING and state.epoch == 1
    return state


def resume_all(state: JobState, steps: dict[str, tuple[int, ...]]) -> tuple[JobState, Resume]:
    """Every member reports; returns the state and the Resume sent by the last report."""
    assert state.membership is not None and set(steps) == set(state.membership.members)
    ready = Ready()
    for w in state.membership.members:
        state, ready = apply(state, RecoveryReady(w, state.epoch, steps[w]))
    resumes = [m for _, m in ready.send if isinstance(m, Resume)]
    assert len(resumes) == 1 and ready.persist_resume == resumes[0], ready
    return state, resumes[0]


def members(state: JobState) -> tuple[str, ...]:
    assert state.membership is not None
    return state.membership.members


# ---- planner.plan_with --------------------------------------------------------------------

def test_plan_with_appends_newcomers_in_rank_order_with_equal_shares() -> None:
    current = Membership(epoch=7, members=("b/1", "a/0", "a/1"), shares=(2.0, 1.0, 0.5),
                         reason="drawn")
    plan = plan_with(current, ["node-2/0", "c/3", "c/10", "a/0"], why="the job runs 3 of 6")
    # Members keep their ranks (even out of rank order); a member in `joining` is not re-added.
    assert plan.members == ("b/1", "a/0", "a/1", "c/3", "c/10", "node-2/0")
    for w in current.members:
        assert plan.rank_of(w) == current.rank_of(w)
    assert plan.shares == (1.0,) * 6
    assert plan.epoch == 8 and not plan.initial
    for w in ("c/3", "c/10", "node-2/0"):
        assert w in plan.reason
    assert "the job runs 3 of 6" in plan.reason and "3 -> 6" in plan.reason


def test_plan_with_one_newcomer_reads_naturally() -> None:
    current = Membership(epoch=1, members=("a/0",), shares=(1.0,), reason="x", initial=True)
    plan = plan_with(current, ["a/1"], why="replacing a/2")
    assert plan.members == ("a/0", "a/1") and plan.epoch == 2
    assert plan.reason == "a/1 joins (replacing a/2); world 1 -> 2"


@pytest.mark.parametrize("joining", [[], ["a/0"]])
def test_plan_with_nobody_new_is_an_assertion(joining: list[str]) -> None:
    current = Membership(epoch=1, members=("a/0",), shares=(1.0,), reason="x")
    with pytest.raises(AssertionError):
        plan_with(current, joining, why="nothing")


# ---- planner.plan_resume with joining members -----------------------------------------------

def test_plan_resume_chooses_the_step_among_holders_only() -> None:
    held = {"a/0": (3, 4), "a/1": (4, 5), "c/0": (1,)}
    # Without the newcomer there is no common step; with it, the holders' newest common one.
    assert isinstance(plan_resume(held), NoCommonSnapshot)
    plan = plan_resume(held, ["c/0"])
    assert isinstance(plan, ResumePlan)
    assert plan.step == 4
    assert plan.transfers == (("c/0", "a/0"),)
    assert "a/0 sends c/0 its snapshot" in plan.reason


def test_plan_resume_transfers_round_robin_over_holders_in_rank_order() -> None:
    held = {"b/0": (9,), "c/0": (), "a/0": (8, 9), "d/0": (), "c/1": (), "e/0": (5,)}
    plan = plan_resume(held, ["e/0", "d/0", "c/1", "c/0"])
    assert isinstance(plan, ResumePlan)
    assert plan.step == 9
    assert plan.transfers == (("c/0", "a/0"), ("c/1", "b/0"), ("d/0", "a/0"), ("e/0", "b/0"))
    for dst, src in plan.transfers:
        assert f"{src} sends {dst} its snapshot" in plan.reason


def test_plan_resume_every_member_joining_has_no_common_snapshot() -> None:
    plan = plan_resume({"a/0": (), "a/1": (3,)}, ["a/1", "a/0"])
    assert isinstance(plan, NoCommonSnapshot)
    assert "a/0" in plan.reason and "a/1" in plan.reason and "persistent" in plan.reason


def test_plan_resume_ignores_a_newcomer_it_was_not_told_about() -> None:
    held = {"a/0": (2, 3), "a/1": (3,)}
    assert plan_resume(held, ["z/0"]) == plan_resume(held)
    plan = plan_resume(held, ["z/0"])
    assert isinstance(plan, ResumePlan) and plan.step == 3 and plan.transfers == ()


def test_plan_resume_holders_without_a_common_step_still_fail() -> None:
    plan = plan_resume({"a/0": (1,), "a/1": (2,), "c/0": ()}, ["c/0"])
    assert isinstance(plan, NoCommonSnapshot)


# ---- job: a standby replaces a lost member --------------------------------------------------

def test_standby_replaces_a_lost_member_in_one_epoch() -> None:
    state = running()
    state, ready = apply(state, WorkerReady("c/0", 200))
    # The world is full: c/0 stands by, no epoch.
    assert ready.persist is None and state.epoch == 1 and state.phase is Phase.RUNNING
    assert [e.kind for e in ready.timeline] == ["standby"]
    assert standbys(state) == ["c/0"] and not wants_admit(state)
    assert state.workers["c/0"].state is WorkerState.READY

    state, ready = apply(state, WorkerExited("b/0", -SIGKILL, SIGKILL))
    assert ready.persist is not None and state.epoch == 2, "one epoch, not shrink then grow"
    assert members(state) == ("a/0", "a/1", "b/1", "c/0"), "survivors in order, standby last"
    assert ready.persist.shares == (1.0,) * 4
    assert state.phase is Phase.RECOVERING and state.joining == {"c/0"}
    assert state.workers["c/0"].state is WorkerState.MEMBER and standbys(state) == []
    assert [e.kind for e in ready.timeline] == ["fault", "epoch"]
    assert "b/0" in ready.persist.reason and "c/0" in ready.persist.reason
    assert ready.send == ((frozenset({"a", "b", "c"}), ready.persist),)

    state, resume = resume_all(state, {"a/0": (40, 41), "a/1": (41,), "b/1": (40, 41),
                                       "c/0": ()})
    assert resume == Resume(2, 41, resume.reason, (("c/0", "a/0"),), ("a/0", "a/1", "b/1"))
    assert state.phase is Phase.RUNNING and state.resume_step == 41
    assert state.joined and state.joining == frozenset() and state.recoveries == 1

    # The next announce (any kind) ends the "joined" epoch.
    state, ready = apply(state, Rebalance(2, (1.0, 1.0, 1.0, 0.5), "slow c/0"))
    assert ready.persist is not None and not state.joined


def test_standby_takes_the_last_members_place_at_its_rank() -> None:
    state = running()
    state, _ = apply(state, WorkerReady("c/0", 200))
    state, _ = apply(state, WorkerExited("b/1", 1, 0))
    before = running()
    assert members(state) == ("a/0", "a/1", "b/0", "c/0")
    assert state.membership is not None and before.membership is not None
    for w in ("a/0", "a/1", "b/0"):
        assert state.membership.rank_of(w) == before.membership.rank_of(w)


def test_joined_is_reset_by_a_fault_epoch() -> None:
    state = running()
    state, _ = apply(state, WorkerReady("c/0", 200))
    state, _ = apply(state, WorkerExited("b/0", 1, 0))
    state, _ = resume_all(state, {"a/0": (5,), "a/1": (5,), "b/1": (5,), "c/0": ()})
    assert state.joined
    state, ready = apply(state, WorkerExited("a/1", 1, 0))
    assert ready.persist is not None and not state.joined
    state, resume = resume_all(state, {"a/0": (6,), "b/1": (6,), "c/0": (6,)})
    assert resume.transfers == () and not state.joined


def test_resume_without_newcomers_sends_no_transfers() -> None:
    state = running()
    state, _ = apply(state, WorkerExited("b/0", 1, 0))
    assert state.joining == frozenset()
    state, resume = resume_all(state, {"a/0": (3,), "a/1": (3,), "b/1": (3,)})
    assert resume.transfers == () and not state.joined


# ---- job: admitting standbys while the world is short ---------------------------------------

@pytest.mark.parametrize("newcomer", ["c/0", "b/1"])  # a new worker, or the lost one restarted
def test_short_world_admits_a_ready_worker(newcomer: str) -> None:
    state = running(min_world_size=2)
    state, _ = apply(state, WorkerExited("b/1", -SIGKILL, SIGKILL))
    assert members(state) == ("a/0", "a/1", "b/0"), "no standby: shrink"
    assert state.joining == frozenset()
    state, _ = resume_all(state, {"a/0": (7,), "a/1": (7,), "b/0": (7,)})
    assert not wants_admit(state)
    unchanged, ready = apply(state, Admit())
    assert unchanged == state and ready == Ready()

    state, ready = apply(state, WorkerReady(newcomer, 300))
    assert ready.persist is None and wants_admit(state)
    state, ready = apply(state, Admit())
    assert ready.persist is not None and state.epoch == 3
    assert members(state) == ("a/0", "a/1", "b/0", newcomer)
    assert state.phase is Phase.RECOVERING and state.joining == {newcomer}
    assert newcomer in ready.persist.reason and "3 of 4" in ready.persist.reason
    assert not wants_admit(state)

    state, resume = resume_all(state, {"a/0": (8,), "a/1": (8,), "b/0": (8,), newcomer: ()})
    assert resume.step == 8 and resume.transfers == ((newcomer, "a/0"),) and state.joined
    # At full size, Admit changes nothing even with another worker standing by.
    state, _ = apply(state, WorkerReady("d/0", 400))
    assert not wants_admit(state) and standbys(state) == ["d/0"]
    unchanged, ready = apply(state, Admit())
    assert unchanged == state and ready == Ready()


def test_admit_takes_only_the_room_left_in_rank_order() -> None:
    state = running(world_size=4, workers=FOUR)
    state, _ = apply(state, NodeLost("b", "heartbeat timeout"))
    state, _ = resume_all(state, {"a/0": (2,), "a/1": (2,)})
    for pid, w in enumerate(("d/0", "c/1", "c/0"), start=500):
        state, _ = apply(state, WorkerReady(w, pid))
    state, ready = apply(state, Admit())
    assert members(state) == ("a/0", "a/1", "c/0", "c/1")
    assert state.joining == {"c/0", "c/1"} and standbys(state) == ["d/0"]
    state, resume = resume_all(state, {"a/0": (3,), "a/1": (3,), "c/0": (), "c/1": ()})
    assert resume.transfers == (("c/0", "a/0"), ("c/1", "a/1"))


def test_admit_while_recovering_or_forming_changes_nothing() -> None:
    forming = JobState(spec=JobSpec(job_id="j", world_size=4))
    forming, _ = apply(forming, WorkerReady("a/0", 1))
    after, ready = apply(forming, Admit())
    assert after == forming and ready == Ready()

    state = running(min_world_size=2)
    state, _ = apply(state, WorkerExited("b/1", 1, 0))
    state, _ = apply(state, WorkerReady("c/0", 300))   # arrives during the recovery
    assert state.phase is Phase.RECOVERING and not wants_admit(state)
    after, ready = apply(state, Admit())
    assert after == state and ready == Ready()
    state, _ = resume_all(state, {"a/0": (1,), "a/1": (1,), "b/0": (1,)})
    assert wants_admit(state), "once running, the standby is admitted"


# ---- job: faults while members join ---------------------------------------------------------

def test_newcomer_lost_before_resume_leaves_and_stops_joining() -> None:
    state = running()
    state, _ = apply(state, WorkerReady("c/0", 200))
    state, _ = apply(state, WorkerExited("b/0", 1, 0))
    assert state.joining == {"c/0"}
    state, _ = apply(state, RecoveryReady("a/0", 2, (4,)))
    state, ready = apply(state, WorkerExited("c/0", -SIGKILL, SIGKILL))
    assert ready.persist is not None and state.epoch == 3
    assert members(state) == ("a/0", "a/1", "b/1") and state.joining == frozenset()
    state, resume = resume_all(state, {"a/0": (4,), "a/1": (4,), "b/1": (4,)})
    assert resume.transfers == () and not state.joined


def test_lost_newcomer_is_replaced_by_the_next_standby() -> None:
    state = running()
    state, _ = apply(state, WorkerReady("c/0", 200))
    state, _ = apply(state, WorkerReady("c/1", 201))
    state, _ = apply(state, WorkerExited("b/0", 1, 0))
    assert members(state)[-1] == "c/0" and standbys(state) == ["c/1"]
    state, _ = apply(state, WorkerExited("c/0", 1, 0))
    assert members(state) == ("a/0", "a/1", "b/1", "c/1") and state.joining == {"c/1"}


def test_newcomer_stays_joining_when_a_holder_is_lost_meanwhile() -> None:
    state = running()
    state, _ = apply(state, WorkerReady("c/0", 200))
    state, _ = apply(state, WorkerExited("b/0", 1, 0))
    state, _ = apply(state, WorkerExited("a/0", 1, 0))
    assert members(state) == ("a/1", "b/1", "c/0") and state.joining == {"c/0"}
    # Even if the newcomer reports steps (e.g. left over from an earlier life), it joins.
    state, resume = resume_all(state, {"a/1": (9,), "b/1": (9,), "c/0": (1,)})
    assert resume.step == 9 and resume.transfers == (("c/0", "a/1"),)


def test_survivor_without_snapshots_is_treated_as_joining() -> None:
    state = running()
    state, _ = apply(state, WorkerReady("c/1", 200))
    state, _ = apply(state, WorkerExited("b/0", 1, 0))
    state, resume = resume_all(state, {"a/0": (6,), "a/1": (), "b/1": (5, 6), "c/1": ()})
    assert state.phase is Phase.RUNNING and resume.step == 6
    assert resume.transfers == (("a/1", "a/0"), ("c/1", "b/1"))
    assert state.joined


# ---- job: min_world_size counts standbys ----------------------------------------------------

def test_standbys_keep_the_job_at_its_minimum() -> None:
    state = running(min_world_size=4)
    state, _ = apply(state, WorkerReady("c/0", 200))
    state, _ = apply(state, WorkerReady("c/1", 201))
    state, ready = apply(state, NodeLost("b", "agent stream closed"))
    assert state.phase is Phase.RECOVERING, state.message
    assert members(state) == ("a/0", "a/1", "c/0", "c/1")
    assert state.joining == {"c/0", "c/1"}


def test_too_few_standbys_fail_the_job() -> None:
    state = running(min_world_size=4)
    state, _ = apply(state, WorkerReady("c/0", 200))
    state, ready = apply(state, NodeLost("b", "agent stream closed"))
    assert state.phase is Phase.FAILED and ready.persist is None and not ready.send
    assert "minimum" in state.message
    assert [e.kind for e in ready.timeline] == ["fault", "failed"]


def test_standbys_alone_cannot_carry_on_without_a_persistent_checkpoint() -> None:
    # The standby gets an epoch of its own (a checkpoint on disk could carry it), but
    # nobody holds a snapshot in memory and it reports none on disk: the resume fails.
    state = running(world_size=1, workers=("a/0",))
    state, _ = apply(state, WorkerReady("c/0", 200))
    state, _ = apply(state, WorkerExited("a/0", -SIGKILL, SIGKILL))
    assert members(state) == ("c/0",) and state.joining == {"c/0"}
    state, ready = apply(state, RecoveryReady("c/0", 2, ()))
    assert state.phase is Phase.FAILED and "every member is joining" in state.message
    assert "no persistent checkpoint" in state.message
    assert not ready.send


def test_standbys_alone_resume_from_the_persistent_checkpoint() -> None:
    state = running(world_size=2, workers=("a/0", "a/1"))
    state, _ = apply(state, WorkerReady("c/0", 200))
    state, _ = apply(state, WorkerReady("c/1", 201))
    state, _ = apply(state, NodeLost("a", "power"))
    assert members(state) == ("c/0", "c/1")
    state, ready = apply(state, RecoveryReady("c/0", 2, (), persisted_step=30))
    assert not ready.send
    state, ready = apply(state, RecoveryReady("c/1", 2, (), persisted_step=35))
    assert state.phase is Phase.RUNNING and state.resume_step == 30
    (nodes, resume), = ready.send
    assert resume.from_disk and resume.step == 30 and resume.transfers == ()
    assert ready.persist_resume == resume
    assert [e.kind for e in ready.timeline] == ["fallback"]
    assert "FALLBACK TO DISK" in ready.timeline[0].text


def test_a_standby_on_the_lost_node_does_not_replace_anyone() -> None:
    state = running(min_world_size=2)
    state, _ = apply(state, WorkerReady("b/2", 200))
    state, ready = apply(state, NodeLost("b", "heartbeat timeout"))
    assert members(state) == ("a/0", "a/1") and state.joining == frozenset()
    assert state.workers["b/2"].state is WorkerState.EXITED


# ---- regression: a finished member is not a standby -----------------------------------------

def test_finished_member_reporting_ready_again_is_not_admitted() -> None:
    state = running(min_world_size=2)
    state, _ = apply(state, WorkerExited("b/1", 1, 0))
    state, _ = resume_all(state, {"a/0": (3,), "a/1": (3,), "b/0": (3,)})
    state, _ = apply(state, WorkerFinished("a/0"))
    state, ready = apply(state, WorkerReady("a/0", 555))
    assert "a/0" not in standbys(state)
    assert not wants_admit(state)
    after, ready = apply(state, Admit())
    assert after == state and ready.persist is None
    # A real standby still gets in, and a/0 is not added a second time.
    state, _ = apply(state, WorkerReady("c/0", 600))
    assert standbys(state) == ["c/0"]
    state, ready = apply(state, Admit())
    assert members(state) == ("a/0", "a/1", "b/0", "c/0") and state.joining == {"c/0"}


# ---- property: random join/leave sequences --------------------------------------------------

WORKERS = ("a/0", "a/1", "b/0", "c/0", "c/1")


@st.composite
def next_event(draw: st.DrawFn, state: JobState) -> Event:
    kind = draw(st.sampled_from(["ready", "ready", "exit", "exit", "rr", "rr", "rr", "rr", "admit"]))
    if kind == "admit" or (wants_admit(state) and draw(st.booleans())):  # as the service does
        return Admit()
    w = draw(st.sampled_from(WORKERS))
    if kind == "ready":
        return WorkerReady(w, draw(st.integers(1, 5)))
    if kind == "exit":
        return WorkerExited(w, draw(st.sampled_from([0, 1])), draw(st.sampled_from([0, 9])))
    # Mostly a member that has not reported yet, so that recoveries do complete.
    waiting_for = [] if state.membership is None else [
        m for m in state.membership.members if m not in state.ready]
    prefer_waiting = draw(st.booleans())
    if waiting_for and prefer_waiting:
        w = draw(st.sampled_from(waiting_for))
    epoch = max(1, state.epoch + draw(st.sampled_from([0, 0, 0, 0, -1])))
    steps = draw(st.sampled_from([(), (), (3,), (2, 3), (1, 3), (2,)]))
    return RecoveryReady(w, epoch, steps)


@settings(max_examples=200, deadline=None)
@given(data=st.data(), world_size=st.integers(1, 3), min_world_size=st.integers(1, 2))
def test_random_join_sequences_keep_invariants(data: st.DataObject, world_size: int,
                                               min_world_size: int) -> None:
    spec = JobSpec(job_id="j", world_size=world_size,
                   min_world_size=min(world_size, min_world_size))
    state = JobState(spec=spec)
    last_epoch = 0
    for i in range(data.draw(st.integers(5, 40))):
        event = data.draw(next_event(state))
        before = state
        state, ready = apply(state, event, now=float(i))
        if ready.persist is not None:
            assert ready.persist.epoch > last_epoch, "epochs strictly increase"
            last_epoch = ready.persist.epoch
            m = ready.persist
            assert len(set(m.members)) == len(m.members) <= spec.world_size
        if isinstance(event, Admit):
            assert (ready.persist is not None) == wants_admit(before)
            if ready.persist is not None:
                assert before.membership is not None
                room = spec.world_size - before.membership.world_size
                joined = [w for w in members(state) if w not in before.membership.members]
                assert members(state)[:before.membership.world_size] == before.membership.members
                assert set(joined) == set(sorted(standbys(before))[:room])
                assert state.joining == set(joined)
        for _, message in ready.send:
            if not isinstance(message, Resume):
                continue
            assert isinstance(event, RecoveryReady)
            reported = {**before.ready, event.worker_id: tuple(event.snapshot_steps)}
            joining = before.joining | {w for w, s in reported.items() if not s}
            # A newcomer already holding the step (its predecessor's, adopted from shared
            # memory) needs no transfer; every other one gets one from a holder.
            needy = {w for w in joining if message.step not in reported[w]}
            dsts = [dst for dst, _ in message.transfers]
            assert sorted(dsts) == sorted(needy), (message, joining)
            for dst, src in message.transfers:
                assert dst in members(state) and src in members(state)
                assert src not in joining
                assert message.step in reported[src]
            if message.transfers:  # where else a newcomer may fetch the step from
                assert message.holders and message.holders[0] in reported
                assert all(message.step in reported[h] and h not in joining
                           for h in message.holders)
            assert state.joined == bool(joining) and not state.joining


# ---- hang detector: the join grace ----------------------------------------------------------

def test_join_grace_raises_the_hang_threshold() -> None:
    assert HangConfig().join_grace_s == 20.0
    # Ranks 0 and 2 wait in seq 10 since t=10; rank 1 never got there (it is loading the
    # snapshot it was sent). Threshold without grace: max(1 s, 3 x 0.2 s) = 1 s.
    progress = job(waiting(0, 10, 10.0), computing(1, 9, 9.9), waiting(2, 10, 10.0))
    assert HangDetector(HangConfig()).observe(progress, STEPS, 15.0,
                                              min_threshold_s=20.0) is None
    verdict = HangDetector(HangConfig()).observe(progress, STEPS, 15.0, min_threshold_s=0.0)
    assert verdict is not None and verdict.threshold_s == pytest.approx(1.0)
    assert verdict.culprit_ranks == (1,)
    late = HangDetector(HangConfig()).observe(progress, STEPS, 30.5, min_threshold_s=20.0)
    assert late is not None and late.threshold_s == pytest.approx(20.0)
