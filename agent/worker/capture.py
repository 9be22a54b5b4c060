"""The step's snapshot: what the state is at a step's start, and its capture into the
ring (checkpoint/snapshot.py) beside the step; the snapshots' memory budget.

A mixin of `Session` (agent/worker/session.py), split out by concept; it uses the session's
model, optimizer, batch plan, membership and snapshot ring.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import torch

from splice.checkpoint.shm import Frozen


class SnapshotBudgetExceeded(Exception):
    """The in-memory snapshots need more host memory than the configured budget."""


class StateCapture:
    def _state(self) -> dict[str, Any]:
        """The state now, its tensors the live ones."""
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                **self._volatile_state(self.step)}

    def _volatile_state(self, step: int) -> dict[str, Any]:
        """The part of the state a step changes before its optimizer step."""
        volatile: dict[str, Any] = {
            "rng": {"torch": torch.get_rng_state(), "python": Frozen(random.getstate())},
            "step": step, "samples_seen": step * self.batch.global_batch_size}
        if self._zero:
            volatile["zero"] = {"world": self.world_size, "rank": self.rank,
                                "replica": self._zero_replica,
                                "members": list(self._members)}
        return volatile

    def _capture(self, step: int) -> None:
        if self._zero and step not in self._snapshots.steps():
            self._zero_replica = self._ring_replica()
        self._snapshots.epoch = self.epoch
        if not self._on_gpu:
            # The state is walked, copied, checksummed and committed on the ring's helper
            # thread, beside this step's forward and backward passes; the optimizer step
            # (and anything else that changes the state) waits for it (`wait_copied`).
            self._snapshots.capture_in_background(step, self._state_later(step, False)[0])
            return
        if not self._zero:
            # Only the state's start is marked now: building it, committing the previous
            # slot and launching the copies wait until the backward pass is queued
            # (`flush`), hidden behind GPU work.
            state, clones = self._state_later(step, True)
            stable = self._stable_on_gpu() | {c.data_ptr() for c in clones.values()}
            self._snapshots.capture(step, state, stable, defer=True)
            return
        # GPU state (a sharded optimizer's): the copies launch after the backward pass.
        self._snapshots.capture(step, self._state(), self._stable_on_gpu(), defer=True)

    def _state_later(self, step: int, cuda: bool
                     ) -> tuple[Callable[[], dict[str, Any]], dict[str, torch.Tensor]]:
        """The state of `step`'s start, built when the function is called (later, or on
        another thread). What may change before the optimizer step is taken now: the RNG
        states, the sharded optimizer's membership, and the model's buffers (a forward
        pass may update them in place), cloned (`cuda`: only the CUDA ones, on the GPU;
        the others are read at the call); the function, and those clones."""
        clones: dict[str, torch.Tensor] = {}
        by_tensor: dict[int, torch.Tensor] = {}  # a module used twice: one clone, two names
        for name, b in self.model.named_buffers(remove_duplicate=False):
            if b.is_cuda or not cuda:
                clone = by_tensor.get(id(b))
                if clone is None:
                    clone = by_tensor[id(b)] = b.clone()
                clones[name] = clone
        volatile = self._volatile_state(step)

        def state() -> dict[str, Any]:
            st = {"model": self.model.state_dict(),
                  "optimizer": self.optimizer.state_dict(), **volatile}
            for name, c in clones.items():
                if name in st["model"]:
                    st["model"][name] = c
            return st

        return state, clones

    def _stable_on_gpu(self) -> frozenset[int]:
        """CUDA tensors of the state that nothing writes between a capture and the
        optimizer step (which waits for the snapshot): the parameters and the optimizer's
        state. The snapshot reads them in place; other CUDA tensors (buffers such as
        BatchNorm statistics, which the forward pass updates) are cloned first."""
        if not self._on_gpu:
            return frozenset()
        from splice.checkpoint.device_copy import optimizer_state, training_state_ptrs

        key = len(optimizer_state(self.optimizer))  # new state tensors: look again
        if self._stable is None or self._stable[0] != key:
            self._stable = (key, training_state_ptrs(self.model, self.optimizer))
        return self._stable[1]

    def _check_budget(self) -> None:
        budget = self.config.snapshot_budget_bytes
        used = self._snapshots.num_bytes
        if budget and used > budget:
            raise SnapshotBudgetExceeded(
                f"worker {self.worker_id}: its in-memory snapshots take {used / 1e6:.1f} MB "
                f"(the state of steps {self._snapshots.steps()}), over the budget of "
                f"{budget / 1e6:.1f} MB; raise --snapshot-budget-mb (or "
                f"HookConfig.snapshot_budget_bytes) or shrink the state")
