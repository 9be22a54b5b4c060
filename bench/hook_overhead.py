"""Hook overhead: what telemetry and per-step snapshots add to a training step.

Measures, on this machine, with one torch thread (as workers run):
  telemetry_us_per_step  the hook's per-step telemetry work: progress counters around one
                         collective and at the step's end, and one step report framed and
                         sent over a Unix socket (what a worker does per step under an agent)
  snapshot_us_per_step   the per-step snapshot's time on the training thread, inside the
                         demo job's real step loop (train_mlp's model, one process): at
                         the step's start `Session._capture` takes what the step changes
                         before its optimizer step (RNG states, buffer clones) and hands
                         the rest to the ring's helper thread; before the optimizer step
                         `wait_copied` waits for that thread if it is not done. The
                         median, per step, of the wall time of both.
  helper_cpu_us_per_step the helper thread's CPU time per step: building the state, the
                         walk, the copy, the checksums and the commit. It runs beside the
                         forward and backward passes, so it costs the step nothing while
                         a core is spare; where workers fill every core it costs about
                         its CPU time (`no_spare_core_*`)
  checksum_us_per_step   of which the checksums (`_record`), CPU time
  step_ms                the median step without snapshots (capture a no-op)
and the fractions of that step. Rounds of --round steps rotate between the rings, so a
shared machine's load hits them alike:
  off          no snapshot: the baseline step
  private      the ring in private memory (what a session without an agent runs)
  shm          the ring splice runs under an agent: in shared-memory files, plus the commit
               record written each step (checkpoint/shm.py); the headline figures
  inline       the shm ring captured on the training thread, as before the helper thread
               (`capture` at the step's start: the whole snapshot's time is the step's)
`step_delta_us` (the median step with a ring minus without) is what the step pays in all
while a core is spare: the helper's Python work (building and walking the state, the
commit record) still takes turns with the training thread's on the GIL, so for a small
model whose step is mostly Python it is close to the inline capture's. Noisy on a shared
machine.

    python -m bench.hook_overhead [--steps 400] [--round 25]    (~20-40 s)
    python -m bench.hook_overhead --model gpt --steps 100 --round 10   (~3 min)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch

from splice.agent import progress
from splice.agent.framing import encode
from splice.agent.progress import ProgressWriter
from splice.checkpoint import snapshot as snapshot_module
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


class _Timed:
    """Wall and CPU time of the calls it wraps, summed per step (`take` ends a step)."""

    def __init__(self) -> None:
        self.wall = self.cpu = 0.0
        self.walls: list[float] = []
        self.cpus: list[float] = []

    def wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            t0, c0 = time.perf_counter(), time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.cpu += time.thread_time() - c0  # this thread's CPU time only
                self.wall += time.perf_counter() - t0
        return timed

    def take(self) -> None:
        self.walls.append(self.wall)
        self.cpus.append(self.cpu)
        self.wall = self.cpu = 0.0


class _Off:
    """A ring that keeps nothing: the baseline step."""

    num_bytes = 0

    def capture(self, step: int, state: Any, stable: Any = None, defer: bool = False) -> None:
        pass

    def capture_in_background(self, step: int, state: Any) -> None:
        pass

    def flush(self) -> None:
        pass

    def steps(self) -> list[int]:
        return []

    def wait_copied(self) -> None:
        pass

    def synchronize(self) -> None:
        pass


class _Inline(SnapshotRing):
    """The ring, captured on the calling thread (as the session did before it handed CPU
    captures to the helper thread)."""

    def capture_in_background(self, step: int, state: Callable[[], Any]) -> None:
        self.capture(step, state())


MODES = ("off", "private", "shm", "inline")


def _register(session: Any, model_kind: str) -> None:
    """The job measured: the demo's MLP (SGD with momentum, 64 samples a step), or the
    example GPT (examples/train_gpt.py with its defaults: 3 layers, width 128, AdamW,
    32 sequences of 64 characters a step)."""
    if model_kind == "mlp":
        model = make_mlp(hidden=256, seed=0)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        session.register(model=model, optimizer=opt, dataset=TeacherDataset(),
                         loss_fn=mse_loss, global_batch_size=64, micro_batch_size=8)
        return
    from splice.examples.train_gpt import CharDataset, lm_loss, make_gpt

    dataset = CharDataset(block_size=64)
    gpt = make_gpt(dataset.vocab_size, seed=0)
    opt = torch.optim.AdamW(gpt.parameters(), lr=3e-3, betas=(0.9, 0.95))
    session.register(model=gpt, optimizer=opt, dataset=dataset, loss_fn=lm_loss,
                     global_batch_size=32, micro_batch_size=8)


def snapshot_in_step_loop(steps: int = 400, round_steps: int = 25,
                          model_kind: str = "mlp") -> dict[str, Any]:
    """Per mode, from `steps` measured steps: the steps' times, the snapshot's time on the
    training thread (`_capture` + `wait_copied`), the helper thread's CPU time and the
    checksum's CPU time, per step (s)."""
    import splice

    torch.set_num_threads(1)
    session = splice.init()
    _register(session, model_kind)
    shm = tempfile.mkdtemp(prefix="splice-bench-",
                           dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    rings: dict[str, Any] = {
        "off": _Off(), "private": SnapshotRing(),
        "shm": SnapshotRing(directory=os.path.join(shm, "w"), owner="node-0/0"),
        "inline": _Inline(directory=os.path.join(shm, "i"), owner="node-0/0")}
    snap = {m: _Timed() for m in MODES}  # on the training thread
    helper = {m: _Timed() for m in MODES}  # on the ring's helper thread
    checksum = {m: _Timed() for m in MODES}  # wherever `_record` runs
    times: dict[str, list[float]] = {m: [] for m in MODES}
    capture_fn = session._capture
    record = snapshot_module._record
    mode = "off"
    snapshot_module._record = lambda *a: checksum[mode].wrap(record)(*a)  # type: ignore
    for m, ring in rings.items():
        if m != "off":
            ring.wait_copied = snap[m].wrap(ring.wait_copied)
            ring._capture_off_thread = helper[m].wrap(ring._capture_off_thread)
    try:
        for measured in (False, True):
            # Rounds rotate the modes, so that a shared machine's load hits them alike;
            # the unmeasured first pass warms up the allocator and both slots of each ring.
            for _ in range(-(-steps // round_steps) if measured else 2):
                for mode in MODES:
                    session._snapshots = rings[mode]
                    session._capture = snap[mode].wrap(capture_fn)  # type: ignore[method-assign]
                    for _ in range(round_steps):
                        r = session.run_step()
                        assert r is not None
                        for t in (snap[mode], helper[mode], checksum[mode]):
                            t.take()
                        times[mode].append(r.step_time_s)
            if not measured:
                for t in (*snap.values(), *helper.values(), *checksum.values()):
                    t.walls.clear()
                    t.cpus.clear()
                for k in MODES:
                    times[k].clear()
    finally:
        snapshot_module._record = record
        session._capture = capture_fn  # type: ignore[method-assign]
        for m in ("private", "shm", "inline"):
            rings[m].close()
        shutil.rmtree(shm, ignore_errors=True)
    return {m: {"step_s": times[m], "snapshot_wall_s": snap[m].walls,
                "helper_cpu_s": helper[m].cpus, "checksum_cpu_s": checksum[m].cpus}
            for m in MODES} | {"snapshot_bytes": rings["private"].num_bytes // 2}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=400, help="measured steps per mode")
    parser.add_argument("--round", type=int, default=25, help="steps per mode per round")
    parser.add_argument("--model", choices=["mlp", "gpt"], default="mlp",
                        help="mlp: the demo's job (a 15 ms step on 1.3 MB of state); gpt: "
                             "the example GPT, a transformer's ratio of compute to state")
    args = parser.parse_args(argv)
    t_start = time.perf_counter()
    tel = telemetry_us()
    m = snapshot_in_step_loop(args.steps, args.round, args.model)
    med, mean = statistics.median, statistics.mean
    step_us = med(m["off"]["step_s"]) * 1e6

    def r1(x: float) -> float:
        return round(x, 1)

    def ring(k: str) -> dict[str, Any]:
        thread_us = med(m[k]["snapshot_wall_s"]) * 1e6
        helper_us = mean(m[k]["helper_cpu_s"]) * 1e6
        return {"snapshot_us_per_step": r1(thread_us),
                "helper_cpu_us_per_step": r1(helper_us),
                "checksum_us_per_step": r1(mean(m[k]["checksum_cpu_s"]) * 1e6),
                "step_delta_us": r1((med(m[k]["step_s"]) - med(m["off"]["step_s"])) * 1e6),
                "snapshot_fraction": round(thread_us / step_us, 5),
                # What the step pays in all, while a core is spare (the helper's Python
                # work still takes turns with the training thread's on the GIL).
                "step_delta_fraction": round(
                    (med(m[k]["step_s"]) - med(m["off"]["step_s"])) / med(m["off"]["step_s"]),
                    5),
                "hook_fraction": round((tel + thread_us) / step_us, 5),
                "no_spare_core_fraction": round((tel + thread_us + helper_us) / step_us, 5)}

    shm = ring("shm")
    print(json.dumps({
        "benchmark": "hook_overhead",
        "command": " ".join(["python -m bench.hook_overhead",
                             *(sys.argv[1:] if argv is None else argv)]),
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus",
        "load_avg_1m": round(os.getloadavg()[0], 2), "torch_threads": torch.get_num_threads(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": args.model,
        "steps_per_mode": len(m["off"]["step_s"]), "snapshot_bytes": m["snapshot_bytes"],
        "telemetry_us_per_step": round(tel, 2),
        "step_ms": round(step_us / 1e3, 3),
        **shm,
        "private": ring("private"),
        "inline": ring("inline"),
        "telemetry_fraction": round(tel / step_us, 5),
        "targets": "telemetry <= 1 % of step time; telemetry + snapshot <= 2 %",
        "wall_s": round(time.perf_counter() - t_start, 1),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
