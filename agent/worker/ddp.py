"""DistributedDataParallel on top of the resilient group.

DDP's reducer waits for gradient reductions inside C++, where no abort flag can be polled.
So DDP gets a one-rank local process group of its own (its internal collectives become
local no-ops that can never block) and a communication hook that hands every bucket to the
resilient group: the hook returns a future that completes with the reduced bucket, or
fails when the controller aborts the epoch, and that failure surfaces from
`loss.backward()`.
"""

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from splice.agent.worker.group import ResilientGroup


# No `from __future__ import annotations` here: DDP checks the hook's annotations as types.
def _hook(group: ResilientGroup, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    # Gradients are already weighted by sample count, so the reduction is a plain sum.
    return group.all_reduce_future(bucket.buffer())


def wrap_ddp(model: nn.Module, group: ResilientGroup) -> DistributedDataParallel:
    ddp = DistributedDataParallel(model, process_group=group.local_group(), init_sync=False)
    ddp.register_comm_hook(group, _hook)
    return ddp


def reset_ddp(ddp: DistributedDataParallel, group: ResilientGroup) -> None:
    """Clear the reducer's state after an aborted backward, before the next step."""
    ddp._update_process_group(group.local_group())
