"""Detector benchmarks on simulated telemetry (simulated clock; no processes, no sleeping).

  stragglers  detection delay (steps) of one slow rank of 8 at 1.1x, 1.2x, 1.5x, median
              over seeds, and false alarms over clean noisy steps. Noise: lognormal
              jitter (sigma 5 %) on every rank and step, plus 2-3x spikes on 0.5 % of
              rank-steps. Also a slow link between two of four nodes.
  hangs       detection latency and culprit accuracy for injected hangs (a stopped rank,
              a rank sleeping inside a step, a rank that skips one collective, a rank
              that skips a whole step) at several step times. The job is simulated event
              by event: three gradient all-reduces per step, each completing when every
              rank has entered the same call; the detector polls the frozen counters.
  rebalance   throughput with one 1.5x slow rank of 8: doing nothing vs the detector +
              rebalance policy (step time = max over ranks of share x per-sample time).

    python -m bench.detectors [--seeds 20] [--clean-steps 2000]

Prints one JSON object per benchmark, each with the machine, the date and the command.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from splice.controller.hang import HangConfig, HangDetector, HangVerdict
from splice.controller.policy import Policy, PolicyState, decide
from splice.controller.stragglers import StragglerConfig, StragglerDetector
from splice.controller.telemetry import RankProgress, StepRecord

NUM_RANKS = 8
NODES = ("A", "B", "C", "D")
NODE_OF = {r: NODES[r // 2] for r in range(NUM_RANKS)}


# ---- stragglers ---------------------------------------------------------------------------

@dataclass
class StepSim:
    """Noisy per-rank step times: compute per sample x share, plus own transfer time."""

    seed: int
    compute_s: float = 0.1
    transfer_s: float = 0.02
    jitter: float = 0.05
    spike_prob: float = 0.005
    slow_rank: int | None = None
    slowdown: float = 1.0
    slow_from_step: int = 100
    slow_link: tuple[str, str] | None = None
    link_slowdown: float = 4.0
    shares: list[float] = field(default_factory=lambda: [1.0] * NUM_RANKS)

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.seed)
        self.now = 0.0

    def per_sample_s(self, step: int) -> np.ndarray:
        base = np.full(NUM_RANKS, self.compute_s)
        if self.slow_rank is not None and step >= self.slow_from_step:
            base[self.slow_rank] *= self.slowdown
        return base

    def step(self, step: int) -> list[StepRecord]:
        n = NUM_RANKS
        noise = self.rng.lognormal(0.0, self.jitter, n)
        spikes = np.where(self.rng.random(n) < self.spike_prob, self.rng.uniform(2, 3, n), 1)
        compute = self.per_sample_s(step) * np.asarray(self.shares) * noise * spikes
        transfer = self.transfer_s * self.rng.lognormal(0.0, self.jitter, n)
        if self.slow_link is not None and step >= self.slow_from_step:
            for r in range(n):
                if NODE_OF[r] in self.slow_link:
                    transfer[r] *= self.link_slowdown
        wait = compute.max() - compute + transfer
        self.now += float((compute + wait).max())
        return [StepRecord(rank=r, epoch=1, step=step, compute_s=float(compute[r]),
                           wait_s=float(wait[r]), end_s=self.now, share=self.shares[r])
                for r in range(n)]


def straggler_delay(slowdown: float, seed: int, max_steps: int = 600) -> int | None:
    sim = StepSim(seed=seed, slow_rank=3, slowdown=slowdown)
    det = StragglerDetector(StragglerConfig(), node_of=NODE_OF)
    for step in range(max_steps):
        for v in det.observe(sim.step(step)):
            if v.active and v.rank == 3 and v.kind == "compute" and step >= sim.slow_from_step:
                return step - sim.slow_from_step + 1
            if v.active and step < sim.slow_from_step:
                raise AssertionError(f"false alarm before the slowdown: {v.reason}")
    return None


def link_delay(seed: int, link_slowdown: float, max_steps: int = 600
               ) -> tuple[int | None, set[int]]:
    sim = StepSim(seed=seed, slow_link=("A", "B"), link_slowdown=link_slowdown)
    det = StragglerDetector(StragglerConfig(), node_of=NODE_OF)
    flagged: set[int] = set()
    for step in range(max_steps):
        for v in det.observe(sim.step(step)):
            if v.active:
                flagged.add(v.rank)
        if flagged >= {0, 1, 2, 3}:
            return step - sim.slow_from_step + 1, flagged
    return None, flagged


def false_alarms(seed: int, steps: int) -> int:
    sim = StepSim(seed=seed)
    det = StragglerDetector(StragglerConfig(), node_of=NODE_OF)
    return sum(v.active for step in range(steps) for v in det.observe(sim.step(step)))


def bench_stragglers(seeds: int, clean_steps: int) -> dict[str, object]:
    out: dict[str, object] = {"benchmark": "straggler_detection", "num_ranks": NUM_RANKS,
                              "seeds": seeds, "noise": "lognormal sigma 0.05 + 2-3x spikes "
                              "on 0.5% of rank-steps", "config": repr(StragglerConfig())}
    for slowdown in (1.1, 1.2, 1.5):
        delays = [straggler_delay(slowdown, s) for s in range(seeds)]
        found = [d for d in delays if d is not None]
        out[f"delay_steps_{slowdown}x"] = {
            "median": statistics.median(found) if found else None,
            "max": max(found) if found else None, "missed_within_500": len(delays) - len(found)}
    links = [link_delay(s, 3.0) for s in range(seeds)]
    found = [d for d, _ in links if d is not None]
    out["link_A_B_3x_delay_steps"] = {
        "median": statistics.median(found) if found else None,
        "max": max(found) if found else None, "missed": len(links) - len(found),
        "wrong_ranks_flagged": sum(len(f - {0, 1, 2, 3}) for _, f in links)}
    alarms = [false_alarms(1000 + s, clean_steps) for s in range(seeds)]
    out["false_alarms"] = {"clean_steps_per_seed": clean_steps, "total": sum(alarms),
                           "rank_steps": clean_steps * seeds * NUM_RANKS}
    d12 = out["delay_steps_1.2x"]
    assert isinstance(d12, dict)
    out["target_met"] = bool(d12["median"] is not None and d12["median"] <= 30
                             and d12["missed_within_500"] == 0 and sum(alarms) == 0)
    out["target"] = "1.2x detected <= 30 steps; 0 false alarms in 2,000 noisy clean steps"
    return out


# ---- hangs --------------------------------------------------------------------------------

OPS_PER_STEP = 3
# When in the step's compute each gradient bucket is ready (fraction of compute time).
BUCKET_AT = (0.6, 0.8, 1.0)
BUCKET_BYTES = (25 << 20, 25 << 20, 9 << 20)


@dataclass
class _Rank:
    plan: list[int]                 # global op ids this rank will call, in order
    pos: int = 0                    # index into plan of the next/current collective
    ready_at: float = 0.0           # when it enters plan[pos] (inf: never)
    inside_since: float | None = None
    entered: int = 0
    exited: int = 0
    steps: int = 0
    progress_s: float = 0.0
    frozen_at: float = math.inf     # stopped: counters and heartbeat freeze
    sleep_from: float = math.inf    # sleeping: compute never ends, heartbeat goes on


def _op_name(op: int) -> str:
    b = op % OPS_PER_STEP
    return f"all_reduce#bucket{b}:{BUCKET_BYTES[b]}"


def simulate_hang(kind: str, step_s: float, seed: int, poll_s: float
                  ) -> dict[str, object]:
    """Run a job to a hang; return the verdict, its latency and whether it is right."""
    rng = np.random.default_rng(seed)
    n, warm_steps, culprit = NUM_RANKS, 30, int(rng.integers(1, NUM_RANKS))
    transfer_s = 0.1 * step_s
    compute_s = step_s - transfer_s
    total_ops = (warm_steps + 5) * OPS_PER_STEP
    ranks = [_Rank(plan=list(range(total_ops))) for _ in range(n)]
    inject_step = warm_steps
    t_inject = math.inf
    if kind in ("skipped-collective", "skipped-step"):
        skip = ([inject_step * OPS_PER_STEP + 1] if kind == "skipped-collective"
                else [inject_step * OPS_PER_STEP + i for i in range(OPS_PER_STEP)])
        ranks[culprit].plan = [op for op in ranks[culprit].plan if op not in skip]

    step_compute = {}            # (rank, step) -> compute time, noisy

    def compute_of(r: int, step: int) -> float:
        if (r, step) not in step_compute:
            step_compute[(r, step)] = compute_s * float(rng.lognormal(0, 0.05))
        return step_compute[(r, step)]

    def segment(r: int, op: int) -> float:
        """Compute time before entering op (from the previous exit)."""
        step, b = divmod(op, OPS_PER_STEP)
        prev = BUCKET_AT[b - 1] if b else 0.0
        return compute_of(r, step) * (BUCKET_AT[b] - prev)

    for r, rk in enumerate(ranks):
        rk.ready_at = segment(r, rk.plan[0])
    events: list[tuple[float, int, tuple[int, int, float | None, int, float, str | None]]] = []
    step_ends: list[float] = []

    def snap(r: int, t: float) -> None:
        rk = ranks[r]
        rk.progress_s = t
        op = _op_name(rk.plan[rk.pos]) if rk.inside_since is not None else None
        events.append((t, r, (rk.entered, rk.exited, rk.inside_since, rk.steps, t, op)))

    now = 0.0
    while True:
        # Next entry among ranks computing.
        computing = [(rk.ready_at, r) for r, rk in enumerate(ranks)
                     if rk.inside_since is None and rk.pos < len(rk.plan)]
        t_enter, r_enter = min(computing) if computing else (math.inf, -1)
        # Next completion: all ranks inside the same op, none frozen.
        inside = [rk for rk in ranks if rk.inside_since is not None]
        t_done = math.inf
        if len(inside) == n and len({rk.plan[rk.pos] for rk in ranks}) == 1:
            t_done = max(rk.inside_since or 0.0 for rk in ranks) + transfer_s
            if any(rk.frozen_at <= t_done for rk in ranks):
                t_done = math.inf
        t_next = min(t_enter, t_done)
        if t_next == math.inf:
            break
        now = t_next
        if t_inject == math.inf and kind in ("stopped", "sleeping") and \
                ranks[0].steps >= inject_step:
            # Inject at a random point of the culprit's current step.
            t_inject = now + float(rng.uniform(0, step_s))
            if kind == "stopped":
                ranks[culprit].frozen_at = t_inject
            else:
                ranks[culprit].sleep_from = t_inject
        if t_done <= t_enter:
            op = ranks[0].plan[ranks[0].pos]
            for r, rk in enumerate(ranks):
                rk.exited += 1
                rk.inside_since = None
                rk.pos += 1
                nxt = rk.plan[rk.pos] if rk.pos < len(rk.plan) else None
                rk.ready_at = now + (segment(r, nxt) if nxt is not None else math.inf)
                if nxt is not None:
                    # Steps with no collective left in the plan (a skipped step) are
                    # computed in full before the next collective.
                    rk.ready_at += sum(compute_of(r, k) for k in
                                       range(op // OPS_PER_STEP + 1, nxt // OPS_PER_STEP))
                    rk.steps = nxt // OPS_PER_STEP
                if rk.sleep_from <= rk.ready_at:
                    rk.ready_at = math.inf
                snap(r, now)
            if op % OPS_PER_STEP == OPS_PER_STEP - 1:
                step_ends.append(now)
        else:
            rk = ranks[r_enter]
            if rk.frozen_at <= t_enter or rk.sleep_from <= t_enter:
                rk.ready_at = math.inf
                continue
            if kind in ("skipped-collective", "skipped-step") and t_inject == math.inf \
                    and r_enter == culprit and rk.plan[rk.pos] != rk.pos:
                t_inject = now   # the first collective it calls out of order
            rk.entered += 1
            rk.inside_since = now
            snap(r_enter, now)
        if now > (warm_steps + 4) * step_s * 3:
            break
    # Poll the detector from one step before the injection until it speaks.
    det = HangDetector(HangConfig())
    stall_start = max(t for t, _, _ in events)
    t = max(0.0, t_inject - step_s)
    last: dict[int, tuple[int, int, float | None, int, float, str | None]] = {}
    idx = 0
    events.sort(key=lambda e: e[0])
    verdict: HangVerdict | None = None
    while t < stall_start + 120:
        while idx < len(events) and events[idx][0] <= t:
            last[events[idx][1]] = events[idx][2]
            idx += 1
        progress = {}
        for r in range(n):
            e, x, since, done, prog, pend = last.get(r, (0, 0, None, 0, 0.0, None))
            rk = ranks[r]
            beat = min(rk.frozen_at, math.floor(t / 0.1) * 0.1)
            progress[r] = RankProgress(rank=r, epoch=1, last_seq_entered=e, last_seq_exited=x,
                                       in_collective_since_s=since, last_step=done,
                                       last_progress_s=prog, heartbeat_s=beat,
                                       pending_op=pend)
        durations = [b - a for a, b in zip([0.0] + step_ends, step_ends, strict=False)
                     if b <= t]
        verdict = det.observe(progress, durations, t)
        if verdict is not None:
            break
        t += poll_s
    expected = {"stopped": "stopped", "sleeping": "stuck-in-compute",
                "skipped-collective": "skipped-collective",
                "skipped-step": "skipped-collective"}[kind]
    median_step = statistics.median(
        [b - a for a, b in zip([0.0] + step_ends, step_ends, strict=False)])
    assert verdict is not None
    return {"latency_from_injection_s": t - t_inject, "latency_from_stall_s": t - stall_start,
            "early": t < t_inject,
            "culprit_right": verdict.culprit_ranks == (culprit,),
            "kind_right": verdict.kind == expected,
            "target_s": max(3 * median_step, 1.0), "reason": verdict.reason}


def bench_hangs(seeds: int) -> dict[str, object]:
    rows = []
    over_inj, over_stall, accuracy, early = [], [], [], 0
    for step_s in (0.05, 0.3, 1.0, 3.0):
        poll_s = min(0.05, step_s / 10)
        for kind in ("stopped", "sleeping", "skipped-collective", "skipped-step"):
            runs = [simulate_hang(kind, step_s, seed, poll_s) for seed in range(seeds)]
            inj = [float(r["latency_from_injection_s"]) for r in runs]  # type: ignore[arg-type]
            stall = [float(r["latency_from_stall_s"]) for r in runs]  # type: ignore[arg-type]
            target = float(runs[0]["target_s"])  # type: ignore[arg-type]
            over_inj.append(max(inj) - target)
            over_stall.append(max(stall) - target)
            accuracy.append(sum(bool(r["culprit_right"]) and bool(r["kind_right"])
                                for r in runs) / seeds)
            early += sum(bool(r["early"]) for r in runs)
            rows.append({
                "step_s": step_s, "kind": kind, "runs": seeds, "poll_s": poll_s,
                "target_s": round(target, 3),
                "latency_from_injection_s": {"p50": round(statistics.median(inj), 3),
                                             "max": round(max(inj), 3)},
                "latency_from_stall_s": {"p50": round(statistics.median(stall), 3),
                                         "max": round(max(stall), 3)},
                "within_target_from_injection": sum(x <= target * 1.02 for x in inj),
                "within_target_from_stall": sum(x <= target * 1.02 for x in stall),
                "culprit_accuracy": sum(bool(r["culprit_right"]) for r in runs) / seeds,
                "kind_accuracy": sum(bool(r["kind_right"]) for r in runs) / seeds,
                "early_alarms": sum(bool(r["early"]) for r in runs),
                "example_reason": runs[0]["reason"]})
    return {"benchmark": "hang_detection", "config": repr(HangConfig()), "rows": rows,
            "culprit_accuracy": min(accuracy), "early_alarms": early,
            # Latency is the threshold (the target's own formula) after the job's last
            # progress, plus one poll; from the injection add however long the healthy
            # ranks kept going before they blocked (up to about one step).
            "worst_over_target_from_stall_s": round(max(over_stall), 3),
            "worst_over_target_from_injection_s": round(max(over_inj), 3),
            "target": "hang detected and culprit named <= max(3 x median step, 1 s)"}


# ---- rebalance ----------------------------------------------------------------------------

def throughput(seed: int, steps: int, rebalance: bool) -> float:
    """Samples per second over `steps`, one rank 1.5x slow from step 100."""
    sim = StepSim(seed=seed, slow_rank=5, slowdown=1.5, transfer_s=0.0)
    det = StragglerDetector(StragglerConfig())
    policy = Policy(mode="rebalance", cooldown_s=30.0)
    state = PolicyState(shares=tuple(sim.shares))
    start = sim.now
    for step in range(steps):
        verdicts = det.observe(sim.step(step))
        if rebalance and verdicts:
            _, state = decide(verdicts, policy, state, sim.now)
            sim.shares = list(state.shares)
    return steps * NUM_RANKS / (sim.now - start)


def bench_rebalance(seeds: int, steps: int = 1000) -> dict[str, object]:
    nothing = [throughput(s, steps, False) for s in range(seeds)]
    rebal = [throughput(s, steps, True) for s in range(seeds)]
    ideal_tp = [steps * NUM_RANKS / _run_clean(s, steps) for s in range(seeds)]
    med = statistics.median
    return {"benchmark": "rebalance_throughput", "num_ranks": NUM_RANKS,
            "slow_rank": "1 rank 1.5x slow from step 100", "steps": steps, "seeds": seeds,
            "samples_per_s_do_nothing": round(med(nothing), 2),
            "samples_per_s_rebalance": round(med(rebal), 2),
            "samples_per_s_no_straggler": round(med(ideal_tp), 2),
            "gain_vs_do_nothing": round(med(rebal) / med(nothing), 3),
            "fraction_of_straggler_free": round(med(rebal) / med(ideal_tp), 3),
            "best_possible_fraction": round((NUM_RANKS - 1 + 1 / 1.5) / NUM_RANKS, 3)}


def _run_clean(seed: int, steps: int) -> float:
    sim = StepSim(seed=seed, transfer_s=0.0)
    for step in range(steps):
        sim.step(step)
    return sim.now


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=20)
    p.add_argument("--clean-steps", type=int, default=2000)
    p.add_argument("--only", choices=("stragglers", "hangs", "rebalance"))
    args = p.parse_args(argv)
    command = "python -m bench.detectors " + " ".join(argv if argv is not None
                                                      else sys.argv[1:])
    meta = {"command": command.strip(),
            "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus",
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    for name, fn in (("stragglers", lambda: bench_stragglers(args.seeds, args.clean_steps)),
                     ("hangs", lambda: bench_hangs(args.seeds)),
                     ("rebalance", lambda: bench_rebalance(args.seeds))):
        if args.only and args.only != name:
            continue
        t0 = time.time()
        row = fn()
        row.update(meta, wall_s=round(time.time() - t0, 1))
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
