"""Per-step in-memory snapshots, double-buffered: the last two steps' state, kept locally.

A snapshot of step k is the state before step k runs. Capturing step k+1 overwrites the
slot of step k-1, never the one of step k, so a complete snapshot of the newer step always
exists before the older one is touched. A slot keeps its CPU tensors in one flat buffer,
allocated once (again only when the state's shapes or dtypes change), every tensor
starting on a block of 512 words (4 KiB: at most that much zero padding per tensor).
`capture` copies into it in one batched call, at memcpy speed with no allocation
(bench/snapshot.py).

Checksums (`checkpoint/checksum.py`). `capture` records a checksum of every tensor, taken
right after the copy (for GPU tensors, on the GPU over the source: `device_copy.py`), and
`restore` checks the copy it hands back against it: a mismatch raises `SnapshotCorrupt`,
naming the step and the tensors.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from splice.checkpoint.checksum import (  # noqa: F401 (re-exported)
    BLOCK_ROWS,
    BLOCK_WORDS,
    CHUNK_BLOCKS,
    ROW_WORDS,
    Signature,
    _block_sums,
    _blocks_of,
    _in_place_blocks,
    _Layout,
    _record,
    checksums_of,
    total_words,
)
from splice.checkpoint.shm import Frozen, SlotFiles, SlotUnreadable, loads_tree  # noqa: F401
from splice.checkpoint.snapshot_tree import (  # noqa: F401 (tensor_bytes re-exported)
    _PENDING,
    _Capture,
    _clone,
    _clone_kept,
    _copy_into,
    _place,
    _tensors,
    tensor_bytes,
)

log = logging.getLogger(__name__)

class SnapshotMissing(Exception):
    """No snapshot of the requested step is held here; ask a peer or the persistent store."""


class SnapshotCorrupt(SnapshotMissing):
    """A held snapshot's bytes no longer match the checksums taken when it was captured
    (raised by both the CPU and the GPU ring). As for a missing one, restore the step from
    a peer's replica or the persistent checkpoint; the CPU ring forgets the snapshot."""


@dataclass(eq=False)  # compared by identity: its tensors have no truth value
class _Slot:
    step: int = -1
    tree: Any = None
    num_bytes: int = 0
    layout: _Layout | None = None  # its flat buffer holds the tree's CPU tensors
    others: dict[int, torch.Tensor] = field(default_factory=dict)  # walk index: off-CPU
    recorded: dict[int, int] | cf.Future[dict[int, int]] | None = None  # others' checksums
    shared: bool = False  # its layout's buffer is a file in the ring's directory
    verified: bool = False  # passed a whole `verify` since it was taken or adopted
    pending: Any = None  # device_copy.PendingCopy: GPU copies still in flight


class SnapshotRing:
    """The two newest per-step snapshots of one worker's state.

    `checksum_in_background=True` takes the checksums on a helper thread instead of at the
    end of `capture` (bench/hook_overhead.py compares the two): `restore`, `checksums` and
    `verify` of a step, and the capture that reuses its slot two steps later, wait for it;
    a change to the slot before the thread has read it would go unnoticed."""

    def __init__(self, *, checksum_in_background: bool = False,
                 directory: str | None = None, owner: str = "",
                 gpu_copies: bool = True) -> None:
        self._slots = [_Slot(), _Slot()]
        # CUDA tensors: copied asynchronously (device_copy.py) when there is a GPU and
        # Triton; otherwise, or with gpu_copies=False, cloned on their device.
        self._gpu_copies = gpu_copies
        self._copier: Any = None  # device_copy.DeviceCopier, made at the first CUDA tensor
        self._later: tuple[int, Callable[[], Mapping[str, Any]], frozenset[int], Any] | None \
            = None  # a capture to run at the flush (`capture` with a function)
        self._background = checksum_in_background
        self._checksummer: cf.ThreadPoolExecutor | None = None
        # `capture_in_background`: the capture running on the helper thread, if any.
        self._helper: cf.ThreadPoolExecutor | None = None
        self._async: cf.Future[None] | None = None
        self._files: SlotFiles | None = None
        if directory:
            if checksum_in_background:
                raise ValueError("a ring in shared memory takes its checksums inline")
            self._files = SlotFiles(directory, owner)
        self.adopted_from = ""  # the worker whose snapshots `adopt` took over
        self._epoch = 0  # recorded with each commit in shared memory (what replicas order by)

    @property
    def epoch(self) -> int:
        return self._epoch

    @epoch.setter
    def epoch(self, epoch: int) -> None:
        self._wait_background()  # a capture in flight commits under the epoch it began in
        self._epoch = epoch

    def adopt(self) -> list[int]:
        """Take over the committed snapshots in this ring's directory (a dead worker's,
        handed over by the agent): the steps now held, unverified (`verify` them)."""
        if self._files is None or self.steps():
            return self.steps()
        for found in self._files.load(total_words):
            try:
                layout = _Layout(found.signature, buffer=found.buffer)
                tree = loads_tree(found.tree, layout.views)
                named = [t for _, t in _tensors(tree)]
                if (len(named) != len(layout.flat_views)
                        or any(a is not b for a, b in zip(named, layout.flat_views,
                                                          strict=True))):
                    raise SlotUnreadable("its tree does not name each tensor of its layout "
                                         "once, in order")
            except (SlotUnreadable, RuntimeError, ValueError, TypeError) as e:
                log.warning("snapshot slot %d in %s is not usable: %s", found.index,
                            self._files.directory, e)
                continue
            slot = self._slots[found.index]
            slot.step, slot.tree, slot.layout = found.step, tree, layout
            slot.num_bytes, slot.others, slot.recorded = tensor_bytes(tree), {}, {}
            slot.shared, slot.verified = True, False
            self.adopted_from = found.owner
        return self.steps()

    def close(self) -> None:
        """Finish the copies in flight (committing their snapshots) and release the slot
        files' descriptors (the snapshots stay where they are)."""
        try:
            self.synchronize()
        finally:
            if self._helper is not None:
                self._helper.shutdown()
                self._helper = None
            for slot in self._slots:
                if slot.layout is not None:
                    slot.layout.release()
            if self._files is not None:
                self._files.close()

    def _forget(self, slot: _Slot) -> None:
        slot.step = -1
        slot.verified = False
        if slot.pending is not None:  # let the copy land before the slot is reused
            slot.pending.wait()
            slot.pending = None
        if self._files is not None:
            self._files.begin(self._slots.index(slot))

    def _settle(self, slot: _Slot) -> None:
        """Complete a slot whose GPU copies were in flight: wait for them, put the CPU
        tensors' block sums beside the GPU ones, and commit it to shared memory."""
        pending = slot.pending
        if pending is None:
            return
        pending.wait()
        layout = slot.layout
        assert layout is not None
        if pending.cpu_blocks.numel():
            layout.record[:, pending.cpu_blocks] = pending.cpu_sums
        slot.pending = None
        self._commit(slot)

    def _commit(self, slot: _Slot) -> None:
        if self._files is not None and slot.shared and not slot.others:  # off-CPU: private
            assert slot.layout is not None
            self._files.commit(self._slots.index(slot), slot.step, slot.layout.signature,
                               slot.layout.views, slot.tree, self._epoch)

    def synchronize(self) -> None:
        """Block until every capture's GPU copies are complete (and committed)."""
        self._run_later()
        for slot in sorted(self._slots, key=lambda s: s.step):
            self._settle(slot)

    def flush(self) -> None:
        """Launch the GPU copies a deferred capture prepared (nothing to do otherwise)."""
        if self._async is not None:
            return  # a capture of CPU state, already under way
        self._run_later()
        for slot in self._slots:
            if slot.pending is not None:
                slot.pending.flush()

    def wait_copied(self) -> None:
        """Make the current CUDA stream wait, on the GPU, until the captures so far have
        read their sources: call before anything overwrites captured CUDA tensors (the
        optimizer step). Does not block the host for GPU state; a capture in background
        (CPU state) it waits for."""
        self._run_later()
        for slot in self._slots:
            if slot.pending is not None:
                self._copier.wait_on(slot.pending.flush())

    def _gpu_device(self, state: Mapping[str, Any]) -> torch.device | None:
        """The CUDA device whose tensors this ring copies asynchronously, if any."""
        if self._copier is not None:
            return self._copier.device  # type: ignore[no-any-return]
        if not self._gpu_copies or not torch.cuda.is_available():
            return None
        device = next((t.device for _, t in _tensors(state) if t.is_cuda), None)
        if device is None:
            # Looked once: a state that moves to a GPU later is still snapshotted, its
            # CUDA tensors cloned on the device (`_Capture.others`), only slower.
            self._gpu_copies = False
            return None
        from splice.kernels.fingerprint import triton
        if triton is None:
            log.warning("triton is not installed: GPU snapshots are cloned on the device "
                        "and checksummed through host copies (slow); pip install triton")
            self._gpu_copies = False
            return None
        from splice.checkpoint.device_copy import DeviceCopier
        self._copier = DeviceCopier(device)
        return device

    def capture(self, step: int, state: Mapping[str, Any] | Callable[[], Mapping[str, Any]],
                stable: frozenset[int] = frozenset(), defer: bool = False) -> None:
        """Record `state` as the snapshot of `step` (the state before step `step` runs).
        CPU tensors are copied and checksummed by the time it returns. CUDA tensors are
        copied asynchronously (device_copy.py): call `wait_copied()` before overwriting
        them; those whose data_ptr is in `stable` are read in place, the others cloned on
        the device first. The snapshot is complete, and visible in shared memory, once
        the copies have landed (the next capture, or a read of the step, waits for it).
        With `defer`, the copies are copies of the state as of now, but their launch (a
        few ms of host time for hundreds of tensors) waits for `flush()` (or anything
        that needs them): a training loop that calls it after launching its backward
        pass hides that host time behind queued GPU work.

        `state` may also be a function returning the state, with `defer`, once this ring
        copies GPU state: then the whole capture (walking the state, committing the
        previous slot, the copies) waits for `flush()`, and copies the GPU tensors as they
        were now. Every CUDA tensor the function returns must then be left unchanged until
        `wait_copied()` (clone the others now and return the clones; nothing is cloned
        for you on this path), and its CPU tensors must be what they are now."""
        self._run_later()
        if callable(state):
            if not defer or self._copier is None:
                state = state()
            else:
                start = torch.cuda.Event()
                start.record(torch.cuda.current_stream(self._copier.device))
                self._later = (step, state, stable, start)
                return
        self._capture_now(step, state, stable, defer)

    def capture_in_background(self, step: int,
                              state: Callable[[], Mapping[str, Any]]) -> None:
        """`capture` of CPU state on a helper thread: `state()` is called there, and the
        walk, the copies, the checksums and the commit run beside the caller's next work
        (a training step's forward and backward passes), off its thread. Until
        `wait_copied()` (or any other call on this ring) returns, nothing may change what
        `state()` reads or returns: take what changes before then (the RNG states, buffers
        a forward pass updates) now, and have `state()` return that. The snapshot is
        complete once the helper is done; an error it met is raised by the next call."""
        self._run_later()
        if self._helper is None:
            self._helper = cf.ThreadPoolExecutor(max_workers=1,
                                                 thread_name_prefix="splice-snapshot")
        self._async = self._helper.submit(self._capture_off_thread, step, state)

    def _capture_off_thread(self, step: int, state: Callable[[], Mapping[str, Any]]) -> None:
        with torch.no_grad():  # grad mode is per thread: the helper's is on
            self._capture_now(step, state(), frozenset(), False)

    def _wait_background(self) -> None:
        pending = self._async
        if pending is not None:
            try:
                pending.result()  # raises what the capture raised, once
            finally:
                if pending.done():  # not when the wait itself was interrupted
                    self._async = None

    def _run_later(self) -> None:
        """Finish a capture in background; run a capture whose state was to be built at
        the flush."""
        self._wait_background()
        if self._later is not None:
            step, fn, stable, start = self._later
            self._later = None
            self._capture_now(step, fn(), stable, False, start)

    def _capture_now(self, step: int, state: Mapping[str, Any], stable: frozenset[int],
                     defer: bool, start: Any = None) -> None:
        for s in sorted(self._slots, key=lambda s: s.step):
            self._settle(s)  # the newer slot's commit comes before the older is reused
        held = sorted(s.step for s in self._slots if s.step >= 0)  # (may be off-thread)
        assert not held or step >= max(held), (step, held)
        if step in held:
            # Only after a rollback to `step`: the state equals that snapshot already, and
            # rewriting its slot would leave a window with one fewer complete snapshot.
            return
        slot = min(self._slots, key=lambda s: s.step)
        self._forget(slot)  # incomplete while copying
        if isinstance(slot.recorded, cf.Future) and not slot.recorded.cancel():
            cf.wait([slot.recorded])  # still reading the buffers about to be overwritten
        cap = _Capture(slot.layout, self._gpu_device(state))
        tree = _copy_into(state, cap)
        if not cap.done():  # first capture into this slot, or the state changed shape
            buffer = None
            if self._files is not None:
                try:
                    buffer = self._files.allocate(self._slots.index(slot),
                                                  total_words(cap.signature))
                except OSError as e:
                    log.warning("snapshot slot in %s stays in private memory: %s (the "
                                "shared memory is too small: a replacement cannot adopt "
                                "it)", self._files.directory, e)
            if buffer is None and cap.dev_idx:  # the GPU's copies need page-locked memory
                buffer = torch.zeros(total_words(cap.signature), dtype=torch.int64,
                                     pin_memory=True)
            if slot.layout is not None:
                slot.layout.release()
            slot.layout = _Layout(cap.signature, buffer=buffer)
            slot.shared = buffer is not None and self._files is not None
            tree = _place(tree, iter(slot.layout.views))
        layout = slot.layout
        assert layout is not None
        slot.tree, slot.num_bytes, slot.others = tree, cap.num_bytes, cap.others
        if cap.dev_idx:
            self._capture_gpu(slot, layout, cap, stable, defer, start)
            slot.step = step
            return
        if cap.srcs:
            # One call for all tensors: ~memcpy speed, where a Python loop of `copy_`
            # reaches half of it on two busy cores (each copy_ its own parallel region).
            torch._foreach_copy_(layout.flat_views, cap.srcs)
        if self._background:
            if self._checksummer is None:
                self._checksummer = cf.ThreadPoolExecutor(
                    max_workers=1, thread_name_prefix="splice-snapshot-sum")
            slot.recorded = self._checksummer.submit(_record, layout, cap.others)
        else:
            slot.recorded = _record(layout, cap.others)
        slot.step = step
        self._commit(slot)

    def _capture_gpu(self, slot: _Slot, layout: _Layout, cap: _Capture,
                     stable: frozenset[int], defer: bool, start: Any) -> None:
        """The CPU tensors copied and summed now (their blocks only), the CUDA ones
        enqueued now or at `flush` (device_copy.py); the slot commits when `_settle`
        finds them landed."""
        from splice.checkpoint.device_copy import PendingCopy

        if cap.srcs:
            torch._foreach_copy_([v for i in cap.src_idx if (v := layout.views[i]) is not None],
                                 cap.srcs)
        cpu_blocks = layout.blocks_of(cap.src_idx)
        cpu_sums = torch.empty(2, cpu_blocks.numel(), dtype=torch.int64)
        if cpu_blocks.numel():
            chunk = min(CHUNK_BLOCKS, cpu_blocks.numel())
            _block_sums(layout.blocks.index_select(0, cpu_blocks), cpu_sums,
                        torch.empty(chunk, BLOCK_ROWS, dtype=torch.int64),
                        torch.empty(chunk, ROW_WORDS, dtype=torch.int64), chunk)
        copier = self._copier
        layout.pin(copier.device)
        start, srcs, keep = copier.prepare(cap.dev_srcs, stable, start)
        views = [v for i in cap.dev_idx if (v := layout.views[i]) is not None]
        firsts = [layout.first_block[i] for i in cap.dev_idx]
        slot.recorded = dict(zip(cap.others, checksums_of(list(cap.others.values())),
                                 strict=True))
        slot.pending = PendingCopy(start, lambda: copier.launch(
            start, layout.record, srcs, views, firsts, keep), cpu_blocks, cpu_sums, srcs)
        if not defer:
            slot.pending.flush()

    def steps(self) -> list[int]:
        self._run_later()
        return sorted(s.step for s in self._slots if s.step >= 0)

    def restore(self, step: int, keep: Callable[[str], bool] | None = None
                ) -> dict[str, Any]:
        """A private copy of the snapshot of `step` (the caller may keep or mutate it),
        checked against the checksums taken at capture: SnapshotCorrupt if it differs.
        With `keep`, only the tensors whose dotted path it accepts are copied and checked;
        the others are None in the copy."""
        slot = self._slot(step)
        recorded = self._recorded(slot)
        if keep is None:
            out = _clone(slot.tree)
            self._check(slot, recorded, checksums_of([t for _, t in _tensors(out)]))
            return out  # type: ignore[no-any-return]
        kept = [i for i, (path, _) in enumerate(_tensors(slot.tree)) if keep(path)]
        out = _clone_kept(slot.tree, keep)
        now = list(recorded)
        for i, value in zip(kept, checksums_of([t for _, t in _tensors(out)]), strict=True):
            now[i] = value
        self._check(slot, recorded, now)
        return out  # type: ignore[no-any-return]

    def checksums(self, step: int) -> dict[str, int]:
        """The checksum (module docstring) of each tensor of the snapshot of `step` as
        taken at capture, by path."""
        slot = self._slot(step)
        return {path: s for (path, _), s in zip(_tensors(slot.tree), self._recorded(slot),
                                                strict=True)}

    def verify(self, step: int, keep: Callable[[str], bool] | None = None, *,
               again: bool = True) -> None:
        """Check the held snapshot of `step` in place, e.g. before sending it to a peer;
        SnapshotCorrupt (and the snapshot forgotten) if any tensor changed. With `keep`,
        only the tensors whose dotted path it accepts. `again=False`: nothing to do if the
        whole snapshot passed a check since it was taken or adopted (a snapshot fetched or
        offered moments ago, about to be loaded)."""
        slot = self._slot(step)
        if slot.verified and not again:
            return
        recorded = self._recorded(slot)
        assert slot.layout is not None
        if keep is not None:
            kept = [(i, t) for i, (path, t) in enumerate(_tensors(slot.tree)) if keep(path)]
            now = list(recorded)
            for (i, _), value in zip(kept, checksums_of([t for _, t in kept]), strict=True):
                now[i] = value
            self._check(slot, recorded, now)
            return
        now = slot.layout.sums()
        for i, value in zip(slot.others, checksums_of(list(slot.others.values())),
                            strict=True):
            now[i] = value
        self._check(slot, recorded, now)
        slot.verified = True

    def forget_checks(self) -> None:
        """Have the next `verify(..., again=False)` check for real: the snapshots were
        checked a while ago (e.g. before the caller built its model)."""
        for slot in self._slots:
            slot.verified = False

    def buffers(self, step: int) -> dict[str, torch.Tensor]:
        """The ring's own tensors of the snapshot of `step`, by path, not copies: to send
        without copying (after `verify`). Writing to them corrupts the snapshot."""
        return dict(_tensors(self._slot(step).tree))

    def discard_after(self, step: int) -> None:
        """Forget snapshots newer than `step`: they belong to an abandoned timeline."""
        self._run_later()
        for s in self._slots:
            if s.step > step:
                self._forget(s)

    @property
    def num_bytes(self) -> int:
        self._wait_background()
        return sum(s.num_bytes for s in self._slots if s.step >= 0)

    def _slot(self, step: int) -> _Slot:
        self._run_later()
        for s in self._slots:
            if s.step == step:
                self._settle(s)
                return s
        raise SnapshotMissing(f"no snapshot of step {step} here (held: {self.steps()})")

    @staticmethod
    def _recorded(slot: _Slot) -> list[int]:
        """The checksums taken at capture, per tensor in walk order."""
        assert slot.recorded is not None and slot.layout is not None, "a held slot has both"
        others = (slot.recorded.result() if isinstance(slot.recorded, cf.Future)
                  else slot.recorded)
        sums = slot.layout.per_tensor(slot.layout.record)
        for i, value in others.items():
            sums[i] = value
        return sums

    def _check(self, slot: _Slot, recorded: list[int], now: list[int]) -> None:
        bad = [f"{path} (recorded {want:#034x}, now {got:#034x})"
               for (path, _), want, got in zip(_tensors(slot.tree), recorded, now, strict=True)
               if want != got]
        if bad:
            step = slot.step
            self._forget(slot)  # no longer a snapshot anyone should train on
            raise SnapshotCorrupt(
                f"snapshot of step {step} is corrupt: {len(bad)} of {len(recorded)} "
                f"tensors changed since capture: {', '.join(bad[:5])}"
                f"{' ...' if len(bad) > 5 else ''}; restore step {step} from a peer's "
                "replica or the persistent checkpoint")
