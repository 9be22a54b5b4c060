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
