"""Persistent checkpoints of a sharded optimizer: every rank writes its own shard.

With ZeRO-1 (agent/worker/zero.py) no rank holds the whole optimizer state, so the
checkpoint of a step is the set of every rank's snapshot of it: the model (the same on
every rank), the RNG state, and the rank's shard of the AdamW moments. Rank r of a W-rank
world writes through its own PersistentStore (persist.py: atomic, newest `keep` kept):

    root/<job_id>/zero/w<W>-r<r>/step-<step:012d>.ckpt|.json

(beside the unsharded checkpoints' files in root/<job_id>/; job ids cannot hold a "/", so
no job's directory is another's).

The directory names the layout, so a step's checkpoint is complete when all W ranks of
one world committed it, which is decided from the manifests alone (`complete`), without
reading any data. Each rank prunes its own directory to the newest `keep` steps, but never
a step from its world's newest complete one on: a rank whose disk lags cannot leave the
job without a complete checkpoint while it catches up. Loading it into another world size takes each new rank's range from the
old shards that overlap it: the files are read, never exchanged, so the filesystem must be
one every member can read (as for the unsharded checkpoint).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from splice.checkpoint.persist import PersistentStore, PersistError, _validate_job_id

log = logging.getLogger("splice.persist")

__all__ = ["ShardedCheckpoints"]

_STORE = re.compile(r"^w(\d+)-r(\d+)$")


class ShardedCheckpoints:
    """The sharded checkpoints of one job under `root`."""

    def __init__(self, root: str | os.PathLike[str], *, job_id: str = "default",
                 keep: int = 2) -> None:
        _validate_job_id(job_id)
        self.root = Path(root)
        self.job_id = job_id
        self.keep = keep
        self._base = self.root / job_id / "zero"
        self._writers: dict[tuple[int, int], PersistentStore] = {}

    @staticmethod
    def _store_name(world: int, rank: int) -> str:
        return f"w{world}-r{rank}"

    def _name(self, world: int, rank: int) -> str:
        return f"{self.job_id}/zero/{self._store_name(world, rank)}"

    def save_async(self, step: int, world: int, rank: int, tree: Any) -> None:
        """Queue rank `rank` of `world`'s snapshot of `step` (a private copy) and return."""
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in a world of {world}")
        store = self._writers.get((world, rank))
        if store is None:
            # A rank prunes nothing from its world's newest complete step on: a rank that
            # lags behind must not leave the job without any complete checkpoint.
            store = PersistentStore(self._base, job_id=self._store_name(world, rank),
                                    keep=self.keep, retain=lambda: self._newest_of(world))
            self._writers[(world, rank)] = store
        store.save_async(step, tree)

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until this process's queued saves are written (True) or `timeout_s` passed."""
        return all(s.flush(timeout_s) for s in self._writers.values())

    def close(self) -> None:
        for store in self._writers.values():
            store.close()

    def _reader(self, world: int, rank: int) -> PersistentStore:
        store = self._writers.get((world, rank))
        return store if store is not None else PersistentStore(
            self._base, job_id=self._store_name(world, rank), keep=self.keep, writer=False)

    def _newest_of(self, world: int) -> int | None:
        """The newest step all ranks of `world` committed, or None."""
        steps: set[int] | None = None
        for rank in range(world):
            held = {info.step for info in self._reader(world, rank).list()}
            steps = held if steps is None else steps & held
        return max(steps) if steps else None

    def complete(self) -> list[tuple[int, int]]:
        """(step, world) of every checkpoint all ranks of its world committed, oldest
        first (by their manifests; the data is checked when loaded)."""
        ranks: dict[int, set[int]] = {}
        try:
            names = [e.name for e in self._base.iterdir()] if self._base.is_dir() else []
        except OSError as e:
            raise PersistError(f"cannot list checkpoint directory {self._base}: {e}") from e
        for name in names:
            m = _STORE.match(name)
            if m is not None:
                ranks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
        out = []
        for world, present in ranks.items():
            if world < 1 or not set(range(world)) <= present:
                continue
            steps: set[int] | None = None
            for rank in range(world):
                held = {info.step for info in self._reader(world, rank).list()}
                steps = held if steps is None else steps & held
            out += [(step, world) for step in steps or ()]
        return sorted(out)

    def newest(self) -> tuple[int, int] | None:
        """(step, world) of the newest complete checkpoint, or None."""
        found = self.complete()
        return found[-1] if found else None

    def load(self, step: int, world: int, rank: int) -> dict[str, Any]:
        """Rank `rank`'s snapshot of `step` in the `world`-rank layout, verified, and
        checked to be what its name says."""
        tree = self._reader(world, rank).load(step)
        zero = tree.get("zero") if isinstance(tree, dict) else None
        if (not isinstance(zero, dict) or zero.get("world") != world
                or zero.get("rank") != rank or tree.get("step") != step):
            raise PersistError(
                f"checkpoint {self._name(world, rank)}/step-{step:012d} is not rank {rank} "
                f"of {world}'s sharded snapshot of step {step} (it says step "
                f"{tree.get('step') if isinstance(tree, dict) else '?'}, layout {zero!r:.80})")
        return tree

    def shards_over(self, step: int, world: int, ranges: Sequence[range], start: int,
                    stop: int) -> list[dict[str, Any]]:
        """The optimizer shards (`ShardedAdamW.state_dict()` form) of the old ranks whose
        range in the `world`-rank layout `ranges` overlaps [start, stop)."""
        if len(ranges) != world:
            raise ValueError(f"{len(ranges)} ranges for a world of {world}")
        out = []
        for rank, r in enumerate(ranges):
            if max(start, r.start) >= min(stop, r.stop):
                continue
            opt = self.load(step, world, rank)["optimizer"]
            if (opt.get("start"), opt.get("stop")) != (r.start, r.stop):
                raise PersistError(
                    f"checkpoint {self._name(world, rank)}/step-{step:012d} holds elements "
                    f"[{opt.get('start')}, {opt.get('stop')}), the layout says "
                    f"[{r.start}, {r.stop}): saved by a different model or alignment")
            out.append(opt)
        return out
