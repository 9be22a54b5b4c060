"""Hang detection on a controller that reads its telemetry late (issue 4).

An overloaded controller takes agents' batches seconds after they were sent. A rank's
heartbeat and progress are then aged from its batch's sent_at_s (as its agent saw them),
plus the controller time since the batch was taken, not from when the worker wrote them:
processing late must not make every healthy rank look stopped, while a stopped rank is
named exactly as soon after the stop (counted from when its telemetry is read) as without
lag, and an agent that goes silent is handled as before.

The stories run on a simulated clock: agents send every 0.1 s by their own (true) clock,
the controller takes each batch `lag` later and its hub ticks every 0.1 s. Times are in
integer milliseconds so that no float rounding decides an ordering.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pytest

from splice.controller import telemetry_columns as tc
from splice.controller.hang import HangConfig, HangDetector, HangVerdict, threshold_s
from splice.controller.job import JobSpec, JobState, Phase
from splice.controller.membership import Membership
from splice.controller.telemetry_hub import DetectionConfig, ProgressArrays, TelemetryHub
from splice.proto import controller_pb2 as pb

JOB = "lag"
T0_MS = 1_000_000        # the simulation starts here (0.0 means "none" on the wire)
STEP_MS = 200            # threshold: max(1 s floor, 3 x 0.2 s) = 1 s
COMPUTE_MS = 120         # then each step's all_reduce until the step ends
SEND_MS = 100            # agents send every 0.1 s (agent.py's default)
TICK_MS = 100            # the hub looks for hangs every 0.1 s (at 50 ms past a send)
NODES = ("a", "b")
WORKERS = tuple(f"{n}/{i}" for n in NODES for i in range(2))   # ranks 0..3
TABLES = {n: tuple(w for w in WORKERS if w.startswith(n + "/")) for n in NODES}
LAG_MS = 10_000          # the controller takes every batch 10 s after it was sent


@dataclass(frozen=True, kw_only=True)
class Story:
    end_ms: int                            # agents send until then (their clock)
    stopped: tuple[int, int] | None = None  # (rank, at): SIGSTOPped then, mid-compute
    # From then every rank waits in the current step's all_reduce, alive (a transport hang).
    all_wait_ms: int | None = None
    silent: tuple[str, int] | None = None   # (node, from): its agent sends nothing more

    def held_at_step(self) -> int | None:
        """The step no rank gets past (None: the job trains on)."""
        at = [ms for ms in (self.stopped and self.stopped[1], self.all_wait_ms,
                            self.silent and self.silent[1]) if ms is not None]
        return (min(at) - T0_MS) // STEP_MS if at else None


def _progress(story: Story, rank: int, t: int) -> pb.WorkerProgress:
    """What rank `rank`'s counters say at `t` (ms): computing in the first COMPUTE_MS of a
    step, then inside the step's all_reduce (seq step + 1) until the step ends."""
    beat = t
    if story.stopped is not None and story.stopped[0] == rank and t >= story.stopped[1]:
        t = beat = story.stopped[1]   # everything froze at the stop
    held = story.held_at_step()
    step, into = divmod(t - T0_MS, STEP_MS)
    if held is not None and step > held:
        step, into = held, STEP_MS - 1   # waits in the held step's all_reduce for ever
    start = T0_MS + step * STEP_MS
    inside = into >= COMPUTE_MS
    return pb.WorkerProgress(
        worker_id=WORKERS[rank], epoch=1, step=step, seq_entered=step + inside,
        seq_exited=step, in_collective_since_s=(start + COMPUTE_MS) / 1e3 if inside else 0.0,
        last_progress_s=(start + COMPUTE_MS * inside) / 1e3, op="all_reduce",
        op_bytes=4096, heartbeat_s=beat / 1e3)


def _batch(story: Story, node: str, t: int) -> tc.Batch:
    """The batch `node`'s agent sends at `t`: its workers' counters and the steps they
    completed since its last batch."""
    table = TABLES[node]
    held = story.held_at_step()
    progress = [_progress(story, WORKERS.index(w), t) for w in table]
    steps = [pb.StepReport(worker_id=w, epoch=1, step=s, step_time_s=STEP_MS / 1e3,
                           compute_s=COMPUTE_MS / 1e3, wait_s=(STEP_MS - COMPUTE_MS) / 1e3,
                           completed_at_s=done / 1e3)
             for w in table
             for s, done in ((s, T0_MS + (s + 1) * STEP_MS) for s in range(
                 (t - SEND_MS - T0_MS) // STEP_MS, (t - T0_MS) // STEP_MS + 1))
             if s >= 0 and t - SEND_MS < done <= t and (held is None or s < held)]
    msg = pb.Telemetry(sent_at_s=t / 1e3)
    index = {w: i for i, w in enumerate(table)}
    tc.encode_progress(msg.progress_columns, [(index[p.worker_id], p) for p in progress])
    tc.encode_steps(msg.step_columns, [(index[s.worker_id], s) for s in steps])
    return tc.decode(msg, table)


def events(story: Story, lag_ms: int) -> Iterator[tuple[int, str, tc.Batch | None]]:
    """(controller time, node, batch) as the controller takes them, and (time, "", None)
    for each of its ticks, in order."""
    out: list[tuple[int, int, str, tc.Batch | None]] = []
    for node in NODES:
        for t in range(T0_MS + SEND_MS, T0_MS + story.end_ms + 1, SEND_MS):
            if story.silent is not None and story.silent[0] == node and t >= story.silent[1]:
                break
            out.append((t + lag_ms, 0, node, _batch(story, node, t)))
    for c in range(T0_MS + TICK_MS // 2, T0_MS + story.end_ms + lag_ms, TICK_MS):
        out.append((c, 1, "", None))
    for at, _, node, batch in sorted(out, key=lambda e: e[:2]):
        yield at, node, batch


# ---- the hub, end to end -------------------------------------------------------------------

class FakeController:
    """The hub's side of the controller: one running job of WORKERS; what the hub does
    (kills, verdicts) is recorded."""

    def __init__(self) -> None:
        self.state = JobState(
            spec=JobSpec(job_id=JOB, world_size=len(WORKERS)), phase=Phase.RUNNING,
            membership=Membership(epoch=1, members=WORKERS, shares=(1.0,) * len(WORKERS),
                                  reason="formed"))
        self.killed: list[str] = []
        self.verdicts: list[pb.Verdict] = []

    def job_state(self, job_id: str) -> JobState:
        return self.state

    def submit(self, job_id: str, fn: object) -> None:
        pass   # straggler verdicts' actions: not these stories' subject

    def kill_worker(self, job_id: str, worker_id: str, epoch: int, reason: str) -> None:
        self.killed.append(worker_id)

    def record_verdict(self, job_id: str, verdict: pb.Verdict, fault: str = "") -> None:
        self.verdicts.append(verdict)


def run_hub(story: Story, lag_ms: int) -> FakeController:
    controller, now = FakeController(), [0.0]
    # Ticks come from the story (every TICK_MS); the hub's own pacing must not skip one.
    hub = TelemetryHub(controller, DetectionConfig(tick_s=TICK_MS / 2e3),  # type: ignore[arg-type]
                       clock=lambda: now[0])
    for at, node, batch in events(story, lag_ms):
        now[0] = at / 1e3
        if batch is None:
            hub.tick()
        else:
            hub.observe(JOB, node, batch, 1)
    return controller


def test_a_late_controller_does_not_take_a_healthy_job_for_hung() -> None:
    c = run_hub(Story(end_ms=20_000), LAG_MS)
    assert (c.verdicts, c.killed) == ([], [])


def test_a_late_controller_names_a_stopped_rank_as_soon_as_one_on_time() -> None:
    # Rank 1 stops 50 ms into step 5's compute; the others wait in step 5's all_reduce.
    stop_ms = T0_MS + 5 * STEP_MS + 50
    story = Story(end_ms=5_000, stopped=(1, stop_ms))
    on_time, late = run_hub(story, 0), run_hub(story, LAG_MS)
    assert on_time.killed == late.killed == ["a/1"]
    (v0,), (v1,) = on_time.verdicts, late.verdicts
    assert (v1.kind, v1.rank, v1.worker_id, v1.action) == ("stopped", 1, "a/1", "kill")
    # On time: the first tick after a batch sent more than the threshold (1 s) after the
    # last progress (the others entered the all_reduce at 1.12 s into the story).
    assert v0.at_s * 1e3 - stop_ms == pytest.approx(1200)
    # Late: exactly the lag later, with the same reason (stall, heartbeat ages, victims).
    assert v1.at_s * 1e3 - v0.at_s * 1e3 == pytest.approx(LAG_MS)
    assert v1.reason == v0.reason
    assert "rank 1 is stopped after seq 5" in v1.reason and "heartbeat 1.20 s old" in v1.reason
    assert "rank 0, 2, 3 wait inside seq 6 (step 5)" in v1.reason
    assert v1.score == pytest.approx(v0.score) == pytest.approx(1.13)


def test_a_late_controller_blames_nobody_when_every_rank_waits_alive() -> None:
    # Everyone is inside the same all_reduce and beating: the transport, not a rank.
    story = Story(end_ms=5_000, all_wait_ms=T0_MS + 5 * STEP_MS + 150)
    on_time, late = run_hub(story, 0), run_hub(story, LAG_MS)
    (v0,), (v1,) = on_time.verdicts, late.verdicts
    assert (v1.kind, v1.action, late.killed) == ("unlocalized", "alert", [])
    assert v1.reason == v0.reason


def test_a_silent_agent_is_left_to_the_node_timeout_late_or_not() -> None:
    # Node b's agent goes silent mid-compute; node a's ranks wait for b's in the
    # all_reduce. No hang verdict: every agent must report past the threshold first, and
    # a node whose agent is silent is the controller's node timeout's to handle.
    story = Story(end_ms=8_000, silent=("b", T0_MS + 5 * STEP_MS + 50))
    for lag_ms in (0, LAG_MS):
        c = run_hub(story, lag_ms)
        assert (c.verdicts, c.killed) == ([], [])


# ---- the hub's arrays as the detector reads them -------------------------------------------

def detector_verdicts(story: Story, lag_ms: int) -> list[tuple[float, HangVerdict]]:
    """The hub's per-rank arrays fed the batches as the controller takes them, and a
    detector polled on them at every tick with nothing in front of it (no gates)."""
    arrays, detector = ProgressArrays(len(WORKERS)), HangDetector(HangConfig())
    step_times: list[float] = []
    out = []
    for at, _, batch in events(story, lag_ms):
        now = at / 1e3
        if batch is None:
            if arrays.seen.all():
                v = detector.observe(arrays.rank_arrays(), step_times, now)
                if v is not None:
                    out.append((now - lag_ms / 1e3, v))
            continue
        ranks = np.array([WORKERS.index(w) for w in batch.worker_ids])
        arrays.update(ranks[batch.progress.worker], batch.progress, None,
                      now - batch.sent_at_s)
        step_times += batch.steps.step_time_s.tolist()
    return out


def test_ranks_fresh_at_their_batches_sending_are_not_stalled_however_late() -> None:
    # The detector alone, without the hub's gates: 10 s late, nobody has stalled.
    assert threshold_s(HangConfig(), [STEP_MS / 1e3]) < LAG_MS / 1e3
    assert detector_verdicts(Story(end_ms=20_000), LAG_MS) == []


def test_ages_are_the_senders_plus_the_time_since_the_batch_was_taken() -> None:
    # Rank 1 stopped at 1.05 s; the batch sent at 2.2 s is taken at 12.2 s: at 12.25 s its
    # heartbeat is 1.15 s + 0.05 s old, the others' 0.05 s, whatever the lag.
    story = Story(end_ms=1_200, stopped=(1, T0_MS + 5 * STEP_MS + 50))
    arrays = ProgressArrays(len(WORKERS))
    for node in NODES:
        batch = _batch(story, node, T0_MS + 1_200)
        ranks = np.array([WORKERS.index(w) for w in batch.worker_ids])
        arrays.update(ranks[batch.progress.worker], batch.progress, None,
                      (T0_MS + 1_200 + LAG_MS) / 1e3 - batch.sent_at_s)
    now = (T0_MS + 1_250 + LAG_MS) / 1e3
    a = arrays.rank_arrays()
    assert (now - a.heartbeat_s).tolist() == pytest.approx([0.05, 0.2, 0.05, 0.05])
    assert (now - a.last_progress_s).tolist() == pytest.approx([0.13, 0.25, 0.13, 0.13])
    assert (now - a.in_collective_since_s[a.in_collective]).tolist() == pytest.approx(
        [0.13, 0.13, 0.13])


def test_a_silent_agents_ranks_age_with_the_controllers_clock() -> None:
    # Without the hub's wait for every agent, node b's ranks (silent from 1.05 s) age from
    # when their last batch was taken: named stopped with the same delay, late or not.
    story = Story(end_ms=4_000, silent=("b", T0_MS + 5 * STEP_MS + 50))
    (at0, v0), = detector_verdicts(story, 0)
    (at1, v1), = detector_verdicts(story, LAG_MS)
    assert at1 == pytest.approx(at0)
    assert (v1.kind, v1.culprit_ranks, v1.victims) == ("stopped", (2, 3), (0, 1))
    assert v1.reason == v0.reason
    assert dict(v1.evidence[2]) == pytest.approx(dict(v0.evidence[2]))
