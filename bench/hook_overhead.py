"""Hook overhead: what telemetry and per-step snapshots add to a training step.

Measures, on this machine:
  telemetry_us   the hook's per-step telemetry work: progress counters around one
                 collective and at the step's end, and one step report framed and sent
                 over a Unix socket (what a worker does per step under an agent)
  snapshot_us    one per-step snapshot of the demo model and optimizer (double-buffered
                 copy into preallocated buffers)
  step_ms        the median step of the demo job (train_mlp, one process, 200 steps)
and prints them as JSON with the overhead as a fraction of the step.

    python -m bench.hook_overhead
"""

from __future__ import annotations

import datetime
import os
import platform
import socket
import statistics
import sys
import tempfile
import time

import torch

from splice.agent import progress
from splice.agent.framing import encode
from splice.agent.progress import ProgressWriter
from splice.checkpoint.snapshot import SnapshotRing
from splice.examples.toy import TeacherDataset, make_mlp, mse_loss
from splice.proto import controller_pb2 as pb
from splice.proto import local_pb2 as lpb


def telemetry_us(iterations: int = 20_000) -> float:
    path = os.path.join(tempfile.mkdtemp(prefix="splice-bench-"), "progress")
    progress.create(path)
    writer = ProgressWriter(path)
    a, b = socket.socketpair()
    b.setblocking(False)
    report = pb.StepReport(worker_id="node-0/0", epoch=1, loss=0.25, step_time_s=0.02,
                           completed_at_s=time.time(), num_samples=16, compute_s=0.015,
                           wait_s=0.005, collective_bytes=600_000, snapshot_bytes=2_000_000,
                           snapshot_at_s=time.time())
    t0 = time.perf_counter()
    for i in range(iterations):
        writer.enter("all_reduce", 600_000)
        writer.exit()
        writer.step(i)
        report.step = i
        a.sendall(encode(lpb.WorkerToAgent(step_report=report)))
        try:
            b.recv(1 << 16)  # keep the buffer drained; the agent's read is not counted
        except BlockingIOError:
            pass
    elapsed = time.perf_counter() - t0
    writer.close()
    return elapsed / iterations * 1e6


def snapshot_us_and_step_ms(steps: int = 200) -> tuple[float, float, int]:
    import splice

    torch.set_num_threads(1)
    session = splice.init()
    model = make_mlp(hidden=256, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    session.register(model=model, optimizer=opt, dataset=TeacherDataset(), loss_fn=mse_loss,
                     global_batch_size=64, micro_batch_size=8)
    times = []
    for _ in range(steps):
        r = session.run_step()
        assert r is not None
        times.append(r.step_time_s)
    ring = SnapshotRing()
    state = session._state()
    ring.capture(0, state)
    t0 = time.perf_counter()
    n = 50
    for k in range(1, n + 1):
        ring.capture(k, session._state())
    snap_us = (time.perf_counter() - t0) / n * 1e6
    return snap_us, statistics.median(times[20:]) * 1e3, ring.num_bytes // 2


def main() -> int:
    tel = telemetry_us()
    snap, step_ms, snap_bytes = snapshot_us_and_step_ms()
    print(__import__("json").dumps({
        "benchmark": "hook_overhead", "command": "python -m bench.hook_overhead",
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "telemetry_us_per_step": round(tel, 2), "snapshot_us_per_step": round(snap, 1),
        "snapshot_bytes": snap_bytes, "step_ms": round(step_ms, 3),
        "telemetry_fraction": round(tel / 1e3 / step_ms, 5),
        "hook_fraction": round((tel + snap) / 1e3 / step_ms, 5),
        "targets": "telemetry <= 1 % of step time; telemetry + snapshot <= 2 %",
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
