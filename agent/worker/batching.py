"""Constant global batch: which micro-batches each rank runs, for any world size.

The global batch of a step is cut into fixed *global* micro-batches. Their composition
does not depend on the world size, only how many each rank runs does, so the optimizer
sees the same samples with the same weights however many ranks are alive. Pure code.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class BatchConfig:
    global_batch_size: int   # samples per optimizer step, fixed for the whole run
    micro_batch_size: int    # samples per forward/backward pass (the last may be smaller)

    def __post_init__(self) -> None:
        if self.global_batch_size < 1 or self.micro_batch_size < 1:
            raise ValueError("global_batch_size and micro_batch_size must be >= 1, got "
                             f"{self.global_batch_size} and {self.micro_batch_size}")
        if self.micro_batch_size > self.global_batch_size:
            raise ValueError(f"micro_batch_size {self.micro_batch_size} exceeds "
                             f"global_batch_size {self.global_batch_size}")

    @property
    def num_micro_batches(self) -> int:
        return math.ceil(self.global_batch_size / self.micro_batch_size)

    def micro_batch_positions(self, step: int, index: int) -> range:
        """Global sample positions (into the endless sample stream) of one micro-batch."""
        start = index * self.micro_batch_size
        end = min(start + self.micro_batch_size, self.global_batch_size)
        base = step * self.global_batch_size
        return range(base + start, base + end)


def assign_micro_batches(num_micro_batches: int, shares: Sequence[float]) -> list[range]:
    """Contiguous ranges of micro-batch indices per rank, proportional to `shares`.

    Largest-remainder apportionment, ties to the lower rank, and every rank gets at least
    one micro-batch (a rank with none could not take part in the gradient reduction).
    """
    world = len(shares)
    if world == 0:
        raise ValueError("no ranks to assign micro-batches to")
    if num_micro_batches < world:
        raise ValueError(f"{num_micro_batches} micro-batches cannot be spread over {world} "
                         "ranks; lower micro_batch_size or raise global_batch_size")
    if any(not s > 0 or math.isinf(s) for s in shares):
        raise ValueError(f"shares must be positive and finite, got {list(shares)}")
    total = sum(shares)
    # Every rank is owed one micro-batch; the rest is apportioned by share.
    spare = num_micro_batches - world
    quotas = [spare * s / total for s in shares]
    counts = [1 + math.floor(q) for q in quotas]
    left = num_micro_batches - sum(counts)
    by_remainder = sorted(range(world), key=lambda r: (-(quotas[r] - math.floor(quotas[r])), r))
    for r in by_remainder[:left]:
        counts[r] += 1
    ranges, start = [], 0
    for c in counts:
        ranges.append(range(start, start + c))
        start += c
    return ranges
