"""Per-step in-memory snapshots (checkpoint/snapshot.py): double buffering and private copies.

Checked through the public API only, and against a naive model: a dict of deep copies of
the two newest captured steps.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from splice.checkpoint.snapshot import SnapshotMissing, SnapshotRing, tensor_bytes


def make_state(step: int, size: int = 4) -> dict[str, Any]:
    """A training state whose every value is determined by `step`."""
    return {
        "model": {"w": torch.full((size, 3), float(step)), "b": torch.arange(3) + step},
        "optim": [torch.full((2,), step * 0.5), {"lr": 0.1 * step, "betas": (0.9, 0.99)}],
        "rng": torch.tensor([step % 256, 7], dtype=torch.uint8),
        "cursor": {"sample": step * 32, "seed": 1234},
    }


def assert_same(a: Any, b: Any) -> None:
    assert type(a) is type(b), (type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    else:
        assert a == b


def tensors(tree: Any) -> list[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):
        return [t for v in tree.values() for t in tensors(v)]
    if isinstance(tree, (list, tuple)):
        return [t for v in tree for t in tensors(v)]
    return []


def test_empty_ring() -> None:
    ring = SnapshotRing()
    assert ring.steps() == [] and ring.num_bytes == 0
    with pytest.raises(SnapshotMissing, match="step 0"):
        ring.restore(0)


def test_keeps_the_two_newest_steps_and_the_older_survives_the_newer_capture() -> None:
    ring = SnapshotRing()
    for s in range(1, 6):
        ring.capture(s, make_state(s))
        assert ring.steps() == ([s - 1, s] if s > 1 else [1])
        assert_same(ring.restore(s - 1 if s > 1 else 1), make_state(s - 1 if s > 1 else 1))
    with pytest.raises(SnapshotMissing, match=r"held: \[4, 5\]"):
        ring.restore(3)


def test_capture_copies_so_later_training_does_not_change_the_snapshot() -> None:
    ring = SnapshotRing()
    state = make_state(1)
    ring.capture(1, state)
    state["model"]["w"].add_(100.0)
    state["optim"][1]["lr"] = 99.0
    state["cursor"]["sample"] = -1
    assert_same(ring.restore(1), make_state(1))


def test_restore_returns_private_copies() -> None:
    ring = SnapshotRing()
    ring.capture(1, make_state(1))
    ring.capture(2, make_state(2))
    first = ring.restore(2)
    second = ring.restore(2)
    ptrs = {t.untyped_storage().data_ptr() for t in tensors(first)}
    assert ptrs.isdisjoint(t.untyped_storage().data_ptr() for t in tensors(second))
    for t in tensors(first):
        t.fill_(0)  # the caller trains on the restored state...
    first["optim"][1]["lr"] = 0.0
    first["cursor"]["sample"] = 0
    ring.capture(3, make_state(3))  # ...and the ring reuses the buffers of step 1 for step 3
    assert_same(ring.restore(2), make_state(2))
    assert_same(second, make_state(2))
    assert_same(ring.restore(3), make_state(3))


def test_restored_copy_survives_the_slot_being_overwritten() -> None:
    ring = SnapshotRing()
    ring.capture(1, make_state(1))
    kept = ring.restore(1)
    ring.capture(2, make_state(2))
    ring.capture(3, make_state(3))  # overwrites the slot step 1 lived in
    assert_same(kept, make_state(1))


def test_rollback_then_recapture_of_the_same_step_is_a_no_op() -> None:
    ring = SnapshotRing()
    ring.capture(4, make_state(4))
    ring.capture(5, make_state(5))
    ring.discard_after(4)  # the new membership resumes at step 4
    assert ring.steps() == [4]
    ring.capture(4, make_state(999))  # the hook captures "before step 4" again
    assert_same(ring.restore(4), make_state(4))
    ring.capture(5, make_state(55))  # the re-run step 5 must not overwrite step 4
    assert ring.steps() == [4, 5]
    assert_same(ring.restore(4), make_state(4))
    assert_same(ring.restore(5), make_state(55))


def test_discard_after_forgets_newer_steps() -> None:
    ring = SnapshotRing()
    ring.capture(7, make_state(7))
    ring.capture(8, make_state(8))
    ring.discard_after(8)
    assert ring.steps() == [7, 8]
    ring.discard_after(6)
    assert ring.steps() == [] and ring.num_bytes == 0
    with pytest.raises(SnapshotMissing):
        ring.restore(7)


def test_capturing_an_older_step_is_an_invariant_violation() -> None:
    ring = SnapshotRing()
    ring.capture(5, make_state(5))
    with pytest.raises(AssertionError):
        ring.capture(4, make_state(4))


def test_num_bytes_counts_complete_snapshots() -> None:
    ring = SnapshotRing()
    one = tensor_bytes(make_state(1))
    assert one == 4 * 3 * 4 + 3 * 8 + 2 * 4 + 2 * 1
    ring.capture(1, make_state(1))
    assert ring.num_bytes == one
    ring.capture(2, make_state(2, size=10))
    assert ring.num_bytes == one + tensor_bytes(make_state(2, size=10))
    ring.discard_after(1)
    assert ring.num_bytes == one


def test_snapshot_is_detached_from_autograd() -> None:
    ring = SnapshotRing()
    w = torch.ones(3, requires_grad=True)
    ring.capture(1, {"w": w})
    restored = ring.restore(1)["w"]
    assert not restored.requires_grad
    assert torch.equal(restored, torch.ones(3))


# ---- against a naive model ----------------------------------------------------------------

ops = st.lists(st.one_of(
    st.tuples(st.just("capture"), st.integers(0, 2), st.integers(1, 6)),  # step delta, size
    st.tuples(st.just("discard"), st.integers(-2, 1), st.just(0)),        # below newest
), min_size=1, max_size=25)


@settings(max_examples=60, deadline=None)
@given(ops)
def test_ring_matches_naive_two_newest_model(script: list[tuple[str, int, int]]) -> None:
    ring = SnapshotRing()
    model: dict[int, dict[str, Any]] = {}
    newest = 0
    for op, arg, size in script:
        if op == "capture":
            step = newest + arg
            newest = step
            state = make_state(step + 1000 * size, size=size)
            ring.capture(step, state)
            if step not in model:
                if len(model) == 2:
                    del model[min(model)]
                model[step] = make_state(step + 1000 * size, size=size)
            state["model"]["w"].fill_(-1)  # training moves on in place
        else:
            bound = newest + arg
            ring.discard_after(bound)
            model = {s: v for s, v in model.items() if s <= bound}
            newest = max(model, default=newest)
        assert ring.steps() == sorted(model)
        for s, want in model.items():
            assert_same(ring.restore(s), want)
        assert ring.num_bytes == sum(tensor_bytes(v) for v in model.values())
