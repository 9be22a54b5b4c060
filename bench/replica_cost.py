"""What pushing replicas ahead of a fault (agent --replicas) costs a training job.

Runs the same local job (2 agents x 2 workers, the toy MLP sized to --state-mb of state
per rank) with agents pushing no replicas and with --replicas 1, alternating, and reports
per run the median step time (rank 0's completions, after a warm-up) and what the agents
pushed (their Prometheus counters). On a machine whose cores the workers already fill,
the pushes' copies and CRCs take CPU from the training; with spare cores they do not.

    python -m bench.replica_cost [--state-mb 20] [--steps 120] [--runs 2]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from bench.replace import hidden_for
from splice.localjob import LocalJob, LocalJobConfig, worker_argv

WARMUP_STEPS = 10


def _counter(address: str, name: str) -> float:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as r:
        text = r.read().decode()
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == name)


def one_run(state_mb: float, steps: int, replicas: int, interval_s: float,
            timeout_s: float) -> dict[str, object]:
    log_dir = tempfile.mkdtemp(prefix="splice-replica-cost-")
    times = os.path.join(log_dir, "step-times.json")
    cfg = LocalJobConfig(
        worker_command=worker_argv("splice.examples.train_mlp",
                                   ["--steps", str(steps), "--log-every", "1000000",
                                    "--hidden", str(hidden_for(state_mb)),
                                    "--step-times", times]),
        nodes=2, nproc=2, job_id=f"replica-cost-{replicas}", log_dir=log_dir, metrics=True,
        replicas=replicas, replicate_interval_s=interval_s)
    t0 = time.perf_counter()
    with LocalJob(cfg) as job:
        status = job.wait_until(lambda s: s.phase in ("complete", "failed"), timeout_s,
                                "the job to end")
        # The agents serve metrics until their workers are gone; read them while they are.
        pushed = sum(_counter(a, "splice_agent_replica_pushed_bytes_total")
                     for a in job.agent_metrics)
        pushes = sum(_counter(a, "splice_agent_replica_pushes_total")
                     for a in job.agent_metrics)
        job.wait_agents(30)
    if status.phase != "complete":
        raise RuntimeError(f"the job ended {status.phase}: {status.message}")
    with open(times) as f:
        done = [t for _, t in json.load(f)]
    gaps = [b - a for a, b in zip(done[WARMUP_STEPS:], done[WARMUP_STEPS + 1:], strict=False)]
    return {"replicas": replicas, "step_p50_s": round(statistics.median(gaps), 4),
            "step_mean_s": round(statistics.mean(gaps), 4), "pushes": int(pushes),
            "pushed_mb": round(pushed / 1e6, 1), "wall_s": round(time.perf_counter() - t0, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--state-mb", type=float, default=20.0)
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--runs", type=int, default=2, help="runs of each, alternating")
    p.add_argument("--interval-s", type=float, default=1.0, help="--replicate-interval-s")
    p.add_argument("--timeout-s", type=float, default=600.0)
    args = p.parse_args(argv)
    runs = []
    for _ in range(args.runs):
        for replicas in (0, 1):
            r = one_run(args.state_mb, args.steps, replicas, args.interval_s, args.timeout_s)
            print(json.dumps(r), flush=True)
            runs.append(r)

    def p50(k: int) -> float:
        return statistics.median(float(r["step_p50_s"]) for r in runs  # type: ignore[arg-type]
                                 if r["replicas"] == k)

    off, on = p50(0), p50(1)
    print(json.dumps({
        "benchmark": "replica_cost",
        "command": "python -m bench.replica_cost " + " ".join(argv if argv is not None
                                                               else sys.argv[1:]),
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "state_mb_per_rank": args.state_mb, "interval_s": args.interval_s, "world": 4,
        "step_p50_s_without": off, "step_p50_s_with_replicas_1": on,
        "overhead_fraction": round(on / off - 1, 4),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
