"""MTTR baseline: how long torchrun's survivors take to resume after one rank is SIGKILLed.

Each run starts ``torchrun --standalone --nproc-per-node N --max-restarts 3`` on
``bench/torchrun_train.py`` in a fresh temporary directory, waits for ``warmup_steps``
steps, SIGKILLs one non-zero rank's worker, and measures the time from the kill to the
first step completed by the restarted group (which reloaded rank 0's disk checkpoint).

Usage: ``python -m bench.torchrun_baseline --ranks 4 8 --runs 5`` (one JSON object a line).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

TRAIN_SCRIPT = Path(__file__).resolve().with_name("torchrun_train.py")
POLL_S = 0.01


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0..100) of ``values``, linearly interpolated between ranks."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"q must lie in [0, 100], got {q}")
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _read_events(path: Path) -> list[dict[str, Any]]:
    """Complete JSON lines of the events file so far (a partly written last line is skipped)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    out = []
    for line in text.splitlines(keepends=True):
        if line.endswith("\n"):
            out.append(json.loads(line))
    return out


def _wait_for(
    pred: Any, events_path: Path, proc: subprocess.Popen[bytes], deadline: float, what: str
) -> list[dict[str, Any]]:
    """Poll the events file until ``pred(events)`` holds; raise if torchrun exits or time runs out."""
    while True:
        events = _read_events(events_path)
        if pred(events):
            return events
        if proc.poll() is not None:
            raise RuntimeError(f"torchrun exited (rc={proc.returncode}) while waiting for {what}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(POLL_S)


def _kill_tree(proc: subprocess.Popen[bytes], ckpt_dir: Path) -> None:
    """End torchrun, its workers (each in its own session) and anything they started."""
    procs: dict[int, psutil.Process] = {}
    try:
        root = psutil.Process(proc.pid)
        procs[root.pid] = root
        for child in root.children(recursive=True):
            procs[child.pid] = child
    except psutil.NoSuchProcess:
        pass
    for pid_file in ckpt_dir.glob("pid.*"):  # workers orphaned by a dying agent
        try:
            p = psutil.Process(int(pid_file.read_text()))
            if any(str(TRAIN_SCRIPT.name) in part for part in p.cmdline()):
                procs[p.pid] = p
        except (psutil.Error, ValueError, OSError):
            pass
    # SIGTERM first so the agent shuts its workers down, then SIGKILL whatever is left.
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    for p in procs.values():
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(list(procs.values()), timeout=5)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _one_run(
    num_ranks: int, victim: int, steps: int, warmup_steps: int, timeout_s: float
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="torchrun-mttr-") as tmp:
        work = Path(tmp)
        ckpt_dir = work / "ckpt"
        ckpt_dir.mkdir()
        events_path = work / "events.jsonl"
        log = open(work / "torchrun.log", "wb")  # noqa: SIM115
        env = dict(os.environ, TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1", OMP_NUM_THREADS="1")
        cmd = [
            sys.executable, "-m", "torch.distributed.run",
            "--standalone", "--nproc-per-node", str(num_ranks),
            "--max-restarts", "3", "--rdzv-backend", "c10d",
            str(TRAIN_SCRIPT),
            "--steps", str(steps), "--ckpt-dir", str(ckpt_dir), "--events", str(events_path),
        ]  # fmt: skip
        proc = subprocess.Popen(
            cmd, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            deadline = time.monotonic() + timeout_s
            _wait_for(
                lambda ev: len(ev) >= warmup_steps, events_path, proc, deadline, "warm-up steps"
            )
            victim_pid = int((ckpt_dir / f"pid.{victim}").read_text())
            os.kill(victim_pid, signal.SIGKILL)
            t_kill = time.time()
            events = _wait_for(
                lambda ev: any(e["attempt"] >= 1 for e in ev),
                events_path, proc, deadline, "the restarted group's first step",
            )  # fmt: skip
            before = [e for e in events if e["attempt"] == 0]
            first = next(e for e in events if e["attempt"] >= 1)
            last_before = max(e["step"] for e in before)
            # Recomputed work: steps completed before the kill that the restarted group redid
            # (the group resumes at first["step"]; every logged step was checkpointed first).
            steps_lost = max(0, last_before - first["step"] + 1)
            return {
                "resume_s": first["t"] - t_kill,
                "steps_lost": steps_lost,
                "killed_rank": victim,
                "step_at_kill": last_before,
                "resumed_at_step": first["step"],
            }
        except BaseException:
            log.flush()
            tail = (work / "torchrun.log").read_text(errors="replace")[-4000:]
            print(f"torchrun log tail:\n{tail}", file=sys.stderr)
            raise
        finally:
            _kill_tree(proc, ckpt_dir)
            log.close()


def measure_torchrun(
    num_ranks: int, runs: int, steps: int = 400, warmup_steps: int = 20, timeout_s: float = 120
) -> dict:
    """Kill one non-zero rank in each of ``runs`` fresh torchrun jobs; time survivors' resume.

    ``timeout_s`` bounds each run. Returns the per-run resume times (kill to the first step
    completed after torchrun's restart), their p50/p90, and the steps recomputed per run.
    """
    if num_ranks < 2:
        raise ValueError("need at least 2 ranks to kill a non-zero one")
    results = [
        _one_run(num_ranks, 1 + i % (num_ranks - 1), steps, warmup_steps, timeout_s)
        for i in range(runs)
    ]
    resume = [r["resume_s"] for r in results]
    return {
        "system": "torchrun",
        "num_ranks": num_ranks,
        "runs": runs,
        "resume_s": [round(x, 4) for x in resume],
        "p50_s": round(percentile(resume, 50), 4),
        "p90_s": round(percentile(resume, 90), 4),
        "steps_lost": [r["steps_lost"] for r in results],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, nargs="+", default=[4, 8])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--warmup-steps", type=int, default=20)
    p.add_argument("--timeout-s", type=float, default=120)
    args = p.parse_args(argv)
    for n in args.ranks:
        res = measure_torchrun(n, args.runs, args.steps, args.warmup_steps, args.timeout_s)
        print(json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
