"""The worker hook: `splice.init()` and the training-step API that recovers in place.

    session = splice.init()
    session.register(model=model, optimizer=opt, dataset=ds, loss_fn=loss_fn,
                     global_batch_size=64, micro_batch_size=8)
    while session.step < num_steps:
        result = session.run_step()   # None when the step was rolled back by a recovery

Each step: snapshot the state (before the step runs), run this rank's micro-batches with
exact sample weighting, all-reduce gradients and the loss through the resilient group,
apply the optimizer. When the controller announces a new epoch, the in-flight collective
aborts, the worker joins the new group, restores the consistent step the controller chose,
re-partitions the data and carries on. No process restarts, nothing is read from disk.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from splice.agent.progress import ProgressWriter
from splice.agent.worker.batching import BatchConfig, assign_micro_batches
from splice.agent.worker.capture import SnapshotBudgetExceeded, StateCapture
from splice.agent.worker.channel import AgentLink, AgentLost
from splice.agent.worker.gradients import GradientWork
from splice.agent.worker.group import CollectiveAborted, EpochSpec, ResilientGroup
from splice.agent.worker.peer_fetch import PeerFetch
from splice.agent.worker.state_sources import ADOPTED, RecoveryFailed, StateSources
from splice.checkpoint.snapshot import SnapshotRing
from splice.proto import controller_pb2 as pb
from splice.proto import local_pb2 as lpb

log = logging.getLogger("splice.worker")

__all__ = ["CollectiveAborted", "Evicted", "HookConfig", "RecoveryFailed", "Session",
           "SnapshotBudgetExceeded", "StepResult", "init"]


class Evicted(Exception):
    """The controller formed a membership without this worker; it must stop training."""


@dataclass(frozen=True, kw_only=True)
class HookConfig:
    # Waiting for the first membership: the whole world must start and connect.
    join_timeout_s: float = 600.0
    # After a fault, how long to wait for the controller's next membership and resume.
    recovery_timeout_s: float = 120.0
    # Backstop for a gloo collective that neither completes nor gets aborted.
    collective_timeout_s: float = 300.0
    # Interface address gloo binds to (the agent passes its node's address).
    gloo_host: str = "127.0.0.1"
    # Persistent checkpoints (off when empty): rank 0 saves the snapshot every
    # `persist_every` steps in the background (with ShardedAdamW every rank its shard). A job started with checkpoints there resumes
    # from the newest; when every in-memory copy is lost the job falls back to it.
    persist_dir: str = ""
    persist_every: int = 0
    job_id: str = "default"
    # Host memory the in-memory snapshots (two steps' worth) may take; 0: unlimited.
    snapshot_budget_bytes: int = 0
    # Where the snapshots live: a directory in shared memory the agent owns, so that they
    # outlive this process and the worker taking its place adopts them (empty: private).
    snapshot_dir: str = ""
    # Mutual TLS to other nodes' agents when fetching their snapshots (the agent's files;
    # all three or none).
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""

    def __post_init__(self) -> None:
        if len({bool(self.tls_ca), bool(self.tls_cert), bool(self.tls_key)}) != 1:
            raise ValueError("tls_ca, tls_cert and tls_key go together (all or none)")
        if self.persist_every < 0:
            raise ValueError(f"persist_every must be >= 0, got {self.persist_every}")
        if self.persist_every and not self.persist_dir:
            raise ValueError("persist_every needs persist_dir")
        if self.snapshot_budget_bytes < 0:
            raise ValueError(f"snapshot_budget_bytes must be >= 0, got "
                             f"{self.snapshot_budget_bytes}")


@dataclass(frozen=True)
class StepResult:
    step: int            # the step that completed
    loss: float          # mean loss over the whole global batch
    step_time_s: float
    num_samples: int     # samples this rank processed
    epoch: int
    world_size: int
    wait_s: float = 0.0  # time inside collectives during the step
    collective_bytes: int = 0

    @property
    def compute_s(self) -> float:
        return max(0.0, self.step_time_s - self.wait_s)


class Session(StateCapture, StateSources, PeerFetch, GradientWork):
    def __init__(self, *, worker_id: str, link: AgentLink | None, config: HookConfig) -> None:
        self.worker_id = worker_id
        self.config = config
        self.group = ResilientGroup(gloo_host=config.gloo_host,
                                    timeout_s=config.collective_timeout_s)
        self._link = link
        self._snapshots = SnapshotRing(directory=config.snapshot_dir or None, owner=worker_id)
        self._on_gpu = False  # the model is on a GPU (register)
        self._stable: tuple[int, frozenset[int]] | None = None  # _stable_on_gpu's cache
        self.step = 0
        self._shares: tuple[float, ...] = (1.0,)
        self._needs_sync = True  # broadcast rank 0's model before step 0
        self._registered = False
        self._snapshot_at_s = 0.0
        self.recoveries = 0
        # A joining worker's state comes from a peer: (epoch, step, source rank) until
        # the snapshot has been received (after register(), which builds the model).
        self._pending_state: tuple[int, int, int, str] | None = None
        # Highest epoch seen that did not include this worker (a standby waits past it).
        self._passed_epoch = 0
        self.joined_once = False
        # Where this worker's state came from when it joined: "<worker> memory, step N".
        self.restored_from = ""
        self._state_source = ""  # set when fetched from a holder: "<holder> memory"
        self._prefetch: Any = None  # a joining worker's early fetch (_start_prefetch)
        # The step whose snapshot the parameters and optimizer state still equal (captured
        # at its start, no optimizer step since); None once the update begins.
        self._live_at: int | None = None
        self._persist = None
        if config.persist_dir:
            from splice.checkpoint.persist import PersistentStore
            from splice.checkpoint.sharded import ShardedCheckpoints

            self._persist = PersistentStore(config.persist_dir, job_id=config.job_id)
            self._sharded = ShardedCheckpoints(config.persist_dir, job_id=config.job_id)
        self._persisted_at = -1
        self._zero = False
        self._check_next = False  # every rank agreed (in a reduce) to check replicas next
        # The exact reduction's float64 accumulator, kept between steps (gradients.py).
        self._grad_acc: torch.Tensor | None = None
        self._members: tuple[str, ...] = ()
        self._zero_replica: dict[str, Any] | None = None
        self._zero_held: tuple[dict[str, Any], dict[str, Any]] | None = None
        if link is not None:
            # What fetching a peer's snapshot needs, imported now rather than in the
            # middle of a recovery (gRPC and the peer protocol: ~0.15 s on an idle core,
            # which delayed a replacement's prefetch by as much).
            import splice.agent.replication  # noqa: F401
            import splice.checkpoint.slotmeta  # noqa: F401
            import splice.controller.membership  # noqa: F401
            import splice.security  # noqa: F401

    # ---- membership ---------------------------------------------------------------------
    @property
    def rank(self) -> int:
        return self.group.rank

    @property
    def world_size(self) -> int:
        return self.group.world_size

    @property
    def epoch(self) -> int:
        return self.group.epoch

    def _on_membership(self, m: pb.Membership) -> None:
        """Reader thread: a newer epoch aborts this one's collectives immediately."""
        self.group.abort(f"epoch {m.epoch} announced: {m.reason}", below_epoch=m.epoch)

    def _on_agent_lost(self, why: str) -> None:
        """Reader thread: without its agent this worker cannot be steered, and the
        controller has already counted it lost. Fail the collective it may be blocked in;
        recovery then raises AgentLost instead of training on alone."""
        if self._link is not None:  # not a clean close()
            self.group.abort(f"agent lost: {why}", below_epoch=self.group.epoch + 1)

    def _join(self, why: str, deadline_s: float) -> None:
        """Join the newest membership: build its group, agree on the step, restore it.

        Loops when a newer membership supersedes the one being joined (a fault during the
        recovery): the half-built group is abandoned and the newer epoch joined instead.
        """
        while not self._join_newest(why, deadline_s):
            pass

    def _wait_link(self, predicate: Callable[[], bool], deadline_s: float) -> bool:
        assert self._link is not None
        return self._link.wait(predicate, max(0.0, deadline_s - time.monotonic()))

    def _join_newest(self, why: str, deadline_s: float) -> bool:
        """One attempt; True once joined, False if superseded and worth another attempt."""
        link = self._link
        assert link is not None
        current = max(self.group.epoch, self._passed_epoch)
        if not self._wait_link(lambda: link.membership_newer_than(current) is not None,
                               deadline_s):
            raise RecoveryFailed(f"no new membership within the timeout after: {why}")
        m = link.membership_newer_than(current)
        assert m is not None
        self._drop_prefetch()  # one begun for an older epoch
        if self.worker_id not in m.members:
            if not self.joined_once:  # a standby: wait until a membership takes it in
                self._passed_epoch = m.epoch
                return False
            raise Evicted(f"epoch {m.epoch} does not include {self.worker_id}: {m.reason}")
        epoch = m.epoch
        spec = EpochSpec(epoch=epoch, rank=list(m.members).index(self.worker_id),
                         world_size=len(m.members), store_host=m.store_host,
                         store_port=m.store_port, store_prefix=m.store_prefix)
        build = self.group.begin_build(spec, on_done=link.notify)
        if not m.initial:
            if not self._registered and not self._snapshots.steps():
                self._adopt_predecessor()
            persisted = self._newest_persisted()
            intact = self._intact_steps()
            link.send(lpb.WorkerToAgent(recovery_ready=pb.RecoveryReady(
                worker_id=self.worker_id, epoch=epoch,
                snapshot_steps=intact, has_persisted=persisted is not None,
                persisted_step=persisted or 0)))
            if not self.joined_once:  # joining: with no state, or its predecessor's
                self._start_prefetch(m, max(intact) + 1 if intact else 0)

        def superseded() -> bool:
            return link.membership_newer_than(epoch) is not None

        def settled() -> bool:
            return superseded() or (build.done.is_set()
                                    and (m.initial or link.resume_for(epoch) is not None))

        if not self._wait_link(settled, deadline_s):
            raise RecoveryFailed(f"epoch {epoch} did not settle in time after: {why}")
        if superseded():
            log.info("epoch %d superseded while joining; moving on", epoch)
            return False
        if build.error is not None:
            # A peer vanished while the group formed; its loss makes a newer epoch.
            log.warning("building the group of epoch %d failed (%s); waiting for the next "
                        "membership", epoch, build.error)
            if not self._wait_link(superseded, deadline_s):
                raise RecoveryFailed(f"group of epoch {epoch} failed: {build.error}")
            return False
        self.group.adopt(build)
        newer = link.membership_newer_than(epoch)
        if newer is not None:  # raced with the adopt: abort what was just adopted
            self.group.abort(f"epoch {newer.epoch} announced", below_epoch=newer.epoch)
            return False
        self._shares = tuple(m.shares) or (1.0,) * len(m.members)
        self._members = tuple(m.members)
        self.joined_once = True
        self._check_next = False  # a request agreed in the old epoch is dropped alike
        if m.initial:
            self.step = 0
            self._needs_sync = True
            persisted = self._newest_persisted()
            if persisted is None:
                return True
            # A cold start of a job that has a persistent checkpoint: resume from it.
            self._pending_state = (epoch, persisted, -1, "disk")
            self.step = persisted
            log.info("worker %s: cold start from the persistent checkpoint of step %d",
                     self.worker_id, persisted)
            return True if not self._registered else self._receive_state()
        resume = link.resume_for(epoch)
        assert resume is not None
        members = list(m.members)
        mine = [t for t in resume.transfers if t.to_worker == self.worker_id]
        if not (mine and mine[0].holders):
            self._drop_prefetch()  # its state comes another way
        if resume.from_disk:
            log.error("worker %s: no in-memory snapshot is left anywhere; loading the "
                      "persistent checkpoint of step %d (%s)", self.worker_id, resume.step,
                      resume.reason)
            self._pending_state = (epoch, resume.step, -1, "disk")
            self.step = resume.step
            return True if not self._registered else self._receive_state()
        if mine and mine[0].holders:
            # Its state comes from the holders' agents, out of their shared memory.
            src = mine[0].from_worker
            self._fetch_state(resume.step, mine[0].holders)
            self._pending_state = (epoch, resume.step, ADOPTED, src)
            self.step = resume.step
            log.info("worker %s: epoch %d, rank %d of %d, joins at step %d with %s's "
                     "snapshot", self.worker_id, epoch, self.rank, self.world_size,
                     resume.step, src)
            return True if not self._registered else self._receive_state()
        if mine:
            src = mine[0].from_worker
            self._pending_state = (epoch, resume.step, members.index(src), src)
            self.step = resume.step
            log.info("worker %s: epoch %d, rank %d of %d, joins at step %d with %s's "
                     "snapshot", self.worker_id, epoch, self.rank, self.world_size,
                     resume.step, src)
            if not self._registered:
                return True  # register() receives it, once the model exists
            return self._receive_state()
        if not self._registered:  # a newcomer holding the step: its predecessor's snapshot
            self._pending_state = (epoch, resume.step, ADOPTED, "")
            self.step = resume.step
            return True
        self._restore(resume.step)
        log.info("worker %s: epoch %d, rank %d of %d, resuming at step %d (%s)",
                 self.worker_id, epoch, self.rank, self.world_size, resume.step,
                 resume.reason)
        for t in resume.transfers:
            if t.from_worker == self.worker_id and not t.holders:
                if not self._send_state(members.index(t.to_worker), t.to_worker):
                    return False
        if self._zero:
            return self._zero_reshard()
        return True

    # ---- registration -------------------------------------------------------------------
    def register(self, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                 dataset: Sequence[Any], loss_fn: Callable[[nn.Module, Any], torch.Tensor],
                 global_batch_size: int, micro_batch_size: int, seed: int = 0,
                 collate_fn: Callable[[list[Any]], Any] | None = None,
                 ddp: bool = False, exact_reduction: bool = True,
                 sdc_check_every_steps: int = 0) -> None:
        """Hand the hook what it snapshots, restores and steps.

        `loss_fn(model, batch)` returns the mean loss over `batch`; the hook weights it by
        the micro-batch's size so gradients are the mean over the global batch. With
        `ddp=True` the model is wrapped in DistributedDataParallel whose gradient buckets
        are reduced by this session's abortable group. `exact_reduction` (default, not
        with DDP) accumulates and reduces gradients in float64 so that results do not
        depend on the world size; turn it off to reduce in the parameters' dtype.
        `sdc_check_every_steps` (0: off) compares fingerprints of every replica's model
        and optimizer state at the start of every N-th step, before any gradient is
        exchanged: with N = 1 a corrupted replica never contaminates the others.
        """
        if sdc_check_every_steps < 0:
            raise ValueError(f"sdc_check_every_steps must be >= 0, got {sdc_check_every_steps}")
        self.sdc_every = sdc_check_every_steps
        if self._registered:
            raise RuntimeError("register() was already called on this session")
        if len(dataset) == 0:
            raise ValueError("dataset is empty")
        self.batch = BatchConfig(global_batch_size=global_batch_size,
                                 micro_batch_size=micro_batch_size)
        self.model = model
        self.optimizer = optimizer
        self._on_gpu = any(p.is_cuda for p in model.parameters())
        self.dataset = dataset
        self.loss_fn = loss_fn
        self.seed = seed
        self.exact_reduction = exact_reduction
        self.collate_fn = collate_fn or torch.utils.data.default_collate
        self._perm_cache: dict[int, torch.Tensor] = {}
        from splice.agent.worker.zero import ShardedAdamW

        self._zero = isinstance(optimizer, ShardedAdamW)
        if self._zero and optimizer.group is not self.group:  # type: ignore[attr-defined]
            raise ValueError("create ShardedAdamW over session.group")
        # A sharded optimizer's snapshot (the state before step k) also carries a replica
        # of the previous rank's shard, so a lost rank's optimizer state survives.
        self.ddp: nn.parallel.DistributedDataParallel | None = None
        if ddp:
            from splice.agent.worker.ddp import wrap_ddp
            self.ddp = wrap_ddp(model, self.group)
        self._registered = True
        if self._pending_state is not None:
            # Joined a running job: the state comes from a peer's memory. Checked when it
            # arrived, it is checked again: building the model may have taken a while.
            self._snapshots.forget_checks()
            while not self._receive_state():
                self._join("receiving the joining state failed",
                           time.monotonic() + self.config.recovery_timeout_s)
                if self._pending_state is None:
                    break
        else:
            # Snapshot of step 0 exists before any collective, so a fault during the first
            # step still leaves every member a common step to resume from.
            self._capture(0)
        # The capture has read the state before the caller's code can change it.
        self._snapshots.wait_copied()

    # ---- data ---------------------------------------------------------------------------
    def _sample_index(self, position: int) -> int:
        n = len(self.dataset)
        data_epoch, offset = divmod(position, n)
        perm = self._perm_cache.get(data_epoch)
        if perm is None:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + data_epoch)
            perm = torch.randperm(n, generator=g)
            self._perm_cache = {data_epoch: perm}
        return int(perm[offset])

    def my_micro_batches(self) -> range:
        return assign_micro_batches(self.batch.num_micro_batches, self._shares)[self.rank]

    # ---- the step -----------------------------------------------------------------------
    def run_step(self) -> StepResult | None:
        """Run one optimizer step; None if a fault interrupted it (the session has then
        recovered and `step` is the consistent step to run next)."""
        if not self._registered:
            raise RuntimeError("call register() before run_step()")
        t0 = time.perf_counter()
        self.group.take_stats()  # what an aborted step left behind does not count
        try:
            if self._needs_sync:
                self.group.check()
                self._sync_from_rank0()
            # The snapshot first: the state is that of the step's start even when a fault
            # was announced since the last step ended, and a member interrupted here then
            # still holds the newest step its peers hold (no rollback, and a newcomer's
            # prefetch of the newest is of the resume step).
            self._capture(self.step)
            self.group.check()
            self._live_at = self.step  # the live state is that snapshot's until the update
            self._snapshot_at_s = time.time()
            if (self._persist is not None and self.config.persist_every
                    and (self.rank == 0 or self._zero) and self.step > 0
                    and self.step % self.config.persist_every == 0
                    and self.step != self._persisted_at):
                # A private copy for the writer thread; the training thread goes on.
                tree = self._snapshots.restore(self.step)
                if self._zero:  # every rank writes its own shard (checkpoint/sharded.py)
                    tree["zero"]["replica"] = None
                    if self.rank:  # the model, the same on every rank, goes in rank 0's
                        tree["model"] = {}
                    self._sharded.save_async(self.step, self.world_size, self.rank, tree)
                else:
                    self._persist.save_async(self.step, tree)
                self._persisted_at = self.step
            if (self.sdc_every and self.step % self.sdc_every == 0) or self._check_next:
                self._check_next = False
                self._check_replicas()
            loss, num_samples = self._forward_backward()
            # The snapshot has read the state: on the GPU for GPU state, here for CPU
            # state (the helper thread is done); its size is known.
            self._snapshots.wait_copied()
            self._check_budget()
            self._live_at = None
            self.optimizer.step()
        except Exception as e:
            if not (isinstance(e, CollectiveAborted) or self.group.aborted is not None):
                raise
            self._recover(str(e))
            return None
        wait_s, num_bytes = self.group.take_stats()
        result = StepResult(self.step, loss, time.perf_counter() - t0, num_samples,
                            self.epoch, self.world_size, wait_s, num_bytes)
        self.step += 1
        if self.group.progress is not None:
            self.group.progress.step(self.step)
        self._report(result)
        return result

    def _sync_from_rank0(self) -> None:
        self._snapshots.wait_copied()
        tensors = [t for t in self.model.state_dict().values() if isinstance(t, torch.Tensor)]
        self.group.broadcast_tensors(tensors, src=0)
        self._needs_sync = False

    def _recover(self, why: str) -> None:
        if self._link is None:
            raise RecoveryFailed(f"collective failed outside any job: {why}")
        t0 = time.monotonic()
        log.warning("worker %s: step %d interrupted (%s); recovering", self.worker_id,
                    self.step, why)
        self._join(why, time.monotonic() + self.config.recovery_timeout_s)
        # A capture the recovery began has read the state before the caller's code runs.
        self._snapshots.wait_copied()
        self.recoveries += 1
        log.info("worker %s: recovered in %.3f s", self.worker_id, time.monotonic() - t0)

    def _report(self, r: StepResult) -> None:
        if self._link is None:
            return
        try:
            self._link.send(lpb.WorkerToAgent(step_report=pb.StepReport(
                worker_id=self.worker_id, epoch=r.epoch, step=r.step, loss=r.loss,
                step_time_s=r.step_time_s, completed_at_s=time.time(),
                num_samples=r.num_samples, compute_s=r.compute_s, wait_s=r.wait_s,
                collective_bytes=r.collective_bytes, snapshot_bytes=self._snapshots.num_bytes,
                snapshot_at_s=self._snapshot_at_s)))
        except AgentLost:
            log.warning("agent gone; training on without reporting")

    def train(self, num_steps: int, on_step: Callable[[StepResult], None] | None = None
              ) -> StepResult | None:
        """Run steps until `num_steps` have completed; returns the last result."""
        last = None
        while self.step < num_steps:
            r = self.run_step()
            if r is not None:
                last = r
                if on_step is not None:
                    on_step(r)
        return last

    def close(self) -> None:
        """Tell the agent this worker finished training (not a fault) and disconnect."""
        try:
            self._snapshots.synchronize()  # the last GPU snapshot lands in shared memory
        except Exception as e:  # a failed capture must not keep the agent from knowing
            log.error("worker %s: the last snapshot failed: %s", self.worker_id, e)
        link, self._link = self._link, None
        if link is not None:
            try:
                link.send(lpb.WorkerToAgent(finished=lpb.WorkerFinished(
                    worker_id=self.worker_id, step=self.step)))
            except AgentLost:
                pass
            link.close()
        self.group.close()
        if self._persist is not None:
            self._persist.close()
            self._sharded.close()


def init(config: HookConfig | None = None) -> Session:
    """Join the job this process was started for by `splice agent`, or, when not started
    by an agent, a one-rank session (handy for debugging and reference runs).

    Blocks until the controller has formed the initial membership."""
    env = os.environ
    path = env.get("SPLICE_AGENT_SOCKET")
    if config is None:
        config = HookConfig(gloo_host=env.get("SPLICE_GLOO_HOST", "127.0.0.1"),
                            persist_dir=env.get("SPLICE_PERSIST_DIR", ""),
                            persist_every=int(env.get("SPLICE_PERSIST_EVERY", "0") or 0),
                            job_id=env.get("SPLICE_JOB_ID", "default"),
                            snapshot_budget_bytes=int(float(
                                env.get("SPLICE_SNAPSHOT_BUDGET_MB", "0") or 0) * 1e6),
                            snapshot_dir=env.get("SPLICE_SNAPSHOT_DIR", ""),
                            tls_ca=env.get("SPLICE_TLS_CA", ""),
                            tls_cert=env.get("SPLICE_TLS_CERT", ""),
                            tls_key=env.get("SPLICE_TLS_KEY", ""))
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                            format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if not path:
        return Session(worker_id="standalone/0", link=None, config=config)
    # What a training script imports lazily on its first optimizer (torch's compiler stack,
    # seconds to load) is loaded before the worker says hello, which tells the controller
    # it is ready: a spare or a standby must not keep the running members waiting for it
    # when it is called in (it was loaded after the hello, and a standby node's workers
    # then joined a node loss's recovery 1.5 s late).
    import torch._dynamo  # noqa: F401
    wid = env["SPLICE_WORKER_ID"]
    holder: list[Session] = []
    link = AgentLink(path, wid,
                     on_membership=lambda m: holder[0]._on_membership(m) if holder else None,
                     on_closed=lambda why: holder[0]._on_agent_lost(why) if holder else None)
    session = Session(worker_id=wid, link=link, config=config)
    if env.get("SPLICE_PROGRESS_PATH"):
        session.group.progress = ProgressWriter(env["SPLICE_PROGRESS_PATH"])
        session.group.progress.start_heartbeat()
    holder.append(session)
    # A warm spare waits as long as the job runs: its agent promotes it when a worker dies.
    spare = env.get("SPLICE_SPARE") == "1"
    timeout_s = 1e8 if spare else config.join_timeout_s
    session._join("initial membership", time.monotonic() + timeout_s)
    return session
