"""Snapshot rings in shared-memory files (checkpoint/shm.py, `SnapshotRing(directory=...)`):
a new worker adopts what a dead one left, and never adopts a torn, damaged or forged slot.

The writer and the adopter are two rings on the same directory (pytest's tmp_path: the
format does not need /dev/shm). A worker killed mid-capture is simulated by
`SlotFiles.begin` or by a capture that raises halfway; damage and forgery by rewriting
the slot files, the meta with a correct header and CRC (the module's header struct) so
that the check under test is the one that refuses it.

The meta is decoded and re-encoded by the helpers below (`read_meta`, `write_meta`,
`decode_tree`, `encode_tree`): a forged meta is built from the real one, changed in one
place.
"""

from __future__ import annotations

import builtins
import io
import logging
import os
import pickle
import random
import shutil
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from splice.checkpoint import shm
from splice.checkpoint.shm import SlotFiles
from splice.checkpoint.snapshot import (
    Frozen,
    SnapshotCorrupt,
    SnapshotMissing,
    SnapshotRing,
    total_words,
)

OWNER = "worker-a"


# ---- a realistic training state ------------------------------------------------------------

class Trainer:
    """A small model and its AdamW optimizer; `state` is what the worker snapshots
    (agent/worker/session.py: `_state`)."""

    def __init__(self, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        with torch.no_grad():
            for p in self.model.parameters():
                p.copy_(torch.randn(p.shape, generator=gen))
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-2)
        self.step = 0

    def train(self) -> None:
        # The step's gradients, as the backward pass would leave them (autograd's first
        # use costs seconds; what is tested is the optimizer's state).
        gen = torch.Generator().manual_seed(1000 + self.step)
        for p in self.model.parameters():
            p.grad = torch.randn(p.shape, generator=gen)
        self.optimizer.step()
        self.step += 1
        # The job's own draws move both RNGs between snapshots.
        torch.rand(3)
        random.random()

    def state(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "python": Frozen(random.getstate())},
            "step": self.step,
            "samples_seen": self.step * 5,
        }

    def load(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = state["step"]


@pytest.fixture(autouse=True)
def _global_rngs() -> Any:
    """The trainer draws from the global RNGs: seed them, and put them back afterwards."""
    torch_state, py_state = torch.get_rng_state(), random.getstate()
    torch.manual_seed(0)
    random.seed(0)
    yield
    torch.set_rng_state(torch_state)
    random.setstate(py_state)


def plain(tree: Any) -> Any:
    """`tree` in a form `==` compares exactly: each tensor as its dtype, shape and bytes
    (bit-exact, NaN-safe), a Frozen as its value; dict, list and tuple kept apart."""
    if isinstance(tree, torch.Tensor):
        t = tree.detach().contiguous()
        return ("tensor", t.dtype, tuple(t.shape), t.reshape(-1).view(torch.uint8).numpy().tobytes())
    if isinstance(tree, Frozen):
        return ("frozen", tree.value)
    if isinstance(tree, dict):
        return {k: plain(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [plain(v) for v in tree]
    if isinstance(tree, tuple):
        return tuple(plain(v) for v in tree)
    return tree


def capture_steps(ring: SnapshotRing, trainer: Trainer, steps: int) -> dict[int, Any]:
    """Capture `steps` consecutive steps, training between them: each step's state as
    `plain` took it at capture."""
    originals = {}
    for _ in range(steps):
        state = trainer.state()
        originals[trainer.step] = plain(state)
        ring.capture(trainer.step, state)
        trainer.train()
    return originals


# ---- the files -----------------------------------------------------------------------------
# slot{i}.meta: header (step, payload length, CRC-32 of the packed step then the payload),
# then the payload: len(info) as "<I", info (a plain pickle of the slot record: data file
# name, owner, layout signature), then the slot's tree (`shm.dumps_tree`: a pickle naming
# only `shm._Tensor` (a layout index) and `shm.Frozen`).

class Ref:
    """A layout tensor as a slot's tree names it: `shm._Tensor(index)`."""

    def __init__(self, index: Any) -> None:
        self.index = index

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Ref) and type(other.index) is type(self.index) \
            and other.index == self.index

    def __repr__(self) -> str:
        return f"Ref({self.index!r})"


class FrozenArgs:
    """A `Frozen` as a slot's tree names it: `shm.Frozen(*args)`."""

    def __init__(self, *args: Any) -> None:
        self.args = args


class _TreeReader(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module == shm.__name__ and name == "_Tensor":
            return Ref
        if module == shm.__name__ and name == "Frozen":
            return FrozenArgs
        raise AssertionError(f"a tree written by a ring names {module}.{name}")


class _TreeWriter(pickle.Pickler):
    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, Ref):
            return shm._Tensor, (obj.index,)
        if isinstance(obj, FrozenArgs):
            return shm.Frozen, obj.args
        return NotImplemented


def decode_tree(raw: bytes) -> Any:
    """A slot's tree with each tensor as a `Ref` and each Frozen as a `FrozenArgs`."""
    return _TreeReader(io.BytesIO(raw)).load()


def encode_tree(tree: Any) -> bytes:
    """`tree` (as `decode_tree` gives it) as a slot's tree pickle."""
    buf = io.BytesIO()
    _TreeWriter(buf, protocol=5).dump(tree)
    return buf.getvalue()


@dataclass
class Meta:
    """A slot's meta, decoded: the step in its header, its record, its tree's bytes."""
    step: int
    info: dict[str, Any]
    tree: bytes = b""

    @property
    def skeleton(self) -> Any:
        return decode_tree(self.tree)


def read_meta(directory: Path, index: int) -> Meta:
    """Slot `index`'s meta (our own file: its record is a plain pickle), its CRC checked."""
    raw = (directory / f"slot{index}.meta").read_bytes()
    step, length, crc = shm._HEADER.unpack_from(raw)
    if step < 0:
        return Meta(step, {})
    payload = raw[shm._HEADER.size:shm._HEADER.size + length]
    assert len(payload) == length
    assert zlib.crc32(payload, zlib.crc32(struct.pack("<q", step))) == crc
    assert shm._crc(step, payload) == crc
    (info_len,) = struct.unpack_from("<I", payload)
    return Meta(step, pickle.loads(payload[4:4 + info_len]), payload[4 + info_len:])


def write_meta(directory: Path, index: int, step: int, info: Any = None, tree: Any = b"",
               *, info_bytes: bytes | None = None, payload: bytes | None = None) -> None:
    """Slot `index`'s meta as a forger would write it: a correct header and CRC. `tree`
    is bytes or a tree to `encode_tree`; `info_bytes` replaces the pickle of `info`,
    `payload` the whole payload."""
    if payload is None:
        if info_bytes is None:
            info_bytes = pickle.dumps(info, protocol=5)
        if not isinstance(tree, bytes):
            tree = encode_tree(tree)
        payload = struct.pack("<I", len(info_bytes)) + info_bytes + tree
    (directory / f"slot{index}.meta").write_bytes(
        shm._HEADER.pack(step, len(payload), shm._crc(step, payload)) + payload)


def rewrite(directory: Path, index: int, meta: Meta, **info: Any) -> None:
    """Slot `index`'s meta again with `info`'s keys changed, its tree kept."""
    write_meta(directory, index, meta.step, {**meta.info, **info}, meta.tree)


def slot_of(directory: Path, step: int) -> int:
    for index in (0, 1):
        if read_meta(directory, index).step == step:
            return index
    raise AssertionError(f"no committed slot of step {step}")


def files(directory: Path) -> dict[str, int]:
    """The directory's files by name, with their inode numbers."""
    return {p.name: p.stat().st_ino for p in sorted(directory.iterdir())}


def flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0x10]))


def adopter(directory: Path, owner: str = "worker-b") -> SnapshotRing:
    ring = SnapshotRing(directory=str(directory), owner=owner)
    ring.adopt()
    return ring


@pytest.fixture(scope="module")
def written_once(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[int, Any]]:
    directory = tmp_path_factory.mktemp("written") / "snap"
    torch_state, py_state = torch.get_rng_state(), random.getstate()
    ring = SnapshotRing(directory=str(directory), owner=OWNER)
    originals = capture_steps(ring, Trainer(), 4)
    torch.set_rng_state(torch_state)
    random.setstate(py_state)
    assert ring.steps() == [2, 3]
    assert read_meta(directory, 0).step == 2 and read_meta(directory, 1).step == 3
    return directory, originals


@pytest.fixture
def written(tmp_path: Path, written_once: tuple[Path, dict[int, Any]]
            ) -> tuple[Path, dict[int, Any]]:
    """Steps 0..3 captured by `OWNER` into tmp_path/snap (a copy of the files a ring
    wrote once for the module): slot 0 holds step 2, slot 1 step 3 (the newest, the one
    tests tamper with). The originals by step."""
    directory = tmp_path / "snap"
    shutil.copytree(written_once[0], directory)
    return directory, written_once[1]


def unusable(caplog: pytest.LogCaptureFixture, index: int) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and f"slot {index} " in r.getMessage()
            and "not usable" in r.getMessage()]


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


# ---- refusals ------------------------------------------------------------------------------
# Each tamper(d, meta) changes slot 1's files (meta: slot 1's meta as the ring wrote it).

def short_meta(d: Path, meta: Meta) -> None:
    (d / "slot1.meta").write_bytes(shm._HEADER.pack(meta.step, 0, 0)[:shm._HEADER.size - 1])


def crc_mismatch(d: Path, meta: Meta) -> None:
    flip(d / "slot1.meta", shm._HEADER.size + 40)


def step_flipped(d: Path, meta: Meta) -> None:
    flip(d / "slot1.meta", 0)  # step 3 -> 19: the CRC covers the step


def step_of_the_other_slot(d: Path, meta: Meta) -> None:
    raw = bytearray((d / "slot1.meta").read_bytes())
    _, length, crc = shm._HEADER.unpack_from(raw)
    shm._HEADER.pack_into(raw, 0, meta.step - 1, length, crc)
    (d / "slot1.meta").write_bytes(bytes(raw))


def truncated_payload(d: Path, meta: Meta) -> None:
    raw = (d / "slot1.meta").read_bytes()
    (d / "slot1.meta").write_bytes(raw[:-10])


def record_length_past_the_payload(d: Path, meta: Meta) -> None:
    info = pickle.dumps(meta.info, protocol=5)
    write_meta(d, 1, meta.step, payload=struct.pack("<I", len(info) + len(meta.tree) + 1)
               + info + meta.tree)


def payload_of_three_bytes(d: Path, meta: Meta) -> None:
    write_meta(d, 1, meta.step, payload=b"\x00\x00\x00")


def record_not_a_pickle(d: Path, meta: Meta) -> None:
    write_meta(d, 1, meta.step, tree=meta.tree, info_bytes=b"\x80\x05garbage")


def not_a_record(d: Path, meta: Meta) -> None:
    write_meta(d, 1, meta.step, [meta.info], meta.tree)


def names_a_global(d: Path, meta: Meta) -> None:
    rewrite(d, 1, meta, x=os.system)


def names_data(name: Any) -> Any:
    def tamper(d: Path, meta: Meta) -> None:
        rewrite(d, 1, meta, data=name)
    return tamper


def escapes_the_directory(d: Path, meta: Meta) -> None:
    # A well-formed data file is there: the name alone is refused.
    (d.parent / "x.data").write_bytes((d / "slot1-1.data").read_bytes())
    rewrite(d, 1, meta, data="../x.data")


def data_missing(d: Path, meta: Meta) -> None:
    (d / "slot1-1.data").unlink()


def data_short(d: Path, meta: Meta) -> None:
    os.truncate(d / "slot1-1.data", os.path.getsize(d / "slot1-1.data") // 2)


def signature_entry(entry: Any) -> Any:
    def tamper(d: Path, meta: Meta) -> None:
        signature = list(meta.info["signature"])
        signature[0] = entry
        rewrite(d, 1, meta, signature=signature)
    return tamper


def signature_is(value: Any) -> Any:
    def tamper(d: Path, meta: Meta) -> None:
        rewrite(d, 1, meta, signature=value)
    return tamper


def tree_with(**model: Any) -> Any:
    """The tree with entries of its "model" replaced (the first tensor is "0.weight")."""
    def tamper(d: Path, meta: Meta) -> None:
        tree = meta.skeleton
        assert tree["model"]["0.weight"] == Ref(0)
        tree["model"].update(model)
        write_meta(d, 1, meta.step, meta.info, tree)
    return tamper


def tree_is(raw: bytes) -> Any:
    def tamper(d: Path, meta: Meta) -> None:
        write_meta(d, 1, meta.step, meta.info, raw)
    return tamper


def tree_names_a_tensor_off_the_cpu(d: Path, meta: Meta) -> None:
    signature = list(meta.info["signature"])
    signature[0] = None
    rewrite(d, 1, meta, signature=signature)


REFUSALS = {
    "meta shorter than its header": (short_meta, "shorter than its header"),
    "payload CRC mismatch": (crc_mismatch, "CRC-32"),
    "step flipped": (step_flipped, "CRC-32"),
    "step of the other slot": (step_of_the_other_slot, "CRC-32"),
    "payload truncated": (truncated_payload, "truncated"),
    "record length past the payload": (record_length_past_the_payload,
                                       "shorter than its slot record"),
    "payload shorter than a record length": (payload_of_three_bytes,
                                             "shorter than its slot record"),
    "record not a pickle": (record_not_a_pickle, "slot record does not load"),
    "payload not a slot record": (not_a_record, "not a slot record"),
    "payload names a global": (names_a_global, "may not name"),
    "data ../x.data": (escapes_the_directory, "names data file '../x.data'"),
    "data in another slot": (names_data("slot0-1.data"), "names data file"),
    "data absolute path": (names_data("/tmp/slot1-1.data"), "names data file"),
    "data with a suffix": (names_data("slot1-1.data.bak"), "names data file"),
    "data with a trailing newline": (names_data("slot1-1.data\n"), "names data file"),
    "data not numbered": (names_data("slot1-x.data"), "names data file"),
    "data the meta itself": (names_data("slot1.meta"), "names data file"),
    "data not a string": (names_data(["slot1-1.data"]), "not a slot record"),
    "data file missing": (data_missing, "is not readable"),
    "data file shorter than its layout": (data_short, "its layout needs"),
    "unknown dtype": (signature_entry(((3, 4), "float128")), "unknown dtype 'float128'"),
    "quantized dtype": (signature_entry(((3, 4), "qint8")), "unknown dtype 'qint8'"),
    "dtype not a dtype": (signature_entry(((3, 4), "Tensor")), "unknown dtype"),
    "dtype with its prefix": (signature_entry(((3, 4), "torch.float32")), "unknown dtype"),
    "negative dimension": (signature_entry(((-3, 4), "float32")), "bad layout entry"),
    "dimension a bool": (signature_entry(((True, 4), "float32")), "bad layout entry"),
    "dimensions in a list": (signature_entry(([3, 4], "float32")), "bad layout entry"),
    "dtype not a string": (signature_entry(((3, 4), 7)), "bad layout entry"),
    "too many elements": (signature_entry(((2 ** 30, 2 ** 30), "float32")), "elements"),
    "signature not a list": (signature_is("float32"), "not a list"),
    "signature missing": (signature_is(None), "not a list"),
    "tree index past the layout": (tree_with(**{"0.weight": Ref(99)}), "names tensor 99"),
    "tree index negative": (tree_with(**{"0.weight": Ref(-1)}), "names tensor -1"),
    "tree index a string": (tree_with(**{"0.weight": Ref("0")}), "names tensor '0'"),
    "tree index a bool": (tree_with(**{"0.weight": Ref(False)}), "names tensor False"),
    "tree names a tensor off the CPU": (tree_names_a_tensor_off_the_cpu, "names tensor 0"),
    "tree frozen with two values": (tree_with(x=FrozenArgs(1, 2)), "malformed frozen"),
    "tree frozen RNG words torn": (
        tree_with(x=FrozenArgs(shm._RANDOM, 3, b"\x01\x02\x03", None)),
        "skeleton does not load"),
    "tree not a pickle": (tree_is(b"\x80\x05garbage"), "skeleton does not load"),
    "tree empty": (tree_is(b""), "skeleton does not load"),
    "tree names a global": (tree_is(b"\x80\x05cbuiltins\ngetattr\n."), "may not name"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_a_bad_slot_is_refused_with_a_warning_and_the_other_adopted(
        written: tuple[Path, Any], caplog: pytest.LogCaptureFixture, case: str) -> None:
    directory, originals = written
    tamper, reason = REFUSALS[case]
    tamper(directory, read_meta(directory, 1))
    caplog.set_level(logging.WARNING)

    ring = SnapshotRing(directory=str(directory), owner="worker-b")
    assert ring.adopt() == [2]
    assert ring.adopted_from == OWNER
    warnings = unusable(caplog, 1)
    assert len(warnings) == 1 and reason in warnings[0], caplog.text
    ring.verify(2)
    assert plain(ring.restore(2)) == originals[2]
    with pytest.raises(SnapshotMissing):
        ring.restore(3)


def test_the_tampering_helpers_write_what_a_ring_accepts(written: tuple[Path, Any]) -> None:
    """Decoding a meta and writing it back unchanged keeps it adoptable: a case above is
    refused for its change, not for how the helpers write."""
    directory, originals = written
    meta = read_meta(directory, 1)
    before = (directory / "slot1.meta").read_bytes()
    assert encode_tree(meta.skeleton) == meta.tree
    rewrite(directory, 1, meta)
    assert (directory / "slot1.meta").read_bytes() == before
    write_meta(directory, 1, meta.step, meta.info, meta.skeleton)
    ring = adopter(directory)
    assert ring.steps() == [2, 3]
    ring.verify(3)
    assert plain(ring.restore(3)) == originals[3]


CALLS: list[str] = []


def record_call(what: str) -> str:
    CALLS.append(what)
    return what


class Forged:
    """Unpickles to a call of `record_call`: what a forger would make run `os.system`."""

    def __reduce__(self) -> Any:
        return record_call, ("forged payload ran",)


def test_a_forged_payload_cannot_run_code(written: tuple[Path, Any],
                                          caplog: pytest.LogCaptureFixture) -> None:
    directory, _ = written
    meta = read_meta(directory, 1)
    tree = meta.skeleton
    tree["step"] = Forged()
    raw = encode_tree(tree)
    CALLS.clear()
    pickle.loads(encode_tree({"step": Forged()}))
    assert CALLS == ["forged payload ran"]  # an ordinary unpickler would run it
    CALLS.clear()
    write_meta(directory, 1, meta.step, meta.info, raw)

    caplog.set_level(logging.WARNING)
    ring = adopter(directory)
    assert ring.steps() == [2]
    assert CALLS == []
    assert "may not name" in unusable(caplog, 1)[0]
    assert "record_call" in unusable(caplog, 1)[0]


def test_a_forged_record_cannot_run_code(written: tuple[Path, Any],
                                         caplog: pytest.LogCaptureFixture) -> None:
    directory, _ = written
    meta = read_meta(directory, 1)
    CALLS.clear()
    rewrite(directory, 1, meta, owner=Forged())
    caplog.set_level(logging.WARNING)
    ring = adopter(directory)
    assert ring.steps() == [2]
    assert CALLS == []
    assert "record_call" in unusable(caplog, 1)[0]


def calls_global(module: str, name: str, arg: str) -> bytes:
    """A tree pickle that calls `module.name(arg)` by the name, as a forger writes it."""
    text = arg.encode()
    assert len(text) < 256
    # PROTO 5, GLOBAL module name, SHORT_BINUNICODE arg, TUPLE1, REDUCE, STOP
    return (b"\x80\x05c" + module.encode() + b"\n" + name.encode() + b"\n"
            + b"\x8c" + bytes([len(text)]) + text + b"\x85R.")


@pytest.mark.parametrize("module,name", [("os", "system"), ("builtins", "eval")])
def test_a_tree_that_names_a_dangerous_global_is_refused_and_nothing_is_called(
        written: tuple[Path, Any], caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch, module: str, name: str) -> None:
    directory, originals = written
    meta = read_meta(directory, 1)
    raw = calls_global(module, name, "touch pwned")
    monkeypatch.setattr({"os": os, "builtins": builtins}[module], name, record_call)
    CALLS.clear()
    assert pickle.loads(raw) == "touch pwned"  # an ordinary unpickler would call it
    assert CALLS == ["touch pwned"]
    CALLS.clear()
    write_meta(directory, 1, meta.step, meta.info, raw)

    caplog.set_level(logging.WARNING)
    ring = adopter(directory)
    assert ring.steps() == [2]
    assert CALLS == []
    warnings = unusable(caplog, 1)
    assert len(warnings) == 1 and f"may not name {module}.{name}" in warnings[0]
    assert plain(ring.restore(2)) == originals[2]


def test_both_slots_refused_leaves_nothing_adopted(written: tuple[Path, Any],
                                                   caplog: pytest.LogCaptureFixture) -> None:
    directory, _ = written
    caplog.set_level(logging.WARNING)
    flip(directory / "slot0.meta", shm._HEADER.size + 40)
    flip(directory / "slot1.meta", shm._HEADER.size + 40)
    ring = adopter(directory)
    assert ring.steps() == [] and ring.adopted_from == ""
    assert unusable(caplog, 0) and unusable(caplog, 1)


# ---- damage to the tensors' bytes ----------------------------------------------------------

@pytest.mark.parametrize("where", ["first tensor", "checksum record"])
@pytest.mark.parametrize("check", ["verify", "restore"])
def test_bytes_flipped_after_commit_are_caught_and_the_slot_forgotten_on_disk(
        written: tuple[Path, Any], where: str, check: str) -> None:
    directory, originals = written
    meta = read_meta(directory, 1)
    data = directory / "slot1-1.data"
    signature = [(torch.Size(shape), getattr(torch, dtype))
                 for shape, dtype in meta.info["signature"]]
    assert os.path.getsize(data) == total_words(signature) * 8
    flip(data, 5 if where == "first tensor" else os.path.getsize(data) - 3)

    ring = adopter(directory)
    assert ring.steps() == [2, 3]  # adopted unverified
    with pytest.raises(SnapshotCorrupt, match="step 3 is corrupt"):
        getattr(ring, check)(3)
    assert ring.steps() == [2]
    assert read_meta(directory, 1).step == -1
    third = adopter(directory, owner="worker-c")
    assert third.steps() == [2]
    third.verify(2)
    assert plain(third.restore(2)) == originals[2]


def test_a_flip_is_named_by_its_tensor(written: tuple[Path, Any]) -> None:
    directory, _ = written
    flip(directory / "slot1-1.data", 5)  # the walk's first tensor starts the buffer
    with pytest.raises(SnapshotCorrupt, match=r"model\.0\.weight"):
        adopter(directory).verify(3)


# ---- forged metas that once made adopt() or verify() raise ---------------------------------
# A meta that passes its CRC but was not written by a ring (only a forger can write one)
# is refused like the others above: logged and skipped, never raised out of adopt(), and
# never adopted if its tree and layout disagree.

def test_a_data_name_too_long_for_the_file_system_is_refused(
        written: tuple[Path, Any], caplog: pytest.LogCaptureFixture) -> None:
    """Once the name passed `_DATA_NAME` and `os.path.getsize` raised ENAMETOOLONG out of
    `adopt`."""
    directory, _ = written
    rewrite(directory, 1, read_meta(directory, 1), data="slot1-" + "1" * 300 + ".data")
    caplog.set_level(logging.WARNING)
    ring = SnapshotRing(directory=str(directory))
    assert ring.adopt() == [2]
    assert unusable(caplog, 1)


@pytest.mark.parametrize("dims", [(0, 2 ** 70), (0, 2 ** 63), (2 ** 62, 0, 2 ** 62),
                                  (0,) * 65])
def test_a_dimension_too_large_for_torch_is_refused(
        written: tuple[Path, Any], caplog: pytest.LogCaptureFixture,
        dims: tuple[int, ...]) -> None:
    """Once ((0, 2**70), "float32") passed the checks (0 elements: no words needed), and
    torch's refusal of the dimension escaped `adopt`."""
    directory, _ = written
    meta = read_meta(directory, 1)
    signature = [(dims, "float32")] + list(meta.info["signature"][1:])
    rewrite(directory, 1, meta, signature=signature)
    caplog.set_level(logging.WARNING)
    ring = SnapshotRing(directory=str(directory))
    assert ring.adopt() == [2]
    assert unusable(caplog, 1)


def _drop_first(model: dict[str, Any]) -> None:
    del model["0.weight"]


def _name_first_twice(model: dict[str, Any]) -> None:
    model["again"] = Ref(0)


def _first_in_place_of_second(model: dict[str, Any]) -> None:
    assert model["0.bias"] == Ref(1)
    model["0.bias"] = Ref(0)


def _swap_first_two(model: dict[str, Any]) -> None:
    model["0.weight"], model["0.bias"] = model["0.bias"], model["0.weight"]


def _wrap_first_in_a_tensor_free_value(model: dict[str, Any]) -> None:
    model["0.weight"] = FrozenArgs(model["0.weight"])


@pytest.mark.parametrize("change", [_drop_first, _name_first_twice, _first_in_place_of_second,
                                    _swap_first_two, _wrap_first_in_a_tensor_free_value],
                         ids=["one tensor fewer", "one tensor more", "one named twice",
                              "two swapped", "one inside a Frozen"])
def test_a_tree_that_does_not_name_each_layout_tensor_once_is_refused(
        written: tuple[Path, Any], caplog: pytest.LogCaptureFixture, change: Any) -> None:
    """Once such a tree was adopted, and `verify`/`restore` then raised ValueError from
    `zip(..., strict=True)` in `_check`, not SnapshotCorrupt."""
    directory, originals = written
    meta = read_meta(directory, 1)
    tree = meta.skeleton
    change(tree["model"])
    write_meta(directory, 1, meta.step, meta.info, tree)
    caplog.set_level(logging.WARNING)
    ring = SnapshotRing(directory=str(directory))
    assert ring.adopt() == [2]
    warnings = unusable(caplog, 1)
    assert len(warnings) == 1 and ("does not name each tensor of its layout" in warnings[0]
                                   or "a tensor inside a frozen value" in warnings[0])
    ring.verify(2)
    assert plain(ring.restore(2)) == originals[2]


class Built:
    """A layout tensor named with a state for pickle's BUILD to apply to it (what a
    forger can add to a tree without naming any other global)."""

    def __init__(self, index: int, state: Any) -> None:
        self.index, self.state = index, state


class _BuildingWriter(_TreeWriter):
    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, Built):
            return shm._Tensor, (obj.index,), obj.state
        return super().reducer_override(obj)


def test_a_tree_cannot_repoint_a_layout_tensor(tmp_path: Path) -> None:
    """Regression (shm.py, `_Unpickler`): the tree's BUILD opcode, which names no global, called
    `Tensor.__setstate__` on the live layout view that `_view` returned; a 4-tuple state
    runs `view.set_(source, offset, size, stride)`. A forged tree that sets tensor "a"'s
    view onto tensor "b"'s memory still names each view once (same objects), so `adopt`
    takes it; `verify` passes (it sums the flat buffer, not the views) while `buffers`
    hands back b's values as "a". The view stays re-pointed in `layout.flat_views`, so
    the ring's later captures into that slot write "a" over "b" and leave a's bytes stale:
    the next adopter verifies and restores a snapshot whose "a" is old, with no error."""
    a, b = torch.arange(4.0), torch.arange(4.0) + 10
    writer = SnapshotRing(directory=str(tmp_path), owner=OWNER)
    writer.capture(0, {"a": a, "b": b})
    meta = read_meta(tmp_path, 0)
    assert meta.skeleton == {"a": Ref(0), "b": Ref(1)}
    buf = io.BytesIO()
    _BuildingWriter(buf, protocol=5).dump({"a": Built(0, (Ref(1), 0, (4,), (1,))),
                                           "b": Ref(1)})
    write_meta(tmp_path, 0, 0, meta.info, buf.getvalue())

    ring = SnapshotRing(directory=str(tmp_path), owner="worker-b")
    if ring.adopt():  # refusing the slot is the other correct outcome
        ring.verify(0)
        assert plain(ring.buffers(0)) == plain({"a": a, "b": b}), "a's view re-pointed"
    states = {s: {"a": a + 100 * s, "b": b + 100 * s} for s in (1, 2)}
    for s, state in states.items():
        ring.capture(s, state)
    third = adopter(tmp_path, owner="worker-c")
    assert third.steps() == [1, 2]
    third.verify(2)
    assert plain(third.restore(2)) == plain(states[2]), "step 2 restored with a stale 'a'"


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
