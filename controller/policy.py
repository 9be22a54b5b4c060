"""What to do about a detector's verdict: the per-job policy, as a pure decision.

`decide(verdicts, policy, state, now)` returns the actions and the next state; the
controller's loop executes them (a kill goes through the crash path: the agent reports
the exit and the planner forms the next membership). A hang always kills its culprits —
waiting any longer only stalls every rank. A straggler gets what the job's policy says,
at most once per cool-down per rank, so a verdict that repeats cannot make the controller
thrash. Every action carries a sentence saying why.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import TypeAlias

from splice.controller.hang import HangVerdict
from splice.controller.stragglers import (
    COMPUTE,
    LinkVerdict,
    StragglerVerdict,
    rebalance_shares,
)

Verdict: TypeAlias = HangVerdict | StragglerVerdict | LinkVerdict


class Mode(enum.Enum):
    ALERT = "alert"            # tell a human; change nothing
    REBALANCE = "rebalance"    # move batch share away from slow ranks
    EVICT = "evict"            # drop the slow rank; the job shrinks
    REPLACE = "replace"        # swap the slow rank for a warm spare


@dataclass(frozen=True, kw_only=True)
class Policy:
    mode: Mode | str = Mode.ALERT
    # No second decision about the same rank within this long: a rebalance needs a few
    # steps to show its effect in the measurements, and evicting or replacing a rank costs
    # a recovery (~0.1-1 s of everyone's time); five minutes bounds that cost at well
    # under 1 % while still reacting within a typical job's lifetime.
    cooldown_s: float = 300.0
    # Each rebalance moves a share by at most this factor (see `rebalance_shares`).
    max_share_change: float = 2.0

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "mode", Mode(self.mode))
        except ValueError:
            raise ValueError(f"policy mode must be one of {[m.value for m in Mode]}, "
                             f"got {self.mode!r}") from None
        if self.cooldown_s < 0:
            raise ValueError(f"cooldown_s must be >= 0, got {self.cooldown_s}")
        if self.max_share_change < 1:
            raise ValueError(f"max_share_change must be >= 1, got {self.max_share_change}")


@dataclass(frozen=True, kw_only=True)
class PolicyState:
    shares: tuple[float, ...] = ()          # current batch shares by rank (rebalance)
    spares: int = 0                         # warm spares available to replace
    slowdowns: Mapping[int, float] = field(default_factory=lambda: MappingProxyType({}))
    last_decision_s: Mapping[int, float] = field(
        default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True, kw_only=True)
class Action:
    kind: str                 # "kill" | "alert" | "rebalance" | "evict" | "replace"
    ranks: tuple[int, ...]
    reason: str
    shares: tuple[float, ...] | None = None   # rebalance only


def decide(verdicts: Sequence[Verdict], policy: Policy, state: PolicyState, now: float
           ) -> tuple[list[Action], PolicyState]:
    actions: list[Action] = []
    last = dict(state.last_decision_s)
    slowdowns = dict(state.slowdowns)
    spares = state.spares
    rebalance_due: list[str] = []

    decided: set[int] = set()       # at most one decision per rank per call

    def cooling(rank: int) -> bool:
        return rank in decided or (rank in last and now - last[rank] < policy.cooldown_s)

    def mark(*ranks: int) -> None:
        decided.update(ranks)
        last.update(dict.fromkeys(ranks, now))

    for v in verdicts:
        if isinstance(v, HangVerdict):
            if not v.culprits:
                actions.append(Action(kind="alert", ranks=v.victims, reason=(
                    f"hang with no culprit to kill; needs a human: {v.reason}")))
                continue
            # No cool-down: a hang stalls everyone until the culprit is gone.
            ranks = v.culprit_ranks
            actions.append(Action(kind="kill", ranks=ranks, reason=(
                f"kill rank {', '.join(map(str, ranks))} (recovery follows the crash path): "
                f"{v.reason}")))
            mark(*ranks)
        elif isinstance(v, LinkVerdict):
            actions.append(Action(kind="alert", ranks=(), reason=(
                f"slow link, no rank to act on (the network is at fault): {v.reason}")))
        elif not v.active:
            if slowdowns.pop(v.rank, None) is not None and policy.mode is Mode.REBALANCE:
                rebalance_due.append(v.reason)
            elif policy.mode is Mode.ALERT:
                actions.append(Action(kind="alert", ranks=(v.rank,), reason=v.reason))
        elif cooling(v.rank):
            continue
        elif v.kind != COMPUTE or policy.mode is Mode.ALERT:
            why = ("" if v.kind == COMPUTE else
                   "a link straggler: evicting or reweighting the rank would not fix the "
                   "link; ")
            actions.append(Action(kind="alert", ranks=(v.rank,), reason=why + v.reason))
            mark(v.rank)
        elif policy.mode is Mode.REBALANCE:
            slowdowns[v.rank] = v.score
            rebalance_due.append(v.reason)
            mark(v.rank)
        elif policy.mode is Mode.REPLACE and spares > 0:
            spares -= 1
            actions.append(Action(kind="replace", ranks=(v.rank,), reason=(
                f"replace rank {v.rank} with a warm spare ({spares} left): {v.reason}")))
            mark(v.rank)
        else:
            fallback = ("no warm spare left, evicting instead; "
                        if policy.mode is Mode.REPLACE else "")
            actions.append(Action(kind="evict", ranks=(v.rank,), reason=(
                f"evict rank {v.rank}: {fallback}{v.reason}")))
            mark(v.rank)

    # A bounded move may stop short of the measured speeds: keep going once the slow
    # ranks' cool-down has passed.
    unfinished = [r for r in slowdowns if not cooling(r)]
    if policy.mode is Mode.REBALANCE and unfinished and not rebalance_due:
        rebalance_due.append(f"rank {', '.join(map(str, sorted(unfinished)))} still slow "
                             "after the cool-down")
        mark(*unfinished)
    shares = state.shares
    if rebalance_due and shares:
        plan = rebalance_shares(shares, slowdowns, max_change=policy.max_share_change)
        if max(abs(a / b - 1) for a, b in zip(plan.shares, shares, strict=True)) > 1e-6:
            shares = plan.shares
            actions.append(Action(kind="rebalance", ranks=tuple(sorted(slowdowns)),
                                  shares=shares, reason=(
                                      f"{plan.reason}; because {'; '.join(rebalance_due)}")))
    return actions, replace(state, shares=shares, spares=spares,
                            slowdowns=MappingProxyType(slowdowns),
                            last_decision_s=MappingProxyType(last))

