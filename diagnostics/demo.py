"""`splice demo`: a local job that loses a worker mid-run and keeps training in place.

A controller and two agents with two workers each train the toy regression MLP on CPU. At
a chosen step the demo SIGKILLs one worker, then prints what happened (fault, detection,
new epoch, resume) with timings, and compares the final loss with a fault-free run of the
same job. Nothing external is needed: every default is embedded.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import signal
import sys
import tempfile
import time
from dataclasses import dataclass

from splice.diagnostics.timeline import format_timeline
from splice.localjob import LocalJob, LocalJobConfig, member_losses, timeline_time, worker_argv
from splice.proto import controller_pb2 as pb

# Loss parity: the same samples with the same weights and the same per-micro-batch RNG on
# any world size, and gradients summed in float64 (exact): the runs agree to the last bit
# in practice; the tolerance only absorbs a rare rounding in the float64 sums.
LOSS_RTOL = 1e-6


FAULTS = ("crash", "node-loss", "hang", "straggler", "bitflip", "controller-loss", "none")


@dataclass(frozen=True, kw_only=True)
class DemoConfig:
    fault: str = "crash"
    store: str = "memory"
    steps: int = 300
    kill_at_step: int = 100
    nodes: int = 2
    nproc: int = 2
    json_output: bool = False
    skip_reference: bool = False
    timeout_s: float = 180.0
    # --fault straggler: how much slower the victim runs, and what the controller does.
    slowdown: float = 1.5
    straggler_policy: str = "alert"
    # Agents keep a warm spare and replace a crashed or evicted worker with it.
    replace: bool = False
    # Mutual TLS everywhere, under a development CA written to the run's log folder.
    tls: bool = False

    def __post_init__(self) -> None:
        if self.fault not in FAULTS:
            raise ValueError(f"unknown fault {self.fault!r}: choose one of {FAULTS}")
        if self.fault == "controller-loss" and self.store != "etcd":
            raise ValueError("--fault controller-loss needs --store etcd (a standby controller "
                             "can only take over state it can read)")
        if not 0 < self.kill_at_step < self.steps:
            raise ValueError(f"--kill-at-step must be in (0, {self.steps}), "
                             f"got {self.kill_at_step}")
        if self.nodes * self.nproc < 2:
            raise ValueError("the demo needs at least 2 workers")


def _say(cfg: DemoConfig, text: str) -> None:
    # With --json, stdout carries only the JSON object; progress goes to stderr.
    print(text, file=sys.stderr if cfg.json_output else sys.stdout, flush=True)


def _paused_s(step_times: list[list[float]], after_s: float) -> float:
    """Longest gap between step completions after `after_s`, minus the median gap: the
    time training stood still beyond its normal step time."""
    times = [t for _, t in step_times]
    gaps = sorted(b - a for a, b in zip(times, times[1:], strict=False))
    if not gaps:
        return 0.0
    median = gaps[len(gaps) // 2]
    late = [b - a for a, b in zip(times, times[1:], strict=False) if b >= after_s]
    return max(0.0, max(late, default=median) - median)


def full_strength_at(status: pb.JobStatus, world: int, after_s: float) -> float | None:
    """When the first step at `world` ranks completed in an epoch formed after `after_s`."""
    grown = {e.epoch for e in status.timeline
             if e.kind == "epoch" and e.at_s > after_s and f"world {world};" in e.text}
    firsts = [e.at_s for e in status.timeline if e.kind == "first_step" and e.epoch in grown]
    return min(firsts, default=None)


def restored_from(status: pb.JobStatus, after_s: float) -> dict[str, str]:
    """Joining worker -> where its state came from, from the resume decisions' reasons."""
    out: dict[str, str] = {}
    for e in status.timeline:
        if e.kind != "resume" or e.at_s <= after_s:
            continue
        step = e.text.split("resume at step ", 1)[-1].split(",", 1)[0]
        for part in e.text.split("; "):
            src, sep, rest = part.partition(" sends ")
            if sep and rest.endswith(" its snapshot"):
                dst = rest[: -len(" its snapshot")]
                out[dst] = f"{src} (peer memory, step {step})"
            who, sep, _ = part.partition(" holds it already")
            if sep:  # it adopted the snapshot the worker it replaces left on its node
                out[who] = f"its predecessor's snapshot (shared memory on its node, step {step})"
    return out


def _run(cfg: DemoConfig, *, fault: str, label: str) -> dict[str, object]:
    etcd = None
    store = cfg.store if fault != "none" or cfg.store == "etcd" else "memory"
    if store == "etcd":
        from splice.localetcd import EtcdServer, find_etcd_binary

        binary = find_etcd_binary()
        if binary is None:
            raise ValueError("the etcd store needs the etcd binary: apt-get install etcd-server")
        etcd = EtcdServer(binary)
        etcd.start()
    log_dir = tempfile.mkdtemp(prefix=f"splice-demo-{label}-")
    step_times = os.path.join(log_dir, "step-times.json")
    worker_args = ["--steps", str(cfg.steps), "--log-every", "100", "--step-times", step_times]
    if fault == "straggler":
        # The third worker (rank 2 of 4) computes `slowdown` x slower from the fault step.
        worker_args += ["--slow-worker", f"node-1/0:{cfg.slowdown}:{cfg.kill_at_step}"]
    if fault == "bitflip" or (fault == "none" and cfg.fault == "bitflip"):
        # Replicas are compared at every step, before any gradient is exchanged.
        worker_args += ["--sdc-every", "1"]
        if fault == "bitflip":
            worker_args += ["--bitflip", f"node-1/0:{cfg.kill_at_step}"]
    job_cfg = LocalJobConfig(
        worker_command=worker_argv("splice.examples.train_mlp", worker_args),
        nodes=cfg.nodes, nproc=cfg.nproc, job_id=f"demo-{label}", log_dir=log_dir,
        store=store, controllers=2 if store == "etcd" else 1,
        etcd_endpoint=etcd.endpoint if etcd else "", metrics=True,
        straggler_policy=cfg.straggler_policy,
        spares=1 if cfg.replace and fault != "none" else 0,
        replace=cfg.replace and fault != "none",
        tls_dir=os.path.join(log_dir, "certs") if cfg.tls else "")
    out: dict[str, object] = {"logs": job_cfg.log_dir}
    try:
        with LocalJob(job_cfg) as job:
            where = (f"controllers {', '.join(job.addresses)} (etcd {etcd.endpoint})" if etcd
                     else f"controller on {job.addresses[0]}")
            _say(cfg, f"[{label}] {where}; {cfg.nodes} agents x {cfg.nproc} workers starting "
                      f"(logs: {job_cfg.log_dir})")
            status = job.wait_until(lambda s: s.epoch >= 1, cfg.timeout_s,
                                    "the initial membership")
            out["metrics_endpoints"] = [f"http://{a}/metrics" for a in
                                        job.controller_metrics + job.agent_metrics]
            _say(cfg, f"[{label}] epoch 1 formed: world {len(status.members)}; training")
            t_kill = None
            if fault != "none":
                status = job.wait_until(
                    lambda s: max((w.last_step for w in s.workers), default=0)
                    >= cfg.kill_at_step, cfg.timeout_s, f"step {cfg.kill_at_step}")
            if fault == "crash":
                victim = status.members[min(2, len(status.members) - 1)]
                w = job.worker(status, victim)
                t_kill = job.kill_worker(victim)
                _say(cfg, f"[{label}] SIGKILL worker {victim} (rank {w.rank}, pid {w.pid}) "
                          f"at step ~{w.last_step}")
                out["victim"] = victim
            elif fault == "node-loss":
                victim = status.members[min(2, len(status.members) - 1)]
                node = victim.rsplit("/", 1)[0]
                index = int(node.rsplit("-", 1)[1])
                t_kill = job.kill_node(index)
                _say(cfg, f"[{label}] SIGKILL node {node}: its agent and all its workers, at "
                          f"step ~{job.worker(status, victim).last_step}")
                out["victim"] = node
                status = job.wait_until(lambda s: s.epoch >= 2, cfg.timeout_s,
                                        "the survivors' epoch")
                joined = job.add_node()
                _say(cfg, f"[{label}] survivors train on at world {len(status.members)}; a new "
                          f"node {joined} starts and joins")
            elif fault in ("hang", "straggler", "bitflip"):
                victim = "node-1/0" if fault != "hang" else status.members[
                    min(2, len(status.members) - 1)]
                w = job.worker(status, victim)
                out["victim"], out["victim_rank"] = victim, w.rank
                t_kill = t_fault = time.time()
                if fault == "hang":
                    os.kill(w.pid, signal.SIGSTOP)
                    _say(cfg, f"[{label}] SIGSTOP worker {victim} (rank {w.rank}, pid {w.pid}) "
                              f"at step ~{w.last_step}: the job hangs")
                elif fault == "bitflip":
                    _say(cfg, f"[{label}] worker {victim} (rank {w.rank}) flips a bit of its "
                              f"weights after step {cfg.kill_at_step}")
                else:
                    _say(cfg, f"[{label}] worker {victim} (rank {w.rank}) computes "
                              f"{cfg.slowdown}x slower from step {cfg.kill_at_step}")

                def after_fault(s: pb.JobStatus) -> list[pb.Verdict]:
                    # The first verdict after the injection (this 2-core machine runs 4
                    # workers: contention makes real, smaller stragglers before it).
                    detector = "sdc" if fault == "bitflip" else fault
                    # A bit flip is caught within a step: often before this poll saw the
                    # step, so its verdict is not filtered by time (there is no other).
                    return [v for v in s.verdicts if v.detector == detector
                            and v.action != "cleared"
                            and (v.at_s >= t_fault or fault == "bitflip")
                            and (fault != "straggler" or v.kind == "compute")]

                status = job.wait_until(lambda s: bool(after_fault(s)), cfg.timeout_s,
                                        f"the {fault} detector's verdict")
                verdict = after_fault(status)[0]
                out["other_verdicts"] = [
                    f"{v.detector} {v.kind} rank {v.rank} ({v.action})" for v in status.verdicts
                    if v.at_s >= t_fault and v is not verdict and v.action != "cleared"]
                out["detect_s"] = round(verdict.at_s - t_kill, 4)
                out["culprit_rank"] = verdict.rank
                out["culprit_correct"] = verdict.worker_id == victim
                out["action"] = verdict.action
                out["verdict"] = verdict.reason
                if fault == "bitflip":
                    out["verdict_at_s"] = verdict.at_s
                _say(cfg, f"[{label}] {fault} detected after {out['detect_s']} s: rank "
                          f"{verdict.rank} ({verdict.worker_id}), action {verdict.action}")
            elif fault == "controller-loss":
                leader = status.controller
                t_kill = job.kill_controller(leader)
                _say(cfg, f"[{label}] SIGKILL the leading controller {leader} at step "
                          f"~{max(w.last_step for w in status.workers)}")
                status = job.wait_until(lambda s: s.leader and s.controller != leader,
                                        cfg.timeout_s, "a standby to take over")
                out["failover_s"] = round(status.leader_since_s - t_kill, 4)
                out["new_leader"] = status.controller
                _say(cfg, f"[{label}] {status.controller} took over after "
                          f"{out['failover_s']} s")
                out["victim"] = leader
            if t_kill is not None and (cfg.replace or fault == "node-loss"):
                world = cfg.nodes * cfg.nproc
                t0 = t_kill
                status = job.wait_until(
                    lambda s: full_strength_at(s, world, t0) is not None
                    or s.phase in ("complete", "failed"), cfg.timeout_s,
                    f"the job back at world {world}")
                at = full_strength_at(status, world, t0)
                out["full_strength_s"] = None if at is None else round(at - t0, 4)
                # From the last newcomer's hook being ready (its process started, torch
                # imported) to that first full-strength step: the join itself.
                ready = [e.at_s for e in status.timeline if e.kind == "standby"
                         and e.at_s > t0 and (at is None or e.at_s < at)]
                if at is not None and ready:
                    out["join_s"] = round(at - max(ready), 4)
                out["restored_from"] = restored_from(status, t0)
                _say(cfg, f"[{label}] back at full strength (world {world}) "
                          f"{out['full_strength_s']} s after the fault; state from "
                          f"{out['restored_from']}")
            status = job.wait_until(lambda s: s.phase in ("complete", "failed"),
                                    cfg.timeout_s, "the end of training")
            job.wait_agents(30)
    finally:
        if etcd is not None:
            etcd.close()
    out["status"] = status
    out["t_kill"] = t_kill
    losses = member_losses(status)
    out["final_loss"] = losses[0] if losses else float("nan")
    if os.path.exists(step_times) and isinstance(t_kill, float):
        with open(step_times) as f:
            times = json.load(f)
        out["training_paused_s"] = round(_paused_s(times, t_kill), 4)
        flipped = [t for s, t in times if s == cfg.kill_at_step]
        if fault == "bitflip" and flipped and "verdict_at_s" in out:
            # The flip happens right after that step completes on the victim.
            out["detect_s"] = round(float(out.pop("verdict_at_s")) - flipped[0], 4)
    return out


def run_demo(cfg: DemoConfig) -> int:
    t_start = time.time()
    # The in-process controller's log goes to a file: the demo prints its own timeline.
    log_path = os.path.join(tempfile.gettempdir(), f"splice-demo-controller-{os.getpid()}.log")
    handler = logging.FileHandler(log_path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    splice_log = logging.getLogger("splice")
    splice_log.addHandler(handler)
    splice_log.setLevel(logging.INFO)
    splice_log.propagate = False
    _say(cfg, f"controller log: {log_path}")
    faulted = _run(cfg, fault=cfg.fault, label=cfg.fault)
    status: pb.JobStatus = faulted["status"]  # type: ignore[assignment]
    t_kill = faulted["t_kill"]
    summary: dict[str, object] = {
        "command": "splice demo" + (" --json" if cfg.json_output else "")
                   + f" --fault {cfg.fault} --store {cfg.store}"
                   + (" --replace" if cfg.replace else "") + (" --tls" if cfg.tls else ""),
        "tls": cfg.tls,
        "fault": cfg.fault, "phase": status.phase,
        "world_before": cfg.nodes * cfg.nproc, "world_after": len(status.members),
        "final_epoch": status.epoch, "recoveries": status.recoveries,
        "final_loss": faulted["final_loss"], "steps": cfg.steps,
    }
    extra = []
    for key in ("failover_s", "new_leader", "training_paused_s", "metrics_endpoints",
                "restored_from", "full_strength_s", "join_s",
                "culprit_rank", "culprit_correct", "action", "verdict", "other_verdicts",
                "victim",
                "victim_rank"):
        if key in faulted:
            summary[key] = faulted[key]
    if cfg.fault in ("hang", "straggler", "bitflip") and isinstance(t_kill, float):
        summary["detect_s"] = faulted.get("detect_s")
        summary["straggler_policy"] = cfg.straggler_policy
        if cfg.fault in ("hang", "bitflip"):  # the culprit was killed: the first step after
            after = [e.at_s for e in status.timeline
                     if e.kind == "first_step" and e.at_s > t_kill]
            summary["resume_s"] = round(min(after) - t_kill, 4) if after else None
        what = ("SIGSTOP" if cfg.fault == "hang"
                else "bit flip in the weights of" if cfg.fault == "bitflip"
                else f"{cfg.slowdown}x slower compute (from step {cfg.kill_at_step}) of")
        extra.append((t_kill, cfg.fault, f"demo starts a {what} {faulted['victim']}"))
    elif cfg.fault == "controller-loss" and isinstance(t_kill, float):
        summary["victim"] = faulted.get("victim")
        extra.append((t_kill, "kill", f"demo sends SIGKILL to the leader {faulted['victim']}"))
    elif isinstance(t_kill, float):
        fault_at = timeline_time(status, "fault")
        epoch_at = timeline_time(status, "epoch", 2)
        resume_at = timeline_time(status, "resume", 2)
        first_at = timeline_time(status, "first_step", 2)
        summary["victim"] = faulted.get("victim")
        summary["detect_s"] = None if fault_at is None else round(fault_at - t_kill, 4)
        summary["new_epoch_s"] = None if epoch_at is None else round(epoch_at - t_kill, 4)
        summary["resume_decided_s"] = None if resume_at is None else round(resume_at - t_kill, 4)
        summary["resume_s"] = None if first_at is None else round(first_at - t_kill, 4)
        extra.append((t_kill, "kill", f"demo sends SIGKILL to {faulted.get('victim')}"))
    if not cfg.skip_reference:
        _say(cfg, "[reference] the same job without a fault, for the loss comparison")
        ref = _run(cfg, fault="none", label="reference")
        ref_loss = float(ref["final_loss"])  # type: ignore[arg-type]
        summary["reference_final_loss"] = ref_loss
        got = float(summary["final_loss"])  # type: ignore[arg-type]
        summary["loss_matches_reference"] = math.isclose(got, ref_loss, rel_tol=LOSS_RTOL)
    summary["machine"] = f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus"
    summary["wall_s"] = round(time.time() - t_start, 1)
    if cfg.json_output:
        print(json.dumps(summary))
    else:
        origin = t_kill if isinstance(t_kill, float) else None
        print("\ntimeline (relative to the kill):" if origin else "\ntimeline:")
        print(format_timeline(status, origin, extra))
        print()
        for key in ("world_before", "world_after", "detect_s", "culprit_rank",
                    "culprit_correct", "action", "resume_s", "full_strength_s", "join_s",
                    "restored_from", "failover_s",
                    "training_paused_s", "final_loss", "reference_final_loss",
                    "loss_matches_reference"):
            if key in summary:
                print(f"  {key:<24} {summary[key]}")
    ok = status.phase == "complete" and summary.get("loss_matches_reference", True) is True
    return 0 if ok else 1
