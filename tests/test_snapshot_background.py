"""Snapshots of CPU state captured on the ring's helper thread (`capture_in_background`),
as the session takes them at every step's start: the same snapshot `capture` takes, the
state read off the calling thread, every later call on the ring waiting for it, its
errors raised there, and its commit recorded under the epoch it began in. Through the
session: the snapshot of step k is the state at step k's start even where the forward
pass changes buffers and draws from the RNG while the helper works."""

from __future__ import annotations

import random
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from splice.checkpoint import slotmeta
from splice.checkpoint.snapshot import SnapshotRing

from .test_rewind import _session
from .test_snapshot import assert_same, make_state, tensors

JOIN_S = 10.0


def test_a_background_capture_equals_a_capture_and_reads_the_state_off_the_thread() -> None:
    inline, background = SnapshotRing(), SnapshotRing()
    threads: list[int] = []

    def state(step: int) -> Any:
        threads.append(threading.get_ident())
        return make_state(step)

    try:
        for step in range(4):
            inline.capture(step, make_state(step))
            background.capture_in_background(step, lambda step=step: state(step))
            background.wait_copied()
            assert background.steps() == inline.steps() == ([step - 1, step] if step else [0])
            for held in inline.steps():
                assert background.checksums(held) == inline.checksums(held)
                assert_same(background.restore(held), inline.restore(held))
        assert threading.get_ident() not in threads
    finally:
        inline.close()
        background.close()


def test_every_call_waits_for_the_capture_in_flight() -> None:
    ring = SnapshotRing()
    release = threading.Event()

    def state() -> Any:
        assert release.wait(JOIN_S)
        return make_state(1)

    try:
        ring.capture(0, make_state(0))
        ring.capture_in_background(1, state)
        seen: list[list[int]] = []
        reader = threading.Thread(target=lambda: seen.append(ring.steps()))
        reader.start()
        reader.join(0.2)
        assert reader.is_alive() and not seen  # still waiting for the helper
        release.set()
        reader.join(JOIN_S)
        assert seen == [[0, 1]]
        assert ring.num_bytes == 2 * sum(t.nbytes for t in tensors(make_state(0)))
    finally:
        release.set()
        ring.close()


def test_an_error_on_the_helper_is_raised_by_the_next_call_and_loses_nothing() -> None:
    ring = SnapshotRing()

    def broken() -> Any:
        raise RuntimeError("the state could not be built")

    try:
        ring.capture(0, make_state(0))
        ring.capture(1, make_state(1))
        ring.capture_in_background(2, broken)
        with pytest.raises(RuntimeError, match="could not be built"):
            ring.wait_copied()
        assert ring.steps() == [0, 1]  # nothing was overwritten
        assert_same(ring.restore(1), make_state(1))
        ring.capture_in_background(2, lambda: make_state(2))  # the ring goes on
        assert ring.steps() == [1, 2]
    finally:
        ring.close()


def test_the_commit_carries_the_epoch_the_capture_began_in(tmp_path: Path) -> None:
    directory = tmp_path / "w"
    ring = SnapshotRing(directory=str(directory), owner="node-0/0")
    release = threading.Event()

    def state() -> Any:
        assert release.wait(JOIN_S)
        return make_state(0)

    try:
        ring.epoch = 3
        ring.capture_in_background(0, state)
        setter = threading.Thread(target=lambda: setattr(ring, "epoch", 4))
        setter.start()
        release.set()
        setter.join(JOIN_S)
        assert not setter.is_alive() and ring.epoch == 4
        records = [slotmeta.read(str(directory), i) for i in (0, 1)]
        committed = [r for r in records if r is not None]
        assert [(r.step, r.info["epoch"]) for r in committed] == [(0, 3)]
    finally:
        release.set()
        ring.close()


@pytest.mark.parametrize("shared_norm", [False, True], ids=["plain", "shared-batchnorm"])
def test_the_session_snapshots_the_state_at_the_steps_start(shared_norm: bool) -> None:
    session = _session(shared_norm)
    helper: list[int] = []
    ring = session._snapshots
    off_thread = ring._capture_off_thread
    forward_done = threading.Event()
    optimizer_called = threading.Event()
    finished: list[bool] = []

    def spy(*args: Any) -> None:
        helper.append(threading.get_ident())
        # Held until the step's forward and backward passes are done (the overlap, made
        # certain), then given the chance to be overtaken by the optimizer step.
        assert forward_done.wait(JOIN_S)
        optimizer_called.wait(0.3)
        off_thread(*args)
        finished.append(True)

    forward_backward = session._forward_backward
    step_fn = session.optimizer.step

    def forward_then_release() -> Any:
        out = forward_backward()
        forward_done.set()
        return out

    def optimizer_step(*args: Any, **kwargs: Any) -> Any:
        optimizer_called.set()
        assert finished, "the optimizer step ran before the snapshot had read the state"
        return step_fn(*args, **kwargs)

    ring._capture_off_thread = spy  # type: ignore[method-assign]
    session._forward_backward = forward_then_release  # type: ignore[method-assign]
    session.optimizer.step = optimizer_step  # type: ignore[method-assign]
    try:
        for _ in range(3):
            forward_done.clear()
            optimizer_called.clear()
            finished.clear()
            step = session.step
            model = {k: v.clone() for k, v in session.model.state_dict().items()}
            opt = session.optimizer.state_dict()["state"]
            moments = {i: {k: v.clone() for k, v in st.items()} for i, st in opt.items()}
            rng, py_rng = torch.get_rng_state(), random.getstate()
            assert session.run_step() is not None
            snap = ring.restore(step)
            for k, v in model.items():
                assert torch.equal(snap["model"][k], v), k
            for i, st in moments.items():
                for k, v in st.items():
                    assert torch.equal(snap["optimizer"]["state"][i][k], v), (i, k)
            assert torch.equal(snap["rng"]["torch"], rng)
            assert snap["rng"]["python"].value == py_rng
            assert snap["step"] == step and snap["samples_seen"] == step * 16
            # The step changed what the snapshot kept: the buffers, the parameters.
            for name in ["1.running_mean"] + (["5.running_mean"] if shared_norm else []):
                assert not torch.equal(session.model.state_dict()[name],
                                       snap["model"][name]), name
        assert len(helper) == 3 and threading.get_ident() not in helper
    finally:
        forward_done.set()
        session.close()


def test_register_returns_once_the_first_snapshot_has_read_the_state() -> None:
    """What the caller does right after `register()` (load weights, build a scheduler)
    is not in the snapshot of step 0."""
    changed = threading.Event()
    at_register: dict[str, torch.Tensor] = {}

    def hold_the_helper(session: Any) -> None:
        ring = session._snapshots
        off_thread = ring._capture_off_thread

        def held(*args: Any) -> None:
            changed.wait(0.3)  # a register() that did not wait: the change lands first
            off_thread(*args)

        ring._capture_off_thread = held

    session = _session(before_register=hold_the_helper)
    try:
        at_register.update({k: v.clone() for k, v in session.model.state_dict().items()})
        with torch.no_grad():
            for p in session.model.parameters():
                p.add_(1.0)
        changed.set()
        snap = session._snapshots.restore(0)
        for k, v in at_register.items():
            assert torch.equal(snap["model"][k], v), k
    finally:
        changed.set()
        session.close()
