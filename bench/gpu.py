"""GPU benchmarks for issue 7: fingerprint speed against HBM bandwidth, snapshot D2H speed
against the pinned-copy limit, and the step overhead of per-step GPU snapshots on a GPT.

Prints one JSON object (machine, torch, date, command, figures, targets). Run on a CUDA
machine: `python -m bench.gpu > bench/results/gpu-<date>.json`.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from splice.checkpoint.device_copy import training_state_ptrs
from splice.checkpoint.snapshot import SnapshotRing
from splice.kernels import fingerprint as fp
from splice.kernels import snapshot_copy as sc

GiB = 1 << 30


def timed_ms(fn: Callable[[], object], reps: int = 10, warmup: int = 3, inner: int = 1
             ) -> float:
    """Median device time of one call of `fn` in ms: CUDA events around `inner` calls
    back to back, so the host's launch overhead overlaps the previous call's work."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(inner):
            fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / inner)
    return statistics.median(times)


def bandwidths() -> dict[str, float]:
    x = torch.randint(-2**31, 2**31 - 1, (GiB // 4,), dtype=torch.int32, device="cuda")
    xf = x.view(torch.float32)
    y = torch.empty_like(x)
    bf = x.view(torch.bfloat16)
    host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
    gbs = lambda nbytes, ms: nbytes / ms / 1e6  # noqa: E731
    out = {
        "hbm_copy_d2d_gbs": gbs(2 * GiB, timed_ms(lambda: y.copy_(x), inner=10)),
        "hbm_reduction_gbs": gbs(GiB, timed_ms(lambda: torch.sum(xf), inner=10)),
        "fingerprint_fp32_gbs": gbs(GiB, timed_ms(lambda: torch.ops.splice.fingerprint(xf),
                                                  inner=10)),
        "fingerprint_bf16_gbs": gbs(GiB, timed_ms(lambda: torch.ops.splice.fingerprint(bf),
                                                  inner=10)),
        "copy_fingerprint_d2d_gbs": gbs(2 * GiB, timed_ms(
            lambda: torch.ops.splice.copy_fingerprint(x, y), inner=10)),
        "d2h_pinned_copy_gbs": gbs(GiB, timed_ms(lambda: host.copy_(x, non_blocking=True))),
        "d2h_to_cpu_non_blocking_gbs": gbs(GiB, timed_ms(
            lambda: x.to("cpu", non_blocking=True), reps=5)),
    }
    try:  # the fused kernel writing over PCIe into pinned memory (zero-copy)
        out["copy_fingerprint_d2h_zero_copy_gbs"] = gbs(GiB, timed_ms(
            lambda: sc.copy_fingerprint_triton(x, host), reps=5))
    except Exception as e:  # reported, not fatal
        out["copy_fingerprint_d2h_zero_copy_error"] = str(e)[:200]  # type: ignore[assignment]
    assert int(torch.ops.splice.fingerprint(x[: 1 << 20])) == fp.fingerprint_cpu(
        x[: 1 << 20].cpu())
    return out


def snapshot_throughput(limit_gbs: float) -> dict[str, float]:
    """What the session's ring (`SnapshotRing` in shared memory) takes to land 1 GiB in 64
    GPU tensors (like a model's parameters) in its page-locked slot: from the capture call
    to the host seeing the copies done (block checksums on the GPU, DMA on a side stream),
    the wall-clock median of 8 after 3 warm-ups (both slots registered by then)."""
    tensors = {f"t{i}": torch.randn(GiB // 4 // 64, device="cuda") for i in range(64)}
    stable = frozenset(t.data_ptr() for t in tensors.values())
    shm = tempfile.mkdtemp(prefix="splice-gpu-bench-", dir="/dev/shm")
    ring = SnapshotRing(directory=os.path.join(shm, "t"), owner="bench/0")
    times = []
    try:
        for step in range(1, 12):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            ring.capture(step, tensors, stable)
            ring.synchronize()
            if step > 3:
                times.append(time.perf_counter() - t0)
        ring.verify(11)  # what landed is what the GPU summed
    finally:
        ring.close()
        shutil.rmtree(shm, ignore_errors=True)
    gbs = GiB / statistics.median(times) / 1e9
    return {"snapshot_d2h_gbs": gbs, "snapshot_fraction_of_pinned_limit": gbs / limit_gbs}


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                           v.transpose(1, 2), is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, vocab: int = 32768, d: int = 1024, layers: int = 12, heads: int = 16,
                 ctx: int = 1024) -> None:
        super().__init__()
        self.emb, self.pos = nn.Embedding(vocab, d), nn.Embedding(ctx, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.emb(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for blk in self.blocks:
            x = blk(x)
        return self.ln(x) @ self.emb.weight.t()


def _gpt_job(batch: int, ctx: int) -> tuple[GPT, torch.optim.Optimizer, torch.Tensor]:
    torch.manual_seed(0)
    model = GPT(ctx=ctx).cuda().to(torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    data = torch.randint(0, 32768, (batch, ctx + 1), device="cuda")
    return model, opt, data


def _gpt_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    logits = model(batch[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                           batch[:, 1:].reshape(-1))


def step_overhead(batch: int = 16, ctx: int = 1024, steps: int = 20, rounds: int = 3
                  ) -> dict[str, Any]:
    """bf16 GPT training in a plain loop; per-step snapshot of the model and AdamW state,
    fenced before the optimizer step, by both rings: `SnapshotRing` in shared memory (what
    a splice worker runs: block checksums on the GPU, DMA into the agent's page-locked
    files, commit at the next step), its copies launched at the capture ("shm") or after
    the backward pass is launched ("shm_deferred", what the session does). Steps are timed
    in runs (no per-step sync), rounds interleaved;
    overhead = median(with) / median(without) - 1."""
    model, opt, data = _gpt_job(batch, ctx)
    shm = tempfile.mkdtemp(prefix="splice-gpu-bench-", dir="/dev/shm")
    rings = {"shm": SnapshotRing(directory=os.path.join(shm, "w"), owner="bench/0"),
             "shm_deferred": SnapshotRing(directory=os.path.join(shm, "d"), owner="bench/1")}
    step_no = [0]

    def train_step(mode: str) -> None:
        step_no[0] += 1
        ring = rings.get(mode)
        if ring is not None:
            ring.capture(step_no[0], {"model": model.state_dict(),
                                      "optimizer": opt.state_dict()},
                         training_state_ptrs(model, opt), defer=mode == "shm_deferred")
        loss = _gpt_loss(model, data)
        loss.backward()
        if ring is not None:
            ring.flush()
            ring.wait_copied()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def run(mode: str) -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            train_step(mode)
        torch.cuda.synchronize()
        return (time.perf_counter() - t0) / steps * 1e3

    modes = ("off", *rings)
    try:
        for m in (*modes, "off"):  # warm-up (allocator, kernels, optimizer state, slots)
            run(m)
        times: dict[str, list[float]] = {m: [] for m in modes}
        for _ in range(rounds):
            for m in modes:
                times[m].append(run(m))
        shm_ring = rings["shm"]
        shm_ring.synchronize()
        newest = max(shm_ring.steps())
        shm_ring.verify(newest)  # the GPU's checksums match the bytes that landed
        t0 = time.perf_counter()
        shm_ring.capture(step_no[0] + 1, {"model": model.state_dict(),
                                          "optimizer": opt.state_dict()},
                         training_state_ptrs(model, opt))
        enqueue_ms = (time.perf_counter() - t0) * 1e3
        shm_ring.synchronize()
        complete_ms = (time.perf_counter() - t0) * 1e3
        nbytes = shm_ring.num_bytes // 2
    finally:
        for ring in rings.values():
            ring.close()
        shutil.rmtree(shm, ignore_errors=True)
    base = statistics.median(times["off"])
    out: dict[str, Any] = {
        "model_params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "snapshot_tensors": len(model.state_dict()) + sum(
            len(st) for st in opt.state_dict()["state"].values()), "snapshot_mb": nbytes / 1e6,
        "tokens_per_step": batch * ctx, "step_ms_base": base,
        "capture_enqueue_ms": enqueue_ms, "capture_complete_ms": complete_ms,
        "runs_ms": times}
    for m in rings:
        out[f"step_ms_{m}"] = statistics.median(times[m])
        out[f"step_overhead_fraction_{m}"] = statistics.median(times[m]) / base - 1
    out["step_overhead_fraction"] = out["step_overhead_fraction_shm_deferred"]  # the session's
    return out


def session_overhead(batch: int = 16, ctx: int = 1024, steps: int = 15, rounds: int = 3
                     ) -> dict[str, Any]:
    """The same GPT through `splice.Session.run_step` (a one-rank session, no agent):
    rounds of steps without a snapshot (the ring replaced by one that keeps nothing) and
    with the session's own ring in shared memory. The session syncs the host once a step
    (the loss), so the capture's host time is not hidden behind queued GPU work here."""
    import splice
    from bench.hook_overhead import _Off

    model, opt, data = _gpt_job(batch, ctx)
    session = splice.init()
    session.register(model=model, optimizer=opt, dataset=list(data.cpu()),
                     loss_fn=lambda m, b: _gpt_loss(m, b.cuda(non_blocking=True)),
                     global_batch_size=batch, micro_batch_size=batch, exact_reduction=False)
    shm = tempfile.mkdtemp(prefix="splice-gpu-bench-", dir="/dev/shm")
    ring = SnapshotRing(directory=os.path.join(shm, "w"), owner="bench/0")
    modes = {"off": _Off(), "shm": ring}
    times: dict[str, list[float]] = {m: [] for m in modes}
    try:
        for measured in (False, True):
            for _ in range(rounds if measured else 1):
                for m, r in modes.items():
                    session._snapshots = r
                    run = []
                    for _ in range(steps):
                        res = session.run_step()
                        assert res is not None
                        run.append(res.step_time_s * 1e3)
                    if measured:
                        times[m].append(statistics.median(run))
        ring.synchronize()
        ring.verify(max(ring.steps()))
    finally:
        session.close()
        ring.close()
        shutil.rmtree(shm, ignore_errors=True)
    base, snap = statistics.median(times["off"]), statistics.median(times["shm"])
    return {"session_step_ms_base": base, "session_step_ms_snapshot": snap,
            "session_step_overhead_fraction": snap / base - 1, "session_runs_ms": times}


def _rounded(v: Any) -> Any:
    if isinstance(v, float):
        return round(v, 4)
    if isinstance(v, dict):
        return {k: _rounded(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_rounded(x) for x in v]
    return v


def main() -> None:
    bw = bandwidths()
    snap = snapshot_throughput(max(bw["d2h_pinned_copy_gbs"], bw["d2h_to_cpu_non_blocking_gbs"]))
    hbm = max(bw["hbm_reduction_gbs"], bw["hbm_copy_d2d_gbs"])
    figures = {**bw, **snap,
               "fingerprint_fraction_of_hbm": bw["fingerprint_fp32_gbs"] / hbm,
               "fingerprint_bf16_fraction_of_hbm": bw["fingerprint_bf16_gbs"] / hbm,
               **step_overhead(), **session_overhead()}
    print(json.dumps({
        "benchmark": "gpu", "device": torch.cuda.get_device_name(),
        "torch": torch.__version__, "triton": __import__("triton").__version__,
        "date": datetime.date.today().isoformat(), "command": " ".join(sys.argv),
        "hbm_reference": "max(1 GiB on-GPU reduction, 1 GiB D2D copy counted read+write)",
        "targets": {"fingerprint_fraction_of_hbm": ">= 0.8",
                    "snapshot_fraction_of_pinned_limit": ">= 0.8",
                    "step_overhead_fraction": "<= 0.02"},
        **{k: _rounded(v) for k, v in figures.items()},
    }))


if __name__ == "__main__":
    main()
