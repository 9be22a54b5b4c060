"""A survivor interrupted in step k before its optimizer step rolls back to the snapshot of
step k without copying its parameters and optimizer state back (they still equal the
snapshot's): only what the step changed is restored, the buffers the forward pass updates
and the RNG states. The result must be the state a whole restore gives, and the training
after it the same, step for step. `SnapshotRing.restore(step, keep)` copies and checks the
tensors `keep` accepts and no others."""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch
from torch import nn

import splice
from splice.agent.worker.session import Session
from splice.checkpoint.snapshot import SnapshotCorrupt, SnapshotRing


def _session(shared_norm: bool = False, before_register: Any = None) -> Session:
    torch.manual_seed(0)
    # BatchNorm's statistics change in the forward pass, dropout draws from the RNG. With
    # `shared_norm` one BatchNorm is used at two places (its buffers under two names);
    # `before_register(session)` runs between init() and register().
    norm = nn.BatchNorm1d(32)
    layers = [nn.Linear(8, 32), norm, nn.Dropout(0.2), nn.ReLU()]
    if shared_norm:
        layers += [nn.Linear(32, 32), norm]
    model = nn.Sequential(*layers, nn.Linear(32, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    data = [(torch.randn(8), torch.randn(1)) for _ in range(64)]

    def loss_fn(m: nn.Module, batch: Any) -> torch.Tensor:
        x, y = batch
        return (m(x) - y).square().mean()

    session = splice.init()
    if before_register is not None:
        before_register(session)
    session.register(model=model, optimizer=opt, dataset=data, loss_fn=loss_fn,
                     global_batch_size=16, micro_batch_size=8, seed=3)
    return session


def _interrupted_before_the_update(s: Session) -> None:
    """What run_step does up to the fault: the capture, then forward and backward."""
    s._capture(s.step)
    s._live_at = s.step
    s._forward_backward()


def _everything(s: Session) -> list[Any]:
    opt = s.optimizer.state_dict()["state"]
    return [{k: v.clone() for k, v in s.model.state_dict().items()},
            {i: {k: v.clone() for k, v in st.items()} for i, st in opt.items()},
            torch.get_rng_state(), random.getstate(), s.step]


def _assert_same(a: list[Any], b: list[Any]) -> None:
    for k in a[0]:
        assert torch.equal(a[0][k], b[0][k]), k
    assert a[1].keys() == b[1].keys()
    for i in a[1]:
        for k in a[1][i]:
            assert torch.equal(a[1][i][k], b[1][i][k]), (i, k)
    assert torch.equal(a[2], b[2]) and a[3] == b[3] and a[4] == b[4]


def test_rewinding_gives_the_state_and_the_training_a_whole_restore_gives(
        monkeypatch: pytest.MonkeyPatch) -> None:
    rewound, restored = _session(), _session()
    try:
        for s in (rewound, restored):
            for _ in range(3):
                assert s.run_step() is not None
            _interrupted_before_the_update(s)
        kept: list[str] = []
        ring_restore = SnapshotRing.restore

        def spy(ring: SnapshotRing, step: int, keep: Any = None) -> Any:
            if keep is not None:
                kept.extend(p for p in ring.checksums(step) if keep(p))
            return ring_restore(ring, step, keep)

        monkeypatch.setattr(SnapshotRing, "restore", spy)
        rewound._restore(3)
        assert sorted(kept) == ["model.1.num_batches_tracked", "model.1.running_mean",
                                "model.1.running_var", "rng.torch"]
        restored._live_at = None  # as if the update had begun: a whole restore
        restored._restore(3)
        monkeypatch.undo()
        _assert_same(_everything(rewound), _everything(restored))
        for _ in range(3):
            a, b = rewound.run_step(), restored.run_step()
            assert a is not None and b is not None and a.loss == b.loss
        _assert_same(_everything(rewound), _everything(restored))
    finally:
        rewound.close()
        restored.close()


def test_once_the_update_has_begun_the_whole_snapshot_comes_back() -> None:
    s = _session()
    try:
        for _ in range(2):
            assert s.run_step() is not None
        want = _everything(s)
        _interrupted_before_the_update(s)
        s._live_at = None  # what run_step does just before optimizer.step()
        s.optimizer.step()  # the parameters and the optimizer's state move on
        s._restore(2)
        _assert_same(_everything(s), want)
    finally:
        s.close()


def test_a_partial_restore_copies_and_checks_only_what_it_keeps() -> None:
    ring = SnapshotRing()
    state = {"a": torch.arange(10.0), "b": torch.ones(4), "n": 7}
    ring.capture(1, state)
    part = ring.restore(1, keep=lambda path: path == "b")
    assert part["a"] is None and torch.equal(part["b"], torch.ones(4)) and part["n"] == 7
    part["b"] += 1  # a private copy
    assert torch.equal(ring.restore(1)["b"], torch.ones(4))
    ring.buffers(1)["a"][3] += 1  # damage where the partial restore does not look
    assert torch.equal(ring.restore(1, keep=lambda path: path == "b")["b"], torch.ones(4))
    with pytest.raises(SnapshotCorrupt, match="a "):
        ring.restore(1, keep=lambda path: path == "a")


def test_a_load_copies_the_models_tensors_from_the_ring_once_checked() -> None:
    s = _session()
    try:
        for _ in range(2):
            assert s.run_step() is not None
        held = s._snapshots.buffers(1)
        snap = s._snapshot_to_load(1)
        # The model's tensors are the ring's own (load_state_dict copies them into the
        # model), the optimizer's private (the optimizer keeps what it is given).
        assert snap["model"]["0.weight"].data_ptr() == held["model.0.weight"].data_ptr()
        state = snap["optimizer"]["state"][0]["exp_avg"]
        assert state.data_ptr() != held["optimizer.state.0.exp_avg"].data_ptr()
        held["model.0.weight"].view(-1).view(torch.int32)[5] ^= 1 << 3  # one bit, at rest
        with pytest.raises(SnapshotCorrupt, match="model.0.weight"):
            s._snapshot_to_load(1)
    finally:
        s.close()
