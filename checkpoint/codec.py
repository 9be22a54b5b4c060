"""A snapshot as bytes: what goes to a peer over the wire and to disk.

    blob = encode_state(tree)        # header + torch.save payload
    tree = decode_state(blob)        # verifies length and CRC-32 first

The payload is read back with `torch.load(weights_only=True)`, which rebuilds tensors,
containers and plain values but never runs code, so bytes from a peer or a file cannot
execute anything. The header carries the payload's length and CRC-32; a truncated or
flipped byte is reported as `CorruptState` before anything is unpickled. `Frozen` values
(the Python RNG state) are wrapped in a marker dict on the way out and unwrapped on the way
in.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Mapping
from typing import Any

import torch

from splice.checkpoint.snapshot import Frozen

MAGIC = b"SPLICE-STATE-1\n\0"
_HEADER = struct.Struct("<16sQI")  # magic, payload length, CRC-32 of the payload
_FROZEN = "__splice_frozen__"


class CorruptState(Exception):
    """Bytes that are not a complete, intact encoded snapshot."""


def _out(value: Any) -> Any:
    if isinstance(value, Frozen):
        return {_FROZEN: value.value}
    if isinstance(value, Mapping):
        return {k: _out(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_out(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_out(v) for v in value)
    return value


def _in(value: Any) -> Any:
    if isinstance(value, dict):
        if len(value) == 1 and _FROZEN in value:
            return Frozen(value[_FROZEN])
        return {k: _in(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_in(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_in(v) for v in value)
    return value


def encode_state(tree: Mapping[str, Any]) -> bytes:
    buf = io.BytesIO()
    buf.write(b"\0" * _HEADER.size)
    torch.save(_out(tree), buf)
    view = buf.getbuffer()
    payload = view[_HEADER.size:]
    _HEADER.pack_into(view, 0, MAGIC, len(payload), zlib.crc32(payload))
    del payload, view
    return buf.getvalue()


def checksum_of(blob: bytes | memoryview) -> int:
    """The CRC-32 an encoded snapshot declares (after checking the header is one)."""
    magic, _, crc = _header(blob)
    return crc


def _header(blob: bytes | memoryview) -> tuple[bytes, int, int]:
    if len(blob) < _HEADER.size:
        raise CorruptState(f"{len(blob)} bytes is shorter than a snapshot header")
    magic, length, crc = _HEADER.unpack_from(blob, 0)
    if magic != MAGIC:
        raise CorruptState("not an encoded splice snapshot (bad magic)")
    return magic, length, crc


def decode_state(blob: bytes | memoryview) -> dict[str, Any]:
    _, length, crc = _header(blob)
    payload = memoryview(blob)[_HEADER.size:]
    if len(payload) != length:
        raise CorruptState(f"snapshot payload is {len(payload)} bytes, its header says "
                           f"{length}: truncated or padded")
    actual = zlib.crc32(payload)
    if actual != crc:
        raise CorruptState(f"snapshot checksum mismatch: CRC-32 {actual:#010x}, header "
                           f"says {crc:#010x}")
    try:
        tree = torch.load(io.BytesIO(payload), weights_only=True, map_location="cpu")
    except Exception as e:  # intact bytes that are still not a snapshot tree
        raise CorruptState(f"snapshot payload does not load: {e}") from e
    if not isinstance(tree, dict):
        raise CorruptState(f"snapshot payload is a {type(tree).__name__}, not a dict")
    return _in(tree)  # type: ignore[no-any-return]
