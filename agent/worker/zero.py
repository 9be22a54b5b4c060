"""ZeRO-1: AdamW whose optimizer state is partitioned across the data-parallel ranks.

Every rank keeps the full parameters, as views into one flat fp32 buffer, but the Adam
moments only for its own contiguous shard of that buffer (`partition`), so optimizer memory
shrinks with the world size. A step updates the rank's shard, then the ranks all-gather the
updated shards. The all-gather is one SUM all-reduce of a zero buffer into which each rank
wrote its shard: x + 0 is exact, and it runs through the resilient group's abortable
all-reduce, so a lost peer fails the step like any other collective instead of hanging it.

When the world changes size, `reshard` applies a ReshardPlan (controller/resharding.py):
state a rank already holds stays where it is, the rest comes over an `Exchange`, and state
nobody holds is either supplied by a fallback (the last persistent checkpoint) or refused.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from splice.controller.resharding import Move, ReshardPlan, partition


class ShardGroup(Protocol):
    """What the optimizer needs of a group: ResilientGroup, or a fake in tests."""

    rank: int
    world_size: int

    def all_reduce_async(self, tensor: torch.Tensor) -> Any: ...

    def wait(self, fut: Any) -> None: ...


class ShardStateLost(Exception):
    """Optimizer state no rank holds in memory: resume from the last persistent checkpoint
    (pass its state as `fallback` to `reshard`)."""


@dataclass(frozen=True, kw_only=True)
class AdamWConfig:
    # torch.optim.AdamW's defaults, so swapping optimizers changes nothing else.
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 1e-2

    def __post_init__(self) -> None:
        if not (self.lr >= 0 and self.eps >= 0 and self.weight_decay >= 0
                and all(0 <= b < 1 for b in self.betas)):
            raise ValueError(f"invalid AdamW settings: {self}")


@dataclass(frozen=True)
class StateShard:
    """Adam moments of elements [start, stop) of the flat buffer, after `step` updates."""

    start: int
    stop: int
    step: int
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor


# Every rank of the new world calls it once with the payload ([2, n]: exp_avg, exp_avg_sq)
# of each transfer it sends, and gets back the payload of each transfer it receives.
Exchange = Callable[[Mapping[Move, torch.Tensor]], Mapping[Move, torch.Tensor]]
# Elements (start, stop) nobody holds, read from a persistent checkpoint.
Fallback = Callable[[int, int], StateShard]


class ShardedAdamW:
    """AdamW over flattened fp32 parameters with the state sharded across `group`.

    Parameters become views into `self.flat`: in-place writes to them (load_state_dict,
    the all-gather) keep working, but moving the model (`.to()`) breaks the views.
    """

    def __init__(self, params: Iterable[nn.Parameter], group: ShardGroup,
                 config: AdamWConfig | None = None, *, align: int = 1) -> None:
        self.params = [p for p in params if p.requires_grad]
        if any(p.dtype != torch.float32 for p in self.params):
            raise ValueError("ShardedAdamW keeps a flat fp32 buffer; parameters must be "
                             "float32 (keep an fp32 master copy for lower precisions)")
        self.group = group
        self.config = config or AdamWConfig()
        self.align = align
        self.flat = torch.cat([p.detach().reshape(-1) for p in self.params]) \
            if self.params else torch.zeros(0)
        offset = 0
        for p in self.params:
            p.data = self.flat[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
        self.shard = partition(self.flat.numel(), group.world_size, align)[group.rank]
        self._step = 0
        self._exp_avg = torch.zeros(len(self.shard))
        self._exp_avg_sq = torch.zeros(len(self.shard))

    # ---- the step -----------------------------------------------------------------------
    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                p.grad.zero_()

    def step(self, flat_grad: torch.Tensor | None = None) -> None:
        """Apply one AdamW update given the (already averaged) gradient of all parameters,
        flat, or read from `.grad` when not given.

        If the all-gather is aborted, ranks disagree on the parameters: restore the
        snapshot taken before this step (the session always does).
        """
        if flat_grad is None:
            flat_grad = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p))
                                   .reshape(-1) for p in self.params]) \
                if self.params else torch.zeros(0)
        if flat_grad.numel() != self.flat.numel():
            raise ValueError(f"gradient has {flat_grad.numel()} elements, the parameters "
                             f"{self.flat.numel()}")
        s = self.shard
        self._step += 1
        with torch.no_grad():
            _adamw(self.flat[s.start:s.stop], flat_grad[s.start:s.stop].to(torch.float32),
                   self._exp_avg, self._exp_avg_sq, self._step, self.config)
            self._all_gather()

    def _all_gather(self) -> None:
        gathered = torch.zeros_like(self.flat)  # private: a parked collective may write later
        gathered[self.shard.start:self.shard.stop] = self.flat[self.shard.start:self.shard.stop]
        self.group.wait(self.group.all_reduce_async(gathered))
        self.flat.copy_(gathered)

    # ---- state --------------------------------------------------------------------------
    @property
    def num_steps(self) -> int:
        return self._step

    def state_shard(self) -> StateShard:
        """A private copy of this rank's state (for snapshots and peer replicas)."""
        return StateShard(self.shard.start, self.shard.stop, self._step,
                          self._exp_avg.clone(), self._exp_avg_sq.clone())

    def load_state_shard(self, state: StateShard) -> None:
        if (state.start, state.stop) != (self.shard.start, self.shard.stop):
            raise ValueError(f"state of [{state.start}, {state.stop}) does not fit this "
                             f"rank's shard [{self.shard.start}, {self.shard.stop}); reshard")
        self._step = state.step
        self._exp_avg = state.exp_avg.clone()
        self._exp_avg_sq = state.exp_avg_sq.clone()

    def state_dict(self) -> dict[str, Any]:
        """The shard as a plain dict, so snapshots treat it like a torch optimizer's."""
        s = self.state_shard()
        return {"start": s.start, "stop": s.stop, "step": s.step, "exp_avg": s.exp_avg,
                "exp_avg_sq": s.exp_avg_sq}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.load_state_shard(StateShard(state["start"], state["stop"], state["step"],
                                         state["exp_avg"], state["exp_avg_sq"]))

    # ---- resharding ---------------------------------------------------------------------
    def reshard(self, plan: ReshardPlan, exchange: Exchange, held: Sequence[StateShard], *,
                step: int | None = None, fallback: Fallback | None = None) -> None:
        """Take this rank's shard of the new layout; `self.group` is already the new world.

        `held`: every old-layout shard this rank holds in memory (its own, restored from
        the resume step's snapshot, and any peers' replicas), as the plan's holders said.
        `step` (the update count) is read from `held` unless this rank holds nothing.
        Every rank refuses alike when state is missing and there is no fallback, so none
        is left waiting in the exchange.
        """
        if plan.missing and fallback is None:
            raise ShardStateLost(plan.reason)
        rank = self.group.rank
        if len(plan.new) != self.group.world_size or plan.new[rank].stop > self.flat.numel():
            raise ValueError(f"plan for {len(plan.new)} ranks does not fit rank {rank} of "
                             f"{self.group.world_size} over {self.flat.numel()} elements")
        steps = {h.step for h in held}
        if (len(steps) != 1 and step is None) or (step is not None and steps - {step}):
            raise ValueError(f"cannot tell the update count: held shards say {sorted(steps)}, "
                             f"caller says {step}")
        num_steps = step if step is not None else steps.pop()
        new = plan.new[rank]
        outgoing = {m: _read(held, m) for m in plan.transfers if m.src_rank == rank}
        incoming = exchange(outgoing)
        state = torch.empty(2, len(new))
        for m in plan.moves:
            if m.dst_rank == rank:
                payload = _read(held, m) if m.local else incoming.get(m)
                if payload is None or payload.shape != (2, m.num_elems):
                    raise ValueError(f"the exchange did not deliver {m}")
                state[:, m.start - new.start:m.stop - new.start] = payload
        for gap in plan.missing:
            if gap.dst_rank == rank:
                assert fallback is not None
                s = fallback(gap.start, gap.stop)
                state[:, gap.start - new.start:gap.stop - new.start] = torch.stack(
                    [s.exp_avg, s.exp_avg_sq])
        self.shard = new
        self._step = num_steps
        self._exp_avg, self._exp_avg_sq = state[0].clone(), state[1].clone()


def _read(held: Sequence[StateShard], m: Move) -> torch.Tensor:
    """Elements [m.start, m.stop) of the held shards as a [2, n] payload."""
    try:
        return read_range(held, m.start, m.stop)
    except ValueError:
        raise ValueError(f"plan has rank {m.src_rank} provide [{m.start}, {m.stop}) but it "
                         f"holds only {[(h.start, h.stop) for h in held]}") from None


def read_range(held: Sequence[StateShard], start: int, stop: int) -> torch.Tensor:
    """Elements [start, stop) of disjoint shards as a [2, n] payload (exp_avg,
    exp_avg_sq); ValueError unless they cover the range."""
    out = torch.empty(2, stop - start)
    covered = 0
    for h in held:
        lo, hi = max(start, h.start), min(stop, h.stop)
        if lo < hi:
            out[0, lo - start:hi - start] = h.exp_avg[lo - h.start:hi - h.start]
            out[1, lo - start:hi - start] = h.exp_avg_sq[lo - h.start:hi - h.start]
            covered += hi - lo
    if covered != stop - start:
        raise ValueError(f"shards {[(h.start, h.stop) for h in held]} do not cover "
                         f"[{start}, {stop})")
    return out


def _adamw(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor,
           exp_avg_sq: torch.Tensor, step: int, c: AdamWConfig) -> None:
    """torch.optim.AdamW's single-tensor update, op for op, so results match it."""
    beta1, beta2 = c.betas
    param.mul_(1 - c.lr * c.weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    step_size = c.lr / (1 - beta1**step)
    denom = (exp_avg_sq.sqrt() / (1 - beta2**step) ** 0.5).add_(c.eps)
    param.addcdiv_(exp_avg, denom, value=-step_size)


def exchange_over(group: ShardGroup, plan: ReshardPlan) -> Exchange:
    """An Exchange through the group's abortable all-reduce: every transfer gets a slot in
    one zero buffer (the same offsets on every rank, from the plan), senders fill theirs.
    Every rank carries every transfer, which is wasteful at scale but needs no
    point-to-point primitive and aborts like every other collective."""
    transfers = plan.transfers
    offsets = [0]
    for m in transfers:
        offsets.append(offsets[-1] + m.num_elems)

    def exchange(outgoing: Mapping[Move, torch.Tensor]) -> Mapping[Move, torch.Tensor]:
        buf = torch.zeros(2, offsets[-1])
        for m, lo, hi in zip(transfers, offsets, offsets[1:], strict=False):
            if m in outgoing:
                buf[:, lo:hi] = outgoing[m]
        if transfers:
            group.wait(group.all_reduce_async(buf))
        return {m: buf[:, lo:hi] for m, lo, hi in zip(transfers, offsets, offsets[1:],
                                                       strict=False)
                if m.dst_rank == group.rank}

    return exchange
