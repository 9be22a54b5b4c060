"""Helpers for the shared-memory snapshot tests (test_shm.py, test_shm_refusals.py): a
realistic training state, and the slot files decoded and re-encoded (`read_meta`,
`write_meta`, `decode_tree`, `encode_tree`): a forged meta is built from the real one,
changed in one place. Their fixtures (`shm_rngs`, `written`) are in conftest.py."""

from __future__ import annotations

import io
import logging
import pickle
import random
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from splice.checkpoint import shm
from splice.checkpoint.snapshot import (
    Frozen,
    SnapshotRing,
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


def unusable(caplog: pytest.LogCaptureFixture, index: int) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and f"slot {index} " in r.getMessage()
            and "not usable" in r.getMessage()]
