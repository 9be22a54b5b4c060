"""Recovery planning: who trains in the next epoch, and from which step.

Pure functions of the job's state; they never touch the network, the clock or the store.
Each returns its verdict with a sentence a human can read in the timeline and the logs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from splice.controller.membership import Membership, rank_order


@dataclass(frozen=True)
class NoQuorum:
    """The planner cannot form a membership; the job cannot go on in place."""

    reason: str


@dataclass(frozen=True)
class ResumePlan:
    step: int
    reason: str
    # (newcomer, holder): who sends each joining member the snapshot of `step`.
    transfers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class NoCommonSnapshot:
    reason: str


def plan_initial(ready: Iterable[str], world_size: int) -> Membership | None:
    """The first membership once `world_size` workers are ready, else None (keep waiting).

    If more than `world_size` are ready the extra ones (in rank order) stand by.
    """
    candidates = sorted(ready, key=rank_order)
    if len(candidates) < world_size:
        return None
    members = tuple(candidates[:world_size])
    return Membership(
        epoch=1,
        members=members,
        shares=(1.0,) * world_size,
        reason=f"initial membership of {world_size} workers",
        initial=True,
    )


def plan_without(
    current: Membership, lost: Iterable[str], *, min_world_size: int = 1
) -> Membership | NoQuorum:
    """The next membership after `lost` workers left: survivors keep their relative order.

    Ranks are reassigned densely (a survivor's new rank is its index among survivors), and
    shares of survivors are kept, so a rebalanced job stays rebalanced.
    """
    gone = set(lost) & set(current.members)
    assert gone, "plan_without needs at least one member to remove"
    kept = [(w, s) for w, s in zip(current.members, current.shares, strict=True) if w not in gone]
    names = ", ".join(sorted(gone, key=rank_order))
    ranks = ", ".join(str(current.rank_of(w)) for w in sorted(gone, key=current.rank_of))
    if len(kept) < max(1, min_world_size):
        return NoQuorum(
            f"lost {names} (rank {ranks}); {len(kept)} survivors is below the minimum "
            f"world size {max(1, min_world_size)}"
        )
    return Membership(
        epoch=current.epoch + 1,
        members=tuple(w for w, _ in kept),
        shares=tuple(s for _, s in kept),
        reason=(
            f"lost {names} (rank {ranks} of epoch {current.epoch}); "
            f"{len(kept)} survivors continue"
        ),
    )


def plan_with(current: Membership, joining: Iterable[str], *, why: str) -> Membership:
    """The next membership with `joining` workers added after the current members.

    Members keep their ranks (newcomers take the next ones, in rank order) and every rank
    gets an equal share again: the global batch is re-apportioned over the larger world.
    """
    new = sorted(set(joining) - set(current.members), key=rank_order)
    assert new, "plan_with needs at least one worker to add"
    members = (*current.members, *new)
    return Membership(
        epoch=current.epoch + 1,
        members=members,
        shares=(1.0,) * len(members),
        reason=(f"{', '.join(new)} join{'s' if len(new) == 1 else ''} ({why}); "
                f"world {current.world_size} -> {len(members)}"),
    )


def plan_resume(held: Mapping[str, Iterable[int]], joining: Iterable[str] = ()
                ) -> ResumePlan | NoCommonSnapshot:
    """The consistent step: the newest step whose snapshot every member holds.

    A snapshot of step k is the state before step k runs, so resuming there re-runs step k
    on the new membership and no optimizer update is applied on some ranks and not others.
    Members in `joining` may hold nothing yet: the step is chosen among the others, and
    each newcomer that does not hold it (one that took a dead worker's place on its node
    holds what that worker left in shared memory) is assigned a holder that sends it that
    snapshot (round robin over holders in rank order, so several newcomers do not all load
    one peer).
    """
    assert held, "plan_resume needs at least one member"
    newcomers = sorted(set(joining) & set(held), key=rank_order)
    if newcomers:
        holders = {w: s for w, s in held.items() if w not in newcomers}
        if not holders:
            return NoCommonSnapshot(
                f"every member is joining ({', '.join(newcomers)}): nobody holds a snapshot "
                "to send them; resume from a persistent checkpoint")
        plan = plan_resume(holders)
        if isinstance(plan, NoCommonSnapshot):
            return plan
        adopted = [w for w in newcomers if plan.step in set(held[w])]
        needy = [w for w in newcomers if w not in adopted]
        sources = sorted(holders, key=rank_order)
        transfers = tuple((w, sources[i % len(sources)]) for i, w in enumerate(needy))
        said = [f"{src} sends {dst} its snapshot" for dst, src in transfers]
        said += [f"{w} holds it already (its predecessor's, in shared memory)"
                 for w in adopted]
        return ResumePlan(step=plan.step, reason=f"{plan.reason}; {'; '.join(said)}",
                          transfers=transfers)
    sets = {w: set(steps) for w, steps in held.items()}
    common = set.intersection(*sets.values())
    if not common:
        described = "; ".join(f"{w}: {sorted(s) or 'none'}" for w, s in sorted(sets.items()))
        return NoCommonSnapshot(
            f"no snapshot step is held by every member ({described}); "
            "resume from a persistent checkpoint"
        )
    step = max(common)
    newest = max(max(s) for s in sets.values() if s)
    ahead = sorted(w for w, s in sets.items() if s and max(s) > step)
    if ahead:
        reason = (
            f"resume at step {step}, the newest snapshot all {len(sets)} members hold; "
            f"{', '.join(ahead)} roll back from step {newest}"
        )
    else:
        reason = f"resume at step {step}, the newest snapshot all {len(sets)} members hold"
    return ResumePlan(step=step, reason=reason)


def plan_from_disk(persisted: Mapping[str, int | None], why: str
                   ) -> ResumePlan | NoCommonSnapshot:
    """Every in-memory copy is gone: resume from the persistent checkpoint, if every member
    can read one. The oldest of the newest steps they report is one all of them hold (a
    save may have landed between two members' reports; the older stays until the newer is
    complete)."""
    missing = sorted((w for w, s in persisted.items() if s is None), key=rank_order)
    if not persisted or missing:
        return NoCommonSnapshot(
            f"{why}; and no persistent checkpoint is readable by "
            f"{', '.join(missing) or 'the members'}: the job cannot go on")
    step = min(s for s in persisted.values() if s is not None)
    return ResumePlan(step=step, reason=(
        f"FALLBACK TO DISK: {why}; every member loads the persistent checkpoint of step "
        f"{step} (the work since then is redone)"))
