"""Real processes on a GPU: a controller, two agents and workers whose model is on CUDA
(snapshots copied asynchronously into the agents' shared memory, checksummed on the GPU);
one worker crashes and the warm spare that takes its place gets its state from memory.
Every step's loss equals the uninterrupted GPU run's. Skips without a GPU."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from tests.conftest import assert_losses_match, run_fault_job

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

STEPS = 30


def test_a_spare_adopts_a_crashed_gpu_workers_snapshot(tmp_path: Path) -> None:
    gpu = ("--device", "cuda")
    summary, records = run_fault_job(tmp_path / "reference", steps=STEPS, extra_args=gpu)
    assert summary["phase"] == "complete", summary["logs"]
    reference = next(iter(records.values()))["losses"]
    assert sorted(reference) == list(range(STEPS))

    summary, records = run_fault_job(tmp_path / "fault", steps=STEPS, extra_args=gpu,
                                     die=["node-1/0:12:before"], spares=1, replace=True)
    assert summary["phase"] == "complete", summary["message"] + summary["logs"]
    new = records["node-1/2"]
    step = min(new["losses"])
    # The state came from memory: the dead worker's committed GPU snapshot if it had
    # landed before the kill, else a survivor's (a GPU snapshot commits only once its
    # copies land, late in the step: the session launches them after the backward pass).
    assert re.fullmatch(rf"(node-1/0 shared memory|node-\d/\d memory), step {step}",
                        new["restored_from"]), new
    assert 12 <= step <= 13
    assert sorted(new["losses"]) == list(range(step, STEPS))
    assert_losses_match(records, reference)
