"""Controller failover benchmark: SIGKILL the leading controller of a training job.

Each run starts etcd, two controller replicas and two agents with two workers each
(the toy MLP), SIGKILLs the leader mid-training and measures:
  failover_s     kill -> the standby leads (adopted the job, serving agents)
  reattached_s   kill -> every agent has re-attached to the new leader
  throughput     steps/s completed by rank 0 in the `window_s` after the kill, against
                 the `window_s` before it (steady state): the ratio is 1 if training never
                 noticed the failover

    python -m bench.failover [--runs 5] [--window-s 2]

Prints one JSON object per run and a summary with p50/p90.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile

from bench.torchrun_baseline import percentile
from splice.localetcd import EtcdServer, find_etcd_binary
from splice.localjob import LocalJob, LocalJobConfig, worker_argv

KILL_AT_STEP = 60
STEP_SLEEP_S = 0.02  # stands in for compute so a step is ~40 ms on this machine


def one_run(run: int, window_s: float, timeout_s: float = 120.0) -> dict[str, float]:
    binary = find_etcd_binary()
    if binary is None:
        raise SystemExit("bench.failover needs etcd: apt-get install etcd-server")
    log_dir = tempfile.mkdtemp(prefix="splice-bench-failover-")
    times_path = os.path.join(log_dir, "step-times.json")
    # Enough steps after the kill to fill the after-window (a step is ~40 ms here).
    steps = KILL_AT_STEP + int(3 * window_s / 0.03)
    with EtcdServer(binary) as etcd:
        etcd.start()
        cfg = LocalJobConfig(
            worker_command=worker_argv("splice.examples.train_mlp", [
                "--steps", str(steps), "--log-every", "1000000", "--step-sleep-s",
                str(STEP_SLEEP_S), "--step-times", times_path]),
            job_id=f"failover-{run}", log_dir=log_dir, store="etcd", controllers=2,
            etcd_endpoint=etcd.endpoint)
        with LocalJob(cfg) as job:
            status = job.wait_until(
                lambda s: s.epoch == 1 and min((w.last_step for w in s.workers), default=0)
                >= KILL_AT_STEP, timeout_s, f"{KILL_AT_STEP} steps")
            leader = status.controller
            t_kill = job.kill_controller(leader)
            status = job.wait_until(lambda s: s.leader and s.controller != leader,
                                    timeout_s, "the standby to take over")
            failover_s = status.leader_since_s - t_kill
            status = job.wait_until(lambda s: s.phase in ("complete", "failed"), timeout_s,
                                    "the end of training")
            job.wait_agents(30)
    if status.phase != "complete":
        raise RuntimeError(f"job did not complete after the failover: {status.message}")
    reattached = [e.at_s for e in status.timeline if e.kind == "reattach"]
    with open(times_path) as f:
        times = [t for _, t in json.load(f)]
    before = sum(t_kill - window_s <= t < t_kill for t in times) / window_s
    after = sum(t_kill <= t < t_kill + window_s for t in times) / window_s
    return {"failover_s": failover_s,
            "reattached_s": max(reattached) - t_kill if reattached else float("nan"),
            "steady_steps_per_s": before, "failover_steps_per_s": after,
            "throughput_ratio": after / before if before else float("nan")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="leader SIGKILL -> standby serving")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--window-s", type=float, default=2.0)
    args = p.parse_args(argv)
    command = "python -m bench.failover " + " ".join(argv if argv is not None else sys.argv[1:])
    machine = f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus"
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    rows = []
    for i in range(args.runs):
        row = one_run(i, args.window_s)
        rows.append(row)
        print(json.dumps({"run": i, **{k: round(v, 4) for k, v in row.items()}}), flush=True)
    fo = [r["failover_s"] for r in rows]
    ra = [r["reattached_s"] for r in rows]
    tr = [r["throughput_ratio"] for r in rows]
    print(json.dumps({
        "benchmark": "failover", "command": command.strip(), "machine": machine, "date": date,
        "runs": args.runs, "failover_p50_s": round(percentile(fo, 50), 4),
        "failover_p90_s": round(percentile(fo, 90), 4),
        "reattached_p50_s": round(percentile(ra, 50), 4),
        "reattached_p90_s": round(percentile(ra, 90), 4),
        "throughput_ratio_p50": round(percentile(tr, 50), 4),
        "throughput_ratio_min": round(min(tr), 4),
        "target": "standby takes over within 2 s of the leader's SIGKILL",
    }), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
