"""Which element ranges of a sharded flat buffer move where when the world changes size.

ZeRO-1 keeps each optimizer-state element on exactly one data-parallel rank. When the
membership goes from N to M ranks, ownership ranges change; every new rank must end up
holding its new range, and the cheapest way there uses what ranks already hold in memory
(their own old shard, or a peer's replica of a lost rank's shard) and sends only the rest
over the wire. This module decides that and moves nothing: the worker hook
(agent/worker/zero.py) executes the plan. Pure and torch-free, so it can be checked
exhaustively against a per-element reference.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True, order=True)
class Move:
    """Elements [start, stop) of the flat buffer go from `src_rank` to `dst_rank` (new
    ranks). `src_rank == dst_rank` is a keep: the data is already there, nothing is sent."""

    src_rank: int
    dst_rank: int
    start: int
    stop: int

    @property
    def num_elems(self) -> int:
        return self.stop - self.start

    @property
    def local(self) -> bool:
        return self.src_rank == self.dst_rank


@dataclass(frozen=True, order=True)
class Missing:
    """Elements [start, stop) that `dst_rank` needs but nobody holds in memory: they belonged
    to `old_rank`, which was lost with every replica. Restore them from disk."""

    dst_rank: int
    start: int
    stop: int
    old_rank: int

    @property
    def num_elems(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class ReshardPlan:
    old: tuple[range, ...]      # shard of each old rank
    new: tuple[range, ...]      # shard of each new rank
    moves: tuple[Move, ...]     # keeps and transfers, sorted by (dst_rank, start)
    missing: tuple[Missing, ...]
    reason: str

    @property
    def transfers(self) -> tuple[Move, ...]:
        """The moves that cross the wire, in an order every rank computes identically."""
        return tuple(m for m in self.moves if not m.local)

    @property
    def elems_sent(self) -> int:
        return sum(m.num_elems for m in self.transfers)

    @property
    def elems_kept(self) -> int:
        return sum(m.num_elems for m in self.moves if m.local)

    @property
    def elems_missing(self) -> int:
        return sum(m.num_elems for m in self.missing)


def partition(total_elems: int, world: int, align: int = 1) -> list[range]:
    """Contiguous shards of a flat buffer, one per rank, tiling [0, total_elems).

    Every boundary but the buffer's end is a multiple of `align` (so vectorised kernels and
    byte-aligned copies work on whole blocks); shards differ by at most one block, the
    earlier ranks taking the extra blocks. Ranks past the data get empty shards.
    """
    if total_elems < 0 or world < 1 or align < 1:
        raise ValueError(f"partition needs total_elems >= 0, world >= 1, align >= 1; got "
                         f"{total_elems}, {world}, {align}")
    blocks = -(-total_elems // align)
    base, extra = divmod(blocks, world)

    def boundary(rank: int) -> int:
        return min(total_elems, (rank * base + min(rank, extra)) * align)

    return [range(boundary(r), boundary(r + 1)) for r in range(world)]


def _check_disjoint(name: str, shards: Sequence[range]) -> None:
    for r in shards:
        if r.step != 1:
            raise ValueError(f"{name} shard {r} must be a contiguous range (step 1)")
    nonempty = sorted((r for r in shards if r), key=lambda r: r.start)
    for a, b in zip(nonempty, nonempty[1:], strict=False):
        if b.start < a.stop:
            raise ValueError(f"{name} shards overlap: [{a.start}, {a.stop}) and "
                             f"[{b.start}, {b.stop})")


def plan_reshard(old: Sequence[range], holders: Mapping[int, Sequence[int]],
                 new: Sequence[range]) -> ReshardPlan:
    """Plan how the new ranks come to hold their shards.

    `old[s]` is old rank s's shard; `holders[s]` lists the NEW ranks that hold that shard's
    data in memory now (a survivor its own old shard, a peer a replica of a lost rank's);
    absent or empty means nobody. Each element of each new shard is covered exactly once:
    kept in place when its destination already holds it, else sent from the lowest-ranked
    holder, else reported missing. Adjacent ranges with the same source and destination
    are merged, so a rank holding two neighbouring old shards sends one range.
    """
    _check_disjoint("old", old)
    _check_disjoint("new", new)
    for s, ranks in holders.items():
        if not 0 <= s < len(old):
            raise ValueError(f"holders names old rank {s}, but there are {len(old)} old ranks")
        bad = [r for r in ranks if not 0 <= r < len(new)]
        if bad:
            raise ValueError(f"holders of old rank {s} name new ranks {bad}, but there are "
                             f"{len(new)} new ranks")
    by_start = sorted((s for s in range(len(old)) if old[s]), key=lambda s: old[s].start)
    starts = [old[s].start for s in by_start]
    sorted_holders = {s: sorted(set(ranks)) for s, ranks in holders.items()}

    moves: list[Move] = []
    missing: list[Missing] = []
    for dst, shard in enumerate(new):
        pos = shard.start
        i = max(0, bisect.bisect_right(starts, pos) - 1)
        while pos < shard.stop:
            while i < len(by_start) and old[by_start[i]].stop <= pos:
                i += 1
            if i == len(by_start) or old[by_start[i]].start > pos:
                raise ValueError(f"element {pos} of new rank {dst}'s shard is in no old "
                                 "shard: the buffer cannot grow during a reshard")
            s = by_start[i]
            stop = min(old[s].stop, shard.stop)
            ranks = sorted_holders.get(s, [])
            if not ranks:
                missing.append(Missing(dst, pos, stop, s))
            else:
                src = dst if dst in ranks else ranks[0]
                prev = moves[-1] if moves else None
                if prev is not None and (prev.src_rank, prev.dst_rank, prev.stop) == (src, dst,
                                                                                      pos):
                    moves[-1] = Move(src, dst, prev.start, stop)
                else:
                    moves.append(Move(src, dst, pos, stop))
            pos = stop
    return ReshardPlan(old=tuple(old), new=tuple(new), moves=tuple(moves),
                       missing=tuple(missing), reason=_describe(old, new, moves, missing))


def _describe(old: Sequence[range], new: Sequence[range], moves: Sequence[Move],
              missing: Sequence[Missing]) -> str:
    kept = sum(m.num_elems for m in moves if m.local)
    transfers = [m for m in moves if not m.local]
    sent = sum(m.num_elems for m in transfers)
    reason = (f"reshard {len(old)} -> {len(new)} ranks: {kept} elements kept in place, "
              f"{sent} sent in {len(transfers)} transfers")
    if not missing:
        return reason
    lost = sorted({m.old_rank for m in missing})
    ranges = ", ".join(f"[{m.start}, {m.stop}) for new rank {m.dst_rank}" for m in missing)
    return (f"{reason}, {sum(m.num_elems for m in missing)} MISSING: no rank holds the shard "
            f"of old rank{'s' if len(lost) > 1 else ''} {', '.join(map(str, lost))} "
            f"({ranges}); restore those from the last persistent checkpoint")
