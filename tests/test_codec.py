"""The snapshot codec: a state tree to bytes (disk) or to a skeleton plus a flat buffer (a
peer), and back, bit for bit; anything damaged is refused before it is used."""

from __future__ import annotations

import random
import zlib

import pytest
import torch

from splice.checkpoint.codec import (
    _HEADER,
    CorruptState,
    decode_state,
    encode_state,
    pack_state,
    unpack_state,
)
from splice.checkpoint.snapshot import Frozen

ZEROS_CRC = zlib.crc32(bytes(128))


def tree() -> dict:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Linear(7, 1))
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(3, 5)).sum().backward()
    opt.step()
    return {
        "model": model.state_dict(), "optimizer": opt.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "python": Frozen(random.getstate())},
        "step": 7, "samples_seen": 448,
        "odd": [torch.tensor([True, False]), torch.empty(0), torch.tensor(2.5, dtype=torch.bfloat16),
                torch.arange(12, dtype=torch.int16).reshape(3, 4).t()],  # not contiguous
    }


def same(a: object, b: object) -> bool:
    if isinstance(a, torch.Tensor):
        return (isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
                and torch.equal(a.contiguous().view(-1).view(torch.uint8) if a.numel() else a,
                                b.contiguous().view(-1).view(torch.uint8) if b.numel() else b))
    if isinstance(a, Frozen):
        return isinstance(b, Frozen) and a.value == b.value
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(same, a, b))
    return a == b


def test_encode_round_trip_is_exact() -> None:
    t = tree()
    assert same(decode_state(encode_state(t)), t)


def test_pack_round_trip_is_exact_and_views_the_buffer() -> None:
    t = tree()
    head, flat = pack_state(t)
    received = flat.clone()
    out = unpack_state(head, received)
    assert same(out, t)
    w = out["model"]["0.weight"]
    assert w.untyped_storage().data_ptr() == received.untyped_storage().data_ptr()


@pytest.mark.parametrize("where", [0, 100, -1])
def test_a_flipped_payload_byte_is_refused(where: int) -> None:
    head, flat = pack_state(tree())
    flat[where] ^= 0x10
    with pytest.raises(CorruptState, match="checksum mismatch"):
        unpack_state(head, flat)


def test_a_flipped_skeleton_byte_is_refused() -> None:
    head, flat = pack_state(tree())
    bad = bytearray(head)
    bad[_HEADER.size + 40] ^= 1
    with pytest.raises(CorruptState, match="checksum mismatch"):
        unpack_state(bytes(bad), flat)


def test_a_truncated_payload_is_refused() -> None:
    head, flat = pack_state(tree())
    with pytest.raises(CorruptState, match="header says"):
        unpack_state(head, flat[:-1].clone())
    with pytest.raises(CorruptState):
        decode_state(encode_state(tree())[:-3])


def test_garbage_is_refused_not_unpickled() -> None:
    with pytest.raises(CorruptState, match="magic"):
        decode_state(b"\x80\x04" + b"x" * 100)
    with pytest.raises(CorruptState, match="shorter"):
        decode_state(b"abc")


def test_a_skeleton_pointing_outside_the_payload_is_refused() -> None:
    # Intact checksums, but the skeleton claims bytes the payload does not have.
    head = encode_state({"skeleton": {"w": {"__splice_tensor__": [64, 4096, "float32", [1024]]}},
                         "payload_bytes": 128, "payload_crc32": ZEROS_CRC})
    with pytest.raises(CorruptState, match="outside"):
        unpack_state(head, torch.zeros(128, dtype=torch.uint8))
    head = encode_state({"skeleton": {"w": {"__splice_tensor__": [0, 8, "float32", [3]]}},
                         "payload_bytes": 128, "payload_crc32": ZEROS_CRC})
    with pytest.raises(CorruptState, match="cannot be 8 bytes"):
        unpack_state(head, torch.zeros(128, dtype=torch.uint8))
    head = encode_state({"skeleton": {"w": {"__splice_tensor__": [0, 8, "not_a_dtype", [2]]}},
                         "payload_bytes": 128, "payload_crc32": ZEROS_CRC})
    with pytest.raises(CorruptState, match="unknown tensor dtype"):
        unpack_state(head, torch.zeros(128, dtype=torch.uint8))
