"""A job's control state machine: events in, a `Ready` (what to persist, what to send) out.

`step(state, event, now)` is pure. The controller's loop executes its result in order:
persist the new epoch (compare-and-swap on the old one), then send. If the persist fails
the loop keeps the old state, so nothing is announced that was not persisted.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType

from splice.controller import planner
from splice.controller.membership import Membership, node_of, rank_order


class Phase(enum.Enum):
    FORMING = "forming"        # waiting for the initial world to be ready
    RUNNING = "running"
    RECOVERING = "recovering"  # a new epoch is announced; waiting for members to be ready
    COMPLETE = "complete"
    FAILED = "failed"


class WorkerState(enum.Enum):
    STARTING = "starting"
    READY = "ready"        # hook connected, not (yet) a member
    MEMBER = "member"
    EXITED = "exited"
    FINISHED = "finished"


@dataclass(frozen=True, kw_only=True)
class JobSpec:
    job_id: str
    # The world the job starts with: it forms once this many workers are ready.
    world_size: int
    # Below this many survivors the job stops instead of shrinking further.
    min_world_size: int = 1

    def __post_init__(self) -> None:
        if not self.job_id or "/" in self.job_id:
            raise ValueError(f"job id must be non-empty and contain no '/': {self.job_id!r}")
        if self.world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {self.world_size}")
        if not 1 <= self.min_world_size <= self.world_size:
            raise ValueError(
                f"min_world_size must be in [1, world_size={self.world_size}], "
                f"got {self.min_world_size}"
            )


# ---- events -------------------------------------------------------------------------------

@dataclass(frozen=True)
class WorkerStarted:
    """The agent launched the worker's process; its hook has not connected yet."""

    worker_id: str
    pid: int


@dataclass(frozen=True)
class WorkerReady:
    worker_id: str
    pid: int


@dataclass(frozen=True)
class WorkerExited:
    worker_id: str
    exit_code: int
    signal: int


@dataclass(frozen=True)
class WorkerFinished:
    worker_id: str


@dataclass(frozen=True)
class NodeLost:
    node_id: str
    reason: str


@dataclass(frozen=True)
class RecoveryReady:
    worker_id: str
    epoch: int
    snapshot_steps: tuple[int, ...]
    # The newest intact persistent checkpoint the worker can read (None: none).
    persisted_step: int | None = None


@dataclass(frozen=True)
class WorkerResync:
    """A re-attaching agent (after a controller failover) says its worker is alive."""

    worker_id: str
    pid: int


@dataclass(frozen=True)
class Rebalance:
    """A detector's policy moves work between ranks: same members, new shares."""

    epoch: int                  # decided for this epoch; stale if the job moved on
    shares: tuple[float, ...]
    reason: str


@dataclass(frozen=True)
class Admit:
    """Bring ready standbys in while the world is below the job's size: a replacement the
    agent promoted from its warm spares, or the workers of a node that joined. Posted by
    the controller's loop whenever `wants_admit` says so; with `force` (after a while)
    without waiting for workers still starting on the standbys' nodes."""

    force: bool = False


@dataclass(frozen=True)
class Evict:
    """A detector's policy removes a live worker (a persistent straggler, say)."""

    epoch: int
    worker_id: str
    reason: str


Event = (WorkerStarted | WorkerReady | WorkerExited | WorkerFinished | NodeLost | RecoveryReady
         | WorkerResync | Rebalance | Evict | Admit)


# ---- effects ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Resume:
    epoch: int
    step: int
    reason: str
    # (joining worker, member that sends it the snapshot of `step`)
    transfers: tuple[tuple[str, str], ...] = ()
    # The members holding the snapshot of `step` (who else a joining worker may fetch from).
    holders: tuple[str, ...] = ()
    # Nobody holds a snapshot in memory: every member loads `step` from persistent storage.
    from_disk: bool = False


@dataclass(frozen=True)
class Refuse:
    """Tell the sender its input was not accepted. `code` names a proto Refusal code."""

    code: str
    message: str


@dataclass(frozen=True)
class TimelineEntry:
    kind: str
    epoch: int
    text: str


@dataclass(frozen=True)
class Ready:
    persist: Membership | None = None
    # A resume decision is persisted too (after `persist`, before `send`): a leader that
    # takes over mid-recovery must not decide a different step than its predecessor.
    persist_resume: Resume | None = None
    # (nodes to send to, message); the loop sends them after `persist` succeeded.
    send: tuple[tuple[frozenset[str], Membership | Resume], ...] = ()
    refuse: Refuse | None = None
    timeline: tuple[TimelineEntry, ...] = ()


# ---- state --------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class WorkerRecord:
    pid: int
    state: WorkerState
    exit_code: int = 0
    signal: int = 0


@dataclass(frozen=True, kw_only=True)
class JobState:
    spec: JobSpec
    phase: Phase = Phase.FORMING
    membership: Membership | None = None
    workers: Mapping[str, WorkerRecord] = field(default_factory=lambda: MappingProxyType({}))
    # During RECOVERING: snapshot steps each member reported for the current epoch.
    ready: Mapping[str, tuple[int, ...]] = field(default_factory=lambda: MappingProxyType({}))
    # During RECOVERING: the newest persistent checkpoint each ready member can read.
    persisted: Mapping[str, int | None] = field(default_factory=lambda: MappingProxyType({}))
    resume_step: int | None = None
    # Members of the current epoch that joined it without state (they get a peer's).
    joining: frozenset[str] = frozenset()
    # The current epoch's resume sent snapshots to joining members.
    joined: bool = False
    recoveries: int = 0
    message: str = ""

    @property
    def epoch(self) -> int:
        return 0 if self.membership is None else self.membership.epoch


def _with_worker(state: JobState, wid: str, record: WorkerRecord) -> JobState:
    workers = dict(state.workers)
    workers[wid] = record
    return replace(state, workers=MappingProxyType(workers))


def describe_exit(exit_code: int, signal: int) -> str:
    return f"killed by signal {signal}" if signal else f"exited with code {exit_code}"


def step(state: JobState, event: Event, now: float) -> tuple[JobState, Ready]:
    """Advance the job by one event. Pure: `now` is only recorded, never read from a clock."""
    del now  # decisions do not depend on time yet; detectors with timeouts will use it
    if isinstance(event, WorkerStarted):
        if event.worker_id in state.workers:
            return state, Ready()  # a resync or a duplicate: what is known is newer
        return _with_worker(state, event.worker_id,
                            WorkerRecord(pid=event.pid, state=WorkerState.STARTING)), Ready()
    if isinstance(event, WorkerReady):
        return _on_ready(state, event)
    if isinstance(event, WorkerExited):
        return _on_exit(state, event)
    if isinstance(event, WorkerFinished):
        return _on_finished(state, event)
    if isinstance(event, NodeLost):
        return _on_node_lost(state, event)
    if isinstance(event, RecoveryReady):
        return _on_recovery_ready(state, event)
    if isinstance(event, WorkerResync):
        return _on_resync(state, event)
    if isinstance(event, Rebalance):
        return _on_rebalance(state, event)
    if isinstance(event, Evict):
        return _on_evict(state, event)
    if isinstance(event, Admit):
        return _on_admit(state, event.force)
    raise TypeError(f"unknown event {event!r}")


def _on_ready(state: JobState, ev: WorkerReady) -> tuple[JobState, Ready]:
    known = state.workers.get(ev.worker_id)
    if known is not None and known.state in (WorkerState.MEMBER, WorkerState.READY):
        return state, Ready(refuse=Refuse(
            "MALFORMED", f"worker {ev.worker_id} is already registered (pid {known.pid})"))
    state = _with_worker(state, ev.worker_id, WorkerRecord(pid=ev.pid, state=WorkerState.READY))
    if state.phase is not Phase.FORMING:
        return state, Ready(timeline=(TimelineEntry(
            "standby", state.epoch, f"{ev.worker_id} is ready and stands by"),))
    ready = [w for w, r in state.workers.items() if r.state is WorkerState.READY]
    membership = planner.plan_initial(ready, state.spec.world_size)
    if membership is None:
        return state, Ready()
    return _announce(state, membership, Phase.RUNNING, kind="epoch")


def standbys(state: JobState) -> list[str]:
    """Workers that are ready but not members."""
    m = state.membership
    return [w for w, r in state.workers.items()
            if r.state is WorkerState.READY and (m is None or not m.has(w))]


def wants_admit(state: JobState, *, force: bool = False) -> bool:
    """Whether an `Admit` would form a larger membership now. Unless forced, it waits while
    another worker of a standby's node is still starting, so that a node that joins is
    taken in at once (one re-formation), not one worker at a time."""
    m = state.membership
    waiting = standbys(state)
    if not (state.phase is Phase.RUNNING and m is not None
            and m.world_size < state.spec.world_size and waiting):
        return False
    if force:
        return True
    nodes = {node_of(w) for w in waiting}
    room = state.spec.world_size - m.world_size
    starting = [w for w, r in state.workers.items()
                if r.state is WorkerState.STARTING and node_of(w) in nodes]
    return not starting or len(waiting) >= room


def _on_admit(state: JobState, force: bool = False) -> tuple[JobState, Ready]:
    if not wants_admit(state, force=force):
        return state, Ready()
    m = state.membership
    assert m is not None
    room = state.spec.world_size - m.world_size
    joining = sorted(standbys(state), key=rank_order)[:room]
    plan = planner.plan_with(m, joining, why=f"the job runs {m.world_size} of "
                                             f"{state.spec.world_size} ranks")
    return _announce(state, plan, Phase.RECOVERING, kind="epoch", joining=frozenset(joining))


def _announce(state: JobState, membership: Membership, phase: Phase, *, kind: str,
              joining: frozenset[str] = frozenset()) -> tuple[JobState, Ready]:
    workers = dict(state.workers)
    for wid in membership.members:
        workers[wid] = replace(workers[wid], state=WorkerState.MEMBER)
    # Newcomers of an earlier epoch still without state (a fault hit while they joined)
    # stay newcomers until a resume gives them a snapshot.
    joining = frozenset(w for w in joining | state.joining if w in membership.members)
    new = replace(state, membership=membership, phase=phase,
                  workers=MappingProxyType(workers), ready=MappingProxyType({}),
                  persisted=MappingProxyType({}),
                  resume_step=0 if membership.initial else None, joining=joining,
                  joined=False)
    return new, Ready(
        persist=membership,
        send=((membership.nodes(), membership),),
        timeline=(TimelineEntry(kind, membership.epoch,
                                f"epoch {membership.epoch}: world {membership.world_size}; "
                                f"{membership.reason}"),),
    )


def _lose(state: JobState, lost: dict[str, WorkerRecord], why: str) -> tuple[JobState, Ready]:
    """Record the lost workers; if any was a member, plan the next epoch without them."""
    workers = dict(state.workers)
    workers.update(lost)
    state = replace(state, workers=MappingProxyType(workers))
    current = state.membership
    members_lost = [] if current is None else [w for w in lost if w in current.members]
    fault = TimelineEntry("fault", state.epoch, why)
    if current is None or not members_lost or state.phase not in (Phase.RUNNING, Phase.RECOVERING):
        return state, Ready(timeline=(fault,))
    plan = planner.plan_without(current, members_lost, min_world_size=state.spec.min_world_size)
    kept = [w for w in current.members if w not in members_lost]
    joining = sorted(standbys(state), key=rank_order)[:max(0, state.spec.world_size - len(kept))]
    # Standbys alone (every member lost) can still resume from a persistent checkpoint.
    if not (joining and len(kept) + len(joining) >= max(1, state.spec.min_world_size)):
        joining = []
    if joining:
        # Ready standbys (a spare the agent promoted) take the lost ranks' places in the
        # same epoch: one recovery instead of a shrink followed by a grow.
        base = Membership(epoch=current.epoch, members=tuple(kept),
                          shares=(1.0,) * len(kept), reason="")
        grown = planner.plan_with(base, joining, why="")
        lost_text = (plan.reason.split(";", 1)[0] if not isinstance(plan, planner.NoQuorum)
                     else f"lost {', '.join(sorted(members_lost, key=rank_order))}")
        plan = replace(grown, reason=(
            f"{lost_text}; standby {', '.join(joining)} "
            f"take{'s' if len(joining) == 1 else ''} over; world {grown.world_size}"))
    if isinstance(plan, planner.NoQuorum):
        failed = replace(state, phase=Phase.FAILED, message=plan.reason)
        return failed, Ready(timeline=(fault, TimelineEntry("failed", state.epoch, plan.reason)))
    new, ready = _announce(state, plan, Phase.RECOVERING, kind="epoch",
                           joining=frozenset(joining))
    return new, replace(ready, timeline=(fault, *ready.timeline))


def _on_exit(state: JobState, ev: WorkerExited) -> tuple[JobState, Ready]:
    known = state.workers.get(ev.worker_id)
    if known is None:
        return state, Ready(refuse=Refuse(
            "UNKNOWN_WORKER", f"exit of unknown worker {ev.worker_id}"))
    if known.state in (WorkerState.EXITED,):
        return state, Ready()
    record = WorkerRecord(pid=known.pid, state=WorkerState.EXITED,
                          exit_code=ev.exit_code, signal=ev.signal)
    if known.state is WorkerState.FINISHED and ev.exit_code == 0 and not ev.signal:
        return _with_worker(state, ev.worker_id, replace(record, state=WorkerState.FINISHED)), Ready()
    why = f"worker {ev.worker_id} (pid {known.pid}) {describe_exit(ev.exit_code, ev.signal)}"
    return _lose(state, {ev.worker_id: record}, why)


def _on_finished(state: JobState, ev: WorkerFinished) -> tuple[JobState, Ready]:
    known = state.workers.get(ev.worker_id)
    if known is None:
        return state, Ready(refuse=Refuse(
            "UNKNOWN_WORKER", f"finish of unknown worker {ev.worker_id}"))
    state = _with_worker(state, ev.worker_id, replace(known, state=WorkerState.FINISHED))
    if state.phase in (Phase.FAILED, Phase.COMPLETE):
        return state, Ready()  # a finished worker does not undo (or redo) the verdict
    members = () if state.membership is None else state.membership.members
    if members and all(state.workers[w].state is WorkerState.FINISHED for w in members):
        return replace(state, phase=Phase.COMPLETE, message="all members finished"), Ready(
            timeline=(TimelineEntry("complete", state.epoch,
                                    f"all {len(members)} members finished training"),))
    return state, Ready()


def _on_node_lost(state: JobState, ev: NodeLost) -> tuple[JobState, Ready]:
    lost = {
        w: WorkerRecord(pid=r.pid, state=WorkerState.EXITED, exit_code=-1)
        for w, r in state.workers.items()
        if node_of(w) == ev.node_id and r.state in (WorkerState.READY, WorkerState.MEMBER,
                                                     WorkerState.STARTING)
    }
    if not lost:
        return state, Ready()
    return _lose(state, lost, f"node {ev.node_id} lost ({ev.reason}); "
                              f"its workers {', '.join(sorted(lost))} are gone")


def _on_recovery_ready(state: JobState, ev: RecoveryReady) -> tuple[JobState, Ready]:
    if state.membership is None or ev.epoch != state.epoch:
        return state, Ready(refuse=Refuse(
            "STALE_EPOCH", f"recovery-ready of {ev.worker_id} for epoch {ev.epoch}; "
                           f"the job is at epoch {state.epoch}"))
    assert state.membership is not None
    if ev.worker_id not in state.membership.members:
        return state, Ready(refuse=Refuse(
            "UNKNOWN_WORKER", f"{ev.worker_id} is not a member of epoch {state.epoch}"))
    if state.phase is not Phase.RECOVERING:
        return state, Ready()
    ready = dict(state.ready)
    ready[ev.worker_id] = tuple(sorted(ev.snapshot_steps))
    persisted = dict(state.persisted)
    persisted[ev.worker_id] = ev.persisted_step
    state = replace(state, ready=MappingProxyType(ready), persisted=MappingProxyType(persisted))
    if set(ready) != set(state.membership.members):
        return state, Ready()
    # A member with no snapshot at all joined without state (or lost it while joining).
    joining = state.joining | {w for w, steps in ready.items() if not steps}
    plan = planner.plan_resume(ready, joining)
    if isinstance(plan, planner.NoCommonSnapshot):
        disk = planner.plan_from_disk(state.persisted, plan.reason)
        if isinstance(disk, planner.NoCommonSnapshot):
            failed = replace(state, phase=Phase.FAILED, message=disk.reason)
            return failed, Ready(timeline=(TimelineEntry("failed", state.epoch, disk.reason),))
        resumed = replace(state, phase=Phase.RUNNING, resume_step=disk.step,
                          recoveries=state.recoveries + 1, joining=frozenset(), joined=True)
        resume = Resume(state.epoch, disk.step, disk.reason, from_disk=True)
        return resumed, Ready(
            persist_resume=resume, send=((state.membership.nodes(), resume),),
            timeline=(TimelineEntry("fallback", state.epoch, disk.reason),))
    resumed = replace(state, phase=Phase.RUNNING, resume_step=plan.step,
                      recoveries=state.recoveries + 1, joining=frozenset(),
                      joined=bool(joining & set(ready)))
    holders = tuple(w for w in sorted(ready, key=rank_order) if plan.step in ready[w]
                    and w not in joining) if plan.transfers else ()
    resume = Resume(state.epoch, plan.step, plan.reason, plan.transfers, holders)
    return resumed, Ready(
        persist_resume=resume,
        send=((state.membership.nodes(), resume),),
        timeline=(TimelineEntry("resume", state.epoch, plan.reason),),
    )


def _on_resync(state: JobState, ev: WorkerResync) -> tuple[JobState, Ready]:
    known = state.workers.get(ev.worker_id)
    if known is not None and known.state in (WorkerState.EXITED, WorkerState.FINISHED):
        return state, Ready(refuse=Refuse(
            "MALFORMED", f"worker {ev.worker_id} already ended; it cannot be alive"))
    members = () if state.membership is None else state.membership.members
    if ev.worker_id in members:
        return _with_worker(state, ev.worker_id,
                            WorkerRecord(pid=ev.pid, state=WorkerState.MEMBER)), Ready()
    return _on_ready(state, WorkerReady(ev.worker_id, ev.pid))


def adopt(spec: JobSpec, record: Membership | None, resume: tuple[int, int] | None
          ) -> JobState:
    """The state a newly elected leader starts from: the persisted epoch, its members
    assumed alive until their agents re-attach (or fail to, within a grace period), and
    RECOVERING if no resume step was persisted for that epoch yet."""
    if record is None:
        return JobState(spec=spec)
    workers = {w: WorkerRecord(pid=0, state=WorkerState.MEMBER) for w in record.members}
    resumed = record.initial or (resume is not None and resume[0] == record.epoch)
    return JobState(
        spec=spec, membership=record,
        phase=Phase.RUNNING if resumed else Phase.RECOVERING,
        workers=MappingProxyType(workers),
        resume_step=(0 if record.initial else resume[1] if resumed and resume else None),
    )


def _on_rebalance(state: JobState, ev: Rebalance) -> tuple[JobState, Ready]:
    m = state.membership
    if m is None or ev.epoch != state.epoch or state.phase is not Phase.RUNNING:
        return state, Ready()  # decided on a view the job has left: drop it
    if len(ev.shares) != m.world_size or any(not s > 0 for s in ev.shares):
        return state, Ready(refuse=Refuse("MALFORMED", f"rebalance needs {m.world_size} "
                                                       f"positive shares, got {ev.shares}"))
    plan = Membership(epoch=m.epoch + 1, members=m.members, shares=ev.shares,
                      reason=f"rebalance: {ev.reason}")
    return _announce(state, plan, Phase.RECOVERING, kind="epoch")


def _on_evict(state: JobState, ev: Evict) -> tuple[JobState, Ready]:
    m = state.membership
    if m is None or ev.epoch != state.epoch or ev.worker_id not in m.members:
        return state, Ready()
    known = state.workers[ev.worker_id]
    record = WorkerRecord(pid=known.pid, state=WorkerState.EXITED, exit_code=-2)
    lost = {ev.worker_id: record}
    if state.phase is Phase.RECOVERING:  # every member that is not ready goes at once
        lost.update({w: WorkerRecord(pid=state.workers[w].pid, state=WorkerState.EXITED,
                                     exit_code=-2)
                     for w in m.members if w not in state.ready})
    return _lose(state, lost, f"evicted {', '.join(sorted(lost))}: {ev.reason}")
