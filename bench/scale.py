"""Controller scale: many fake agents stream telemetry to one real controller on one core.

The design target is 100,000 ranks at one step per second on one controller core. This
bench starts a real in-process `Controller` (gRPC server, event loop, telemetry hub,
detectors) in its own process pinned to CPU 0, and a load generator in another process
pinned to CPU 1: one asyncio loop with one grpc.aio Attach stream per fake agent. Each
agent says hello, reports its workers ready, waits for the membership, then once per
simulated second sends ONE Telemetry message: a step report per worker for the step that
just ended (compute ~0.6 s with 5 % lognormal jitter, wait filling the 1 s step,
completed_at_s) and a progress record per worker (one all_reduce per step; the counters
as the agent would read them at that instant). Agents are spread evenly over the second.
By default the records go as columns, as agent.py sends them (`ColumnTelemetryEncoder`:
packed columns indexing a worker table sent with the first batch); `--encoding records`
sends one StepReport and one WorkerProgress message per rank, as older agents did
(`TelemetryEncoder`). Either is written pre-serialized (the bytes the protobuf setters
would produce, from numpy arrays) so that one core can feed 100,000 ranks; one HTTP/2
connection carries 8 streams.

Per scale N it injects one straggler (a rank's compute x1.5 from some step) and then a
hang (one rank stops mid-compute; every other rank waits in that step's all_reduce
forever) and reads the verdicts the controller records.

Measured per N: step records processed per second by the controller (counted where the
telemetry hub consumes them), the controller process's CPU % (psutil; 100 % = one core),
the processing lag (controller time when a batch was consumed minus its sent_at_s), the
generator's own lag (so that a slow generator is not blamed on the controller), and the
detection latency of both faults. `keeps_up`: >= 95 % of N records/s, lag p99 < 1 s.

Forming a world goes through the controller's real path (N WorkerReady events) up to
--real-forming-max-n ranks. Forming is quadratic in N in the job state machine (every
WorkerReady copies the worker map and re-sorts the ready list), so above that the bench
seeds the job with N-1 ready workers and sends only the last READY over gRPC: the job
still reaches RUNNING with N members through `Controller._apply`, in one event.

The controller's gRPC server runs each Attach stream on one of 256 executor threads, so at
most ~250 agents can be attached at once; ranks per agent K is raised (K = N / agents)
when N / 8 agents would exceed --max-agents, and reported.

    python -m bench.scale [--ranks 1000,3000,10000,30000,100000] [--profile]

Prints one JSON object per N and a summary, each with the machine, the date and the command.

The scenario and the load generator live in bench/scale_agents.py, the generator's wire
encoders in bench/scale_encoding.py; this module runs the controller it measures, drives
one run per N and reports.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import json
import multiprocessing as mp
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

from bench.scale_agents import (
    COMPUTE_FRACTION,
    JITTER_SIGMA,
    JOB,
    STRAGGLER_FACTOR,
    TRANSFER_FRACTION,
    Scenario,
    generator_main,
    node_id,
    pin,
    worker,
)
from bench.scale_encoding import ColumnTelemetryEncoder, TelemetryEncoder

# Names that tests and other callers import from bench.scale, wherever they now live.
__all__ = ["COMPUTE_FRACTION", "JITTER_SIGMA", "JOB", "STRAGGLER_FACTOR", "TRANSFER_FRACTION",
           "ColumnTelemetryEncoder", "Scenario", "TelemetryEncoder", "controller_main",
           "generator_main", "main", "node_id", "percentile", "pin", "plan_agents",
           "run_scale", "worker"]


# ---- the controller process ---------------------------------------------------------------

def controller_main(conn: Any, sc: Scenario, cpu: int) -> None:
    pinned = pin(cpu)      # before grpc starts its threads: they inherit the affinity
    import logging
    from types import MappingProxyType

    from splice.controller import job as jobs
    from splice.controller.hang import HangConfig
    from splice.controller.service import Controller, ControllerConfig
    from splice.controller.store import InMemoryStateStore
    from splice.controller.telemetry_hub import DetectionConfig

    config = ControllerConfig(listen="127.0.0.1:0", node_timeout_s=600,
                              jobs=(jobs.JobSpec(job_id=JOB, world_size=sc.num_ranks),))
    # Telemetry comes once per second here (agents send every 0.1 s by default), so a
    # heartbeat is up to ~1 s old when read: the "stopped" test must allow for that.
    detection = DetectionConfig(hang=HangConfig(heartbeat_timeout_s=2.5 * sc.period_s))
    c = Controller(config, InMemoryStateStore(), detection=detection)
    # Verdicts are read through record_verdict below; a hang's reason names every rank
    # waiting (O(N) characters), which would flood the bench's output.
    logging.getLogger("splice").setLevel(logging.ERROR)
    c.start()
    if sc.preform:
        # N-1 workers ready (the state the real path would reach, without its quadratic
        # cost); the last agent's last READY forms the job through the real event path.
        records = {}
        rt = c._jobs[JOB]
        for a in range(sc.num_agents):
            for w in range(sc.ranks_per_agent):
                wid = worker(a, w)
                records[wid] = jobs.WorkerRecord(pid=1000 + w, state=jobs.WorkerState.READY)
                rt.view.worker_seen(wid, node_id(a), 1000 + w)
        del records[worker(sc.num_agents - 1, sc.ranks_per_agent - 1)]
        rt.state = dataclasses.replace(rt.state, workers=MappingProxyType(records))

    lock = threading.Lock()
    counts = {"records": 0, "batches": 0, "progress": 0}
    lags: list[float] = []
    verdicts: list[dict[str, Any]] = []
    hub = c.telemetry
    assert hub is not None
    observe = hub.observe

    def counted_observe(job_id: str, node: str, batch: Any, epoch: int) -> None:
        observe(job_id, node, batch, epoch)
        now = time.time()
        with lock:
            counts["records"] += len(batch.steps)
            counts["progress"] += len(batch.progress)
            counts["batches"] += 1
            lags.append(now - batch.sent_at_s)

    hub.observe = counted_observe  # type: ignore[method-assign]
    record_verdict = c.record_verdict

    def noted_verdict(job_id: str, verdict: Any, fault: str = "") -> None:
        with lock:
            verdicts.append({"seen_at_s": time.time(), "at_s": verdict.at_s,
                             "detector": verdict.detector, "kind": verdict.kind,
                             "worker_id": verdict.worker_id, "action": verdict.action,
                             "reason": verdict.reason})
        record_verdict(job_id, verdict, fault)

    c.record_verdict = noted_verdict  # type: ignore[method-assign]
    conn.send({"port": c.port, "pid": os.getpid(), "pinned": pinned})
    while True:
        cmd = conn.recv()
        if cmd == "stop":
            break
        if cmd == "stats":
            with lock:
                conn.send({**counts, "lags": list(lags), "verdicts": list(verdicts)})
                lags.clear()
        elif cmd == "status":
            t0 = time.perf_counter()
            status = c.job_status(JOB)
            took = time.perf_counter() - t0
            steps = collections.Counter(w.last_step for w in status.workers)
            faults = [(e.at_s, e.text[:100]) for e in status.timeline
                      if e.kind in ("fault", "epoch")]
            conn.send({"job_status_s": took, "workers": len(status.workers),
                       "phase": status.phase, "epoch": status.epoch, "faults": faults[:4],
                       "last_steps": dict(steps.most_common(3)),
                       "verdicts": [(v.detector, v.worker_id, v.at_s) for v in status.verdicts]})
    c.stop(grace_s=0.5)
    conn.send("stopped")


# ---- the orchestrator ---------------------------------------------------------------------

def plan_agents(num_ranks: int, ranks_per_agent: int, max_agents: int) -> int:
    """Ranks per agent: the requested K unless that needs more than max_agents streams."""
    k = ranks_per_agent
    while num_ranks // k > max_agents or num_ranks % k:
        k += 1
    return k


def percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(len(xs) * q))], 3)


def run_scale(sc: Scenario, *, form_timeout_s: float = 120.0, verdict_wait_s: float = 20.0,
              status_max_n: int = 10000, profile_on: bool = False) -> dict[str, Any]:
    """Run one scale in two fresh processes; one result row (see the module docstring)."""
    import psutil

    ctx = mp.get_context("spawn")
    c_conn, c_child = ctx.Pipe()
    cp = ctx.Process(target=controller_main, args=(c_child, sc, 0), daemon=True)
    cp.start()
    hello = c_conn.recv()
    proc = psutil.Process(hello["pid"])
    g_conn, g_child = ctx.Pipe()
    gp = ctx.Process(target=generator_main,
                     args=(g_child, sc, hello["port"], 1, form_timeout_s), daemon=True)
    t_start = time.time()
    gp.start()

    def stats() -> dict[str, Any]:
        c_conn.send("stats")
        s: dict[str, Any] = c_conn.recv()
        return s

    # The generator says when step 0 starts once the job formed (or ends if it did not).
    t0 = None
    gen: dict[str, Any] = {}
    if g_conn.poll(form_timeout_s + 300):
        first = g_conn.recv()
        if "t0" in first:
            t0 = first["t0"]
        else:
            gen = first
    # Other work on the machine competes with both processes: say how busy it was.
    row: dict[str, Any] = {"num_ranks": sc.num_ranks, "ranks_per_agent": sc.ranks_per_agent,
                           "loadavg_1m_at_start": round(os.getloadavg()[0], 2),
                           "num_agents": sc.num_agents, "encoding": sc.encoding,
                           "forming": "seeded N-1 ready" if sc.preform else "real",
                           "controller_pinned_cpu0": hello["pinned"]}
    profile: dict[str, Any] | None = None
    if t0 is not None:
        a, b = sc.measure_steps
        _sleep_until(t0 + (a + 1.95) * sc.period_s)
        base = stats()
        proc.cpu_percent(None)
        cpu0 = proc.cpu_times()
        w0 = time.time()
        spy = _start_py_spy(hello["pid"], (b - a) * sc.period_s) if profile_on else None
        _sleep_until(t0 + (b + 1.95) * sc.period_s)
        cpu_pct = proc.cpu_percent(None)
        cpu1 = proc.cpu_times()
        w1 = time.time()
        mid = stats()
        if spy is not None:
            profile = _finish_py_spy(*spy)
        rate = (mid["records"] - base["records"]) / (w1 - w0)
        lag = mid["lags"]
        row.update(
            step_records_per_s=round(rate, 1),
            progress_records_per_s=round((mid["progress"] - base["progress"]) / (w1 - w0), 1),
            controller_cpu_pct=round(cpu_pct, 1),
            controller_cpu_user_sys_s_per_s=round(
                (cpu1.user + cpu1.system - cpu0.user - cpu0.system) / (w1 - w0), 3),
            lag_p50_s=percentile(lag, 0.5), lag_p99_s=percentile(lag, 0.99),
            lag_max_s=percentile(lag, 1.0))
        row["keeps_up"] = bool(rate >= 0.95 * sc.num_ranks / sc.period_s
                               and (row["lag_p99_s"] or 9) < 1.0)
    if t0 is not None and g_conn.poll(sc.hang_step * sc.period_s + sc.hang_wait_s + 120):
        gen = g_conn.recv()
    row.update(forming_s=gen.get("forming_s"), attach_s=gen.get("attach_s"),
               generator_lag_p50_s=gen.get("generator_lag_p50_s"),
               generator_lag_p99_s=gen.get("generator_lag_p99_s"),
               generator_pinned_cpu1=gen.get("generator_pinned"))
    if gen.get("formed"):
        deadline = time.time() + verdict_wait_s
        verdicts: list[dict[str, Any]] = []
        while time.time() < deadline:
            verdicts = stats()["verdicts"]
            if {"hang", "straggler"} <= {v["detector"] for v in verdicts}:
                break
            time.sleep(0.5)
        row.update(_detections(sc, gen, verdicts))
        if sc.num_ranks <= status_max_n:
            c_conn.send("status")
            st = c_conn.recv()
            row["job_status_s"] = round(st["job_status_s"], 3)
            row["job_status_verdicts"] = len(st["verdicts"])
            row.update(final_phase=st["phase"], final_epoch=st["epoch"],
                       timeline=[(round(at - t0, 1), text) for at, text in st["faults"]])
        else:
            row["job_status_s"] = f"skipped above --status-max-n {status_max_n}"
    elif gen:
        row["error"] = f"job did not form within {form_timeout_s} s"
    if profile is not None:
        row["profile"] = profile
    if t0 is not None:
        g_conn.send("close")
    c_conn.send("stop")
    if c_conn.poll(15):
        c_conn.recv()
    for p in (cp, gp):
        p.join(timeout=5)
        if p.is_alive():
            p.kill()
    row["wall_s"] = round(time.time() - t_start, 1)
    row["loadavg_1m_at_end"] = round(os.getloadavg()[0], 2)
    return row


def _detections(sc: Scenario, gen: dict[str, Any], verdicts: list[dict[str, Any]]
                ) -> dict[str, Any]:
    out: dict[str, Any] = {}
    want = {"straggler": worker(sc.straggler_rank // sc.ranks_per_agent,
                                sc.straggler_rank % sc.ranks_per_agent),
            "hang": worker(sc.hang_rank // sc.ranks_per_agent, sc.hang_rank % sc.ranks_per_agent)}
    for kind in ("straggler", "hang"):
        vs = [v for v in verdicts if v["detector"] == kind and v["action"] != "cleared"]
        at = gen["injected"][kind]
        # Verdicts before the fault was injected are false alarms (a lagging controller
        # reads stale progress as a stall).
        out[f"{kind}_false_verdicts"] = sum(v["at_s"] < at for v in vs)
        hits = [v for v in vs if v["at_s"] >= at]
        if not hits:
            out[f"{kind}_detect_s"] = None
            continue
        v = hits[0]
        out[f"{kind}_detect_s"] = round(v["at_s"] - at, 2)
        out[f"{kind}_culprit_correct"] = v["worker_id"] == want[kind]
        m = re.search(r"at step (\d+)", v["reason"])
        if kind == "straggler" and m:
            out["straggler_detect_steps"] = int(m.group(1)) - sc.straggler_step + 1
    return out


def _sleep_until(t: float) -> None:
    time.sleep(max(0.0, t - time.time()))


def _start_py_spy(pid: int, duration_s: float) -> tuple[subprocess.Popen[bytes], str] | None:
    exe = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    if not os.path.exists(exe):
        return None
    out = os.path.join(tempfile.mkdtemp(prefix="splice-scale-"), "profile.txt")
    cmd = [exe, "record", "--pid", str(pid), "--format", "raw", "--rate", "50",
           "--nonblocking", "--duration", str(int(duration_s)), "--output", out]
    with open(out + ".log", "wb") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), out


def _finish_py_spy(p: subprocess.Popen[bytes], path: str) -> dict[str, Any]:
    """Top functions by samples (self and inclusive), from py-spy's collapsed stacks."""
    try:
        p.wait(timeout=60)
    except subprocess.TimeoutExpired:   # py-spy could not keep up: keep what it wrote
        p.kill()
        p.wait()
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    try:
        with open(path) as f:
            for line in f:
                stack, _, n = line.rstrip().rpartition(" ")
                frames = [fr.split(" (")[0] + "@" + fr.split("/")[-1].rstrip(")")
                          for fr in stack.split(";")]
                if frames[-1].split("@")[0].endswith(("wait", "get", "_wait_once", "select")):
                    continue   # an idle thread blocked in a queue or a poll
                total += int(n)
                own[frames[-1]] += int(n)
                for fr in set(frames):
                    inclusive[fr] += int(n)
    except OSError as e:
        try:
            with open(path + ".log") as f:
                said = f.read()[-500:]
        except OSError:
            said = ""
        return {"error": f"py-spy wrote no profile: {e}; it said: {said}"}
    return {"busy_samples": total,
            "top_self": [(f, round(n / max(total, 1), 3)) for f, n in own.most_common(12)],
            "top_inclusive": [(f, round(n / max(total, 1), 3))
                              for f, n in inclusive.most_common(25)]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", default="1000,3000,10000,30000,100000",
                   help="comma-separated world sizes")
    p.add_argument("--ranks-per-agent", type=int, default=8)
    p.add_argument("--max-agents", type=int, default=240,
                   help="the controller serves at most ~256 Attach streams (executor size)")
    p.add_argument("--real-forming-max-n", type=int, default=2000,
                   help="above this, seed N-1 ready workers (forming is quadratic)")
    p.add_argument("--form-timeout-s", type=float, default=120.0)
    p.add_argument("--verdict-wait-s", type=float, default=20.0)
    p.add_argument("--status-max-n", type=int, default=10000,
                   help="call job_status() only up to this N (it is slow at scale)")
    p.add_argument("--profile", action="store_true", help="py-spy the controller")
    p.add_argument("--encoding", choices=("columns", "records"), default="columns",
                   help="telemetry as columns (agent.py) or one message per record (older "
                        "agents)")
    args = p.parse_args(argv)
    command = "python -m bench.scale " + " ".join(argv if argv is not None else sys.argv[1:])
    meta = {"command": command.strip(),
            "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus "
                       f"python {platform.python_version()}",
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    if (os.cpu_count() or 1) < 2:
        print(json.dumps({"warning": "fewer than 2 CPUs: controller and generator share"}))
    rows = []
    for n in (int(x) for x in args.ranks.split(",")):
        k = plan_agents(n, args.ranks_per_agent, args.max_agents)
        sc = Scenario(num_ranks=n, ranks_per_agent=k, preform=n > args.real_forming_max_n,
                      encoding=args.encoding)
        row = run_scale(sc, form_timeout_s=args.form_timeout_s,
                        verdict_wait_s=args.verdict_wait_s, status_max_n=args.status_max_n,
                        profile_on=args.profile)
        row.update(meta)
        rows.append(row)
        print(json.dumps(row), flush=True)
    kept = [r["num_ranks"] for r in rows if r.get("keeps_up")]
    summary = {"summary": "controller scale", **meta,
               "ranks_sustained_1_step_per_s_one_core": max(kept) if kept else 0,
               "target": 100000,
               "by_n": {r["num_ranks"]: {k: r.get(k) for k in (
                   "keeps_up", "step_records_per_s", "controller_cpu_pct", "lag_p99_s",
                   "straggler_detect_s", "hang_detect_s")} for r in rows}}
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
