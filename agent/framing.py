"""Length-prefixed protobuf frames for the agent <-> worker Unix socket.

A frame is a 4-byte big-endian length followed by that many bytes of one serialized
message. Oversized or truncated frames and undecodable payloads raise FrameError; the
receiver closes the connection and nothing it decoded so far is applied.
"""

from __future__ import annotations

import socket
import struct
from typing import TypeVar

from google.protobuf.message import DecodeError, Message

MAX_FRAME_BYTES = 1 << 20
_HEADER = struct.Struct(">I")

M = TypeVar("M", bound=Message)


class FrameError(Exception):
    """The peer sent something that is not a valid frame; close the connection."""


def encode(message: Message) -> bytes:
    payload = message.SerializeToString()
    if len(payload) > MAX_FRAME_BYTES:
        raise ValueError(f"message of {len(payload)} bytes exceeds {MAX_FRAME_BYTES}")
    return _HEADER.pack(len(payload)) + payload


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    """Exactly `n` bytes; None if the stream ended before the first byte."""
    chunks = []
    want = n
    while want:
        chunk = sock.recv(want)
        if not chunk:
            if want == n:
                return None
            raise FrameError(f"stream ended inside a frame: {n - want} of {n} bytes read")
        chunks.append(chunk)
        want -= len(chunk)
    return b"".join(chunks)


def read_frame(sock: socket.socket, into: type[M]) -> M | None:
    """The next message, or None on a clean end of stream. Raises FrameError on garbage."""
    header = _recv_exact(sock, _HEADER.size)
    if header is None:
        return None
    (size,) = _HEADER.unpack(header)
    if size > MAX_FRAME_BYTES:
        raise FrameError(f"frame of {size} bytes exceeds the {MAX_FRAME_BYTES}-byte limit")
    payload = _recv_exact(sock, size) if size else b""
    if payload is None:
        raise FrameError(f"stream ended inside a {size}-byte frame")
    message = into()
    try:
        message.ParseFromString(payload)
    except DecodeError as e:
        raise FrameError(f"undecodable {into.__name__} frame: {e}") from e
    if message.WhichOneof("kind") is None:  # type: ignore[arg-type]
        raise FrameError(f"{into.__name__} frame carries no known message kind")
    return message
