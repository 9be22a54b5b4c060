"""The in-memory snapshot budget: over it, training stops with a clear error."""

from __future__ import annotations

import pytest
import torch

from splice.agent.worker.session import HookConfig, Session, SnapshotBudgetExceeded
from splice.examples.toy import TeacherDataset, make_mlp, mse_loss


def session(budget: int) -> Session:
    s = Session(worker_id="standalone/0", link=None,
                config=HookConfig(snapshot_budget_bytes=budget))
    model = make_mlp(hidden=32)
    s.register(model=model, optimizer=torch.optim.AdamW(model.parameters()),
               dataset=TeacherDataset(num_samples=64), loss_fn=mse_loss,
               global_batch_size=8, micro_batch_size=4)
    return s


def test_within_the_budget_training_goes_on() -> None:
    s = session(budget=10_000_000)
    for _ in range(3):
        assert s.run_step() is not None
    assert 0 < s._snapshots.num_bytes <= 10_000_000


def test_over_the_budget_the_step_stops_with_a_clear_error() -> None:
    # Step 0's snapshot fits; AdamW creates its moments in step 0, so step 1's does not.
    params = sum(p.numel() * 4 for p in make_mlp(hidden=32).parameters())
    s = session(budget=int(params * 2.5))
    assert s.run_step() is not None
    with pytest.raises(SnapshotBudgetExceeded, match=r"over the budget of .* MB; raise "
                                                     r"--snapshot-budget-mb"):
        s.run_step()


def test_a_negative_budget_is_refused() -> None:
    with pytest.raises(ValueError, match="snapshot_budget_bytes"):
        HookConfig(snapshot_budget_bytes=-1)
