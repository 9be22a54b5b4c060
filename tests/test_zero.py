"""ZeRO-1 sharded AdamW (agent/worker/zero.py) against torch.optim.AdamW, unsharded.

Ranks are simulated in one process: one thread per rank, and a fake group whose all-reduce
meets the other ranks' threads at a barrier (no process group, no sleeping). Resharding
runs the pure plan (controller/resharding.py) through a fake in-memory exchange, or through
the fake group's all-reduce (the path a real ResilientGroup takes).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, TypeVar

import pytest
import torch
from torch import nn

from splice.agent.worker.group import CollectiveAborted, ResilientGroup
from splice.agent.worker.zero import (
    AdamWConfig,
    Exchange,
    ShardedAdamW,
    ShardStateLost,
    StateShard,
    exchange_over,
)
from splice.controller.resharding import Move, ReshardPlan, partition, plan_reshard

CONFIG = AdamWConfig(lr=0.05, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)
T = TypeVar("T")


class FakeWorld:
    """The collectives of `size` in-process ranks, each driven by its own thread."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._barrier = threading.Barrier(size, timeout=10)  # a bug fails, never hangs
        self._slots: list[Any] = [None] * size
        self._lock = threading.Lock()
        self.elems_exchanged = 0  # over the fake exchange: what crossed the 'wire'

    def _meet(self, rank: int, item: Any) -> list[Any]:
        self._slots[rank] = item
        self._barrier.wait()
        seen = list(self._slots)
        self._barrier.wait()  # everyone has read before anyone posts again
        return seen

    def all_reduce(self, rank: int, tensor: torch.Tensor) -> None:
        parts = self._meet(rank, tensor.clone())
        total = parts[0]
        for part in parts[1:]:  # in rank order: every rank sums alike
            total = total + part
        tensor.copy_(total)

    def exchange(self, rank: int) -> Exchange:
        def run(outgoing: Mapping[Move, torch.Tensor]) -> Mapping[Move, torch.Tensor]:
            posts = self._meet(rank, dict(outgoing))
            got = {m: t.clone() for post in posts for m, t in post.items()
                   if m.dst_rank == rank}
            with self._lock:
                self.elems_exchanged += sum(m.num_elems for m in got)
            return got
        return run


class FakeGroup:
    """ShardGroup over a FakeWorld: the collective completes inside all_reduce_async."""

    def __init__(self, world: FakeWorld, rank: int) -> None:
        self.world, self.rank, self.world_size = world, rank, world.size

    def all_reduce_async(self, tensor: torch.Tensor) -> object:
        if self.world_size > 1:
            self.world.all_reduce(self.rank, tensor)
        return None

    def wait(self, fut: object) -> None:
        return None


def on_ranks(fns: Sequence[Callable[[], T]]) -> list[T]:
    """Run one callable per rank concurrently; re-raise the first failure."""
    with ThreadPoolExecutor(len(fns)) as pool:
        return [f.result() for f in [pool.submit(fn) for fn in fns]]


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))


DATA = torch.randn(16, 5, generator=torch.Generator().manual_seed(1))
TARGET = torch.randn(16, 3, generator=torch.Generator().manual_seed(2))


def backward(model: nn.Module, step: int) -> None:
    batch = slice(step % 4 * 4, step % 4 * 4 + 4)
    model.zero_grad()
    nn.functional.mse_loss(model(DATA[batch]), TARGET[batch]).backward()


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def reference(num_steps: int) -> list[torch.Tensor]:
    """Parameters after each step of unsharded torch.optim.AdamW."""
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=CONFIG.lr, betas=CONFIG.betas,
                            eps=CONFIG.eps, weight_decay=CONFIG.weight_decay)
    out = []
    for step in range(num_steps):
        backward(model, step)
        opt.step()
        out.append(flat(model).clone())
    return out


class Rank:
    """One simulated data-parallel rank: its own model replica and optimizer shard."""

    def __init__(self, world: FakeWorld, rank: int, align: int = 1) -> None:
        self.model = make_model()
        self.opt = ShardedAdamW(self.model.parameters(), FakeGroup(world, rank), CONFIG,
                                align=align)

    def step(self, step: int) -> torch.Tensor:
        backward(self.model, step)  # the gradient every rank would see after all-reduce
        self.opt.step()
        return flat(self.model).clone()

    def join(self, world: FakeWorld, rank: int) -> None:
        self.opt.group = FakeGroup(world, rank)


def train(ranks: Sequence[Rank], steps: range, expected: list[torch.Tensor]) -> None:
    for step in steps:
        for params in on_ranks([partial(r.step, step) for r in ranks]):
            torch.testing.assert_close(params, expected[step], rtol=1e-6, atol=1e-7)


# ---- tests --------------------------------------------------------------------------------


@pytest.mark.parametrize(("num_ranks", "align"), [(1, 1), (2, 1), (3, 1), (4, 4), (8, 16)])
def test_sharded_training_matches_unsharded_adamw(num_ranks: int, align: int) -> None:
    world = FakeWorld(num_ranks)
    ranks = [Rank(world, r, align) for r in range(num_ranks)]
    train(ranks, range(8), reference(8))
    total = ranks[0].opt.flat.numel()
    assert [(r.opt.shard, len(r.opt.state_shard().exp_avg)) for r in ranks] == [
        (s, len(s)) for s in partition(total, num_ranks, align)]


@pytest.mark.parametrize("via", ["fake exchange", "group all-reduce"])
def test_lose_a_rank_then_grow_back_and_still_match(via: str) -> None:
    expected = reference(9)
    world4 = FakeWorld(4)
    ranks = [Rank(world4, r) for r in range(4)]
    train(ranks, range(3), expected)
    total = ranks[0].opt.flat.numel()

    # Rank 2 dies; rank 3 (new rank 2) held its replica. Survivors 0, 1, 3 -> 0, 1, 2.
    replica = ranks[2].opt.state_shard()
    survivors = [ranks[0], ranks[1], ranks[3]]
    plan = plan_reshard(partition(total, 4), {0: [0], 1: [1], 2: [2], 3: [2]},
                        partition(total, 3))
    assert not plan.missing and plan.elems_sent > 0
    world3 = FakeWorld(3)
    held = [[r.opt.state_shard()] for r in survivors]
    held[2].append(replica)
    reshard_all(world3, survivors, plan, held, via)
    if via == "fake exchange":
        assert world3.elems_exchanged == plan.elems_sent  # exactly the planned ranges
    train(survivors, range(3, 6), expected)

    # A replacement joins as rank 3 with the parameters (from a peer's snapshot) but no state.
    world4b = FakeWorld(4)
    fresh = Rank(world4b, 3)
    with torch.no_grad():
        fresh.opt.flat.copy_(survivors[0].opt.flat)
    back = [*survivors, fresh]
    plan = plan_reshard(partition(total, 3), {0: [0], 1: [1], 2: [2]}, partition(total, 4))
    held = [[r.opt.state_shard()] for r in survivors] + [[]]
    reshard_all(world4b, back, plan, held, via, step=survivors[0].opt.num_steps)
    assert [r.opt.shard for r in back] == partition(total, 4)
    train(back, range(6, 9), expected)


def reshard_all(world: FakeWorld, ranks: Sequence[Rank], plan: ReshardPlan,
                held: Sequence[list[StateShard]], via: str, step: int | None = None) -> None:
    for new_rank, r in enumerate(ranks):
        r.join(world, new_rank)

    def run(new_rank: int) -> None:
        opt = ranks[new_rank].opt
        ex = (world.exchange(new_rank) if via == "fake exchange"
              else exchange_over(opt.group, plan))
        opt.reshard(plan, ex, held[new_rank], step=step)

    on_ranks([partial(run, i) for i in range(len(ranks))])


def test_a_shard_nobody_holds_is_refused_unless_a_checkpoint_supplies_it() -> None:
    expected = reference(6)
    world4 = FakeWorld(4)
    ranks = [Rank(world4, r) for r in range(4)]
    train(ranks, range(3), expected)
    total = ranks[0].opt.flat.numel()
    on_disk = ranks[2].opt.state_shard()  # stands in for the last persistent checkpoint
    survivors = [ranks[0], ranks[1], ranks[3]]
    plan = plan_reshard(partition(total, 4), {0: [0], 1: [1], 3: [2]}, partition(total, 3))
    assert plan.missing and {m.old_rank for m in plan.missing} == {2}
    assert "MISSING" in plan.reason

    world3 = FakeWorld(3)
    held = [[r.opt.state_shard()] for r in survivors]
    before = [r.opt.state_shard() for r in survivors]
    for i, r in enumerate(survivors):
        r.join(world3, i)
        with pytest.raises(ShardStateLost, match="old rank 2"):  # every rank alike
            r.opt.reshard(plan, world3.exchange(i), held[i])
        assert r.opt.shard == range(before[i].start, before[i].stop)  # nothing changed

    def from_disk(start: int, stop: int) -> StateShard:
        lo, hi = start - on_disk.start, stop - on_disk.start
        return StateShard(start, stop, on_disk.step, on_disk.exp_avg[lo:hi],
                          on_disk.exp_avg_sq[lo:hi])

    on_ranks([partial(r.opt.reshard, plan, world3.exchange(i), held[i], fallback=from_disk)
              for i, r in enumerate(survivors)])
    train(survivors, range(3, 6), expected)


def test_works_over_a_real_resilient_group_and_aborts_like_one() -> None:
    expected = reference(3)
    model = make_model()
    group = ResilientGroup()  # one rank: no gloo group is needed
    opt = ShardedAdamW(model.parameters(), group, CONFIG)
    for step in range(2):
        backward(model, step)
        opt.step()  # gradients read from .grad, as the session leaves them
        torch.testing.assert_close(flat(model), expected[step], rtol=1e-6, atol=1e-7)
    snapshot = opt.state_dict()
    group.abort("epoch 1 announced", below_epoch=1)
    backward(model, 2)
    with pytest.raises(CollectiveAborted):
        opt.step()
    opt.load_state_dict(snapshot)
    assert opt.num_steps == 2


def test_bad_input_is_refused() -> None:
    world = FakeWorld(2)
    opt = ShardedAdamW(make_model().parameters(), FakeGroup(world, 0), CONFIG)
    other = ShardedAdamW(make_model().parameters(), FakeGroup(world, 1), CONFIG)
    with pytest.raises(ValueError, match="does not fit"):
        opt.load_state_shard(other.state_shard())
    with pytest.raises(ValueError, match="elements"):
        opt.step(torch.zeros(3))
    with pytest.raises(ValueError, match="float32"):
        ShardedAdamW(nn.Linear(2, 2).double().parameters(), FakeGroup(world, 0))
    with pytest.raises(ValueError):
        AdamWConfig(betas=(1.0, 0.9))
