"""Memberships and worker identities.

A membership is the ordered list of workers training together under one epoch; a worker's
rank is its index in that list. Epochs strictly increase and are the fencing token: every
message that belongs to a membership carries its epoch, and anything older is refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field


class StaleEpochError(Exception):
    """A message or write belongs to an epoch older than the current one; drop it."""

    def __init__(self, got: int, current: int) -> None:
        super().__init__(f"stale epoch {got}: the job is at epoch {current}")
        self.got = got
        self.current = current


def worker_id(node_id: str, local_rank: int) -> str:
    return f"{node_id}/{local_rank}"


def parse_worker_id(wid: str) -> tuple[str, int]:
    """Split `node/local_rank`; raises ValueError for anything else."""
    node, sep, local = wid.rpartition("/")
    if not sep or not node or not (local.isascii() and local.isdigit()) or str(int(local)) != local:
        raise ValueError(f"malformed worker id {wid!r}: expected NODE/LOCAL_RANK")
    return node, int(local)


def node_of(wid: str) -> str:
    return parse_worker_id(wid)[0]


def rank_order(wid: str) -> tuple[str, int]:
    """Sort key giving the same rank order on every controller: by node, then local rank."""
    return parse_worker_id(wid)


@dataclass(frozen=True, kw_only=True)
class Membership:
    epoch: int
    members: tuple[str, ...]
    # Relative share of the global batch per rank, in rank order. Equal shares by default;
    # rebalancing away from a slow rank changes them without changing the global batch.
    shares: tuple[float, ...]
    reason: str
    initial: bool = False
    # worker id -> rank: rank lookups are on the telemetry path, O(1) at 100k ranks.
    _ranks: dict[str, int] = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        assert self.epoch >= 1, self.epoch
        assert len(self.members) == len(self.shares), (self.members, self.shares)
        ranks = {w: r for r, w in enumerate(self.members)}
        assert len(ranks) == len(self.members), self.members
        object.__setattr__(self, "_ranks", ranks)

    @property
    def world_size(self) -> int:
        return len(self.members)

    def rank_of(self, wid: str) -> int:
        """The worker's rank; ValueError if it is not a member."""
        try:
            return self._ranks[wid]
        except KeyError:
            raise ValueError(f"{wid} is not a member of epoch {self.epoch}") from None

    def has(self, wid: str) -> bool:
        return wid in self._ranks

    def nodes(self) -> frozenset[str]:
        return frozenset(node_of(w) for w in self.members)
