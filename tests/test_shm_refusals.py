"""Shared-memory snapshot slots a new worker must never adopt: torn, damaged or forged
ones (checkpoint/shm.py). Damage and forgery rewrite the slot files, the meta with a correct
header and CRC (the module's header struct) so that the check under test is the one that
refuses it. The round trips are in test_shm.py; the helpers in shm_files.py.
"""

from __future__ import annotations

import builtins
import io
import logging
import os
import pickle
import struct
from pathlib import Path
from typing import Any

import pytest
import torch

from splice.checkpoint import shm
from splice.checkpoint.snapshot import (
    SnapshotCorrupt,
    SnapshotMissing,
    SnapshotRing,
    total_words,
)
from tests.shm_files import (
    OWNER,
    FrozenArgs,
    Meta,
    Ref,
    _TreeWriter,
    adopter,
    encode_tree,
    flip,
    plain,
    read_meta,
    rewrite,
    unusable,
    write_meta,
)

pytestmark = pytest.mark.usefixtures("shm_rngs")


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
