"""The job state machine (controller/job.py): failure stories as data, fencing as properties.

`step(state, event, now)` is pure, so every story is a list of (event, expectation) rows
replayed against it, and every step of every story and of every random event sequence is
checked against the same invariants (`check_step`).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from splice.controller.job import (
    Event,
    JobSpec,
    JobState,
    NodeLost,
    Phase,
    Ready,
    RecoveryReady,
    Resume,
    WorkerExited,
    WorkerFinished,
    WorkerReady,
    WorkerState,
    step,
)
from splice.controller.membership import Membership

SIGKILL = 9
NODES = {"a": ("a/0", "a/1"), "b": ("b/0", "b/1")}
FOUR = ("a/0", "a/1", "b/0", "b/1")


def check_step(before: JobState, event: Event, after: JobState, ready: Ready) -> None:
    """Invariants that hold for every single step, whatever the event."""
    assert after.epoch >= before.epoch, "epochs never go back"
    if ready.persist is not None:
        assert ready.persist.epoch == before.epoch + 1, "each new epoch is the next one"
        assert after.membership == ready.persist
        assert ready.persist.reason.strip()
    else:
        assert after.membership == before.membership, "membership changes only when persisted"
    for nodes, message in ready.send:
        assert nodes, "a message goes somewhere"
        if isinstance(message, Membership):
            assert message == ready.persist, "only the persisted membership is announced"
        else:
            assert isinstance(message, Resume)
            assert message.epoch == after.epoch and message.reason.strip()
    if ready.refuse is not None:
        assert after == before, "a refusal changes no state"
        assert ready.refuse.code and ready.refuse.message.strip()
        assert not ready.send and ready.persist is None
    for entry in ready.timeline:
        assert entry.kind and entry.text.strip()
    if after.phase is Phase.FAILED:
        assert after.message.strip(), "a failed job says why"
    if isinstance(event, RecoveryReady) and event.epoch != before.epoch:
        assert ready.refuse is not None and ready.refuse.code == "STALE_EPOCH"
    if after.membership is not None and after.phase in (Phase.RUNNING, Phase.RECOVERING):
        for w in after.membership.members:
            assert after.workers[w].state is not WorkerState.EXITED, (w, after)


def apply(state: JobState, event: Event, now: float = 0.0) -> tuple[JobState, Ready]:
    after, ready = step(state, event, now)
    check_step(state, event, after, ready)
    return after, ready


def fresh(world_size: int = 4, min_world_size: int = 1) -> JobState:
    return JobState(spec=JobSpec(job_id="j", world_size=world_size,
                                 min_world_size=min_world_size))


def ready_all(state: JobState, workers: tuple[str, ...] = FOUR) -> JobState:
    for pid, w in enumerate(workers, start=100):
        state, _ = apply(state, WorkerReady(w, pid))
    return state


# ---- failure stories as data --------------------------------------------------------------

@dataclass(frozen=True)
class Expect:
    phase: Phase
    epoch: int
    members: tuple[str, ...] | None = None
    refuse: str | None = None          # refusal code, if the event must be refused
    persisted: bool = False            # a new epoch is persisted by this event
    resume_step: int | None = None     # a Resume for this step is sent by this event
    recoveries: int | None = None


def ready4() -> list[tuple[Event, Expect]]:
    rows: list[tuple[Event, Expect]] = [
        (WorkerReady(w, 100 + i), Expect(Phase.FORMING, 0)) for i, w in enumerate(FOUR[:3])
    ]
    rows.append((WorkerReady(FOUR[3], 103),
                 Expect(Phase.RUNNING, 1, members=FOUR, persisted=True)))
    return rows


STORIES: dict[str, tuple[JobSpec, list[tuple[Event, Expect]]]] = {
    "rank 2 SIGKILLed, 3 survivors resume at the newest common step": (
        JobSpec(job_id="j", world_size=4, min_world_size=2), [
            *ready4(),
            (WorkerExited("b/0", -SIGKILL, SIGKILL),
             Expect(Phase.RECOVERING, 2, members=("a/0", "a/1", "b/1"), persisted=True)),
            (RecoveryReady("a/0", 2, (40, 41)), Expect(Phase.RECOVERING, 2)),
            (RecoveryReady("a/1", 2, (41, 40)), Expect(Phase.RECOVERING, 2)),
            (RecoveryReady("b/1", 2, (39, 40)),
             Expect(Phase.RUNNING, 2, resume_step=40, recoveries=1)),
        ]),
    "kill during recovery: a second epoch, and readiness for the old one is stale": (
        JobSpec(job_id="j", world_size=4, min_world_size=2), [
            *ready4(),
            (WorkerExited("b/0", 0, SIGKILL), Expect(Phase.RECOVERING, 2, persisted=True)),
            (RecoveryReady("a/0", 2, (7, 8)), Expect(Phase.RECOVERING, 2)),
            (WorkerExited("a/1", 1, 0),
             Expect(Phase.RECOVERING, 3, members=("a/0", "b/1"), persisted=True)),
            (RecoveryReady("b/1", 2, (7, 8)), Expect(Phase.RECOVERING, 3, refuse="STALE_EPOCH")),
            (RecoveryReady("a/0", 3, (7, 8)), Expect(Phase.RECOVERING, 3)),
            (RecoveryReady("b/1", 3, (8,)),
             Expect(Phase.RUNNING, 3, resume_step=8, recoveries=1)),
        ]),
    "rank 0 lost: the next worker becomes rank 0": (
        JobSpec(job_id="j", world_size=4), [
            *ready4(),
            (WorkerExited("a/0", 0, SIGKILL),
             Expect(Phase.RECOVERING, 2, members=("a/1", "b/0", "b/1"), persisted=True)),
            (RecoveryReady("b/1", 2, (3,)), Expect(Phase.RECOVERING, 2)),
            (RecoveryReady("a/1", 2, (3,)), Expect(Phase.RECOVERING, 2)),
            (RecoveryReady("b/0", 2, (2, 3)),
             Expect(Phase.RUNNING, 2, resume_step=3, recoveries=1)),
        ]),
    "node b lost: both its workers leave in one new epoch": (
        JobSpec(job_id="j", world_size=4, min_world_size=2), [
            *ready4(),
            (NodeLost("b", "heartbeat timeout"),
             Expect(Phase.RECOVERING, 2, members=("a/0", "a/1"), persisted=True)),
            # the agent's exit reports for b's workers arrive late: no further epoch
            (WorkerExited("b/0", 0, SIGKILL), Expect(Phase.RECOVERING, 2)),
            (RecoveryReady("a/0", 2, (5,)), Expect(Phase.RECOVERING, 2)),
            (RecoveryReady("a/1", 2, (5,)),
             Expect(Phase.RUNNING, 2, resume_step=5, recoveries=1)),
        ]),
    "loss below min_world_size fails the job with a reason": (
        JobSpec(job_id="j", world_size=4, min_world_size=4), [
            *ready4(),
            (WorkerExited("a/1", 0, SIGKILL), Expect(Phase.FAILED, 1)),
            (WorkerExited("b/1", 0, SIGKILL), Expect(Phase.FAILED, 1)),
        ]),
    "node loss below min_world_size fails the job": (
        JobSpec(job_id="j", world_size=4, min_world_size=3), [
            *ready4(),
            (NodeLost("a", "agent stream closed"), Expect(Phase.FAILED, 1)),
        ]),
    "no common snapshot fails the job instead of resuming inconsistently": (
        JobSpec(job_id="j", world_size=4), [
            *ready4(),
            (WorkerExited("a/0", 0, SIGKILL), Expect(Phase.RECOVERING, 2, persisted=True)),
            (RecoveryReady("a/1", 2, (10,)), Expect(Phase.RECOVERING, 2)),
            (RecoveryReady("b/0", 2, (11,)), Expect(Phase.RECOVERING, 2)),
            (RecoveryReady("b/1", 2, (10, 11)), Expect(Phase.FAILED, 2)),
        ]),
    "all members finish: COMPLETE, and their clean exits are not faults": (
        JobSpec(job_id="j", world_size=4), [
            *ready4(),
            *[(WorkerFinished(w), Expect(Phase.RUNNING, 1)) for w in FOUR[:3]],
            (WorkerExited("a/0", 0, 0), Expect(Phase.RUNNING, 1)),
            (WorkerFinished("b/1"), Expect(Phase.COMPLETE, 1)),
            *[(WorkerExited(w, 0, 0), Expect(Phase.COMPLETE, 1)) for w in FOUR[1:]],
        ]),
    "bad input is refused and changes nothing": (
        JobSpec(job_id="j", world_size=4), [
            (WorkerExited("z/0", 1, 0), Expect(Phase.FORMING, 0, refuse="UNKNOWN_WORKER")),
            (WorkerFinished("z/0"), Expect(Phase.FORMING, 0, refuse="UNKNOWN_WORKER")),
            *ready4(),
            (WorkerReady("a/0", 999), Expect(Phase.RUNNING, 1, refuse="MALFORMED")),
            (WorkerExited("z/0", 1, 0), Expect(Phase.RUNNING, 1, refuse="UNKNOWN_WORKER")),
            (WorkerExited("b/0", 0, SIGKILL), Expect(Phase.RECOVERING, 2, persisted=True)),
            (RecoveryReady("b/0", 2, (1,)), Expect(Phase.RECOVERING, 2, refuse="UNKNOWN_WORKER")),
            (RecoveryReady("z/9", 2, (1,)), Expect(Phase.RECOVERING, 2, refuse="UNKNOWN_WORKER")),
            (RecoveryReady("a/0", 1, (1,)), Expect(Phase.RECOVERING, 2, refuse="STALE_EPOCH")),
            (RecoveryReady("a/0", 3, (1,)), Expect(Phase.RECOVERING, 2, refuse="STALE_EPOCH")),
        ]),
    "a spare worker stands by and its loss is not a membership change": (
        JobSpec(job_id="j", world_size=4), [
            *ready4(),
            (WorkerReady("c/0", 200), Expect(Phase.RUNNING, 1, members=FOUR)),
            (WorkerExited("c/0", 1, 0), Expect(Phase.RUNNING, 1, members=FOUR)),
            (NodeLost("c", "gone"), Expect(Phase.RUNNING, 1, members=FOUR)),
        ]),
}


@pytest.mark.parametrize("story", list(STORIES))
def test_failure_story(story: str) -> None:
    spec, rows = STORIES[story]
    state = JobState(spec=spec)
    for i, (event, want) in enumerate(rows):
        before = state
        state, ready = apply(state, event, now=float(i))
        where = f"row {i}: {event}"
        assert state.phase is want.phase, where
        assert state.epoch == want.epoch, where
        if want.members is not None:
            assert state.membership is not None and state.membership.members == want.members
        if want.refuse is None:
            assert ready.refuse is None, (where, ready.refuse)
        else:
            assert ready.refuse is not None and ready.refuse.code == want.refuse, where
            assert state == before, where
        assert (ready.persist is not None) == want.persisted, where
        if want.persisted:
            assert ready.persist is not None
            assert ready.send == ((ready.persist.nodes(), ready.persist),), where
        resumes = [m for _, m in ready.send if isinstance(m, Resume)]
        if want.resume_step is None:
            assert not resumes, where
        else:
            assert resumes == [Resume(state.epoch, want.resume_step, resumes[0].reason)], where
            assert state.resume_step == want.resume_step
        if want.recoveries is not None:
            assert state.recoveries == want.recoveries, where


def test_rank_two_killed_story_details() -> None:
    state = ready_all(fresh(min_world_size=2))
    assert state.resume_step == 0 and state.membership is not None and state.membership.initial
    state, ready = apply(state, WorkerExited("b/0", -SIGKILL, SIGKILL))
    assert state.workers["b/0"].state is WorkerState.EXITED
    assert [e.kind for e in ready.timeline] == ["fault", "epoch"]
    assert "signal 9" in ready.timeline[0].text and "b/0" in ready.timeline[0].text
    assert ready.persist is not None and ready.persist.shares == (1.0, 1.0, 1.0)
    assert ready.send[0][0] == frozenset({"a", "b"})  # b/1 still lives on node b
    assert state.resume_step is None  # not known until every survivor reported
    for w in ("a/0", "a/1", "b/1"):
        state, ready = apply(state, RecoveryReady(w, 2, (40, 41) if w != "b/1" else (39, 40)))
    assert state.phase is Phase.RUNNING and state.resume_step == 40 and state.recoveries == 1
    assert [e.kind for e in ready.timeline] == ["resume"]
    assert not state.ready or set(state.ready) == {"a/0", "a/1", "b/1"}


def test_failed_job_reason_names_the_loss_and_the_minimum() -> None:
    state = ready_all(fresh(min_world_size=4))
    state, ready = apply(state, WorkerExited("a/1", 0, SIGKILL))
    assert state.phase is Phase.FAILED
    assert "a/1" in state.message and "minimum" in state.message
    assert [e.kind for e in ready.timeline] == ["fault", "failed"]
    assert ready.persist is None and not ready.send


def test_finished_worker_that_then_crashes_is_still_a_fault() -> None:
    state = ready_all(fresh())
    state, _ = apply(state, WorkerFinished("a/0"))
    state, ready = apply(state, WorkerExited("a/0", 1, 0))
    assert state.workers["a/0"].state is WorkerState.EXITED
    assert ready.persist is not None and "a/0" not in ready.persist.members


def test_repeated_exit_report_is_ignored() -> None:
    state = ready_all(fresh())
    state, _ = apply(state, WorkerExited("b/0", 0, SIGKILL))
    again, ready = apply(state, WorkerExited("b/0", 0, SIGKILL))
    assert again == state and ready == Ready()


def test_step_does_not_read_the_clock() -> None:
    state = fresh()
    for w in FOUR:
        a, ra = step(state, WorkerReady(w, 1), now=0.0)
        b, rb = step(state, WorkerReady(w, 1), now=1e9)
        assert (a, ra) == (b, rb)
        state = a


def test_unknown_event_type_is_a_type_error() -> None:
    with pytest.raises(TypeError):
        step(fresh(), object(), 0.0)  # type: ignore[arg-type]


def test_recovery_ready_before_any_membership_is_refused() -> None:
    state = ready_all(fresh(), FOUR[:2])
    after, ready = step(state, RecoveryReady("a/0", 0, (1,)), 0.0)
    assert after == state
    assert ready.refuse is not None


def test_failed_is_terminal() -> None:
    state = ready_all(fresh(world_size=2), ("a/0", "a/1"))
    state, _ = apply(state, WorkerExited("a/0", 1, 0))
    state, _ = apply(state, RecoveryReady("a/1", 2, ()))  # holds no snapshot: FAILED
    assert state.phase is Phase.FAILED
    failed_reason = state.message
    state, _ = step(state, WorkerFinished("a/1"), 0.0)
    assert state.phase is Phase.FAILED
    assert state.message == failed_reason


@pytest.mark.parametrize("kwargs", [
    {"job_id": "", "world_size": 1},
    {"job_id": "a/b", "world_size": 1},
    {"job_id": "j", "world_size": 0},
    {"job_id": "j", "world_size": 2, "min_world_size": 0},
    {"job_id": "j", "world_size": 2, "min_world_size": 3},
])
def test_job_spec_rejects_bad_config(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        JobSpec(**kwargs)


# ---- epoch fencing under random event sequences -------------------------------------------

WORKERS = ("a/0", "a/1", "b/0", "b/1", "c/0")


@st.composite
def next_event(draw: st.DrawFn, state: JobState) -> Event:
    w = draw(st.sampled_from((*WORKERS, "z/0")))
    kind = draw(st.sampled_from(["ready", "ready", "exit", "finish", "node", "rr", "rr", "rr"]))
    if kind == "ready":
        return WorkerReady(w, draw(st.integers(1, 5)))
    if kind == "exit":
        return WorkerExited(w, draw(st.sampled_from([0, 1, -9])), draw(st.sampled_from([0, 9])))
    if kind == "finish":
        return WorkerFinished(w)
    if kind == "node":
        return NodeLost(draw(st.sampled_from(["a", "b", "c", "z"])), "drawn")
    # Mostly the current epoch, sometimes a stale or future one. Never epoch 0: see
    # test_recovery_ready_before_any_membership_is_refused for that bug.
    epoch = max(1, state.epoch + draw(st.sampled_from([0, 0, 0, -1, 1])))
    steps = draw(st.lists(st.integers(0, 4), max_size=3))
    return RecoveryReady(w, epoch, tuple(steps))


@settings(max_examples=200)
@given(data=st.data(), world_size=st.integers(1, 4), min_frac=st.integers(0, 3))
def test_random_event_sequences_keep_epoch_fencing(data: st.DataObject, world_size: int,
                                                   min_frac: int) -> None:
    min_world_size = max(1, world_size - min_frac)
    state = fresh(world_size, min_world_size)
    persisted: list[int] = []
    exited: set[str] = set()
    for i in range(data.draw(st.integers(1, 40))):
        event = data.draw(next_event(state))
        before = state
        state, ready = apply(state, event, now=float(i))
        if ready.persist is not None:
            persisted.append(ready.persist.epoch)
            assert not set(ready.persist.members) & {
                w for w, r in state.workers.items() if r.state is WorkerState.EXITED}
        if isinstance(event, RecoveryReady) and event.epoch != before.epoch:
            assert state == before
        exited = {w for w, r in state.workers.items() if r.state is WorkerState.EXITED}
        if state.phase in (Phase.RUNNING, Phase.RECOVERING):
            assert state.membership is not None
            assert not exited & set(state.membership.members)
        if before.phase in (Phase.COMPLETE, Phase.FAILED):
            assert state.epoch == before.epoch and ready.persist is None
    assert persisted == list(range(1, len(persisted) + 1)), "epochs 1, 2, 3, ... never reused"


def test_worker_dying_before_its_hook_connects_is_a_recorded_fault() -> None:
    """STARTED then EXITED with no READY: not refused as unknown, recorded as a fault, and
    the job keeps waiting to form (a replacement may still come)."""
    from splice.controller.job import WorkerStarted

    state = JobState(spec=JobSpec(job_id="j", world_size=2))
    state, ready = step(state, WorkerStarted("a/0", 41), 0.0)
    assert ready == Ready() and state.workers["a/0"].state is WorkerState.STARTING
    state, ready = step(state, WorkerExited("a/0", 1, 0), 1.0)
    assert ready.refuse is None
    assert [e.kind for e in ready.timeline] == ["fault"]
    assert "a/0" in ready.timeline[0].text and "code 1" in ready.timeline[0].text
    assert state.workers["a/0"].state is WorkerState.EXITED
    assert state.phase is Phase.FORMING and state.membership is None
