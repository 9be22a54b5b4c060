"""GPU benchmarks for issue 7: fingerprint speed against HBM bandwidth, snapshot D2H speed
against the pinned-copy limit, and the step overhead of per-step GPU snapshots on a GPT.

Prints one JSON object (machine, torch, date, command, figures, targets). Run on a CUDA
machine: `python3 bench/gpu.py > bench/results/gpu-<date>.json`.
"""

from __future__ import annotations

import datetime
import json
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from splice.checkpoint.gpu_snapshot import GpuSnapshotRing, state_tensors
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
    """GpuSnapshotRing.capture of 1 GiB in 64 tensors (like a model's parameters)."""
    tensors = {f"t{i}": torch.randn(GiB // 4 // 64, device="cuda") for i in range(64)}
    ring = GpuSnapshotRing()
    step = [0]

    def capture() -> None:
        step[0] += 1
        ring.capture(step[0], tensors)
        torch.cuda.current_stream().wait_stream(ring.stream)

    ms = timed_ms(capture, reps=8)
    gbs = GiB / ms / 1e6
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


def step_overhead(batch: int = 16, ctx: int = 1024, steps: int = 20, rounds: int = 3
                  ) -> dict[str, float]:
    """bf16 GPT training; per-step snapshot of params + AdamW state on a side stream,
    fenced before the optimizer step. Steps are timed in runs (no per-step sync), A/B
    interleaved; overhead = median(snap) / median(base) - 1."""
    torch.manual_seed(0)
    model = GPT(ctx=ctx).cuda().to(torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    data = torch.randint(0, 32768, (batch, ctx + 1), device="cuda")
    ring = GpuSnapshotRing()
    step_no = [0]

    def train_step(snapshot: bool) -> None:
        step_no[0] += 1
        if snapshot:
            ring.capture(step_no[0], state_tensors(model, opt))
        logits = model(data[:, :-1])
        loss = F.cross_entropy(logits.view(-1, logits.shape[-1]).float(),
                               data[:, 1:].reshape(-1))
        loss.backward()
        if snapshot:
            ring.wait_copied()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def run(snapshot: bool) -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            train_step(snapshot)
        torch.cuda.synchronize()
        return (time.perf_counter() - t0) / steps * 1e3

    for s in (False, True, False):  # warm-up (allocator, kernels, optimizer state)
        run(s)
    base, snap = [], []
    for _ in range(rounds):
        base.append(run(False))
        snap.append(run(True))
    st = state_tensors(model, opt)
    nbytes = sum(t.numel() * t.element_size() for t in st.values())
    t0 = time.perf_counter()
    ring.capture(step_no[0] + 1, st)
    enqueue_ms = (time.perf_counter() - t0) * 1e3
    ring.synchronize()
    copy_ms = (time.perf_counter() - t0) * 1e3
    b, s = statistics.median(base), statistics.median(snap)
    return {"model_params_m": sum(p.numel() for p in model.parameters()) / 1e6,
            "snapshot_tensors": len(st), "snapshot_mb": nbytes / 1e6,
            "tokens_per_step": batch * ctx, "step_ms_base": b, "step_ms_snapshot": s,
            "step_overhead_fraction": s / b - 1, "capture_enqueue_ms": enqueue_ms,
            "capture_complete_ms": copy_ms, "base_runs_ms": base, "snapshot_runs_ms": snap}


def main() -> None:
    bw = bandwidths()
    snap = snapshot_throughput(max(bw["d2h_pinned_copy_gbs"], bw["d2h_to_cpu_non_blocking_gbs"]))
    hbm = max(bw["hbm_reduction_gbs"], bw["hbm_copy_d2d_gbs"])
    figures = {**bw, **snap,
               "fingerprint_fraction_of_hbm": bw["fingerprint_fp32_gbs"] / hbm,
               "fingerprint_bf16_fraction_of_hbm": bw["fingerprint_bf16_gbs"] / hbm,
               **step_overhead()}
    print(json.dumps({
        "benchmark": "gpu", "device": torch.cuda.get_device_name(),
        "torch": torch.__version__, "triton": __import__("triton").__version__,
        "date": datetime.date.today().isoformat(), "command": " ".join(sys.argv),
        "hbm_reference": "max(1 GiB on-GPU reduction, 1 GiB D2D copy counted read+write)",
        "targets": {"fingerprint_fraction_of_hbm": ">= 0.8",
                    "snapshot_fraction_of_pinned_limit": ">= 0.8",
                    "step_overhead_fraction": "<= 0.02"},
        **{k: round(v, 4) if isinstance(v, float) else v for k, v in figures.items()},
    }))


if __name__ == "__main__":
    main()
