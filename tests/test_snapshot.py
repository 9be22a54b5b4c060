"""Per-step in-memory snapshots (checkpoint/snapshot.py): double buffering, private copies
and checksums verified on restore.

Checked through the public API only, and against a naive model: a dict of deep copies of
the two newest captured steps, with the CRC-32 of each tensor's bytes computed here.
Corruption is injected by flipping a byte of a tensor the ring holds (`ring.buffers`).
"""

from __future__ import annotations

import zlib
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from splice.checkpoint.snapshot import (
    SnapshotCorrupt,
    SnapshotMissing,
    SnapshotRing,
    tensor_bytes,
)


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


def crc(t: torch.Tensor) -> int:
    return zlib.crc32(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def expected_checksums(tree: Any, path: str = "") -> dict[str, int]:
    """The oracle: CRC-32 of each tensor's bytes by dotted path, computed independently."""
    if isinstance(tree, torch.Tensor):
        return {path: crc(tree)}
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) \
        if isinstance(tree, (list, tuple)) else []
    return {p: c for k, v in items
            for p, c in expected_checksums(v, f"{path}.{k}" if path else str(k)).items()}


def flip_byte(t: torch.Tensor, index: int) -> None:
    raw = t.view(-1).view(torch.uint8)
    raw[index] ^= 0x10


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


# ---- checksums ------------------------------------------------------------------------------

def test_checksums_are_the_crc32_of_each_tensor_by_path() -> None:
    ring = SnapshotRing()
    ring.capture(1, make_state(1))
    sums = ring.checksums(1)
    assert sums == expected_checksums(make_state(1))
    assert set(sums) == {"model.w", "model.b", "optim.0", "rng"}
    ring.verify(1)


def test_a_flipped_byte_in_a_held_slot_is_caught_on_restore_naming_the_tensor() -> None:
    ring = SnapshotRing()
    ring.capture(2, make_state(2))
    ring.capture(3, make_state(3))
    ring.checksums(3)  # the background checksum has read the slot: corruption from here on
    flip_byte(ring.buffers(3)["model.w"], 5)
    with pytest.raises(SnapshotCorrupt, match=r"step 3 is corrupt: 1 of 4 tensors "
                                              r"changed since capture: model\.w \(recorded"):
        ring.restore(3)
    # A corrupt snapshot is not held any more: callers that treat it as missing move on.
    assert issubclass(SnapshotCorrupt, SnapshotMissing)
    assert ring.steps() == [2]
    with pytest.raises(SnapshotMissing, match="held: \\[2\\]"):
        ring.restore(3)
    assert_same(ring.restore(2), make_state(2))


def test_verify_checks_in_place_and_names_every_changed_tensor() -> None:
    ring = SnapshotRing()
    state = {"model": {"layer": {"weight": torch.randn(64, 64), "bias": torch.randn(64)}},
             "optimizer": {"state": {0: {"exp_avg": torch.randn(64, 64)}}}}
    ring.capture(7, state)
    ring.verify(7)
    held = ring.buffers(7)
    assert set(held) == {"model.layer.weight", "model.layer.bias", "optimizer.state.0.exp_avg"}
    flip_byte(held["model.layer.weight"], 4 * 64 * 64 - 1)  # the very last byte
    flip_byte(held["optimizer.state.0.exp_avg"], 0)  # the very first
    with pytest.raises(SnapshotCorrupt) as err:
        ring.verify(7)
    message = str(err.value)
    assert "step 7" in message and "2 of 3 tensors" in message
    assert "model.layer.weight" in message and "optimizer.state.0.exp_avg" in message
    assert "model.layer.bias" not in message
    assert "peer" in message  # says what to do next
    assert ring.steps() == []


def test_an_intact_ring_restores_bit_exactly() -> None:
    g = torch.Generator().manual_seed(0)
    bits = torch.randint(-2**31, 2**31, (4096,), generator=g, dtype=torch.int64)
    state = {  # arbitrary bit patterns, NaN payloads and signed zeros included
        "f32": bits.to(torch.int32).view(torch.float32),
        "bf16": bits[:1000].to(torch.int16).view(torch.bfloat16),
        "f64": bits.view(torch.float64),
        "mask": bits[:77] % 2 == 0,
        "step": torch.tensor(3.0),
        "empty": torch.empty(0, 5),
        "strided": torch.arange(24.0).reshape(4, 6).t(),
    }
    ring = SnapshotRing()
    ring.capture(1, state)
    ring.capture(2, {k: v.clone() for k, v in state.items()})
    for step in (1, 2):
        ring.verify(step)
        got = ring.restore(step)
        for k, v in state.items():
            assert got[k].dtype == v.dtype and got[k].shape == v.shape
            assert crc(got[k]) == crc(v), k
            assert torch.equal(got[k].reshape(-1).view(torch.uint8),
                               v.contiguous().reshape(-1).view(torch.uint8)), k
        assert ring.checksums(step) == expected_checksums(state)


def test_each_slot_keeps_its_own_checksums_through_the_rotation() -> None:
    ring = SnapshotRing()
    ring.capture(1, make_state(1))
    ring.capture(2, make_state(2))
    of_two = ring.checksums(2)
    assert of_two == expected_checksums(make_state(2)) != ring.checksums(1)
    ring.capture(3, make_state(3))  # reuses the buffers of step 1
    assert ring.checksums(2) == of_two
    assert ring.checksums(3) == expected_checksums(make_state(3))
    flip_byte(ring.buffers(2)["optim.0"], 1)  # the older slot goes bad...
    assert_same(ring.restore(3), make_state(3))  # ...the newer one is unaffected
    with pytest.raises(SnapshotCorrupt, match=r"step 2 .*optim\.0"):
        ring.restore(2)
    ring.capture(4, make_state(4))  # overwrites the forgotten slot with fresh checksums
    assert ring.steps() == [3, 4]
    for s in (3, 4):
        ring.verify(s)
        assert ring.checksums(s) == expected_checksums(make_state(s))


def test_checksums_of_a_step_not_held_is_missing() -> None:
    ring = SnapshotRing()
    ring.capture(1, make_state(1))
    for call in (ring.checksums, ring.verify, ring.buffers):
        with pytest.raises(SnapshotMissing, match="step 2"):
            call(2)


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
            assert ring.checksums(s) == expected_checksums(want)
        assert ring.num_bytes == sum(tensor_bytes(v) for v in model.values())
