"""Constant global batch: which micro-batches each rank runs, for any world size.

The global batch of a step is cut into fixed *global* micro-batches. Their composition
does not depend on the world size, only how many each rank runs does, so the optimizer
sees the same samples with the same weights however many ranks are alive. Pure code.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction


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

    Largest-remainder apportionment in exact arithmetic, ties to the lower rank; then any
    rank left with none takes one from the rank most above its quota (a rank with no
    micro-batch could not take part in the gradient reduction).
    """
    world = len(shares)
    if world == 0:
        raise ValueError("no ranks to assign micro-batches to")
    if num_micro_batches < world:
        raise ValueError(f"{num_micro_batches} micro-batches cannot be spread over {world} "
                         "ranks; lower micro_batch_size or raise global_batch_size")
    if any(not (s > 0 and math.isfinite(s)) for s in shares):
        raise ValueError(f"shares must be positive and finite, got {list(shares)}")
    exact = [Fraction(s) for s in shares]
    total = sum(exact)
    quotas = [num_micro_batches * s / total for s in exact]
    counts = [math.floor(q) for q in quotas]
    left = num_micro_batches - sum(counts)
    by_remainder = sorted(range(world), key=lambda r: (-(quotas[r] - counts[r]), r))
    for r in by_remainder[:left]:
        counts[r] += 1
    for r in range(world):
        if counts[r] == 0:
            donor = max((d for d in range(world) if counts[d] > 1),
                        key=lambda d: (counts[d] - quotas[d], -d))
            counts[donor] -= 1
            counts[r] = 1
    ranges, start = [], 0
    for c in counts:
        ranges.append(range(start, start + c))
        start += c
    return ranges
