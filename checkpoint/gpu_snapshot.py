"""Per-step snapshots of GPU tensors into pinned host memory, overlapped with training.

The CPU `SnapshotRing` copies synchronously; on a GPU that would stall the step for the
whole device-to-host transfer (~55 GB/s on an H100). Here a capture only *enqueues* work
on a side CUDA stream: the side stream waits for the state as of now, fingerprints every
tensor on the GPU (a pass at HBM speed), then copies each tensor into a preallocated
pinned buffer with the copy engine, leaving the SMs to training. The training loop calls
`wait_copied()` before anything overwrites the captured tensors (the optimizer step), so
the snapshot of step k is exactly the state before step k ran.

Double buffering as in `SnapshotRing`: capturing step k+1 overwrites the slot of step
k-1, and first waits (on the host) for step k's copy to finish, so a complete snapshot
always exists. A slot counts as held once its copy event has completed.

The fingerprints travel with the snapshot (copied to the host beside the data) and a
restore recomputes them over what it restores; a mismatch raises `SnapshotCorrupt`.
Non-tensor state (step counters, RNG, data cursor) stays with the CPU `SnapshotRing`.
Importing this module needs no GPU; constructing a ring does.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

# One SnapshotCorrupt for both rings (a SnapshotMissing: callers move on to a peer's
# replica or the persistent checkpoint alike); raised here when a fingerprint differs.
from splice.checkpoint.snapshot import SnapshotCorrupt, SnapshotMissing
from splice.kernels import fingerprint as fp

__all__ = ["GpuSnapshotRing", "SnapshotCorrupt", "SnapshotMissing", "capture_fingerprint",
           "state_tensors"]


@dataclass
class _Slot:
    step: int = -1
    host: dict[str, torch.Tensor] = field(default_factory=dict)
    fingerprints: torch.Tensor | None = None  # pinned int64, one per tensor
    done: torch.cuda.Event | None = None


def state_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None
                  ) -> dict[str, torch.Tensor]:
    """The tensors of a model and its optimizer under stable names, for `capture`."""
    out = {f"param/{k}": v for k, v in model.state_dict().items()
           if isinstance(v, torch.Tensor)}
    if optimizer is not None:
        for idx, st in optimizer.state_dict()["state"].items():
            for key, v in st.items():
                if isinstance(v, torch.Tensor):
                    out[f"optim/{idx}/{key}"] = v
    return out


class GpuSnapshotRing:
    """The two newest per-step snapshots of a set of named GPU tensors, in pinned memory."""

    def __init__(self, device: torch.device | str | None = None) -> None:
        if not torch.cuda.is_available():
            raise RuntimeError("GpuSnapshotRing needs CUDA; use SnapshotRing on CPU")
        self.device = torch.device(device if device is not None else "cuda")
        self.stream = torch.cuda.Stream(self.device)
        self._slots = [_Slot(), _Slot()]
        self._newest: _Slot | None = None

    # ---- capture --------------------------------------------------------------------------
    def capture(self, step: int, tensors: Mapping[str, torch.Tensor]) -> None:
        """Start snapshotting `tensors` as the state before step `step`; returns at once.

        Call `wait_copied()` before anything modifies these tensors."""
        held = [s.step for s in self._slots if s.step >= 0]
        assert not held or step >= max(held), (step, held)
        if step in held:  # after a rollback to `step`: that snapshot is the state already
            return
        slot = min(self._slots, key=lambda s: s.step)
        newer = self._slots[1 - self._slots.index(slot)]
        if newer.done is not None:
            newer.done.synchronize()  # never overwrite the older slot before this completes
        if slot.done is not None:
            slot.done.synchronize()
        slot.step = -1  # incomplete while copying
        self._ensure_buffers(slot, tensors)
        main = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(main)
        with torch.cuda.stream(self.stream):
            sources = [t.detach() for t in tensors.values()]
            sums = fp.fingerprint_many(sources)  # one launch for the whole state
            torch._foreach_copy_([slot.host[k] for k in tensors], sources, non_blocking=True)
            for t in sources:
                t.record_stream(self.stream)  # keep the source alive if the caller drops it
            assert slot.fingerprints is not None
            slot.fingerprints.copy_(sums, non_blocking=True)
            sums.record_stream(self.stream)
            slot.done = torch.cuda.Event()
            slot.done.record(self.stream)
        slot.step = step
        self._newest = slot

    def _ensure_buffers(self, slot: _Slot, tensors: Mapping[str, torch.Tensor]) -> None:
        """Reuse the slot's pinned buffers; allocate only for new or reshaped tensors."""
        host = {}
        for name, t in tensors.items():
            old = slot.host.get(name)
            if old is None or old.shape != t.shape or old.dtype != t.dtype:
                old = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            host[name] = old
        slot.host = host
        if slot.fingerprints is None or slot.fingerprints.numel() != len(tensors):
            slot.fingerprints = torch.empty(len(tensors), dtype=torch.int64, pin_memory=True)

    def wait_copied(self, stream: torch.cuda.Stream | None = None) -> None:
        """Make `stream` (default: the current one) wait until the newest capture has read
        its sources. Enqueues a dependency; does not block the host."""
        if self._newest is not None and self._newest.done is not None:
            (stream or torch.cuda.current_stream(self.device)).wait_event(self._newest.done)

    def synchronize(self) -> None:
        """Block the host until every capture issued so far is complete."""
        self.stream.synchronize()

    # ---- what is held ---------------------------------------------------------------------
    def steps(self) -> list[int]:
        """Steps whose snapshots are complete."""
        return sorted(s.step for s in self._slots
                      if s.step >= 0 and s.done is not None and s.done.query())

    def _slot(self, step: int) -> _Slot:
        for s in self._slots:
            if s.step == step:
                assert s.done is not None
                s.done.synchronize()
                return s
        raise SnapshotMissing(f"no GPU snapshot of step {step} here (held: {self.steps()})")

    def fingerprints(self, step: int) -> dict[str, int]:
        """The fingerprints recorded at capture, by tensor name."""
        s = self._slot(step)
        assert s.fingerprints is not None
        return dict(zip(s.host, s.fingerprints.tolist(), strict=True))

    def host_buffers(self, step: int) -> dict[str, torch.Tensor]:
        """The pinned buffers of a snapshot (e.g. to send to a peer); read-only by contract,
        and overwritten two captures later."""
        return dict(self._slot(step).host)

    def discard_after(self, step: int) -> None:
        """Forget snapshots newer than `step`: they belong to an abandoned timeline."""
        for s in self._slots:
            if s.step > step:
                s.step = -1

    @property
    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for s in self._slots if s.step >= 0
                   for t in s.host.values())

    # ---- restore --------------------------------------------------------------------------
    def restore(self, step: int, into: Mapping[str, torch.Tensor] | None = None
                ) -> dict[str, torch.Tensor]:
        """The verified tensors of `step`: copied into `into` (e.g. the live GPU tensors,
        verified there on the GPU) or, without `into`, as private CPU copies verified on
        the CPU. Raises SnapshotCorrupt naming every tensor whose fingerprint differs; the
        targets then hold unverified data and must be restored from elsewhere."""
        recorded = self.fingerprints(step)
        host = self._slot(step).host
        if into is not None and set(into) != set(host):
            raise ValueError(f"restore into {sorted(set(into) ^ set(host))[:5]}...: the "
                             "targets must be named exactly like the captured tensors")
        if into is None:
            out = {name: t.clone() for name, t in host.items()}
        else:
            out = dict(into)
            for name, t in out.items():
                with torch.no_grad():
                    t.copy_(host[name], non_blocking=True)
        by_device: dict[torch.device, list[str]] = {}
        for name in recorded:
            by_device.setdefault(out[name].device, []).append(name)
        now: dict[str, int] = {}
        for names in by_device.values():
            now.update(zip(names, fp.fingerprint_many([out[n] for n in names]).tolist(),
                           strict=True))
        got_values = [now[name] for name in recorded]
        bad = [f"{name} (recorded {want:#010x}, now {got:#010x})"
               for (name, want), got in zip(recorded.items(), got_values, strict=True)
               if want != got]
        if bad:
            raise SnapshotCorrupt(
                f"GPU snapshot of step {step} is corrupt: {len(bad)} of {len(recorded)} "
                f"tensors changed since capture: {', '.join(bad[:5])}"
                f"{' ...' if len(bad) > 5 else ''}; restore step {step} from a peer's "
                "replica or the persistent checkpoint")
        return out


def capture_fingerprint(tensors: Mapping[str, Any]) -> int:
    """One number for a set of named tensors (names sorted), e.g. to compare replicas."""
    return fp.fingerprint_tensors(tensors[k] for k in sorted(tensors))
