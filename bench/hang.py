"""Hang detection on real processes: latency and culprit accuracy.

Each run starts a local job (2 agents x 2 workers, the toy MLP) and injects one hang into
worker node-1/0 (rank 2) at step 40:
  stopped   SIGSTOP the process (it stops mid-step or inside a collective)
  sleeping  the worker sleeps 30 s inside its step (a wedged data loader or kernel)
and measures the time from the injection to the hang verdict, whether the verdict names the
right rank and kind, and the time until the survivors' first step after the culprit was
killed. The target is max(3 x median step, 1 s) from the job's last progress.

    python -m bench.hang [--runs 5]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import sys
import time

from bench.torchrun_baseline import percentile
from splice.localjob import LocalJob, LocalJobConfig, worker_argv

VICTIM, AT_STEP = "node-1/0", 40


def one_run(kind: str, run: int, timeout_s: float = 120.0) -> dict[str, object]:
    args = ["--steps", "100000", "--log-every", "1000000", "--step-sleep-s", "0.02"]
    if kind == "sleeping":
        args += ["--stall", f"{VICTIM}:{AT_STEP}:30"]
    cfg = LocalJobConfig(worker_command=worker_argv("splice.examples.train_mlp", args),
                         job_id=f"hang-{kind}-{run}")
    with LocalJob(cfg) as job:
        status = job.wait_until(
            lambda s: s.phase == "running" and min(
                (w.last_step for w in s.workers), default=0) >= AT_STEP - 1,
            timeout_s, f"step {AT_STEP}")
        if kind == "stopped":
            t_inject = time.time()
            os.kill(job.worker(status, VICTIM).pid, signal.SIGSTOP)
        else:
            # The stall starts when the victim enters step AT_STEP: about now.
            t_inject = time.time()
        status = job.wait_until(lambda s: any(v.detector == "hang" for v in s.verdicts),
                                timeout_s, "the hang verdict")
        v = next(v for v in status.verdicts if v.detector == "hang")
        status = job.wait_until(
            lambda s: any(e.kind == "first_step" and e.at_s > v.at_s for e in s.timeline),
            timeout_s, "the survivors' first step")
        resumed = min(e.at_s for e in status.timeline
                      if e.kind == "first_step" and e.at_s > v.at_s)
        step_s = sorted(w.last_step_time_s for w in status.workers)[len(status.workers) // 2]
    return {"kind": kind, "detect_s": v.at_s - t_inject, "resume_s": resumed - t_inject,
            "culprit": v.worker_id, "verdict_kind": v.kind, "correct": v.worker_id == VICTIM,
            "action": v.action, "median_step_s": step_s}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="hang detection latency and culprit accuracy")
    p.add_argument("--runs", type=int, default=5)
    args = p.parse_args(argv)
    command = "python -m bench.hang " + " ".join(argv if argv is not None else sys.argv[1:])
    machine = f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus"
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    summary: dict[str, object] = {"benchmark": "hang", "command": command.strip(),
                                  "machine": machine, "date": date,
                                  "target": "verdict within max(3 x median step, 1 s) of the "
                                            "job's last progress"}
    for kind in ("stopped", "sleeping"):
        rows = [one_run(kind, i) for i in range(args.runs)]
        for r in rows:
            print(json.dumps({k: round(v, 4) if isinstance(v, float) else v
                              for k, v in r.items()}), flush=True)
        detect = [float(r["detect_s"]) for r in rows]  # type: ignore[arg-type]
        summary[f"{kind}_detect_p50_s"] = round(percentile(detect, 50), 4)
        summary[f"{kind}_detect_p90_s"] = round(percentile(detect, 90), 4)
        summary[f"{kind}_culprit_accuracy"] = sum(bool(r["correct"]) for r in rows) / len(rows)
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
