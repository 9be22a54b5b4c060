"""Where a worker's state comes from: its own snapshots (restored whole, or only what an
interrupted step changed, and loaded into the model and optimizer); when it holds none of
the step, a peer's memory (a joining worker: sent over the group here, fetched from the
peer's agent in agent/worker/peer_fetch.py), the persistent checkpoint (a cold start, or every in-memory
copy lost), and, for a sharded optimizer, the shards other ranks hold (resharding after a
membership change). Also which of its own snapshots a worker may still offer.

A newcomer that takes a dead worker's place on the same node adopts the snapshots that
worker left in shared memory (checkpoint/shm.py): no transfer at all.

A mixin of `Session` (agent/worker/session.py), split out by concept; it uses the session's
group, link, snapshots, model and optimizer.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence
from typing import Any

import torch

from splice.agent.worker.group import CollectiveAborted
from splice.checkpoint.snapshot import tensor_bytes

log = logging.getLogger("splice.worker")

# `Session._pending_state`'s source rank for state this worker holds itself: the snapshot
# its predecessor left in shared memory (-1 is the persistent checkpoint).
ADOPTED = -2


class RecoveryFailed(Exception):
    """No usable membership arrived in time after a fault; the job cannot go on here."""


def replica_shift(members: Sequence[str]) -> int:
    """Rank r's optimizer shard is replicated on rank (r + shift) % world: the smallest
    shift that puts every replica on another node than its original (so losing a whole
    node loses no shard), or 1 when there is no such shift (one node)."""
    from splice.controller.membership import node_of

    world = len(members)
    nodes = [node_of(w) for w in members]
    for shift in range(1, world):
        if all(nodes[r] != nodes[(r + shift) % world] for r in range(world)):
            return shift
    return 1


class StateSources:
    # ---- its own snapshots, loaded ----------------------------------------------------
    def _restore(self, step: int) -> None:
        if step == self._live_at and not self._zero:
            # Interrupted in this very step before its optimizer step: the parameters and
            # the optimizer's state are still the snapshot's. Only what the step changed
            # goes back (buffers such as BatchNorm's statistics, the RNG states), which
            # spares copying and checking the bulk of the state on the way back.
            live = self._parameter_keys()
            self._load(self._snapshots.restore(step, keep=lambda path: not (
                path.startswith("optimizer.") or path in live)), rewind=True)
        else:
            self._load(self._snapshot_to_load(step))
        self._snapshots.discard_after(step)

    def _snapshot_to_load(self, step: int) -> dict[str, Any]:
        """The snapshot of `step`, checked, for `_load`: the model's tensors are the ring's
        own (loading copies them into the model's), the rest private copies (the optimizer
        keeps the tensors it is given). One copy of the model's bytes fewer than
        `restore`. The model's tensors are not checked again if the whole snapshot was
        since it was taken or adopted (a fetched one, or one offered to the recovery)."""
        ring = self._snapshots
        snap = ring.restore(step, keep=lambda path: not path.startswith("model."))
        ring.verify(step, keep=lambda path: path.startswith("model."), again=False)
        held = ring.buffers(step)
        snap["model"] = {k: held[f"model.{k}"] if v is None else v
                         for k, v in snap["model"].items()}
        return snap

    def _parameter_keys(self) -> set[str]:
        """The snapshot paths ("model.<key>") of the model's state-dict entries that are
        parameters (tied ones under each of their names)."""
        ptrs = {p.data_ptr() for p in self.model.parameters()}
        return {f"model.{k}" for k, v in self.model.state_dict().items()
                if isinstance(v, torch.Tensor) and v.data_ptr() in ptrs}

    def _load(self, snap: dict[str, Any], rewind: bool = False) -> None:
        """Load a snapshot; `rewind`: a partial one (`_restore`), whose parameters and
        optimizer state (None in it) the live ones still equal."""
        self._snapshots.synchronize()  # no GPU copy may still be reading what is loaded
        step = snap["step"]
        if rewind:
            self.model.load_state_dict({k: v for k, v in snap["model"].items()
                                        if v is not None}, strict=False)
        else:
            self._stable = None  # loading may replace the optimizer's state tensors
            self.model.load_state_dict(snap["model"])
            if self._zero:  # the shard layout may have changed: _zero_reshard loads it
                self._zero_held = (snap["optimizer"], snap["zero"])
            else:
                self.optimizer.load_state_dict(snap["optimizer"])
            self._live_at = step
        # A private contiguous copy: set_rng_state crashes on a view with a storage offset
        # (a received snapshot's tensors are views of one flat buffer).
        torch.set_rng_state(snap["rng"]["torch"].clone())
        random.setstate(snap["rng"]["python"].value)
        self.step = step
        if self.ddp is not None:
            from splice.agent.worker.ddp import reset_ddp
            reset_ddp(self.ddp, self.group)
        self._needs_sync = step == 0

    # ---- state for joining members ------------------------------------------------------
    def _send_state(self, dst: int, to_worker: str) -> bool:
        """Send this rank's state (just restored: the snapshot of the resume step) to a
        joining member. False if the epoch broke meanwhile (a newer one follows)."""
        from splice.checkpoint.codec import pack_state

        t0 = time.perf_counter()
        head, flat = pack_state(self._state())
        try:
            self.group.send_bytes(head, dst, tag=0)
            self.group.send_buffer(flat, dst, tag=1)
        except CollectiveAborted as e:
            log.warning("sending state to %s failed (%s); waiting for the next membership",
                        to_worker, e)
            return False
        log.info("worker %s: sent %.1f MB of step-%d state to %s (rank %d) in %.3f s",
                 self.worker_id, flat.numel() / 1e6, self.step, to_worker, dst,
                 time.perf_counter() - t0)
        return True

    def _receive_state(self) -> bool:
        """Receive and load the state a peer sends this joining worker. False if the epoch
        broke meanwhile; a snapshot that fails its checksum is an error, never loaded."""
        from splice.checkpoint.codec import CorruptState, unpack_state

        assert self._pending_state is not None
        epoch, step, src, src_worker = self._pending_state
        if self.group.epoch != epoch:
            return False
        t0 = time.perf_counter()
        if src == ADOPTED:
            return self._load_adopted(step)
        if src < 0:
            return self._load_persisted(step)
        try:
            head = self.group.recv_bytes(src, tag=0, max_bytes=1 << 30)
            flat = self.group.recv_buffer(src, tag=1)
        except CollectiveAborted as e:
            log.warning("receiving state from %s failed (%s); waiting for the next "
                        "membership", src_worker, e)
            return False
        try:
            snap = unpack_state(head, flat)
        except CorruptState as e:
            raise RecoveryFailed(f"the state {src_worker} sent is corrupt: {e}") from e
        if snap.get("step") != step:
            raise RecoveryFailed(f"{src_worker} sent the state of step {snap.get('step')}, "
                                 f"expected step {step}")
        self._load(snap)
        self._snapshots.discard_after(-1)
        self._pending_state = None
        self.restored_from = f"{src_worker} memory, step {step}"
        if self._zero:
            self._zero_held = None  # the sender's shards are the sender's, not ours
            if not self._zero_reshard():
                return False
        else:
            self._capture(step)
        log.info("worker %s: loaded %.1f MB of step-%d state from %s in %.3f s",
                 self.worker_id, flat.numel() / 1e6, step, src_worker,
                 time.perf_counter() - t0)
        return True

    def _adopt_predecessor(self) -> None:
        """A newcomer taking a dead worker's place on this node: the agent has handed it
        that worker's snapshot directory; adopt what it holds (verified before it is
        offered, like any held snapshot)."""
        t0 = time.perf_counter()
        steps = self._snapshots.adopt()
        if steps:
            log.info("worker %s: adopted the snapshots of steps %s that %s left in this "
                     "node's shared memory (%.1f MB, %.3f s)", self.worker_id, steps,
                     self._snapshots.adopted_from, self._snapshots.num_bytes / 1e6,
                     time.perf_counter() - t0)

    def _load_adopted(self, step: int) -> bool:
        """Load the adopted snapshot of `step` (checked against its checksums)."""
        from splice.checkpoint.snapshot import SnapshotCorrupt

        assert self._pending_state is not None
        t0 = time.perf_counter()
        try:
            snap = self._snapshot_to_load(step)
        except SnapshotCorrupt as e:
            raise RecoveryFailed(f"the adopted snapshot of step {step} is corrupt: {e}") from e
        self._load(snap)
        self._snapshots.discard_after(step)
        self._pending_state = None
        fetched = bool(self._state_source)  # a holder's snapshot, not a predecessor's
        source = self._state_source or f"{self._snapshots.adopted_from} shared memory"
        self._state_source = ""
        self.restored_from = f"{source}, step {step}"
        log.info("worker %s: loaded %.1f MB of step-%d state from %s in %.3f s",
                 self.worker_id, tensor_bytes(snap) / 1e6, step, source,
                 time.perf_counter() - t0)
        if self._zero:
            if fetched:
                self._zero_held = None  # a holder's shards are the holder's, not ours
            return self._zero_reshard()
        return True

    def _ring_replica(self) -> dict[str, Any] | None:
        """Each rank sends its optimizer shard to the rank `replica_shift` places on (on
        another node) and keeps the shard of the rank as far behind (k = 1 replication,
        one point-to-point exchange per snapshot)."""
        from splice.controller.resharding import partition

        opt: Any = self.optimizer
        world, rank = self.world_size, self.rank
        if world == 1:
            return None
        shift = replica_shift(self._members)
        prev = (rank - shift) % world
        shard = partition(opt.flat.numel(), world, opt.align)[prev]
        mine = torch.stack([opt._exp_avg, opt._exp_avg_sq])
        theirs = torch.empty(2, len(shard))
        self.group.exchange(mine, (rank + shift) % world, theirs, prev, tag=7)
        return {"start": shard.start, "stop": shard.stop, "step": opt.num_steps,
                "exp_avg": theirs[0], "exp_avg_sq": theirs[1]}

    def _zero_reshard(self) -> bool:
        """After a membership change: every rank takes its shard of the new layout from
        what the members hold (their own old shard and the replica of the previous rank's),
        exchanging exactly the ranges that move. False if the epoch broke meanwhile."""
        from splice.agent.worker.zero import (
            ShardStateLost,
            StateShard,
            exchange_over,
            read_range,
        )
        from splice.controller.resharding import partition, plan_reshard

        opt: Any = self.optimizer
        held: list[StateShard] = []
        old_world = 0
        old_members: list[str] | None = None
        if self._zero_held is not None:
            own, zinfo = self._zero_held
            old_world = int(zinfo["world"])
            old_members = zinfo.get("members")
            held.append(StateShard(own["start"], own["stop"], own["step"], own["exp_avg"],
                                   own["exp_avg_sq"]))
            if zinfo.get("replica") is not None:
                r = zinfo["replica"]
                held.append(StateShard(r["start"], r["stop"], r["step"], r["exp_avg"],
                                       r["exp_avg_sq"]))
        try:
            agree = torch.tensor([float(old_world), float(bool(held))], dtype=torch.float64)
            self.group.all_reduce(agree)
            if agree[1].item() == 0:
                raise RecoveryFailed("no member holds any optimizer shard")
            old_world = round(agree[0].item() / agree[1].item())
            holdings = torch.zeros(self.world_size, old_world, dtype=torch.float64)
            for h in held:
                old = partition(opt.flat.numel(), old_world, opt.align)
                holdings[self.rank, next(s for s, rg in enumerate(old)
                                         if (rg.start, rg.stop) == (h.start, h.stop))] = 1
            self.group.all_reduce(holdings)
            holders = {s: [n for n in range(self.world_size) if holdings[n, s] > 0]
                       for s in range(old_world)}
            plan = plan_reshard(partition(opt.flat.numel(), old_world, opt.align), holders,
                                partition(opt.flat.numel(), self.world_size, opt.align))
            fallback = None
            if plan.missing:  # a shard lost with its in-step replica: an agent's replica?
                found = self._zero_replica_shards(plan, old_members)
                if isinstance(found, int):  # every member rolled back to that step
                    return self._zero_reshard()
                if found is not None:
                    step = self.step
                    fallback = lambda a, b: StateShard(  # noqa: E731
                        a, b, step, *read_range(found, a, b))
            opt.reshard(plan, exchange_over(self.group, plan), held, step=self.step,
                        fallback=fallback)
        except CollectiveAborted as e:
            log.warning("resharding the optimizer state failed (%s); waiting for the next "
                        "membership", e)
            return False
        except ShardStateLost as e:
            self._zero_held = None
            return self._zero_from_disk(str(e))
        self._zero_held = None
        log.info("worker %s: optimizer shard of rank %d/%d from the %d-rank layout (the "
                 "plan keeps %d elements in place, moves %d)", self.worker_id, self.rank,
                 self.world_size, old_world, plan.elems_kept, plan.elems_sent)
        # Every member re-snapshots the resume step in the new layout.
        self._snapshots.discard_after(-1)
        try:
            self._capture(self.step)
        except CollectiveAborted:
            return False
        return True

    def _zero_replica_shards(self, plan: Any, old_members: Sequence[str] | None
                             ) -> list[Any] | int | None:
        """The lost old ranks' optimizer shards from the replicas the members' agents hold
        (agent --replicas), at a step every member agrees on: the resume step, or the one
        before it, which every member still holds (then they all roll back to it and this
        returns that step, to be resharded again). For the shards this rank needs, fetched
        and checked; None (every member alike) when the replicas cannot cover the loss."""
        from splice.agent import replication
        from splice.agent.worker.zero import StateShard
        from splice.agent.worker.zero_replicas import fetch_shard, replica_steps

        lost = sorted({g.old_rank for g in plan.missing})
        candidates = [self.step, self.step - 1]
        ok = [0.0, 0.0]
        where: dict[str, dict[int, list[str]]] = {}
        credentials, bulk_tls = self._peer_credentials(), self._peer_bulk_tls()
        if old_members is not None and len(old_members) == len(plan.old):
            workers = [old_members[s] for s in lost]
            m = self._link.latest_membership() if self._link is not None else None
            where = replica_steps([a.snapshot_address for a in (m.agents if m else ())
                                   if a.snapshot_address], self.config.job_id, workers,
                                  credentials=credentials)
            ring = set(self._snapshots.steps())
            ok = [1.0 if c >= 0 and c in ring and all(c in where[w] for w in workers)
                  else 0.0 for c in candidates]
        flags = torch.tensor(ok, dtype=torch.float64)
        self.group.all_reduce(flags)
        agreed = [c for c, f in zip(candidates, flags.tolist(), strict=True)
                  if f == self.world_size]
        if not agreed:
            return None
        step = agreed[0]
        if step != self.step:
            log.warning("worker %s: optimizer shards of old ranks %s are in no member's "
                        "memory; agents hold replicas of step %d: every member goes back "
                        "to it", self.worker_id, lost, step)
            self._restore(step)
            return step
        assert old_members is not None
        shards, failed = [], 0.0
        for s in sorted({g.old_rank for g in plan.missing if g.dst_rank == self.rank}):
            w = old_members[s]
            try:
                d = fetch_shard(where[w][step], self.config.job_id, w, step,
                                credentials=credentials, bulk_tls=bulk_tls)
                if (d["start"], d["stop"]) != (plan.old[s].start, plan.old[s].stop):
                    raise ValueError(f"it holds elements [{d['start']}, {d['stop']}), old "
                                     f"rank {s} held [{plan.old[s].start}, "
                                     f"{plan.old[s].stop})")
            except (replication.ReplicationError, ValueError) as e:
                log.error("worker %s: the replica of %s's optimizer shard is not usable: %s",
                          self.worker_id, w, e)
                failed = 1.0
                continue
            shards.append(StateShard(d["start"], d["stop"], d["step"], d["exp_avg"],
                                     d["exp_avg_sq"]))
            log.info("worker %s: optimizer shard of old rank %d (%s) from an agent's replica "
                     "of step %d", self.worker_id, s, w, step)
        verdict = torch.tensor([failed], dtype=torch.float64)
        self.group.all_reduce(verdict)
        return shards if verdict.item() == 0 else None

    def _intact_steps(self) -> list[int]:
        """Snapshot steps whose checksums still verify. A corrupted one is dropped (the
        ring forgets it) and not offered: the controller then resumes at a step this
        worker holds intact, or has a peer send it one."""
        from splice.checkpoint.snapshot import SnapshotCorrupt

        try:
            held = self._snapshots.steps()
        except Exception as e:  # the interrupted step's capture failed: it is not held
            log.error("worker %s: the last snapshot failed: %s", self.worker_id, e)
            held = self._snapshots.steps()
        intact = []
        for step in held:
            try:
                self._snapshots.verify(step)
            except SnapshotCorrupt as e:
                log.error("worker %s: %s", self.worker_id, e)  # verify() dropped it
                continue
            intact.append(step)
        return intact

    def _persisted_steps(self) -> list[int]:
        """The steps of this optimizer's kind of persistent checkpoint, oldest first."""
        if self._persist is None:
            return []
        if self._zero:
            return sorted({s for s, _ in self._sharded.complete()})
        return [i.step for i in self._persist.list()]

    def _newest_persisted(self) -> int | None:
        """The newest persistent checkpoint's step: the whole snapshot rank 0 writes, or a
        sharded optimizer's, every rank's shard (checkpoint/sharded.py)."""
        if self._persist is None:
            return None
        # A registered session reads its own kind; before register() (a cold start) it
        # cannot tell, and a job has only one kind unless its optimizer changed.
        zero = self._zero if self._registered else None
        held = [] if zero else [i.step for i in self._persist.list()]
        sharded = None if zero is False else self._sharded.newest()
        if sharded is not None:
            held.append(sharded[0])
        return max(held) if held else None

    def _load_persisted(self, step: int) -> bool:
        """Load the persistent checkpoint of `step` (verified), agreeing with every member
        on the outcome and the step. If any member cannot read its files, all of them try
        the next older checkpoint, loudly; with none left, all fail alike (none is left
        waiting in a collective for one that gave up)."""
        from splice.checkpoint.persist import PersistError

        assert self._persist is not None
        t0 = time.perf_counter()
        tried: list[str] = []
        try:
            while True:
                error: PersistError | None = None
                try:
                    if self._zero:
                        self._load_sharded(step)
                    else:
                        self._load(self._persist.load(step))
                except PersistError as e:
                    error = e
                v = torch.tensor([float(error is not None), float(step), float(step) ** 2,
                                  1.0], dtype=torch.float64)
                self.group.all_reduce(v)
                failed, s1, s2, n = v.tolist()
                if s1 != step * n or s2 != float(step) ** 2 * n:
                    raise RecoveryFailed(f"members loaded different persistent checkpoints "
                                         f"(mean step {s1 / n}, mine {step})")
                if not failed:
                    break
                why = (str(error) if error is not None else
                       f"{int(failed)} other member(s) could not (see their logs)")
                tried.append(f"step {step}: {why}")
                older = [s for s in self._persisted_steps() if s < step]
                if not older:
                    raise RecoveryFailed("cannot load any persistent checkpoint: "
                                         + "; ".join(tried))
                log.error("worker %s: cannot load the persistent checkpoint of step %d (%s); "
                          "every member tries the older one of step %d", self.worker_id,
                          step, why, older[-1])
                step = older[-1]
                self.step = step
            self._snapshots.discard_after(-1)
            self._pending_state = None
            self.restored_from = f"disk, step {step}"
            self._capture(step)  # a sharded optimizer exchanges its replicas here
        except CollectiveAborted:
            return False
        self._needs_sync = False
        log.info("worker %s: loaded the persistent checkpoint of step %d in %.3f s",
                 self.worker_id, step, time.perf_counter() - t0)
        return True

    def _load_sharded(self, step: int) -> None:
        """A sharded optimizer's checkpoint of `step`, saved by a world of any size: the
        model and RNG from one rank's file, this rank's shard of the new layout from the
        files of the old shards it overlaps (PersistError if any is missing or damaged)."""
        from splice.agent.worker.zero import StateShard, read_range
        from splice.checkpoint.persist import PersistError
        from splice.controller.resharding import partition, plan_reshard

        worlds = [w for s, w in self._sharded.complete() if s == step]
        if not worlds:
            raise PersistError(f"no sharded checkpoint of step {step} with every rank's "
                               f"shard under {self._sharded.root} (complete: "
                               f"{self._sharded.complete()}); a job without ShardedAdamW "
                               "writes the unsharded kind")
        world = worlds[-1]
        # Rank 0's file alone holds the model (the same on every rank); each rank's holds
        # its RNG state and shard.
        snap = self._sharded.load(step, world, self.rank % world)
        if self.rank % world:
            snap["model"] = self._sharded.load(step, world, 0)["model"]
        self._load(snap)
        self._zero_held = None
        opt: Any = self.optimizer
        old = partition(opt.flat.numel(), world, opt.align)
        plan = plan_reshard(old, {s: [] for s in range(world)},
                            partition(opt.flat.numel(), self.world_size, opt.align))

        def from_files(start: int, stop: int) -> StateShard:
            shards = [StateShard(d["start"], d["stop"], d["step"], d["exp_avg"],
                                 d["exp_avg_sq"])
                      for d in self._sharded.shards_over(step, world, old, start, stop)]
            if any(sh.step != snap["optimizer"]["step"] for sh in shards):
                raise PersistError(f"the shards of step {step} disagree on the update count: "
                                   f"{sorted({sh.step for sh in shards})}")
            both = read_range(shards, start, stop)
            return StateShard(start, stop, shards[0].step, both[0], both[1])

        try:
            opt.reshard(plan, lambda outgoing: {}, [], step=snap["optimizer"]["step"],
                        fallback=from_files)
        except ValueError as e:
            raise PersistError(f"the sharded checkpoint of step {step} does not fit this "
                               f"model: {e}") from e
        log.info("worker %s: optimizer shard of rank %d/%d read from the %d-rank sharded "
                 "checkpoint of step %d", self.worker_id, self.rank, self.world_size, world,
                 step)

    def _zero_from_disk(self, why: str) -> bool:
        """Some optimizer shard has no copy left in any member's memory (every rank
        concludes this alike, from the same agreed holdings): every member goes back to
        the newest sharded checkpoint. False if the epoch broke meanwhile."""
        if self._persist is None:
            raise RecoveryFailed(f"optimizer state lost with every copy: {why}; no "
                                 "persistent checkpoint to fall back to (--persist-dir, "
                                 "--persist-every)")
        self._sharded.flush(self.config.recovery_timeout_s)
        try:  # every member's own queued saves are on disk before anyone looks
            self.group.all_reduce(torch.zeros(1, dtype=torch.float64))
        except CollectiveAborted:
            return False
        newest = self._sharded.newest()
        if newest is None:
            raise RecoveryFailed(f"optimizer state lost with every copy: {why}; and no "
                                 f"complete sharded checkpoint under {self._sharded.root}")
        step = newest[0]
        log.error("worker %s: FALLBACK TO DISK: optimizer state lost with every in-memory "
                  "copy (%s); every member goes back to the persistent checkpoint of step %d",
                  self.worker_id, why, step)
        self.step = step
        return self._load_persisted(step)
