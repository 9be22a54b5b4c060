"""Smoke test of the scale bench: a small simulated job, fast steps, both faults found.

The bench (bench/scale.py) runs a real controller and a load generator in two processes;
here with 32 ranks on 4 fake agents and 0.25 s steps, so that it ends in seconds. It checks
the harness itself (the job forms, every step record is consumed, the injected straggler
and hang are named correctly, no false alarm) rather than any scale figure.
"""

from __future__ import annotations

import pytest

from bench.scale import Scenario, run_scale


@pytest.mark.integration
def test_small_simulated_job_keeps_up_and_names_both_culprits() -> None:
    sc = Scenario(num_ranks=32, ranks_per_agent=8, preform=False, period_s=0.25,
                  straggler_step=3, hang_step=16, hang_wait_s=2.0, measure_steps=(2, 12))
    row = run_scale(sc, form_timeout_s=10.0, verdict_wait_s=5.0)
    assert row["forming"] == "real" and row["forming_s"] is not None, row
    assert row["keeps_up"], row
    assert row["straggler_culprit_correct"] and row["straggler_false_verdicts"] == 0, row
    assert row["hang_culprit_correct"] and row["hang_false_verdicts"] == 0, row
    assert row["final_phase"] == "running", row


def test_generator_encoder_parses_to_the_message_the_setters_build() -> None:
    import numpy as np

    from bench.scale import TelemetryEncoder, worker
    from splice.proto import controller_pb2 as pb

    k = 5
    wids = [worker(3, w) for w in range(k)]
    enc = TelemetryEncoder(wids, epoch=1, num_samples=32, collective_bytes=1 << 26,
                           op="all_reduce", op_bytes=1 << 26)
    c = np.random.default_rng(1).random(k)
    entered = np.array([7, 8, 8, 7, 8])
    for with_steps in (True, False):
        v = dict(p_step=7, p_seq_entered=entered, p_seq_exited=7,
                 p_in_collective_since_s=np.where(c > .5, c, 0.0), p_last_progress_s=c + 3,
                 p_heartbeat_s=123.5, sent_at_s=99.25)
        if with_steps:
            v.update(s_step=6, s_compute_s=c, s_wait_s=1 - c, s_step_time_s=1.05,
                     s_completed_at_s=7.5, s_loss=0.25)
        want = pb.Telemetry(sent_at_s=99.25)
        for w in range(k):
            want.progress.add(worker_id=wids[w], epoch=1, op="all_reduce", op_bytes=1 << 26,
                              step=7, seq_entered=int(entered[w]), seq_exited=7,
                              in_collective_since_s=float(v["p_in_collective_since_s"][w]),
                              last_progress_s=float(c[w] + 3), heartbeat_s=123.5)
        if with_steps:
            for w in range(k):
                want.steps.add(worker_id=wids[w], epoch=1, num_samples=32,
                               collective_bytes=1 << 26, step=6, compute_s=float(c[w]),
                               wait_s=float(1 - c[w]), step_time_s=1.05, completed_at_s=7.5,
                               loss=0.25)
        assert pb.Telemetry.FromString(enc.encode(with_steps, v)) == want


def test_column_encoder_parses_to_the_message_the_setters_build() -> None:
    import numpy as np

    from bench.scale import ColumnTelemetryEncoder, worker
    from splice.proto import controller_pb2 as pb

    k = 200   # worker indices past 127 take two-byte varints
    wids = [worker(3, w) for w in range(k)]
    enc = ColumnTelemetryEncoder(wids, epoch=1, num_samples=32, collective_bytes=1 << 26,
                                 op="all_reduce", op_bytes=1 << 26)
    c = np.random.default_rng(1).random(k)
    entered = np.where(c > .5, 300, 299)
    for first, with_steps in ((True, True), (False, False), (False, True)):
        v = dict(p_step=299, p_seq_entered=entered, p_seq_exited=299,
                 p_in_collective_since_s=np.where(c > .5, c, 0.0), p_last_progress_s=c + 3,
                 p_heartbeat_s=123.5, sent_at_s=99.25)
        if with_steps:
            v.update(s_step=298, s_compute_s=c, s_wait_s=1 - c, s_step_time_s=1.05,
                     s_completed_at_s=7.5, s_loss=0.25)
        want = pb.Telemetry(sent_at_s=99.25)
        if first:
            want.workers.worker_ids.extend(wids)
        p = want.progress_columns
        p.worker.extend(range(k))
        p.epoch.extend([1] * k)
        p.step.extend([299] * k)
        p.seq_entered.extend(entered.tolist())
        p.seq_exited.extend([299] * k)
        p.in_collective_since_s.extend(v["p_in_collective_since_s"].tolist())
        p.last_progress_s.extend((c + 3).tolist())
        p.op_bytes.extend([1 << 26] * k)
        p.heartbeat_s.extend([123.5] * k)
        p.ops.append("all_reduce")
        if with_steps:
            s = want.step_columns
            s.worker.extend(range(k))
            s.epoch.extend([1] * k)
            s.step.extend([298] * k)
            s.loss.extend([0.25] * k)
            s.step_time_s.extend([1.05] * k)
            s.completed_at_s.extend([7.5] * k)
            s.num_samples.extend([32] * k)
            s.compute_s.extend(c.tolist())
            s.wait_s.extend((1 - c).tolist())
            s.collective_bytes.extend([1 << 26] * k)
        assert pb.Telemetry.FromString(enc.encode(with_steps, v)) == want
