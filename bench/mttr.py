"""MTTR benchmark: crash -> survivors resume, splice beside torchrun.

For each world size, each run starts a local splice job (in-process controller, two agents),
lets it train, SIGKILLs one non-zero rank and measures:
  detect_s   kill -> the controller has the fault (agent reported the exit)
  resume_s   kill -> first step completed by the survivors in the new epoch
The same job then runs under `torchrun --max-restarts` with a per-step disk checkpoint
(bench/torchrun_baseline.py), where resume_s is kill -> first step after the restart.

    python -m bench.mttr [--ranks 4 8] [--runs 5] [--skip-torchrun]

Prints one JSON object per (system, world size), then a summary object.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

from bench.torchrun_baseline import measure_torchrun, percentile
from splice.localjob import LocalJob, LocalJobConfig, timeline_time, worker_argv

WARMUP_STEPS = 20


def _one_splice_run(num_ranks: int, run: int, timeout_s: float) -> dict[str, float]:
    cfg = LocalJobConfig(
        worker_command=worker_argv("splice.examples.train_mlp",
                                   ["--steps", "1000000", "--log-every", "1000000"]),
        nodes=2, nproc=num_ranks // 2, job_id=f"mttr-{num_ranks}-{run}")
    with LocalJob(cfg) as job:
        status = job.wait_until(
            lambda s: s.epoch == 1 and min((w.last_step for w in s.workers), default=0)
            >= WARMUP_STEPS, timeout_s, f"{WARMUP_STEPS} warm-up steps")
        # Rotate the victim over the non-zero ranks, like the torchrun baseline.
        victim = status.members[1 + run % (num_ranks - 1)]
        t_kill = job.kill_worker(victim)
        status = job.wait_until(lambda s: timeline_time(s, "first_step", 2) is not None,
                                timeout_s, "the survivors' first step")
    fault_at = timeline_time(status, "fault")
    first_at = timeline_time(status, "first_step", 2)
    assert fault_at is not None and first_at is not None
    return {"detect_s": fault_at - t_kill, "resume_s": first_at - t_kill}


def measure_splice(num_ranks: int, runs: int, timeout_s: float = 120.0) -> dict[str, object]:
    if num_ranks < 2 or num_ranks % 2:
        raise ValueError(f"num_ranks must be even and >= 2 (two agents), got {num_ranks}")
    results = [_one_splice_run(num_ranks, i, timeout_s) for i in range(runs)]
    resume = [r["resume_s"] for r in results]
    detect = [r["detect_s"] for r in results]
    return {
        "system": "splice", "num_ranks": num_ranks, "runs": runs,
        "resume_s": [round(x, 4) for x in resume],
        "p50_s": round(percentile(resume, 50), 4), "p90_s": round(percentile(resume, 90), 4),
        "detect_p50_s": round(percentile(detect, 50), 4),
        "detect_p90_s": round(percentile(detect, 90), 4),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="crash -> resume MTTR, splice vs torchrun")
    p.add_argument("--ranks", type=int, nargs="+", default=[4, 8])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--skip-torchrun", action="store_true")
    args = p.parse_args(argv)
    command = "python -m bench.mttr " + " ".join(argv if argv is not None else sys.argv[1:])
    machine = f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus"
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    summary: dict[str, object] = {"benchmark": "mttr", "command": command.strip(),
                                  "machine": machine, "date": date}
    for n in args.ranks:
        t0 = time.time()
        row = measure_splice(n, args.runs)
        row.update(wall_s=round(time.time() - t0, 1), machine=machine, date=date)
        print(json.dumps(row), flush=True)
        summary[f"splice_{n}_p50_s"] = row["p50_s"]
        summary[f"splice_{n}_p90_s"] = row["p90_s"]
        if not args.skip_torchrun:
            t0 = time.time()
            base = measure_torchrun(n, args.runs)
            base.update(wall_s=round(time.time() - t0, 1), machine=machine, date=date)
            print(json.dumps(base), flush=True)
            summary[f"torchrun_{n}_p50_s"] = round(float(base["p50_s"]), 4)
            summary[f"torchrun_{n}_p90_s"] = round(float(base["p90_s"]), 4)
    summary["target"] = "splice p50 <= 0.2 s at 8 ranks"
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
