"""A snapshot checked in full is not checked again on its way into the model
(`SnapshotRing.verify(..., again=False)`, used by `_snapshot_to_load`): a newcomer that
verified a fetched snapshot, or a member that verified its snapshots before offering them
to a recovery, loads without reading the model's bytes once more. Anything that rewrites
a slot (a capture into it, an adoption) makes the next check a real one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from splice.checkpoint import snapshot as snapshot_module
from splice.checkpoint.snapshot import SnapshotCorrupt, SnapshotRing

from .test_snapshot import make_state


def flip(ring: SnapshotRing, step: int) -> None:
    victim = ring.buffers(step)["model.w"]
    victim.view(-1).view(torch.uint8)[0] ^= 0x40


def test_a_check_is_skipped_only_after_a_whole_check_of_the_same_capture() -> None:
    ring = SnapshotRing()
    try:
        ring.capture(0, make_state(0))
        flip(ring, 0)
        # Never checked since the capture: `again=False` checks, and catches the damage.
        with pytest.raises(SnapshotCorrupt):
            ring.verify(0, again=False)
        ring.capture(1, make_state(1))
        ring.verify(1)
        flip(ring, 1)  # damage after the check: only a real check sees it
        ring.verify(1, keep=lambda p: p.startswith("model."), again=False)
        with pytest.raises(SnapshotCorrupt):
            ring.verify(1, keep=lambda p: p.startswith("model."))
        # A capture into a checked slot needs a check again.
        ring.capture(2, make_state(2))
        ring.verify(2)
        ring.capture(3, make_state(3))
        ring.capture(4, make_state(4))  # reuses step 2's slot
        flip(ring, 4)
        with pytest.raises(SnapshotCorrupt):
            ring.verify(4, again=False)
    finally:
        ring.close()


def test_an_adopted_snapshot_is_checked_even_if_its_writer_had_checked_it(
        tmp_path: Path) -> None:
    directory = str(tmp_path / "w")
    writer = SnapshotRing(directory=directory, owner="node-0/0")
    writer.capture(5, make_state(5))
    writer.verify(5)
    flip(writer, 5)
    writer.close()
    adopter = SnapshotRing(directory=directory, owner="node-0/1")
    try:
        assert adopter.adopt() == [5]
        with pytest.raises(SnapshotCorrupt):
            adopter.verify(5, again=False)
    finally:
        adopter.close()


def test_loading_a_verified_snapshot_reads_the_models_bytes_once(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """What `_snapshot_to_load` does after `_fetch_state`'s check: the optimizer's part is
    copied and its copy checked; the model's, checked in place moments ago, is not."""
    from splice.agent.worker.state_sources import StateSources

    ring = SnapshotRing()
    ring.capture(3, {"model": {"w": torch.arange(8.0)},
                     "optimizer": {"m": torch.ones(4)}, "step": 3})
    ring.verify(3)
    summed: list[int] = []
    real = snapshot_module.checksums_of

    def counted(tensors: list[torch.Tensor]) -> list[int]:
        summed.extend(t.numel() for t in tensors)
        return real(tensors)

    monkeypatch.setattr(snapshot_module, "checksums_of", counted)
    loader = StateSources.__new__(StateSources)
    loader._snapshots = ring  # type: ignore[attr-defined]
    try:
        snap = loader._snapshot_to_load(3)
    finally:
        ring.close()
    assert summed == [4]  # the optimizer's copy only
    assert torch.equal(snap["model"]["w"], torch.arange(8.0))
    assert torch.equal(snap["optimizer"]["m"], torch.ones(4))


def test_forgetting_the_checks_makes_the_next_one_real() -> None:
    """A joining worker's state, checked on arrival, is checked again at load once the
    model has been built (`register()`), however long that took."""
    ring = SnapshotRing()
    try:
        ring.capture(0, make_state(0))
        ring.verify(0)
        flip(ring, 0)
        ring.verify(0, again=False)  # trusted: checked since it was taken
        ring.forget_checks()
        with pytest.raises(SnapshotCorrupt):
            ring.verify(0, again=False)
    finally:
        ring.close()
