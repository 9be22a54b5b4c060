"""The GPU half of a snapshot: CUDA tensors copied into a slot's host buffer asynchronously.

`SnapshotRing.capture` copies CPU tensors into the slot's flat buffer at once. A CUDA
tensor gets the same place in the same buffer (the shared-memory file the agent owns, so
a replacement or a peer reads GPU state exactly like CPU state), but the copy is only
*enqueued*, on a side stream:

  1. the side stream waits for the training stream as it is at capture (the state before
     step k);
  2. one kernel launch (`kernels/block_sums.py`) reads every source in HBM and writes the
     slot checksum's per-block sums, the same numbers the CPU takes over its copy, into
     a small device record, which is copied to the slot's record;
  3. each tensor is copied by the copy engine straight into its place in the buffer, which
     is page-locked (`cudaHostRegister`) so the copies are DMA transfers that leave the
     SMs to training;
  4. an event marks the end.

The training loop calls `SnapshotRing.wait_copied()` before anything writes the captured
tensors (the optimizer step); that makes the training stream wait for the event, on the
GPU, without blocking the host. The slot becomes a snapshot the agent can see (its commit
record in shared memory) only once the event has completed: at the next capture, which
waits for it on the host (by then the copy has normally long finished: it runs beside the
forward and backward passes), or when the step is read (`restore`, `verify`, ...).

Tensors the caller does not promise to leave alone until `wait_copied` (e.g. BatchNorm
running statistics, which the forward pass updates in place) are first cloned on the
training stream, a device-to-device copy, and the clone is what goes to the host.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger(__name__)

_PORTABLE = 1  # cudaHostRegisterPortable: page-locked for every CUDA context


class PinnedHostMemory:
    """Host memory page-locked for the GPU's copy engine while this object lives (a
    shared-memory mapping made with `torch.from_file`, say). Registration can fail (a
    limit on locked memory, say): `ok` is then False and copies into it still work,
    synchronously, through the driver's staging buffers."""

    def __init__(self, ptr: int, nbytes: int, device: torch.device) -> None:
        self._ptr = 0
        self.ok = nbytes == 0
        if nbytes == 0:
            return
        with torch.cuda.device(device):  # in the copying device's context, usable by all
            rc = int(torch.cuda.cudart().cudaHostRegister(ptr, nbytes, _PORTABLE))
        self.ok = rc == 0
        if self.ok:
            self._ptr = ptr
        else:
            log.warning("could not page-lock the %.1f MB snapshot buffer for the GPU (CUDA "
                        "error %d): the device-to-host copies of GPU snapshots will be "
                        "synchronous", nbytes / 1e6, rc)

    @classmethod
    def of(cls, tensors: list[torch.Tensor], device: torch.device) -> list[PinnedHostMemory]:
        """Pin the memory under `tensors` (adjacent ones as one range) for copies from
        `device`; nothing for those allocated pinned already."""
        spans: list[list[int]] = []
        for t in tensors:
            if t.nbytes == 0 or t.is_pinned():
                continue
            if spans and spans[-1][0] + spans[-1][1] == t.data_ptr():
                spans[-1][1] += t.nbytes
            else:
                spans.append([t.data_ptr(), t.nbytes])
        return [cls(ptr, n, device) for ptr, n in spans]

    def release(self) -> None:
        if self._ptr:
            torch.cuda.cudart().cudaHostUnregister(self._ptr)
            self._ptr = 0
            self.ok = False

    def __del__(self) -> None:  # pragma: no cover - depends on interpreter shutdown order
        try:
            self.release()
        except Exception:
            pass


def optimizer_state(optimizer: Any) -> Mapping[Any, Mapping[str, Any]]:
    """An optimizer's state tensors by parameter (torch's), or, for one without that
    mapping (the sharded AdamW: flat buffers as attributes), its attributes as one entry."""
    per_param = getattr(optimizer, "state", None)
    return per_param if isinstance(per_param, Mapping) else {0: vars(optimizer)}


def training_state_ptrs(model: torch.nn.Module, optimizer: Any) -> frozenset[int]:
    """The data_ptrs of the CUDA tensors nothing writes between a capture and the optimizer
    step: the parameters and the optimizer's state (the `stable` of a capture). Buffers
    such as BatchNorm statistics, which the forward pass updates, are not among them."""
    ptrs = {p.data_ptr() for p in model.parameters() if p.is_cuda}
    for st in optimizer_state(optimizer).values():
        ptrs.update(v.data_ptr() for v in st.values()
                    if isinstance(v, torch.Tensor) and v.is_cuda)
    return frozenset(ptrs)


@dataclass(eq=False)
class PendingCopy:
    """A slot's GPU copies: prepared at capture (`start` marks the training stream's
    position, the state to copy), enqueued on the side stream by `launch` (at once, or
    deferred to `SnapshotRing.flush`), done when `event` has completed. `cpu_blocks` and
    `cpu_sums` are the CPU tensors' block sums, written into the slot's record once the
    device record's copy (which fills every column) has landed."""
    start: torch.cuda.Event
    launch: Callable[[], torch.cuda.Event] | None
    cpu_blocks: torch.Tensor
    cpu_sums: torch.Tensor
    # Every tensor the copies read, held until they are known to be done: a source the
    # caller drops (a clone) must not go back to the allocator, where the training
    # stream could reuse and overwrite it before the side stream has read it.
    sources: list[torch.Tensor]
    event: torch.cuda.Event | None = None

    def flush(self) -> torch.cuda.Event:
        if self.event is None:
            assert self.launch is not None
            self.event, self.launch = self.launch(), None
        return self.event

    def wait(self) -> None:
        self.flush().synchronize()


class DeviceCopier:
    """One ring's side stream and device record buffers, for the CUDA tensors of one device."""

    def __init__(self, device: torch.device) -> None:
        from splice.kernels import block_sums  # needs triton, imported with a GPU only

        self.device = device
        self.stream = torch.cuda.Stream(device)
        self._block_sums = block_sums.block_sums_many
        self._records: dict[int, torch.Tensor] = {}  # by number of blocks

    def prepare(self, sources: list[torch.Tensor], stable: frozenset[int],
                start: torch.cuda.Event | None = None
                ) -> tuple[torch.cuda.Event, list[torch.Tensor], list[torch.Tensor]]:
        """Mark the state to copy: clone on the training stream the sources whose data_ptr
        is not in `stable` (or that are not contiguous), and record an event there.
        Returns the event, the sources to read and the clones among them. Given `start`
        (an event recorded earlier: the state as it was then, every source left unchanged
        until the copies are waited for), the non-contiguous ones are cloned on the side
        stream after it instead."""
        keep = []
        srcs = []
        side = start is not None
        if start is not None:
            self.stream.wait_event(start)
        with torch.cuda.stream(self.stream if side else torch.cuda.current_stream(
                self.device)):
            for t in sources:
                if t.data_ptr() not in stable or not t.is_contiguous():
                    t = t.clone(memory_format=torch.contiguous_format)
                    keep.append(t)
                srcs.append(t)
        if start is None:
            start = torch.cuda.Event()
            start.record(torch.cuda.current_stream(self.device))
        return start, srcs, keep

    def launch(self, start: torch.cuda.Event, record: torch.Tensor,
               sources: list[torch.Tensor], destinations: list[torch.Tensor],
               first_blocks: list[int], keep: list[torch.Tensor]) -> torch.cuda.Event:
        """On the side stream, once the training stream has reached `start`: the block
        sums of `sources` into the columns `first_blocks` of `record` (2 x blocks, host),
        and each source into its destination (views of the page-locked host buffer).
        Returns the event that marks completion."""
        n = record.shape[1]
        device_record = self._records.get(n)
        if device_record is None:
            device_record = self._records[n] = torch.zeros(2, n, dtype=torch.int64,
                                                           device=self.device)
        self.stream.wait_event(start)
        with torch.cuda.stream(self.stream):
            self._block_sums(sources, first_blocks, device_record)
            record.copy_(device_record, non_blocking=True)
            torch._foreach_copy_(destinations, sources, non_blocking=True)
            for t in keep:
                t.record_stream(self.stream)
            event = torch.cuda.Event()
            event.record(self.stream)
        return event

    def wait_on(self, event: torch.cuda.Event) -> None:
        """The training stream waits (on the GPU) for `event`."""
        torch.cuda.current_stream(self.device).wait_event(event)
