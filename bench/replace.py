"""Replacement benchmark: a worker is SIGKILLed, a warm spare takes its place, the job is
back at full strength with a peer's in-memory snapshot. With --fault node-loss a whole node
(agent and workers) is SIGKILLed instead, and a standby node's ready workers take its
ranks' places, fetching their state from a survivor's agent.

The kill lands at a uniformly random point of a step (seeded by the run number).

Each run starts a local job (in-process controller, two agents with one warm spare each,
--replace) training the toy MLP sized so that one rank's state (parameters plus SGD
momentum) is about --state-mb, waits for some steps, SIGKILLs a non-zero rank and measures:
  detect_s         kill -> the controller has the fault
  full_strength_s  kill -> the first step completed at the original world size
  state_loaded_s   kill -> the last newcomer has loaded its state (its log line), the moment
                   the full-size world can step: detection, the survivors' abort and
                   regroup, then either the adoption of the snapshot the dead worker
                   left in the agent's shared memory (check and load), or the fetch of a
                   survivor's snapshot from its agent (a standby's newcomers begin it
                   as the new membership is announced), check and load
  transfer_s       the newcomer's load of the snapshot (from its log)
  restored_from    "<dead worker> shared memory, step N" or "<peer> memory, step N"
  step_s           the last step time before the fault: full strength is only reached
                   once the first step at full size completes
  state_mb         the snapshot bytes the newcomer received

With --damage-snapshots (crash only) the bench stops the victim (SIGSTOP), flips a byte in
each of its snapshots in its agent's shared memory, then kills it:
the spare finds them corrupt and fetches a survivor's instead (the path a replacement
takes when its predecessor's memory cannot be trusted, and its prefetch's).

    python -m bench.replace [--state-mb 100] [--runs 3] [--fault crash|node-loss]
                            [--damage-snapshots]

Prints one JSON object per run, then a summary object (the DESIGN target: full strength
within 1 s with 100 MB of state per rank).
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import math
import os
import platform
import random
import re
import signal
import sys
import tempfile
import time

from bench.torchrun_baseline import percentile
from splice.diagnostics.demo import full_strength_at
from splice.localjob import LocalJob, LocalJobConfig, timeline_time, worker_argv

WARMUP_STEPS = 3
_LOADED = re.compile(r"^(\S+ \S+) \S+ INFO worker \S+: loaded ([0-9.]+) MB of step-(\d+) "
                     r"state from (\S+(?: shared)?) (?:memory )?in ([0-9.]+) s", re.M)


def hidden_for(state_mb: float) -> int:
    """Width of the 3-layer MLP whose parameters + momentum are about `state_mb` MB:
    two hidden x hidden layers dominate, 2 tensors (weights, momentum) x 4 bytes each."""
    return max(64, int(math.sqrt(state_mb * 1e6 / 16)))


def damage_snapshots(agent_pid: int, worker_id: str) -> int:
    """Flip the first byte of every snapshot slot `worker_id` left in the shared memory of
    the agent whose pid is `agent_pid`; returns how many slots were damaged."""
    from splice.agent.agent import OWNER_FILE, SHM_PREFIX

    root = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    damaged = 0
    for name in os.listdir(root):
        base = os.path.join(root, name)
        try:
            with open(os.path.join(base, OWNER_FILE)) as f:
                owner = int(f.read())
        except (OSError, ValueError):
            continue
        if not name.startswith(SHM_PREFIX) or owner != agent_pid:
            continue
        slots = os.path.join(base, "snapshots", worker_id.replace("/", "_"))
        for data in sorted(glob.glob(os.path.join(slots, "slot*.data"))):
            with open(data, "r+b") as f:
                first = f.read(1)
                if first:
                    f.seek(0)
                    f.write(bytes([first[0] ^ 0x40]))
                    damaged += 1
    return damaged


def one_run(state_mb: float, run: int, timeout_s: float,
            fault: str = "crash", damage: bool = False) -> dict[str, object]:
    node_loss = fault == "node-loss"
    cfg = LocalJobConfig(
        worker_command=worker_argv("splice.examples.train_mlp",
                                   ["--steps", "1000000", "--log-every", "1000000",
                                    "--hidden", str(hidden_for(state_mb))]),
        nodes=2, nproc=2, job_id=f"replace-{run}", spares=0 if node_loss else 1,
        replace=not node_loss)
    with LocalJob(cfg) as job:
        status = job.wait_until(
            lambda s: s.epoch == 1 and min((w.last_step for w in s.workers), default=0)
            >= WARMUP_STEPS, timeout_s, f"{WARMUP_STEPS} warm-up steps")
        if node_loss:
            # A standby node: its agent and 2 workers are ready beyond the job's size.
            job.add_node()
            status = job.wait_until(
                lambda s: sum(e.kind == "standby" for e in s.timeline) >= 2, timeout_s,
                "the standby node's workers")
        else:
            # Both agents' spares must be warm (they log it) before the kill.
            deadline = time.monotonic() + timeout_s
            while job.logs().count("is warm") < 2:
                if time.monotonic() > deadline:
                    raise TimeoutError("spares did not get warm")
                time.sleep(0.2)  # polling log files, not synchronising processes
        victim = "node-1" if node_loss else status.members[1 + run % 3]
        step_s = max(w.last_step_time_s for w in status.workers)
        # A fault strikes at a random point of a step: the status shows a step just after
        # it ended, when the next step's snapshot is being taken.
        time.sleep(random.Random(run).uniform(0.0, step_s))
        damaged = 0
        if damage:
            # Stopped first, so that it takes no new snapshot over the damaged ones; its
            # agent hands them over (renamed) as soon as it sees the death.
            job.kill_worker(victim, signal.SIGSTOP)
            node = int(victim.split("/")[0].removeprefix("node-"))
            damaged = damage_snapshots(job.agents[node].pid, victim)
            if not damaged:
                raise RuntimeError(f"no snapshot of {victim} found to damage")
        t_kill = job.kill_node(1) if node_loss else job.kill_worker(victim)
        status = job.wait_until(lambda s: full_strength_at(s, 4, t_kill) is not None,
                                timeout_s, "full strength")
        at = full_strength_at(status, 4, t_kill)
        fault = timeline_time(status, "fault")
        assert at is not None
        logs = job.logs()
    # Every newcomer must have loaded before the full-size world can step: the last one.
    loads = [(datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp(), m)
             for m in _LOADED.finditer(logs)]
    loaded = max(loads, key=lambda x: x[0])[1] if loads else None
    loaded_at = None
    if loads:  # log lines are local wall clock
        loaded_at = round(max(when for when, _ in loads) - t_kill, 3)
    return {
        "run": run, "victim": victim,
        "detect_s": round(fault - t_kill, 4) if fault else None,
        "state_loaded_s": loaded_at,
        "full_strength_s": round(at - t_kill, 4),
        "step_s": round(step_s, 3),
        "transfer_s": float(loaded.group(5)) if loaded else None,
        "state_mb": float(loaded.group(2)) if loaded else None,
        "restored_from": f"{loaded.group(4)} memory, step {loaded.group(3)}" if loaded else None,
        **({"snapshots_damaged": damaged} if damage else {}),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--state-mb", type=float, default=100.0)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--timeout-s", type=float, default=300.0)
    p.add_argument("--fault", choices=["crash", "node-loss"], default="crash",
                   help="crash: SIGKILL a worker, a warm spare replaces it; node-loss: "
                        "SIGKILL node-1's agent and workers, a standby node's workers "
                        "take their places")
    p.add_argument("--damage-snapshots", action="store_true",
                   help="crash only: damage the dead worker's snapshots as it dies, so that "
                        "the spare fetches a survivor's")
    args = p.parse_args(argv)
    if args.damage_snapshots and args.fault != "crash":
        p.error("--damage-snapshots goes with --fault crash")
    runs = []
    for run in range(args.runs):
        r = one_run(args.state_mb, run, args.timeout_s, args.fault, args.damage_snapshots)
        print(json.dumps(r), flush=True)
        runs.append(r)
    full = sorted(float(r["full_strength_s"]) for r in runs)  # type: ignore[arg-type]
    transfer = sorted(float(r["transfer_s"]) for r in runs if r["transfer_s"] is not None)  # type: ignore[arg-type]
    loaded = sorted(float(r["state_loaded_s"]) for r in runs  # type: ignore[arg-type]
                    if r["state_loaded_s"] is not None)
    print(json.dumps({
        "benchmark": "replace",
        "command": "python -m bench.replace " + " ".join(argv if argv is not None
                                                          else sys.argv[1:]),
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "fault": args.fault, "damage_snapshots": args.damage_snapshots,
        "world": 4, "state_mb_per_rank": runs[0]["state_mb"], "runs": len(runs),
        "full_strength_p50_s": percentile(full, 50), "full_strength_max_s": full[-1],
        "transfer_p50_s": percentile(transfer, 50) if transfer else None,
        "state_loaded_p50_s": percentile(loaded, 50) if loaded else None,
        "step_p50_s": percentile(sorted(float(r["step_s"]) for r in runs), 50),  # type: ignore[arg-type]
        "target": "full strength <= 1 s with 100 MB of state per rank",
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
