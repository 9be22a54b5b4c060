"""A snapshot as bytes: what goes to a peer over the wire and to disk.

    blob = encode_state(tree)        # header + torch.save payload
    tree = decode_state(blob)        # verifies length and CRC-32 first

    head, flat = pack_state(tree)    # for a peer: a small encoded skeleton + one flat
    tree = unpack_state(head, flat)  # uint8 tensor holding every tensor's bytes

`pack_state` avoids pickling the tensors: they are copied once into one flat buffer (sent
as is) and come back as views of the received buffer, so a 100 MB snapshot costs two
memcpy-speed passes and two CRC passes instead of a pickle round trip.

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


_TENSOR = "__splice_tensor__"
_ALIGN = 64  # every tensor starts on a 64-byte boundary of the flat buffer


def _skeleton(value: Any, tensors: list[torch.Tensor], offset: list[int]) -> Any:
    if isinstance(value, torch.Tensor):
        t = value.detach()
        nbytes = t.numel() * t.element_size()
        start = offset[0]
        offset[0] = start + (nbytes + _ALIGN - 1) // _ALIGN * _ALIGN
        tensors.append(t)
        return {_TENSOR: [start, nbytes, str(t.dtype).removeprefix("torch."), list(t.shape)]}
    if isinstance(value, Frozen):
        return {_FROZEN: value.value}
    if isinstance(value, Mapping):
        return {k: _skeleton(v, tensors, offset) for k, v in value.items()}
    if isinstance(value, list):
        return [_skeleton(v, tensors, offset) for v in value]
    if isinstance(value, tuple):
        return tuple(_skeleton(v, tensors, offset) for v in value)
    return value


def pack_state(tree: Mapping[str, Any]) -> tuple[bytes, torch.Tensor]:
    """(encoded skeleton with the payload's size and CRC-32, flat uint8 payload)."""
    tensors: list[torch.Tensor] = []
    offset = [0]
    skeleton = _skeleton(tree, tensors, offset)
    flat = torch.empty(offset[0], dtype=torch.uint8)
    pos = 0
    for t in tensors:
        n = t.numel() * t.element_size()
        if n:
            flat[pos:pos + n].copy_(t.contiguous().reshape(-1).view(torch.uint8))
        pos += (n + _ALIGN - 1) // _ALIGN * _ALIGN
    crc = zlib.crc32(flat.numpy()) if flat.numel() else 0
    head = encode_state({"skeleton": skeleton, "payload_bytes": flat.numel(),
                         "payload_crc32": crc})
    return head, flat


def _rebuild(value: Any, flat: torch.Tensor) -> Any:
    if isinstance(value, dict):
        if len(value) == 1 and _TENSOR in value:
            start, nbytes, dtype_name, shape = value[_TENSOR]
            dtype = getattr(torch, str(dtype_name), None)
            if not isinstance(dtype, torch.dtype):
                raise CorruptState(f"unknown tensor dtype {dtype_name!r} in a snapshot")
            if not (0 <= start and start + nbytes <= flat.numel()):
                raise CorruptState(f"tensor bytes [{start}, {start + nbytes}) lie outside "
                                   f"the {flat.numel()}-byte payload")
            count = 1
            for d in shape:
                count *= int(d)
            if count * torch.empty((), dtype=dtype).element_size() != nbytes:
                raise CorruptState(f"tensor of shape {shape} and dtype {dtype_name} cannot "
                                   f"be {nbytes} bytes")
            return flat[start:start + nbytes].view(dtype).view(shape)
        if len(value) == 1 and _FROZEN in value:
            return Frozen(value[_FROZEN])
        return {k: _rebuild(v, flat) for k, v in value.items()}
    if isinstance(value, list):
        return [_rebuild(v, flat) for v in value]
    if isinstance(value, tuple):
        return tuple(_rebuild(v, flat) for v in value)
    return value


def unpack_state(head: bytes | memoryview, flat: torch.Tensor) -> dict[str, Any]:
    """The tree `pack_state` packed; its tensors are views of `flat` (verified first)."""
    meta = decode_state(head)
    size, crc = meta.get("payload_bytes"), meta.get("payload_crc32")
    if flat.dtype != torch.uint8 or flat.dim() != 1 or flat.numel() != size:
        raise CorruptState(f"snapshot payload is {flat.numel()} bytes, its header says {size}")
    actual = zlib.crc32(flat.numpy()) if flat.numel() else 0
    if actual != crc:
        raise CorruptState(f"snapshot payload checksum mismatch: CRC-32 {actual:#010x}, "
                           f"header says {crc:#010x}")
    tree = _rebuild(meta.get("skeleton"), flat)
    if not isinstance(tree, dict):
        raise CorruptState("snapshot skeleton is not a dict")
    return tree
