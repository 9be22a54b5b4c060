"""Per-step in-memory snapshots, double-buffered: the last two steps' state, kept locally.

A snapshot of step k is the state before step k runs. Capturing step k+1 overwrites the
slot of step k-1, never the one of step k, so a complete snapshot of the newer step always
exists before the older one is touched. Tensors are copied into buffers allocated once per
slot, all in one batched call, so steady-state capture runs at memcpy speed with no
allocation (bench/snapshot.py).

Every slot carries a CRC-32 of each of its tensors' bytes, checked on restore: a mismatch
raises `SnapshotCorrupt`, naming the step and the tensors (`model.layer.weight`).

Why the checksum is computed in a background thread right after the copy. CRC-32 (zlib)
runs at ~2-3.5 GB/s on one core, a copy at ~6-20 GB/s: computed inside `capture` it would
make it three times slower or more. Computed lazily (first restore, send or `verify`) it
would cost nothing per step, but would also bless whatever the slot's memory holds by then,
so a byte flipped after capture would go unnoticed. So `capture` copies, hands the slot to
one background thread and returns; the thread reads the slot (zlib releases the GIL) while
the step runs forward, backward and the optimizer update. The training thread waits for it
only when it needs it: `restore`, `checksums` and `verify` of that step, and a `capture`
about to overwrite that slot, two steps later (so a step shorter than the checksum of its
state does pay for it; the copy alone never waits).

What is covered: any change to a slot's tensor bytes after the background thread has read
them, up to the moment `restore` copies them out (the copy handed back is what is checked,
so corruption while copying out is caught too). What is not: a change in the window
between the copy and the thread reading that tensor (at most the checksum's duration,
~40 ms for 100 MB; the change is then part of the recorded checksum), a source tensor
already wrong when captured, and non-tensor values (ints, RNG tuples), which are Python
objects rather than bytes in a buffer. The CPU cost of the checksum is moved off the
step's critical path, not removed: where every core is busy training it still competes.
"""

from __future__ import annotations

import concurrent.futures as cf
import copy
import ctypes
import zlib
from collections.abc import Iterator, Mapping
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


class SnapshotCorrupt(SnapshotMissing):
    """A held snapshot's bytes no longer match the checksums taken when it was captured.
    The ring forgets it; as for a missing one, restore the step from a peer's replica or
    the persistent checkpoint."""


Checksums = list[tuple[str, int]]  # (tensor path, CRC-32), in the tree's walk order


@dataclass
class _Slot:
    step: int = -1
    tree: Any = None
    num_bytes: int = 0
    checksums: cf.Future[Checksums] | None = None  # computed in the background


class _Copies:
    """The copies a capture owes: destination buffers and sources, done in one batch."""

    __slots__ = ("dsts", "srcs", "num_bytes")

    def __init__(self) -> None:
        self.dsts: list[torch.Tensor] = []
        self.srcs: list[torch.Tensor] = []
        self.num_bytes = 0

    def run(self) -> None:
        # One call for all tensors: ~memcpy speed, where a Python loop of `copy_` reaches
        # half of it on two busy cores (each copy_ its own parallel region).
        if self.dsts:
            torch._foreach_copy_(self.dsts, self.srcs)


def _copy_into(value: Any, old: Any, copies: _Copies) -> Any:
    """Deep-copy `value`, reusing tensors of `old` (same structure) as copy targets: new
    tensors are cloned here, reused ones are queued in `copies`, whose bytes are counted."""
    if isinstance(value, _SCALARS):
        return value
    if isinstance(value, torch.Tensor):
        copies.num_bytes += value.numel() * value.element_size()
        if (isinstance(old, torch.Tensor) and old.shape == value.shape
                and old.dtype == value.dtype and old.device == value.device):
            copies.dsts.append(old)
            copies.srcs.append(value.detach())
            return old
        return value.detach().clone()
    if isinstance(value, Mapping):
        prev = old if isinstance(old, dict) else {}
        return {k: _copy_into(v, prev.get(k), copies) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        prev_seq = old if isinstance(old, (list, tuple)) and len(old) == len(value) else None
        items = [_copy_into(v, prev_seq[i] if prev_seq is not None else None, copies)
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


def _tensors(value: Any, path: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of a snapshot tree with its dotted path ("model.layer.weight")."""
    if isinstance(value, torch.Tensor):
        yield path, value
    elif isinstance(value, Mapping):
        for k, v in value.items():
            yield from _tensors(v, f"{path}.{k}" if path else str(k))
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _tensors(v, f"{path}.{i}" if path else str(i))


def _crc32(t: torch.Tensor) -> int:
    """CRC-32 of a tensor's row-major bytes, read in place (state tensors are contiguous;
    another layout is copied first), so the checksum depends on the values, not strides."""
    if t.device.type != "cpu" or not t.is_contiguous():
        t = t.cpu().contiguous()
    num_bytes = t.numel() * t.element_size()
    if num_bytes == 0:
        return 0
    return zlib.crc32((ctypes.c_char * num_bytes).from_address(t.data_ptr()))


def _checksum_tree(tree: Any) -> Checksums:
    return [(path, _crc32(t)) for path, t in _tensors(tree)]


class SnapshotRing:
    """The two newest per-step snapshots of one worker's state."""

    def __init__(self) -> None:
        self._slots = [_Slot(), _Slot()]
        self._checksummer: cf.ThreadPoolExecutor | None = None  # started on first capture

    def capture(self, step: int, state: Mapping[str, Any]) -> None:
        """Record `state` as the snapshot of `step` (the state before step `step` runs).
        Returns once the copy is complete; its checksums follow in the background."""
        held = self.steps()
        assert not held or step >= max(held), (step, held)
        if step in held:
            # Only after a rollback to `step`: the state equals that snapshot already, and
            # rewriting its slot would leave a window with one fewer complete snapshot.
            return
        slot = min(self._slots, key=lambda s: s.step)
        slot.step = -1  # incomplete while copying
        if slot.checksums is not None and not slot.checksums.cancel():
            cf.wait([slot.checksums])  # still reading the buffers about to be overwritten
        copies = _Copies()
        slot.tree = _copy_into(state, slot.tree, copies)
        copies.run()
        slot.num_bytes = copies.num_bytes
        if self._checksummer is None:
            self._checksummer = cf.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="splice-snapshot-crc")
        slot.checksums = self._checksummer.submit(_checksum_tree, slot.tree)
        slot.step = step

    def steps(self) -> list[int]:
        return sorted(s.step for s in self._slots if s.step >= 0)

    def restore(self, step: int) -> dict[str, Any]:
        """A private copy of the snapshot of `step` (the caller may keep or mutate it),
        checked against the checksums taken at capture: SnapshotCorrupt if it differs."""
        slot = self._slot(step)
        recorded = self._recorded(slot)
        out = _clone(slot.tree)
        self._check(slot, recorded, _checksum_tree(out))
        return out  # type: ignore[no-any-return]

    def checksums(self, step: int) -> dict[str, int]:
        """CRC-32 of each tensor of the snapshot of `step` as taken at capture, by path
        (waits for the background computation if it is still running)."""
        return dict(self._recorded(self._slot(step)))

    def verify(self, step: int) -> None:
        """Check the held snapshot of `step` in place, e.g. before sending it to a peer;
        SnapshotCorrupt (and the snapshot forgotten) if any tensor changed."""
        slot = self._slot(step)
        self._check(slot, self._recorded(slot), _checksum_tree(slot.tree))

    def buffers(self, step: int) -> dict[str, torch.Tensor]:
        """The ring's own tensors of the snapshot of `step`, by path, not copies: to send
        without copying (after `verify`). Writing to them corrupts the snapshot."""
        return dict(_tensors(self._slot(step).tree))

    def discard_after(self, step: int) -> None:
        """Forget snapshots newer than `step`: they belong to an abandoned timeline."""
        for s in self._slots:
            if s.step > step:
                s.step = -1

    @property
    def num_bytes(self) -> int:
        return sum(s.num_bytes for s in self._slots if s.step >= 0)

    def _slot(self, step: int) -> _Slot:
        for s in self._slots:
            if s.step == step:
                return s
        raise SnapshotMissing(f"no snapshot of step {step} here (held: {self.steps()})")

    @staticmethod
    def _recorded(slot: _Slot) -> Checksums:
        assert slot.checksums is not None, "a held slot always has checksums under way"
        return slot.checksums.result()

    @staticmethod
    def _check(slot: _Slot, recorded: Checksums, now: Checksums) -> None:
        bad = [f"{path} (recorded {want:#010x}, now {got:#010x})"
               for (path, want), (_, got) in zip(recorded, now, strict=True) if want != got]
        if bad:
            step, slot.step = slot.step, -1  # no longer a snapshot anyone should train on
            raise SnapshotCorrupt(
                f"snapshot of step {step} is corrupt: {len(bad)} of {len(recorded)} "
                f"tensors changed since capture: {', '.join(bad[:5])}"
                f"{' ...' if len(bad) > 5 else ''}; restore step {step} from a peer's "
                "replica or the persistent checkpoint")
