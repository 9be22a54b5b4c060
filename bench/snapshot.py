"""Per-step CPU snapshot speed (issue 3): `SnapshotRing.capture` against a plain copy of the
same tensors and against one flat memcpy of the same byte count, and the checksum's cost.

The state is a model's state_dict plus Adam's (exp_avg, exp_avg_sq, a 0-dim step per
parameter), from a small transformer scaled to about --size-mb: a few large tensors
(embedding, projections) and many small ones (biases, norms, steps), as in training.

    capture_gbps          one `capture` into a slot already allocated: the copy and the
                          checksums (inline, as splice runs it)
    capture_copy_gbps     the same with checksum_in_background=True, the previous capture's
                          checksum finished first: the copy alone, on the calling thread
    plain_copy_gbps       `dst.copy_(src)` over the same tensors, preallocated
    foreach_copy_gbps     the same copies as one `torch._foreach_copy_` call (what capture uses)
    memcpy_gbps           one copy of a flat buffer of the same byte count
    verify_gbps           `verify(step)`: every tensor's checksum recomputed in place
    crc32_gbps            zlib.crc32 over the same tensors in place: the checksum `capture`
                          took before (for comparison)
    restore_gbps          `restore(step)`: copy out and check the copy

Each figure is the median of --runs runs, the ratios the median of per-run ratios (the
figures of a run are taken side by side, so a shared machine's load hits them alike).
Target: the copy (capture_copy) >= 0.80 of memcpy; capture_over_memcpy shows what the
checksum adds on top.

    python -m bench.snapshot [--size-mb 100] [--runs 5] [--threads 1]

Workers run with one intra-op thread (the agent sets OMP_NUM_THREADS=1), so that is the
default; with more threads than idle cores, every per-tensor parallel region can wait a
scheduler slice and all the figures collapse together.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import os
import platform
import statistics
import sys
import time
import zlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from splice.checkpoint.snapshot import SnapshotRing, tensor_bytes


def make_state(size_bytes: int) -> dict[str, Any]:
    """A transformer's state_dict and Adam's state after one step, about `size_bytes`."""
    torch.manual_seed(0)
    d_model, vocab = 256, 8192
    per_param = 3 * 4  # fp32 weight + exp_avg + exp_avg_sq
    layer_params = sum(p.numel() for p in nn.TransformerEncoderLayer(
        d_model, 4, 4 * d_model, batch_first=True).parameters())
    fixed_params = 2 * vocab * d_model + 2 * d_model + vocab  # embedding, final norm, head
    num_layers = max(1, round((size_bytes / per_param - fixed_params) / layer_params))
    model = nn.Sequential(
        nn.Embedding(vocab, d_model),
        *[nn.TransformerEncoderLayer(d_model, 4, 4 * d_model, batch_first=True)
          for _ in range(num_layers)],
        nn.LayerNorm(d_model), nn.Linear(d_model, vocab))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    return {"model": model.state_dict(), "optimizer": opt.state_dict(),
            "rng": {"torch": torch.get_rng_state()}, "step": 1}


def tensors(tree: Any) -> list[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):
        return [t for v in tree.values() for t in tensors(v)]
    if isinstance(tree, (list, tuple)):
        return [t for v in tree for t in tensors(v)]
    return []


def timed_s(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=float, default=100.0, help="state size, 1e6 bytes")
    parser.add_argument("--runs", type=int, default=5, help="runs per figure (median)")
    parser.add_argument("--inner", type=int, default=3, help="calls averaged within a run")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads; 1 as in workers (OMP_NUM_THREADS=1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()

    state = make_state(int(args.size_mb * 1e6))
    srcs = tensors(state)
    num_bytes = tensor_bytes(state)
    dsts = [torch.empty_like(t) for t in srcs]
    flat_src = torch.ones(num_bytes, dtype=torch.uint8)
    flat_dst = torch.empty_like(flat_src)
    ring = SnapshotRing()
    ring.capture(0, state)  # the first two captures allocate the two slots
    ring.capture(1, state)
    copy_ring = SnapshotRing(checksum_in_background=True)
    copy_ring.capture(0, state)
    copy_ring.capture(1, state)
    step = 1

    def capture() -> None:
        nonlocal step
        step += 1
        ring.capture(step, state)

    def capture_copy() -> None:
        copy_ring.capture(step, state)  # `step` is new to copy_ring too

    def plain_copy() -> None:
        for d, s in zip(dsts, srcs, strict=True):
            d.copy_(s)

    def crc32() -> None:
        for t in srcs:
            n = t.numel() * t.element_size()
            if n:
                zlib.crc32((ctypes.c_char * n).from_address(t.data_ptr()))

    # The figures of one run are taken interleaved, so that load from other processes on
    # a shared machine hits them alike; each is the mean of --inner calls.
    figures: dict[str, list[float]] = {k: [] for k in (
        "capture", "capture_copy", "plain_copy", "foreach_copy", "memcpy", "verify",
        "crc32", "restore")}
    ratios: dict[str, list[float]] = {"capture_over_plain_copy": [],
                                      "capture_over_memcpy": [],
                                      "capture_copy_over_memcpy": [],
                                      "crc32_over_verify": []}
    plain_copy()
    flat_dst.copy_(flat_src)
    for _ in range(args.runs):
        run: dict[str, float] = dict.fromkeys(figures, 0.0)
        for _ in range(args.inner):
            run["capture"] += timed_s(capture)
            copy_ring.checksums(max(copy_ring.steps()))  # a step longer than the checksum
            run["capture_copy"] += timed_s(capture_copy)
            run["plain_copy"] += timed_s(plain_copy)
            run["foreach_copy"] += timed_s(lambda: torch._foreach_copy_(dsts, srcs))
            run["memcpy"] += timed_s(lambda: flat_dst.copy_(flat_src))
            run["verify"] += timed_s(lambda: ring.verify(step))
            run["crc32"] += timed_s(crc32)
            run["restore"] += timed_s(lambda: ring.restore(step))
        for k, v in run.items():
            figures[k].append(v / args.inner)
        ratios["capture_over_plain_copy"].append(run["plain_copy"] / run["capture"])
        ratios["capture_over_memcpy"].append(run["memcpy"] / run["capture"])
        ratios["capture_copy_over_memcpy"].append(run["memcpy"] / run["capture_copy"])
        ratios["crc32_over_verify"].append(run["crc32"] / run["verify"])
    copy_ring.checksums(max(copy_ring.steps()))

    median = {k: statistics.median(v) for k, v in figures.items()}
    print(json.dumps({
        "benchmark": "snapshot",
        "command": " ".join(["python -m bench.snapshot",
                             *(sys.argv[1:] if argv is None else argv)]),
        "machine": {"platform": platform.platform(), "processor": platform.machine(),
                    "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "load_avg_1m": round(os.getloadavg()[0], 2)},
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "state_bytes": num_bytes, "num_tensors": len(srcs),
        "num_tensors_under_4kb": sum(t.numel() * t.element_size() < 4096 for t in srcs),
        "largest_tensor_bytes": max(t.numel() * t.element_size() for t in srcs),
        "runs": args.runs, "inner": args.inner,
        "capture_ms": round(median["capture"] * 1e3, 3),
        "capture_copy_ms": round(median["capture_copy"] * 1e3, 3),
        **{f"{k}_gbps": round(num_bytes / v / 1e9, 3) for k, v in median.items()},
        **{k: round(statistics.median(v), 3) for k, v in ratios.items()},
        "target": "capture_copy >= 0.80 of memcpy",
        "wall_s": round(time.perf_counter() - t_start, 1),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
