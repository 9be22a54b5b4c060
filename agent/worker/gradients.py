"""A step's gradients: the forward and backward passes over this rank's micro-batches,
the reduction (exact in float64, through DDP's buckets, or plain), and the replicas'
fingerprint check that runs before any gradient is exchanged.

A mixin of `Session` (agent/worker/session.py), split out by concept; it uses the session's
group, link, snapshots, model, optimizer, batch plan and dataset.
"""

from __future__ import annotations

import collections
import logging

import torch
from torch import nn

from splice.agent.worker.channel import AgentLost
from splice.agent.worker.group import CollectiveAborted
from splice.proto import controller_pb2 as pb
from splice.proto import local_pb2 as lpb

log = logging.getLogger("splice.worker")


def _seed_for(seed: int, step: int, micro_batch: int) -> int:
    """RNG seed of one global micro-batch: the same on whichever rank runs it."""
    return (seed * 0x9E3779B1 + step * 1_000_003 + micro_batch) % (2**63 - 1)


def _seed(seed: int) -> None:
    """`torch.manual_seed(seed)`, without its cost where no GPU is in use: for every
    accelerator backend not yet initialised it queues the seed with a captured Python stack
    (~0.6 ms a call on these CPUs, 5 ms of a 12 ms demo step at 8 micro-batches). The CPU
    generator is seeded alike; CUDA's too once initialised, and torch's own path is kept
    while a GPU is present but not yet in use."""
    if torch.cuda.is_initialized():
        torch.default_generator.manual_seed(seed)
        torch.cuda.manual_seed_all(seed)
    elif torch.cuda.is_available():
        torch.manual_seed(seed)
    else:
        torch.default_generator.manual_seed(seed)


_CHUNK = 1 << 18  # float64 elements: a 2 MiB staging buffer that stays in cache


def _accumulate(acc: torch.Tensor, params: list[nn.Parameter],
                scratch: torch.Tensor | None) -> None:
    """Add each parameter's gradient into its place in the float64 accumulator `acc` (in
    parameter order), then zero the gradient. On the CPU each gradient is widened to
    float64 through `scratch` a cache-sized chunk at a time and added from there: a
    mixed-dtype `add_` (or a flattened copy of all gradients first) runs 4-5x slower
    (88 ms against 19 ms for 12.5 M parameters on these CPUs). The widening is exact, so
    the sums are those of widening everything first, bit for bit."""
    offset = 0
    with torch.no_grad():
        for p in params:
            n = p.numel()
            g = p.grad
            if g is not None:
                dst = acc.narrow(0, offset, n)
                src = g.reshape(-1)
                if scratch is None:
                    dst.add_(src)
                else:
                    size = scratch.numel()
                    for start in range(0, n, size):
                        m = min(size, n - start)
                        part = scratch[:m]
                        part.copy_(src.narrow(0, start, m))
                        dst.narrow(0, start, m).add_(part)
                g.zero_()
            offset += n


class GradientWork:
    """The step's compute and gradient exchange (see the module docstring)."""

    def _check_replicas(self) -> None:
        """Silent data corruption: data-parallel replicas must hold identical state.
        One tiny all-reduce gathers every rank's fingerprint; ranks outside the majority
        are reported to the controller (which removes them) and this step is abandoned
        before any gradient of a corrupted replica reached the others."""
        from splice.kernels.fingerprint import combine, fingerprint_module, fingerprint_optimizer

        if self.world_size < 2:
            return
        parts = [fingerprint_module(self.model)]
        if not self._zero:  # a sharded optimizer's state differs across ranks by design
            parts.append(fingerprint_optimizer(self.optimizer))
        fp = combine(parts)
        slots = torch.zeros(self.world_size, dtype=torch.int64)
        slots[self.rank] = fp - (1 << 64) if fp >= (1 << 63) else fp  # as a signed int64
        self.group.all_reduce(slots)
        values = [v % (1 << 64) for v in slots.tolist()]
        if len(set(values)) == 1:
            return
        majority, count = collections.Counter(values).most_common(1)[0]
        m = self._link.latest_membership() if self._link is not None else None
        members = list(m.members) if m is not None else []
        if 2 * count > self.world_size and members:
            culprits = [members[r] for r, v in enumerate(values) if v != majority]
            reason = (f"replicas disagree at step {self.step}: {', '.join(culprits)} "
                      f"differ from the {count} of {self.world_size} ranks that agree "
                      f"(fingerprint {majority:#018x})")
        else:
            culprits = []
            reason = (f"replicas disagree at step {self.step} and no majority agrees: "
                      f"fingerprints {[f'{v:#x}' for v in values]}")
        log.error("worker %s: %s", self.worker_id, reason)
        if self._link is not None:
            try:
                self._link.send(lpb.WorkerToAgent(corruption=pb.CorruptionReport(
                    worker_id=self.worker_id, epoch=self.epoch, step=self.step,
                    culprits=culprits, fingerprints=values, reason=reason)))
            except AgentLost:
                pass
        if culprits:
            # Wait for the membership without the culprits; this step runs again there.
            raise CollectiveAborted(f"silent data corruption: {reason}")

    def _accumulator(self, numel: int, device: torch.device) -> torch.Tensor:
        """The exact reduction's float64 accumulator, zeroed. One is kept from step to
        step: allocating a fresh one costs its page faults every step (~70 ms for 100 MB
        on these CPUs, against ~10 ms to zero it). It is dropped when a step fails
        (`_forward_backward`), since an aborted all-reduce may still write into it."""
        acc = self._grad_acc
        if acc is None or acc.numel() != numel or acc.device != device:
            self._grad_acc = None  # the old one is freed before the new one is made
            acc = self._grad_acc = torch.zeros(numel, dtype=torch.float64, device=device)
        else:
            acc.zero_()
        return acc

    def _forward_backward(self) -> tuple[float, int]:
        try:
            return self._forward_backward_once()
        except BaseException:
            # An aborted epoch's collective may still land in the accumulator later
            # (gloo's threads run out on their own timeout): the next step gets a new one.
            self._grad_acc = None
            raise

    def _forward_backward_once(self) -> tuple[float, int]:
        g = self.batch.global_batch_size
        mine = self.my_micro_batches()
        module: nn.Module = self.ddp if self.ddp is not None else self.model
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer.zero_grad(set_to_none=False)
        # Exact mode sums each micro-batch's float32 gradient into a float64 accumulator:
        # those sums are (nearly always) exact, so the result does not depend on how the
        # micro-batches were spread over ranks, and a run that lost a rank follows the
        # uninterrupted run's loss curve to the last bit.
        exact = self.exact_reduction and self.ddp is None and bool(params)
        device = params[0].device if params else torch.device("cpu")
        acc = scratch = None
        if exact:
            acc = self._accumulator(sum(p.numel() for p in params) + 2, device)
            if device.type == "cpu":
                scratch = torch.empty(min(_CHUNK, acc.numel()), dtype=torch.float64)
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        num_samples = 0
        for j in mine:
            positions = self.batch.micro_batch_positions(self.step, j)
            batch = self.collate_fn([self.dataset[self._sample_index(p)] for p in positions])
            _seed(_seed_for(self.seed, self.step, j))
            last = j == mine[-1]
            if self.ddp is not None and not last:
                with self.ddp.no_sync():
                    loss = self.loss_fn(module, batch)
                    (loss * (len(positions) / g)).backward()
            else:
                loss = self.loss_fn(module, batch)
                (loss * (len(positions) / g)).backward()
            if acc is not None:
                _accumulate(acc, params, scratch)
            loss_sum += loss.detach().double() * len(positions)
            num_samples += len(positions)
            self.group.check()
        # Launched now, the snapshot's GPU copies (if any) run beside the backward pass
        # still queued, and their host time hides behind it.
        self._snapshots.flush()
        # One more element rides along: whether any rank was asked for a replica check,
        # so that all of them run it at the start of the next step.
        asked = self._link is not None and self._link.check_requested
        if asked:
            assert self._link is not None
            self._link.check_requested = False
        flag = torch.tensor([1.0 if asked else 0.0], dtype=torch.float64, device=device)
        if self.ddp is not None:
            both = self.group.all_reduce(torch.cat([loss_sum.reshape(1), flag]))
            total, flag = both[:1], both[1:]
        elif acc is not None:
            acc[-2] = loss_sum
            acc[-1] = flag[0]
            self.group.wait(self.group.all_reduce_async(acc))
            self._set_grads(params, acc[:-2])
            total, flag = acc[-2:-1], acc[-1:]
        else:
            total, flag = self._all_reduce_grads(params, loss_sum, flag)
        if flag.item() > 0:
            self._check_next = True
        return float(total[0]) / g, num_samples

    @staticmethod
    def _set_grads(params: list[nn.Parameter], flat: torch.Tensor) -> None:
        templates = [p.detach() for p in params]
        reduced = torch._utils._unflatten_dense_tensors(flat, templates)
        with torch.no_grad():
            for p, r in zip(params, reduced, strict=True):
                if p.grad is None:
                    p.grad = r.to(p.dtype).clone()
                else:
                    p.grad.copy_(r)

    def _all_reduce_grads(self, params: list[nn.Parameter], loss_sum: torch.Tensor,
                          flag: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One SUM all-reduce of every gradient plus the loss and the check flag, through a
        fresh flat buffer. Returns (loss sum, flag sum)."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        extra = torch.cat([loss_sum.reshape(1), flag])
        if grads:
            flat = torch._utils._flatten_dense_tensors([*grads, extra.to(grads[0].dtype)])
        else:
            flat = extra.clone()
        self.group.wait(self.group.all_reduce_async(flat))
        if grads:
            self._set_grads(params, flat[:-2])
        return flat[-2:-1].double(), flat[-1:].double()
