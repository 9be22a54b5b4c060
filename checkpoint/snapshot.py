"""Per-step in-memory snapshots, double-buffered: the last two steps' state, kept locally.

A snapshot of step k is the state before step k runs. Capturing step k+1 overwrites the
slot of step k-1, never the one of step k, so a complete snapshot of the newer step always
exists before the older one is touched. Tensors are copied into buffers allocated once per
slot, so steady-state capture is a plain memcpy with no allocation.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch


class Frozen:
    """An immutable value kept by reference in a snapshot (no copy, no walk): e.g. the
    Python RNG state, a tuple of 625 ints that would otherwise be walked every step."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


_SCALARS = (int, float, str, bool, bytes, type(None), Frozen)


class SnapshotMissing(Exception):
    """No snapshot of the requested step is held here; ask a peer or the persistent store."""


@dataclass
class _Slot:
    step: int = -1
    tree: Any = None
    num_bytes: int = 0


def _copy_into(value: Any, old: Any, size: list[int]) -> Any:
    """Deep-copy `value`, reusing tensors of `old` (same structure) as copy targets, and
    add the bytes of the tensors copied to `size[0]`."""
    if isinstance(value, _SCALARS):
        return value
    if isinstance(value, torch.Tensor):
        size[0] += value.numel() * value.element_size()
        if (isinstance(old, torch.Tensor) and old.shape == value.shape
                and old.dtype == value.dtype and old.device == value.device):
            old.copy_(value.detach())
            return old
        return value.detach().clone()
    if isinstance(value, Mapping):
        prev = old if isinstance(old, dict) else {}
        return {k: _copy_into(v, prev.get(k), size) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        prev_seq = old if isinstance(old, (list, tuple)) and len(old) == len(value) else None
        items = [_copy_into(v, prev_seq[i] if prev_seq is not None else None, size)
                 for i, v in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    return copy.deepcopy(value)


def _clone(value: Any) -> Any:
    if isinstance(value, _SCALARS):
        return value
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, Mapping):
        return {k: _clone(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clone(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_clone(v) for v in value)
    return copy.deepcopy(value)


def tensor_bytes(value: Any) -> int:
    if isinstance(value, _SCALARS):
        return 0
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, Mapping):
        return sum(tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(v) for v in value)
    return 0


class SnapshotRing:
    """The two newest per-step snapshots of one worker's state."""

    def __init__(self) -> None:
        self._slots = [_Slot(), _Slot()]

    def capture(self, step: int, state: Mapping[str, Any]) -> None:
        """Record `state` as the snapshot of `step` (the state before step `step` runs)."""
        held = self.steps()
        assert not held or step >= max(held), (step, held)
        if step in held:
            # Only after a rollback to `step`: the state equals that snapshot already, and
            # rewriting its slot would leave a window with one fewer complete snapshot.
            return
        slot = min(self._slots, key=lambda s: s.step)
        slot.step = -1  # incomplete while copying
        size = [0]
        slot.tree = _copy_into(state, slot.tree, size)
        slot.num_bytes = size[0]
        slot.step = step

    def steps(self) -> list[int]:
        return sorted(s.step for s in self._slots if s.step >= 0)

    def restore(self, step: int) -> dict[str, Any]:
        """A private copy of the snapshot of `step` (the caller may keep or mutate it)."""
        for s in self._slots:
            if s.step == step:
                return _clone(s.tree)  # type: ignore[no-any-return]
        raise SnapshotMissing(f"no snapshot of step {step} here (held: {self.steps()})")

    def discard_after(self, step: int) -> None:
        """Forget snapshots newer than `step`: they belong to an abandoned timeline."""
        for s in self._slots:
            if s.step > step:
                s.step = -1

    @property
    def num_bytes(self) -> int:
        return sum(s.num_bytes for s in self._slots if s.step >= 0)
