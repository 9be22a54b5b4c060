"""Length-prefixed protobuf frames (agent/framing.py) over a real socketpair.

Anything that is not a valid frame must raise FrameError (never another exception, never a
silently wrong message); a clean end of stream between frames is None.
"""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from splice.agent.framing import MAX_FRAME_BYTES, FrameError, encode, read_frame
from splice.proto import controller_pb2 as pb
from splice.proto import local_pb2 as lpb


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    a.settimeout(10)  # a failing test must not hang the suite; nothing here waits on time
    b.settimeout(10)
    yield a, b
    a.close()
    b.close()


def header(size: int) -> bytes:
    return struct.pack(">I", size)


def send_in_thread(sock: socket.socket, data: bytes, close: bool = False) -> threading.Thread:
    """Frames larger than the socket buffer need a concurrent writer."""
    def write() -> None:
        sock.sendall(data)
        if close:
            sock.shutdown(socket.SHUT_WR)
    t = threading.Thread(target=write)
    t.start()
    return t


def hello(worker_id: str = "a/0", pid: int = 42) -> lpb.WorkerToAgent:
    return lpb.WorkerToAgent(hello=lpb.WorkerHello(worker_id=worker_id, pid=pid))


# ---- round trips --------------------------------------------------------------------------

def test_frames_back_to_back_then_clean_end(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    msgs = [
        hello(),
        lpb.WorkerToAgent(recovery_ready=pb.RecoveryReady(worker_id="a/0", epoch=3,
                                                          snapshot_steps=[40, 41])),
        lpb.WorkerToAgent(step_report=pb.StepReport(worker_id="a/0", epoch=3, step=41,
                                                    loss=0.25)),
        lpb.WorkerToAgent(finished=lpb.WorkerFinished(worker_id="a/0", step=100)),
    ]
    a.sendall(b"".join(encode(m) for m in msgs))
    a.shutdown(socket.SHUT_WR)
    for m in msgs:
        assert read_frame(b, lpb.WorkerToAgent) == m
    assert read_frame(b, lpb.WorkerToAgent) is None


def test_agent_to_worker_round_trip(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    msg = lpb.AgentToWorker(membership=pb.Membership(
        epoch=2, members=["a/0", "a/1"], shares=[1.0, 0.5], reason="lost b/0", initial=False))
    a.sendall(encode(msg))
    got = read_frame(b, lpb.AgentToWorker)
    assert got == msg and got.WhichOneof("kind") == "membership"


@settings(max_examples=50)
@given(worker_id=st.text(max_size=200), pid=st.integers(-(2**31), 2**31 - 1),
       steps=st.lists(st.integers(0, 2**64 - 1), max_size=20))
def test_round_trip_property(worker_id: str, pid: int, steps: list[int]) -> None:
    a, b = socket.socketpair()
    with a, b:
        msgs = [hello(worker_id, pid), lpb.WorkerToAgent(recovery_ready=pb.RecoveryReady(
            worker_id=worker_id, epoch=1, snapshot_steps=steps))]
        a.sendall(b"".join(encode(m) for m in msgs))
        for m in msgs:
            assert read_frame(b, lpb.WorkerToAgent) == m


class ChunkedSocket:
    """A fake socket that hands out at most `chunk` bytes per recv, as a real one may."""

    def __init__(self, data: bytes, chunk: int) -> None:
        self._data = data
        self._chunk = chunk

    def recv(self, n: int) -> bytes:
        out, self._data = self._data[:min(n, self._chunk)], self._data[min(n, self._chunk):]
        return out


@given(chunk=st.integers(1, 7), worker_ids=st.lists(st.text(max_size=30), min_size=1,
                                                    max_size=5))
def test_partial_reads_are_reassembled(chunk: int, worker_ids: list[str]) -> None:
    msgs = [hello(w, i) for i, w in enumerate(worker_ids)]
    sock = ChunkedSocket(b"".join(encode(m) for m in msgs), chunk)
    for m in msgs:
        assert read_frame(sock, lpb.WorkerToAgent) == m  # type: ignore[arg-type]
    assert read_frame(sock, lpb.WorkerToAgent) is None  # type: ignore[arg-type]


def test_largest_allowed_frame_round_trips(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    msg = hello("x" * MAX_FRAME_BYTES)
    while (excess := len(msg.SerializeToString()) - MAX_FRAME_BYTES) > 0:
        msg.hello.worker_id = msg.hello.worker_id[:-excess]  # length varints may shrink
    assert len(msg.SerializeToString()) == MAX_FRAME_BYTES
    writer = send_in_thread(a, encode(msg))
    assert read_frame(b, lpb.WorkerToAgent) == msg
    writer.join()


# ---- bad input ----------------------------------------------------------------------------

def test_encoding_an_oversized_message_is_refused() -> None:
    with pytest.raises(ValueError, match="exceeds"):
        encode(hello("x" * MAX_FRAME_BYTES))


@pytest.mark.parametrize("size", [MAX_FRAME_BYTES + 1, 0xFFFFFFFF])
def test_oversized_frame_header_is_a_frame_error(pair: tuple[socket.socket, socket.socket],
                                                  size: int) -> None:
    a, b = pair
    a.sendall(header(size) + b"\x0a\x00")  # the payload is never read
    with pytest.raises(FrameError, match="exceeds"):
        read_frame(b, lpb.WorkerToAgent)


def test_truncated_payload_is_a_frame_error(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    whole = encode(hello())
    a.sendall(whole[:-3])
    a.shutdown(socket.SHUT_WR)
    with pytest.raises(FrameError, match="ended inside"):
        read_frame(b, lpb.WorkerToAgent)


@pytest.mark.parametrize("cut", [1, 2, 3])
def test_truncated_header_is_a_frame_error(pair: tuple[socket.socket, socket.socket],
                                           cut: int) -> None:
    a, b = pair
    a.sendall(encode(hello())[:cut])
    a.shutdown(socket.SHUT_WR)
    with pytest.raises(FrameError):
        read_frame(b, lpb.WorkerToAgent)


@pytest.mark.parametrize("payload", [
    b"\xff\xff\xff\xff\xff",          # a field tag that is not a valid varint
    b"\x0a\x10\x0a\x02",              # a sub-message longer than the frame
    b"\x0a\x04\x0a\x02\xff\xfe",      # worker_id that is not UTF-8
], ids=["bad-varint", "overlong-field", "bad-utf8"])
def test_garbage_payload_is_a_frame_error(pair: tuple[socket.socket, socket.socket],
                                          payload: bytes) -> None:
    a, b = pair
    a.sendall(header(len(payload)) + payload)
    with pytest.raises(FrameError, match="undecodable"):
        read_frame(b, lpb.WorkerToAgent)


@pytest.mark.parametrize("payload", [b"", b"\x78\x05"], ids=["empty", "unknown-field-only"])
def test_frame_without_a_message_kind_is_a_frame_error(
        pair: tuple[socket.socket, socket.socket], payload: bytes) -> None:
    a, b = pair
    a.sendall(header(len(payload)) + payload)
    with pytest.raises(FrameError, match="no known message kind"):
        read_frame(b, lpb.WorkerToAgent)


@settings(max_examples=200)
@given(payload=st.binary(max_size=64))
def test_any_payload_is_a_message_with_a_kind_or_a_frame_error(payload: bytes) -> None:
    sock = ChunkedSocket(header(len(payload)) + payload, chunk=1 << 16)
    try:
        msg = read_frame(sock, lpb.WorkerToAgent)  # type: ignore[arg-type]
    except FrameError as e:
        assert str(e).strip()
    else:
        assert msg is not None and msg.WhichOneof("kind") is not None
