"""The NCCL path of the resilient process group: a non-blocking communicator per epoch.

gloo cannot abort a rank blocked in a recv, which is why `group.py` polls futures and
parks dead groups. NCCL can do better: a communicator created with `blocking = 0`
(`ProcessGroupNCCL.Options().config.blocking`) never blocks a host thread inside NCCL, and
`ProcessGroupNCCL.abort()` called from another thread (the agent channel's reader, on the
controller's word) tears it down, failing its pending work. Recovery then either shrinks
the communicator in place (`ProcessGroupNCCL.shrink`, what `torch.distributed.shrink_group`
calls; NCCL >= 2.27) or, where shrinking is unavailable or the membership grows, aborts
and builds the next epoch's group under a new store prefix, like the gloo path.

Waiting follows the gloo path's rule: poll `work.is_completed()` (a CUDA event query, never
blocks) against an abort event, so a hung peer never pins the training thread.

Limitations, from running this on one H100 (torch 2.11, NCCL 2.28):
- NCCL refuses two ranks on one GPU, so only one-rank groups run collectives here; a
  two-rank group whose peer never arrives is how a hung collective is exercised.
- A peer that never arrives is NOT abortable this way (measured): rank 0 of a two-rank
  group, non-blocking config, lazy init: `allreduce()` itself blocks inside communicator
  init waiting for the peer, and `abort()` from another thread blocks as well (both still
  stuck after 45 s; the watchdog later reports "Connection closed by remote peer"). So
  build and connect each epoch's group (`eager_connect`) on a thread of its own, as
  `group.GroupBuild` does for gloo, and abandon (park) a build that does not finish.
- `shrink` needs at least one rank to exclude and a group of >= 2 ranks, so it is only
  probed for availability (`supports_shrinking`) here, never executed; multi-rank NCCL
  (shrink, abort of a peer mid-ring) is untested in this repository.
- `torch.distributed.shrink_group` only accepts groups registered with the c10d world
  (init_process_group / new_group); per-epoch groups built here are not, so `shrink`
  goes to the backend object directly.
"""

from __future__ import annotations

import datetime
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from splice.agent.worker.group import CollectiveAborted, EpochSpec

SHRINK_DEFAULT = 0x00
SHRINK_ABORT = 0x01  # abort the parent's pending operations before shrinking


def nccl_available() -> bool:
    return (dist.is_available() and dist.is_nccl_available() and torch.cuda.is_available()
            and hasattr(dist, "ProcessGroupNCCL"))


@dataclass(frozen=True, kw_only=True)
class NcclConfig:
    # NCCL's own watchdog timeout. Long: the controller decides when a collective is dead
    # and aborts it; the watchdog is only the last resort when the controller is gone.
    timeout_s: float = 300.0
    # Non-blocking communicators make abort() from another thread safe and prompt.
    nonblocking: bool = True
    # Put NCCL's stream at high priority so collectives are not starved by compute.
    high_priority_stream: bool = False
    # Connect at build time (eager init) instead of at the first collective, so a missing
    # peer shows up during the rebuild, not mid-step.
    eager_connect: bool = True


def make_options(cfg: NcclConfig) -> Any:
    """ProcessGroupNCCL options for `cfg` (torch 2.11 and 2.13 both expose
    `config.blocking`; 0 makes NCCL calls return ncclInProgress instead of blocking)."""
    opts = dist.ProcessGroupNCCL.Options(is_high_priority_stream=cfg.high_priority_stream)
    opts._timeout = datetime.timedelta(seconds=cfg.timeout_s)
    if cfg.nonblocking:
        opts.config.blocking = 0
    return opts


class NcclEpochGroup:
    """One epoch's NCCL group on one device: SUM all-reduce, abortable waits, abort, shrink."""

    def __init__(self, pg: Any, *, spec: EpochSpec, device: torch.device,
                 cfg: NcclConfig) -> None:
        self.pg = pg
        self.spec = spec
        self.device = device
        self.cfg = cfg
        self.aborted = threading.Event()
        self.abort_reason = ""

    @classmethod
    def build(cls, store: dist.Store, spec: EpochSpec, device: torch.device,
              cfg: NcclConfig = NcclConfig()) -> NcclEpochGroup:
        """Rendezvous under the epoch's store prefix and (optionally) connect now."""
        if not nccl_available():
            raise RuntimeError("NCCL is not available here (no CUDA, or a CPU build of torch)")
        pg = dist.ProcessGroupNCCL(dist.PrefixStore(spec.store_prefix, store), spec.rank,
                                   spec.world_size, make_options(cfg))
        group = cls(pg, spec=spec, device=device, cfg=cfg)
        if cfg.eager_connect:
            pg.eager_connect_single_device(device)
        return group

    # ---- collectives --------------------------------------------------------------------
    def all_reduce_async(self, tensor: torch.Tensor) -> Any:
        if self.aborted.is_set():
            raise CollectiveAborted(self.abort_reason)
        opts = dist.AllreduceOptions()
        opts.reduceOp = dist.ReduceOp.SUM
        return self.pg.allreduce([tensor], opts)

    def wait(self, work: Any, timeout_s: float | None = None, poll_s: float = 2e-4) -> None:
        """Wait for `work` by polling, so an abort (or the timeout) always gets through.

        On completion the current stream is ordered after the collective (`work.wait()` on
        a completed NCCL work only adds that dependency)."""
        deadline = time.monotonic() + (timeout_s if timeout_s is not None
                                       else self.cfg.timeout_s)
        while not work.is_completed():
            if self.aborted.wait(poll_s):
                raise CollectiveAborted(self.abort_reason)
            if time.monotonic() > deadline:
                raise CollectiveAborted(f"NCCL collective of epoch {self.spec.epoch} timed "
                                        f"out after {timeout_s} s")
        if self.aborted.is_set():
            raise CollectiveAborted(self.abort_reason)
        work.wait()

    def all_reduce(self, tensor: torch.Tensor, timeout_s: float | None = None) -> torch.Tensor:
        self.wait(self.all_reduce_async(tensor), timeout_s)
        return tensor

    # ---- failure handling ---------------------------------------------------------------
    def abort(self, reason: str) -> float:
        """Abort the communicator; thread-safe, meant for the control channel's thread.
        Waiters raise CollectiveAborted(reason). Returns the seconds abort() took."""
        self.abort_reason = reason
        self.aborted.set()
        t0 = time.perf_counter()
        self.pg.abort()
        return time.perf_counter() - t0

    def supports_shrinking(self) -> bool:
        return bool(getattr(self.pg, "supports_shrinking", False))

    def shrink(self, exclude_ranks: list[int], next_spec: EpochSpec,
               *, abort_pending: bool = True) -> NcclEpochGroup:
        """The next epoch's group without `exclude_ranks`, shrunk in place (no rendezvous).
        Raises NotImplementedError where the backend cannot shrink: rebuild instead."""
        if not self.supports_shrinking():
            raise NotImplementedError("this NCCL backend cannot shrink (torch or NCCL too "
                                      "old); abort and build the next epoch's group")
        if not exclude_ranks or self.spec.rank in exclude_ranks:
            raise ValueError(f"shrink needs ranks to exclude other than this one "
                             f"(rank {self.spec.rank}, excluding {exclude_ranks})")
        flags = SHRINK_ABORT if abort_pending else SHRINK_DEFAULT
        new_pg = self.pg.shrink(sorted(exclude_ranks), flags, make_options(self.cfg))
        return NcclEpochGroup(new_pg, spec=next_spec, device=self.device, cfg=self.cfg)


def shrink_or_rebuild(group: NcclEpochGroup, exclude_ranks: list[int], next_spec: EpochSpec,
                      store: dist.Store) -> tuple[NcclEpochGroup, str]:
    """Recover into `next_spec`: shrink in place when only ranks were lost and the backend
    can, else abort the old group and rendezvous a new one. Returns the group and how."""
    if exclude_ranks and group.supports_shrinking() \
            and next_spec.world_size == group.spec.world_size - len(exclude_ranks):
        try:
            return group.shrink(exclude_ranks, next_spec), "shrink"
        except (NotImplementedError, RuntimeError):
            pass  # e.g. the communicator is already broken: fall back to a fresh one
    group.abort(f"epoch {group.spec.epoch} replaced by epoch {next_spec.epoch}")
    return NcclEpochGroup.build(store, next_spec, group.device, group.cfg), "rebuild"
