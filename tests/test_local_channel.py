"""The agent <-> worker channel over a real Unix socket: the agent's LocalServer and the
worker's AgentLink.

A connection that sends garbage, skips the hello or speaks for a worker it is not gets
closed and delivers nothing; the server keeps serving valid workers. Every wait is on a
real event (a delivered message, a closed socket) with a bounded timeout.
"""

from __future__ import annotations

import os
import platform
import queue
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from splice.agent.framing import MAX_FRAME_BYTES, encode, read_frame
from splice.agent.local_server import LocalServer
from splice.agent.worker.channel import AgentLink, AgentLost
from splice.proto import controller_pb2 as pb
from splice.proto import local_pb2 as lpb

TIMEOUT_S = 10.0
EXPECTED = {"a/0", "a/1"}


class Recorder:
    """LocalServer callbacks: every delivered message and disconnect, in order."""

    def __init__(self) -> None:
        self.events: queue.Queue[tuple[str, str, lpb.WorkerToAgent | None]] = queue.Queue()

    def on_message(self, wid: str, msg: lpb.WorkerToAgent) -> None:
        self.events.put(("message", wid, msg))

    def on_disconnect(self, wid: str) -> None:
        self.events.put(("disconnect", wid, None))

    def next(self) -> tuple[str, str, lpb.WorkerToAgent | None]:
        try:
            return self.events.get(timeout=TIMEOUT_S)
        except queue.Empty:
            raise AssertionError(f"nothing delivered in {TIMEOUT_S} s") from None

    def expect_hello(self, wid: str) -> None:
        what, got, msg = self.next()
        assert (what, got) == ("message", wid)
        assert msg is not None and msg.WhichOneof("kind") == "hello"
        assert msg.hello.worker_id == wid

    def assert_nothing(self) -> None:
        assert self.events.empty(), f"unexpected delivery: {self.events.get_nowait()}"


@pytest.fixture
def rec() -> Recorder:
    return Recorder()


@pytest.fixture
def server(tmp_path: Path, rec: Recorder) -> Iterator[LocalServer]:
    s = LocalServer(str(tmp_path / "agent.sock"), set(EXPECTED), rec.on_message,
                    rec.on_disconnect)
    yield s
    s.close()


@pytest.fixture
def connect(server: LocalServer) -> Iterator:
    socks: list[socket.socket] = []

    def make() -> socket.socket:
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.settimeout(TIMEOUT_S)  # a failing test must not hang; nothing waits on time
        c.connect(server.path)
        socks.append(c)
        return c

    yield make
    for c in socks:
        c.close()


def hello(wid: str, pid: int = 4242) -> lpb.WorkerToAgent:
    return lpb.WorkerToAgent(hello=lpb.WorkerHello(worker_id=wid, pid=pid))


def membership(epoch: int, members: tuple[str, ...] = ("a/0", "a/1")) -> lpb.AgentToWorker:
    return lpb.AgentToWorker(membership=pb.Membership(
        epoch=epoch, members=list(members), shares=[1.0] * len(members),
        store_host="127.0.0.1", store_port=1234, store_prefix=f"j/epoch-{epoch}",
        reason="test", initial=epoch == 1))


def assert_closed_by_server(c: socket.socket) -> None:
    """The server closed the connection: EOF (or a reset, when it left bytes unread)."""
    try:
        data = c.recv(1)
    except ConnectionResetError:
        return
    except TimeoutError:
        raise AssertionError(f"the server did not close the connection in {TIMEOUT_S} s") \
            from None
    assert data == b"", f"expected the connection closed, got {data!r}"


def attach(connect, rec: Recorder, wid: str) -> socket.socket:
    c = connect()
    c.sendall(encode(hello(wid)))
    rec.expect_hello(wid)
    return c


# ---- the agent's server -------------------------------------------------------------------

def test_valid_hello_is_delivered_then_messages_then_disconnect(connect, rec: Recorder) -> None:
    c = attach(connect, rec, "a/0")
    report = lpb.WorkerToAgent(step_report=pb.StepReport(worker_id="a/0", epoch=1, step=3))
    c.sendall(encode(report))
    assert rec.next() == ("message", "a/0", report)
    c.close()
    assert rec.next() == ("disconnect", "a/0", None)
    rec.assert_nothing()


BAD_FIRST_FRAMES = {
    # A 5-byte payload that is no WorkerToAgent.
    "garbage": struct.pack(">I", 5) + b"\xff\xff\xff\xff\xff",
    "oversized_header": struct.pack(">I", MAX_FRAME_BYTES + 1),
    "huge_header": b"\xff\xff\xff\xff",
    "not_a_hello": encode(lpb.WorkerToAgent(
        step_report=pb.StepReport(worker_id="a/0", epoch=1, step=3))),
    "no_kind": struct.pack(">I", 0),
    "unexpected_worker": encode(hello("b/0")),
    "empty_worker_id": encode(hello("")),
}


@pytest.mark.parametrize("data", BAD_FIRST_FRAMES.values(), ids=BAD_FIRST_FRAMES.keys())
def test_bad_first_frame_closes_the_connection_and_delivers_nothing(
        connect, rec: Recorder, data: bytes) -> None:
    bad = connect()
    bad.sendall(data)
    assert_closed_by_server(bad)
    rec.assert_nothing()
    # The server is not hurt: a valid worker still attaches (under the same id too).
    attach(connect, rec, "a/0")
    rec.assert_nothing()


def test_garbage_after_the_hello_closes_and_disconnects(connect, rec: Recorder) -> None:
    c = attach(connect, rec, "a/0")
    c.sendall(struct.pack(">I", 3) + b"\xff\xff\xff")
    assert_closed_by_server(c)
    assert rec.next() == ("disconnect", "a/0", None)
    rec.assert_nothing()
    attach(connect, rec, "a/0")  # the id is free again


def test_second_hello_on_a_connection_closes_it(connect, rec: Recorder) -> None:
    c = attach(connect, rec, "a/0")
    c.sendall(encode(hello("a/1")))
    assert_closed_by_server(c)
    assert rec.next() == ("disconnect", "a/0", None)
    rec.assert_nothing()


def test_second_connection_for_a_connected_worker_is_closed(
        server: LocalServer, connect, rec: Recorder) -> None:
    first = attach(connect, rec, "a/0")
    impostor = connect()
    impostor.sendall(encode(hello("a/0", pid=1)))
    assert_closed_by_server(impostor)
    rec.assert_nothing()  # neither its hello nor a disconnect of a/0
    # The first connection is still a/0's.
    assert server.send("a/0", membership(1))
    assert read_frame(first, lpb.AgentToWorker) == membership(1)


def test_send_and_broadcast(server: LocalServer, connect, rec: Recorder) -> None:
    a0 = attach(connect, rec, "a/0")
    a1 = attach(connect, rec, "a/1")
    resume = lpb.AgentToWorker(resume=pb.Resume(epoch=2, step=4, reason="r"))
    assert server.send("a/1", resume)
    assert read_frame(a1, lpb.AgentToWorker) == resume
    assert not server.send("b/0", resume)  # not connected: nothing sent
    server.broadcast(membership(3))
    assert read_frame(a0, lpb.AgentToWorker) == membership(3)
    assert read_frame(a1, lpb.AgentToWorker) == membership(3)
    # a/0 got nothing before the broadcast: the resume went to a/1 only.
    shutdown = lpb.AgentToWorker(shutdown=pb.Shutdown(reason="done"))
    server.broadcast(shutdown)
    assert read_frame(a0, lpb.AgentToWorker) == shutdown


def test_send_after_the_worker_left_returns_false(
        server: LocalServer, connect, rec: Recorder) -> None:
    c = attach(connect, rec, "a/0")
    c.close()
    assert rec.next() == ("disconnect", "a/0", None)
    assert not server.send("a/0", membership(1))


def test_close_removes_the_socket(tmp_path: Path, rec: Recorder) -> None:
    path = tmp_path / "s.sock"
    s = LocalServer(str(path), set(EXPECTED), rec.on_message, rec.on_disconnect)
    assert path.exists()
    s.close()
    assert not path.exists()
    with pytest.raises(OSError):
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM).connect(str(path))


# ---- the worker's link --------------------------------------------------------------------

@pytest.fixture
def links() -> Iterator[list[AgentLink]]:
    made: list[AgentLink] = []
    yield made
    for link in made:
        link.close()


def open_link(server: LocalServer, rec: Recorder, links: list[AgentLink], wid: str = "a/0"
              ) -> tuple[AgentLink, queue.Queue[pb.Membership]]:
    seen: queue.Queue[pb.Membership] = queue.Queue()
    link = AgentLink(server.path, wid, seen.put)
    links.append(link)
    what, got, msg = rec.next()
    assert (what, got) == ("message", wid) and msg.hello.pid == os.getpid()
    return link, seen


def test_link_delivers_a_membership_once(server: LocalServer, rec: Recorder,
                                         links: list[AgentLink]) -> None:
    link, seen = open_link(server, rec, links)
    assert server.send("a/0", membership(1))
    assert link.wait(lambda: link.latest_membership() is not None, TIMEOUT_S)
    assert seen.get(timeout=TIMEOUT_S) == membership(1).membership
    assert link.latest_membership() == membership(1).membership
    # Once: a resume that follows arrives with no second membership callback.
    assert server.send("a/0", lpb.AgentToWorker(resume=pb.Resume(epoch=1, step=0)))
    assert link.wait(lambda: link.resume_for(1) is not None, TIMEOUT_S)
    assert seen.empty()


def test_link_ignores_a_stale_membership(server: LocalServer, rec: Recorder,
                                         links: list[AgentLink]) -> None:
    link, seen = open_link(server, rec, links)
    for epoch in (2, 1, 2, 3):  # 1 and the repeated 2 are stale
        assert server.send("a/0", membership(epoch))
    assert link.wait(lambda: link.membership_newer_than(2) is not None, TIMEOUT_S)
    assert [seen.get(timeout=TIMEOUT_S).epoch for _ in range(2)] == [2, 3]
    assert seen.empty()
    assert link.latest_membership().epoch == 3


def test_link_sends_to_the_agent(server: LocalServer, rec: Recorder,
                                 links: list[AgentLink]) -> None:
    link, _ = open_link(server, rec, links)
    msg = lpb.WorkerToAgent(recovery_ready=pb.RecoveryReady(worker_id="a/0", epoch=2,
                                                            snapshot_steps=[3, 4]))
    link.send(msg)
    assert rec.next() == ("message", "a/0", msg)


def test_link_raises_agent_lost_when_the_agent_goes_away(tmp_path: Path,
                                                         links: list[AgentLink]) -> None:
    """An agent that dies: its end of the socket closes under the worker."""
    path = str(tmp_path / "raw.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(path)
        listener.listen(1)
        listener.settimeout(TIMEOUT_S)
        closed: queue.Queue[str] = queue.Queue()
        links.append(AgentLink(path, "a/0", lambda m: None, on_closed=closed.put))
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(TIMEOUT_S)
            assert read_frame(conn, lpb.WorkerToAgent).hello.worker_id == "a/0"
    finally:
        listener.close()
    with pytest.raises(AgentLost):
        links[-1].wait(lambda: False, TIMEOUT_S)
    assert closed.get(timeout=TIMEOUT_S)  # on_closed ran, with a reason
    assert closed.empty()


# Kernel state of a thread blocked in a socket call, read from /proc (Linux only).
_SYSCALLS = {"x86_64": {"recvfrom": 45, "accept4": 288},
             "aarch64": {"recvfrom": 207, "accept4": 242}}


def wait_blocked_in(threads: list[threading.Thread], syscall: str) -> None:
    """Wait (bounded) until each thread is blocked in `syscall`, as the kernel reports it."""
    numbers = _SYSCALLS.get(platform.machine())
    if numbers is None or not os.path.exists(f"/proc/self/task/{threading.get_native_id()}"):
        pytest.skip("needs Linux /proc/<pid>/task/<tid>/syscall on x86_64 or aarch64")
    assert threads, "no thread to wait for"
    want = str(numbers[syscall])
    deadline = time.monotonic() + TIMEOUT_S
    for t in threads:
        while True:
            try:
                with open(f"/proc/self/task/{t.native_id}/syscall") as f:
                    if f.read().split(" ", 1)[0] == want:
                        break
            except OSError:
                pytest.skip("cannot read the thread's /proc syscall entry")
            assert time.monotonic() < deadline, f"{t.name} never blocked in {syscall}"
            os.sched_yield()


def new_threads(before: set[threading.Thread], name: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t not in before and t.name == name]


# Only 3 s: with the fix the end of stream arrives within microseconds of close().
BUG_TIMEOUT_S = 3.0


def test_link_raises_agent_lost_when_the_server_closes(server: LocalServer, rec: Recorder,
                                                       links: list[AgentLink]) -> None:
    before = set(threading.enumerate())
    link, _ = open_link(server, rec, links)
    # The race that matters in production: the server's thread waits for the next frame.
    wait_blocked_in(new_threads(before, "splice-local-conn"), "recvfrom")
    server.close()
    with pytest.raises(AgentLost):
        link.wait(lambda: False, BUG_TIMEOUT_S)


def test_close_stops_the_accept_thread(tmp_path: Path, rec: Recorder) -> None:
    before = set(threading.enumerate())
    s = LocalServer(str(tmp_path / "s.sock"), set(EXPECTED), rec.on_message,
                    rec.on_disconnect)
    acceptors = new_threads(before, "splice-local-accept")
    assert len(acceptors) == 1
    wait_blocked_in(acceptors, "accept4")
    s.close()
    acceptors[0].join(BUG_TIMEOUT_S)
    assert not acceptors[0].is_alive(), "the accept thread outlived close()"


def test_link_raises_agent_lost_on_shutdown(server: LocalServer, rec: Recorder,
                                            links: list[AgentLink]) -> None:
    link, _ = open_link(server, rec, links)
    assert server.send("a/0", lpb.AgentToWorker(shutdown=pb.Shutdown(reason="job done")))
    with pytest.raises(AgentLost, match="job done"):
        link.wait(lambda: False, TIMEOUT_S)
