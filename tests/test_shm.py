"""Snapshot rings in shared-memory files (checkpoint/shm.py, `SnapshotRing(directory=...)`):
a new worker adopts what a dead one left, bit for bit, and carries on in the same files.

The writer and the adopter are two rings on the same directory (pytest's tmp_path: the
format does not need /dev/shm). A worker killed mid-capture is simulated by
`SlotFiles.begin` or by a capture that raises halfway. Torn, damaged and forged slots,
which a new worker must never adopt, are in test_shm_refusals.py; the helpers in
shm_files.py.
"""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from splice.checkpoint import shm
from splice.checkpoint.shm import SlotFiles
from splice.checkpoint.snapshot import (
    Frozen,
    SnapshotMissing,
    SnapshotRing,
)
from tests.shm_files import (
    OWNER,
    Trainer,
    adopter,
    capture_steps,
    files,
    flip,
    plain,
    read_meta,
)

pytestmark = pytest.mark.usefixtures("shm_rngs")


# ---- round trip ----------------------------------------------------------------------------

def test_a_new_ring_adopts_the_last_two_steps_bit_exactly(tmp_path: Path) -> None:
    trainer = Trainer()
    writer = SnapshotRing(directory=str(tmp_path), owner=OWNER)
    originals = capture_steps(writer, trainer, 5)
    after_step_4 = plain(trainer.model.state_dict())

    ring = SnapshotRing(directory=str(tmp_path), owner="worker-b")
    assert ring.adopted_from == ""
    assert ring.adopt() == [3, 4]
    assert ring.steps() == [3, 4]
    assert ring.adopted_from == OWNER
    assert ring.num_bytes == writer.num_bytes
    for step in (3, 4):
        ring.verify(step)
        assert ring.checksums(step) == writer.checksums(step)
        restored = ring.restore(step)
        assert plain(restored) == originals[step]
        assert restored["rng"]["python"].value == originals[step]["rng"]["python"][1]
        assert restored["optimizer"]["param_groups"] == \
            writer.restore(step)["optimizer"]["param_groups"]
    with pytest.raises(SnapshotMissing):
        ring.restore(2)

    # The restored state trains on exactly as the original did.
    resumed = Trainer(seed=99)
    resumed.load(ring.restore(4))
    torch.set_rng_state(ring.restore(4)["rng"]["torch"])
    resumed.train()
    assert plain(resumed.model.state_dict()) == after_step_4


def test_restore_from_an_adopted_ring_is_a_private_copy(written: tuple[Path, Any]) -> None:
    directory, originals = written
    ring = adopter(directory)
    restored = ring.restore(3)
    restored["model"]["0.weight"].add_(1.0)
    restored["optimizer"]["param_groups"][0]["lr"] = 5.0
    ring.verify(3)
    assert plain(ring.restore(3)) == originals[3]


def test_every_dtype_shape_and_non_tensor_value_round_trips(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(40, 30, generator=gen, dtype=torch.float64)
    state = {
        "f64_transposed": base.t(),  # not contiguous
        "f32_param": nn.Parameter(torch.randn(7, 3, generator=gen)),  # requires grad
        "bf16": torch.randn(600, generator=gen).to(torch.bfloat16),  # crosses a block
        "f16_nan": torch.tensor([float("nan"), -0.0, float("inf")], dtype=torch.float16),
        "i8": torch.arange(-5, 5, dtype=torch.int8),
        "u8": torch.arange(256, dtype=torch.uint8),
        "i64": torch.tensor([-(2 ** 63), 2 ** 63 - 1]),
        "bool": torch.tensor([True, False, True]),
        "c64": torch.randn(4, generator=gen, dtype=torch.complex64),
        "scalar": torch.tensor(2.5),
        "empty": torch.empty(0, 3),
        "nested": [(1, 2.5, "s", b"b", None, True), {3: [torch.ones(2)], (1, 2): "tuple key"}],
        "big_int": 2 ** 100,
        "frozen": Frozen((3, tuple(range(625)), None)),
    }
    writer = SnapshotRing(directory=str(tmp_path), owner=OWNER)
    writer.capture(7, state)
    ring = adopter(tmp_path)
    assert ring.steps() == [7]
    ring.verify(7)
    restored = ring.restore(7)
    assert plain(restored) == plain(state)
    assert not restored["f32_param"].requires_grad
    assert type(restored["nested"][0]) is tuple and type(restored["nested"][1]) is dict


def test_a_state_without_tensors_round_trips(tmp_path: Path) -> None:
    writer = SnapshotRing(directory=str(tmp_path), owner=OWNER)
    writer.capture(1, {"step": 1, "rng": Frozen(random.getstate())})
    writer.capture(2, {"step": 2, "rng": Frozen(random.getstate())})
    ring = adopter(tmp_path)
    assert ring.steps() == [1, 2]
    ring.verify(2)
    assert ring.restore(2)["step"] == 2
    assert ring.restore(1)["rng"].value == random.getstate()


def test_adopt_of_an_empty_or_missing_directory_holds_nothing(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert SnapshotRing(directory=str(tmp_path / "missing")).adopt() == []
    ring = SnapshotRing(directory=str(tmp_path))
    assert ring.adopt() == [] and ring.adopted_from == ""
    assert SnapshotRing().adopt() == []  # no directory: nothing to adopt
    assert not caplog.records


def test_adopt_is_a_no_op_for_a_ring_that_holds_steps(written: tuple[Path, Any]) -> None:
    directory, _ = written
    ring = SnapshotRing(directory=str(directory), owner="worker-b")
    ring.capture(10, {"w": torch.ones(3)})
    assert ring.adopt() == [10]
    assert ring.adopted_from == ""


def test_checksums_in_the_background_are_refused_for_a_ring_in_files(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="inline"):
        SnapshotRing(checksum_in_background=True, directory=str(tmp_path))
    assert not any(tmp_path.iterdir())


# ---- the adopter carries on ----------------------------------------------------------------

def test_an_adopter_captures_into_the_same_files_and_the_next_adopter_sees_it(
        written: tuple[Path, Any]) -> None:
    directory, _ = written
    before = files(directory)
    # Slot 0 took a second layout at step 2: the optimizer's state appeared at step 1.
    assert set(before) == {"slot0.meta", "slot1.meta", "slot0-2.data", "slot1-1.data"}

    second = adopter(directory, owner="worker-b")
    trainer = Trainer(seed=5)
    trainer.load(second.restore(3))
    trainer.train()  # step 3 runs
    originals = capture_steps(second, trainer, 2)  # steps 4 and 5
    assert second.steps() == [4, 5]
    assert files(directory) == before  # same names, same inodes: written in place

    third = adopter(directory, owner="worker-c")
    assert third.steps() == [4, 5]
    assert third.adopted_from == "worker-b"
    for step in (4, 5):
        third.verify(step)
        assert plain(third.restore(step)) == originals[step]


def test_rollback_after_adoption_then_new_timeline(written: tuple[Path, Any]) -> None:
    """The newcomer's flow (state_sources.py: `_load_adopted`): restore a step, forget
    the newer one, train on from there."""
    directory, originals = written
    second = adopter(directory, owner="worker-b")
    trainer = Trainer(seed=5)
    trainer.load(second.restore(2))
    second.discard_after(2)
    assert second.steps() == [2]
    assert adopter(directory, owner="worker-c").steps() == [2]

    trainer.train()  # step 2 again, on the new timeline
    new = capture_steps(second, trainer, 1)
    third = adopter(directory, owner="worker-c")
    assert third.steps() == [2, 3]
    assert plain(third.restore(2)) == originals[2]
    assert plain(third.restore(3)) == new[3]


def test_discard_after_hides_the_newer_slot_from_a_later_adopter(
        written: tuple[Path, Any]) -> None:
    directory, originals = written
    writer = SnapshotRing(directory=str(directory), owner=OWNER)
    assert writer.adopt() == [2, 3]
    writer.discard_after(2)
    assert read_meta(directory, 1).step == -1
    assert read_meta(directory, 0).step == 2
    ring = adopter(directory)
    assert ring.steps() == [2]
    assert plain(ring.restore(2)) == originals[2]


def test_discard_after_in_the_writing_ring_itself(tmp_path: Path) -> None:
    writer = SnapshotRing(directory=str(tmp_path), owner=OWNER)
    originals = capture_steps(writer, Trainer(), 3)  # slot 0: step 2, slot 1: step 1
    writer.discard_after(1)
    assert read_meta(tmp_path, 0).step == -1
    ring = adopter(tmp_path)
    assert ring.steps() == [1]
    assert plain(ring.restore(1)) == originals[1]


# ---- a worker killed mid-capture -----------------------------------------------------------

def test_a_slot_begun_but_not_committed_is_not_adopted(written: tuple[Path, Any]) -> None:
    directory, originals = written
    SlotFiles(str(directory)).begin(1)  # the worker died while copying step 4 into slot 1
    with open(directory / "slot1-1.data", "r+b") as f:
        f.write(b"\xff" * 4096)  # ... after overwriting part of it
    ring = adopter(directory)
    assert ring.steps() == [2]
    assert ring.adopted_from == OWNER
    ring.verify(2)
    assert plain(ring.restore(2)) == originals[2]


class Unclonable:
    def __deepcopy__(self, memo: Any) -> Any:
        raise RuntimeError("the worker dies here")


class CopyFails(torch.Tensor):
    """A tensor whose copy into the slot fails (as if the worker died during the copy)."""

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None
                           ) -> Any:
        if func is torch._foreach_copy_:
            raise RuntimeError("the worker dies here")
        return super().__torch_function__(func, types, args, kwargs or {})


@pytest.mark.parametrize("poison", ["walk", "copy"])
def test_a_capture_that_dies_midway_leaves_its_slot_incomplete(
        written: tuple[Path, Any], poison: str) -> None:
    directory, originals = written
    writer = SnapshotRing(directory=str(directory), owner=OWNER)
    assert writer.adopt() == [2, 3]
    state = Trainer(seed=4).state()
    if poison == "walk":
        state["extra"] = Unclonable()
    else:
        state["model"]["0.weight"] = state["model"]["0.weight"].as_subclass(CopyFails)
    with pytest.raises(RuntimeError, match="dies here"):
        writer.capture(4, state)
    assert writer.steps() == [3]
    assert read_meta(directory, 0).step == -1  # slot 0 (step 2) was being overwritten

    ring = adopter(directory)
    assert ring.steps() == [3]
    ring.verify(3)
    assert plain(ring.restore(3)) == originals[3]
    # ... and carries on past the dead slot.
    ring.capture(4, {"w": torch.ones(2)})
    assert adopter(directory, owner="worker-c").steps() == [3, 4]


# ---- layouts that change -------------------------------------------------------------------

def sized(step: int, size: int) -> dict[str, Any]:
    return {"w": torch.full((size, 700), float(step)), "m": torch.arange(size) + step,
            "step": step}


def test_a_new_shape_gets_a_new_data_file_and_the_old_one_goes(tmp_path: Path) -> None:
    writer = SnapshotRing(directory=str(tmp_path), owner=OWNER)
    writer.capture(0, sized(0, 4))
    writer.capture(1, sized(1, 4))
    assert set(files(tmp_path)) == {"slot0.meta", "slot1.meta", "slot0-1.data", "slot1-1.data"}
    writer.capture(2, sized(2, 9))  # into slot 0
    assert set(files(tmp_path)) == {"slot0.meta", "slot1.meta", "slot0-2.data", "slot1-1.data"}
    assert read_meta(tmp_path, 0).info["data"] == "slot0-2.data"

    ring = adopter(tmp_path)
    assert ring.steps() == [1, 2]
    for step, size in ((1, 4), (2, 9)):
        ring.verify(step)
        assert plain(ring.restore(step)) == plain(sized(step, size))

    writer.capture(3, sized(3, 9))  # into slot 1
    assert set(files(tmp_path)) == {"slot0.meta", "slot1.meta", "slot0-2.data", "slot1-2.data"}
    ring = adopter(tmp_path)
    assert ring.steps() == [2, 3]
    assert plain(ring.restore(3)) == plain(sized(3, 9))


def test_an_adopter_whose_state_changes_shape_takes_the_next_generation(tmp_path: Path) -> None:
    writer = SnapshotRing(directory=str(tmp_path), owner=OWNER)
    for step, size in ((0, 4), (1, 4), (2, 9), (3, 9)):
        writer.capture(step, sized(step, size))  # both slots at generation 2
    second = adopter(tmp_path, owner="worker-b")
    second.capture(4, sized(4, 9))  # same layout: in place
    assert set(files(tmp_path)) == {"slot0.meta", "slot1.meta", "slot0-2.data", "slot1-2.data"}
    second.capture(5, sized(5, 2))  # slot 1, new layout
    assert set(files(tmp_path)) == {"slot0.meta", "slot1.meta", "slot0-2.data", "slot1-3.data"}
    third = adopter(tmp_path, owner="worker-c")
    assert third.steps() == [4, 5]
    assert plain(third.restore(4)) == plain(sized(4, 9))
    assert plain(third.restore(5)) == plain(sized(5, 2))


def three_layouts(directory: Path) -> dict[int, Any]:
    """Steps 0..5 with the state's shape changing every two steps: both slots at
    generation 3 (slot0-3.data: step 4, slot1-3.data: step 5)."""
    writer = SnapshotRing(directory=str(directory), owner=OWNER)
    states = {}
    for step, size in ((0, 4), (1, 4), (2, 9), (3, 9), (4, 2), (5, 2)):
        states[step] = sized(step, size)
        writer.capture(step, states[step])
    assert set(files(directory)) == {"slot0.meta", "slot1.meta", "slot0-3.data",
                                     "slot1-3.data"}
    return states


def test_after_adopting_an_incomplete_slot_its_next_layout_takes_a_new_file(
        tmp_path: Path) -> None:
    states = three_layouts(tmp_path)
    SlotFiles(str(tmp_path)).begin(1)  # the worker died while capturing step 6
    before = files(tmp_path)
    second = adopter(tmp_path, owner="worker-b")
    assert second.steps() == [4]
    second.capture(6, sized(6, 5))  # into slot 1, a new layout
    after = files(tmp_path)
    new = set(after) - set(before)
    assert new == {"slot1-4.data"}
    assert all(after[n] == before[n] for n in set(after) & set(before))  # nothing reused
    third = adopter(tmp_path, owner="worker-c")
    assert third.steps() == [4, 6]
    third.verify(6)
    assert plain(third.restore(6)) == plain(sized(6, 5))
    assert plain(third.restore(4)) == plain(states[4])


@pytest.mark.parametrize("how", ["incomplete", "refused"])
def test_the_data_file_of_an_unadopted_slot_goes_with_its_next_layout(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, how: str) -> None:
    """Regression (shm.py, `SlotFiles.load` / `allocate`): `load` recorded a slot's data file
    (`_data[index]`) only when the slot was committed and readable, so when the adopter
    gives that slot a new layout, `allocate` has no previous file to remove:
    slot1-3.data (a whole slot of shared memory) stays in the directory for as long as
    the adopter lives. For a refused slot `load` also skips numbering the slot's next
    layout past its files ("Number the slot's next layouts past every file it has had"),
    so the next layout is slot1-1.data again."""
    three_layouts(tmp_path)
    if how == "incomplete":
        SlotFiles(str(tmp_path)).begin(1)
    else:
        flip(tmp_path / "slot1.meta", shm._HEADER.size + 40)
    caplog.set_level(logging.WARNING)
    second = adopter(tmp_path, owner="worker-b")
    assert second.steps() == [4]
    second.capture(6, sized(6, 5))  # into slot 1, a new layout
    assert set(files(tmp_path)) == {"slot0.meta", "slot1.meta", "slot0-3.data",
                                    "slot1-4.data"}


@pytest.mark.parametrize("value", [
    (3, tuple(range(625)), None),
    (3, (2 ** 32, 1, 2), 0.5),
    (3, (-1, 1, 2), None),
    (3, (), None),
    ("x", (1, 2), "y"),
    (1, 2),
], ids=["rng", "word too large", "negative word", "empty", "other tuple", "pair"])
def test_frozen_values_round_trip(tmp_path: Path, value: Any) -> None:
    writer = SnapshotRing(directory=str(tmp_path), owner=OWNER)
    writer.capture(0, {"f": Frozen(value), "t": torch.ones(2)})
    restored = adopter(tmp_path).restore(0)["f"].value
    assert restored == value and plain(restored) == plain(value)
    assert type(restored) is tuple
    if isinstance(value[1], tuple):
        assert [type(x) for x in restored[1]] == [type(x) for x in value[1]]


@pytest.mark.parametrize("value", [(0, (1, 2, 3, 4, 0.5), None), (0, (1, 2, 3, 4, "x"), None),
                                   (0, (1, 2, 3, 4, True), None)],
                         ids=["a float after four ints", "a str after four ints",
                              "a bool after four ints"])
def test_a_frozen_tuple_that_starts_with_four_ints_round_trips(
        tmp_path: Path, value: Any) -> None:
    """Regression (shm.py, `_Pickler.reducer_override`): a Frozen (x, t, y) whose t starts with
    four ints was packed as the Python RNG state, `array.array("I", t)`, checking the
    types of t's first four items only and catching only OverflowError: a float or a str
    later in t raises TypeError out of `capture` (a ring in memory takes the same value),
    and a bool later in t comes back as the int 1."""
    SnapshotRing().capture(0, {"f": Frozen(value)})  # a ring in memory takes it
    writer = SnapshotRing(directory=str(tmp_path), owner=OWNER)
    writer.capture(0, {"f": Frozen(value), "t": torch.ones(2)})
    restored = adopter(tmp_path).restore(0)["f"].value
    assert restored == value
    assert [type(x) for x in restored[1]] == [type(x) for x in value[1]]


def test_a_full_shared_memory_leaves_the_slot_private_and_unadoptable(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """A tmpfs without room would kill the worker with SIGBUS mid-copy; the pages are
    reserved up front instead, and a slot that does not fit stays in private memory."""
    import errno

    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    directory = tmp_path / "full"
    ring = SnapshotRing(directory=str(directory), owner="node-0/0")
    monkeypatch.setattr(shm.os, "posix_fallocate", full)
    caplog.set_level(logging.WARNING)
    state = {"w": torch.arange(4096, dtype=torch.float32), "step": 1}
    ring.capture(1, state)
    assert ring.steps() == [1]
    assert torch.equal(ring.restore(1)["w"], state["w"])  # the snapshot itself is fine
    assert any("stays in private memory" in r.getMessage() for r in caplog.records)
    assert not [n for n in os.listdir(directory) if n.endswith(".data")]  # nothing half-made
    assert SnapshotRing(directory=str(directory)).adopt() == []
    monkeypatch.undo()
    ring.capture(2, {"w": state["w"] + 1, "step": 2})  # the other slot: room again
    assert SnapshotRing(directory=str(directory)).adopt() == [2]
