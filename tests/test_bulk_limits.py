"""The bulk snapshot port's limits (agent/bulk.py): transfer slots and the connection cap,
an accept loop that cannot start a thread, the server's and the client's deadlines,
cancelling, the fall back to gRPC when the port is busy or silent, announced sizes, and a
fetched slot's file reserved before the bytes land. Helpers from tests/test_bulk.py."""

from __future__ import annotations

import errno
import logging
import os
import pickle
import socket
import struct
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest

from splice.agent import bulk
from splice.agent.replication import (
    MalformedStream,
    MiB,
    ReplicaBusy,
    ReplicaStore,
    ReplicationError,
    fetch,
    serve,
)
from splice.agent.replication_wire import MAX_DATA_BYTES
from splice.checkpoint.slotmeta import IncomingSlot
from splice.proto import peer_pb2 as pb
from splice.security import (
    AGENT_SERVER_NAME,
    ssl_client_context,
    ssl_server_context,
)
from tests.conftest import role
from tests.test_bulk import (
    DATA,
    DEADLINE_S,
    META,
    WORKER,
    drain,
    fake_peer,
    fake_server,
    fetched,
    frame,
    noting,
    provider_of,
    request,
    snapshot_reply,
    source_of,
    stalled_fetch,
)
from tests.test_replication import JOB, payload, state

# ---- transfer slots and the connection cap --------------------------------------------------

def ended_by_peer(conn: socket.socket) -> bool:
    """Whether the peer ended the stream (EOF or reset) before sending anything; a socket
    timeout (the peer kept it open) raises."""
    try:
        return conn.recv(1) == b""
    except ConnectionResetError:
        return True


def fetch_when_free(port: int) -> bulk.Received:
    """A fetch of WORKER, retried until the server has noticed connections that went away
    (it drops them on its own threads, just after they close)."""
    deadline = time.monotonic() + DEADLINE_S
    while True:
        try:
            return bulk.fetch("127.0.0.1", port, request(), timeout_s=DEADLINE_S)
        except ReplicationError:
            if time.monotonic() > deadline:
                raise


def test_connections_over_the_cap_are_closed_at_once() -> None:
    server = bulk.BulkServer(source_of({WORKER: DATA}), "127.0.0.1", max_connections=2,
                             request_timeout_s=3 * DEADLINE_S)
    idle: list[socket.socket] = []
    try:
        idle = [socket.create_connection(("127.0.0.1", server.port), timeout=DEADLINE_S)
                for _ in range(2)]
        with socket.create_connection(("127.0.0.1", server.port), timeout=DEADLINE_S) as extra:
            # Closed by the accept loop, not after the request timeout a served one gets.
            assert ended_by_peer(extra)
        for conn in idle:  # those under the cap are still open
            conn.setblocking(False)
            with pytest.raises(BlockingIOError):
                conn.recv(1)
            conn.close()
        assert fetched(fetch_when_free(server.port)) == (1, b"meta", DATA)
    finally:
        for conn in idle:
            conn.close()
        server.close()


def test_a_fetch_turned_away_by_the_cap_may_fall_back_to_grpc() -> None:
    """`replication.fetch` uses gRPC instead only on BulkUnreachable or ReplicaBusy; a
    fetcher the cap turns away must see one of those (as it does over TLS, where the
    handshake fails), not a MalformedStream that has it skip the holder altogether."""
    server = bulk.BulkServer(source_of({WORKER: DATA}), "127.0.0.1", max_connections=1,
                             request_timeout_s=3 * DEADLINE_S)
    idle = socket.create_connection(("127.0.0.1", server.port), timeout=DEADLINE_S)
    try:
        with pytest.raises((bulk.BulkUnreachable, ReplicaBusy)):
            bulk.fetch("127.0.0.1", server.port, request(), timeout_s=DEADLINE_S)
    finally:
        idle.close()
        server.close()


@pytest.mark.parametrize("secure", [False, True], ids=["plaintext", "tls"])
def test_connections_without_a_whole_request_hold_no_transfer_slot(
        pki: dict[str, str], secure: bool) -> None:
    tls = role(pki, "agent")
    client_tls = ssl_client_context(tls) if secure else None
    server = bulk.BulkServer(source_of({WORKER: DATA}), "127.0.0.1", max_transfers=2,
                             tls=ssl_server_context(tls) if secure else None,
                             request_timeout_s=3 * DEADLINE_S)
    idle: list[socket.socket] = []
    try:
        # One has sent nothing (not even a TLS hello); one is part way: half a request in
        # plaintext, its handshake done and no request over TLS.
        idle.append(socket.create_connection(("127.0.0.1", server.port), timeout=DEADLINE_S))
        partial = socket.create_connection(("127.0.0.1", server.port), timeout=DEADLINE_S)
        idle.append(partial)
        if client_tls is None:
            partial.sendall(bulk.MAGIC + b"\x00\x00")
        else:
            idle[-1] = client_tls.wrap_socket(partial, server_hostname=AGENT_SERVER_NAME)
        got = bulk.fetch("127.0.0.1", server.port, request(), tls=client_tls,
                         server_name=AGENT_SERVER_NAME, timeout_s=DEADLINE_S)
        assert fetched(got) == (1, b"meta", DATA)
    finally:
        for conn in idle:
            conn.close()
        server.close()


class _ScarceThread(threading.Thread):
    """A Thread whose next `failures` bulk-transfer threads cannot start, as when the
    process is out of threads."""

    failures = 0

    def start(self) -> None:
        if self.name == "splice-bulk-transfer" and _ScarceThread.failures:
            _ScarceThread.failures -= 1
            raise RuntimeError("can't start new thread")
        super().start()


def test_the_accept_loop_survives_a_thread_that_cannot_start(
        monkeypatch: pytest.MonkeyPatch) -> None:
    server = bulk.BulkServer(source_of({WORKER: DATA}), "127.0.0.1", max_connections=1)
    monkeypatch.setattr(_ScarceThread, "failures", 1)
    monkeypatch.setattr(threading, "Thread", _ScarceThread)
    try:
        with noting("bulk port: cannot serve a connection") as noted:
            with pytest.raises(ReplicationError):  # that connection is dropped at once
                bulk.fetch("127.0.0.1", server.port, request(), timeout_s=DEADLINE_S)
            assert noted.is_set()
        # Still accepting, and the dropped connection no longer counts against the cap of 1.
        got = bulk.fetch("127.0.0.1", server.port, request(), timeout_s=DEADLINE_S,
                         connect_timeout_s=DEADLINE_S)
        assert fetched(got) == (1, b"meta", DATA)
    finally:
        server.close()


def test_the_server_cuts_a_transfer_at_its_transfer_timeout() -> None:
    """A fetcher that reads too slowly holds a thread and a slot for at most
    `transfer_timeout_s`, however long `stall_timeout_s` is."""
    big = bytes(16 * MiB)  # far more than the socket buffers hold
    server = bulk.BulkServer(source_of({"big": big}), "127.0.0.1",
                             stall_timeout_s=3 * DEADLINE_S, transfer_timeout_s=0.5)
    conn = None
    try:
        with noting(f"bulk fetch of {JOB}/big step newest ended early") as dropped:
            t0 = time.monotonic()
            conn = stalled_fetch(server.port, "big")
            assert dropped.wait(DEADLINE_S), "the slow fetcher was never dropped"
            assert time.monotonic() - t0 < 5.0
        assert drain(conn) < len(big)
    finally:
        if conn is not None:
            conn.close()
        server.close()


# ---- the client's deadlines and cancelling --------------------------------------------------

def silent(conn: socket.socket, done: threading.Event) -> None:
    done.wait(DEADLINE_S)


def trickler(trickling: threading.Event) -> Callable[[socket.socket, threading.Event], None]:
    """A peer that announces a MiB of data, then sends it a byte every 20 ms (for at most
    DEADLINE_S); `trickling` is set once the first byte is out."""

    def act(conn: socket.socket, done: threading.Event) -> None:
        header = pb.SnapshotHeader(job_id=JOB, worker_id=WORKER, step=7,
                                   meta_bytes=len(META), data_bytes=MiB)
        conn.sendall(frame(pb.BulkReply(header=header)) + META[:1])
        trickling.set()
        stop = time.monotonic() + DEADLINE_S
        while not done.wait(0.02) and time.monotonic() < stop:
            conn.sendall(b"\0")

    return act


def test_no_reply_within_the_connect_timeout_is_unreachable() -> None:
    with fake_peer(silent) as port:
        t0 = time.monotonic()
        with pytest.raises(bulk.BulkUnreachable, match=r"no reply .* within 0.3 s"):
            bulk.fetch("127.0.0.1", port, request(), timeout_s=DEADLINE_S,
                       connect_timeout_s=0.3)
        assert time.monotonic() - t0 < 5.0


def test_a_peer_trickling_bytes_cannot_hold_a_fetch_past_its_deadline() -> None:
    with fake_peer(trickler(threading.Event())) as port:
        t0 = time.monotonic()
        with pytest.raises(ReplicationError) as info:
            bulk.fetch("127.0.0.1", port, request(), timeout_s=0.5)
        took = time.monotonic() - t0
    # Exactly a ReplicationError (the deadline), not the MalformedStream of the peer
    # giving up its trickle after DEADLINE_S.
    assert type(info.value) is ReplicationError, repr(info.value)
    assert took < 5.0


def test_cancelling_ends_a_fetch_from_a_slow_peer_at_once() -> None:
    cancelled = threading.Event()  # set by the peer once it trickles: a cancel meanwhile
    with fake_peer(trickler(cancelled)) as port:
        t0 = time.monotonic()
        with pytest.raises(bulk.FetchCancelled):
            bulk.fetch("127.0.0.1", port, request(), timeout_s=DEADLINE_S,
                       cancelled=cancelled)
        assert time.monotonic() - t0 < 5.0


def test_a_fetch_cancelled_as_its_meta_lands_reads_no_data() -> None:
    cancelled = threading.Event()
    landed: list[bytes] = []

    def into(data_bytes: int, meta: bytes) -> memoryview:
        landed.append(meta)
        cancelled.set()
        return memoryview(bytearray(data_bytes))

    with fake_server(snapshot_reply()) as (port, _):
        with pytest.raises(bulk.FetchCancelled, match=f"after 0 of {len(DATA)} bytes"):
            bulk.fetch("127.0.0.1", port, request(step=7), timeout_s=DEADLINE_S, into=into,
                       cancelled=cancelled)
    assert landed == [META]


# ---- replication.fetch: the gRPC fallback and cancelling ------------------------------------

def test_a_busy_bulk_port_falls_back_to_grpc(caplog: pytest.LogCaptureFixture) -> None:
    entered, release = threading.Event(), threading.Event()
    data = payload(50_000, 7)

    def provider(job: str, worker: str, step: int) -> tuple[int, bytes, bytes]:
        if worker == "busy/0":  # holds the bulk port's one transfer slot until released
            entered.set()
            release.wait(DEADLINE_S)
        return 5, b"meta", data

    # max_workers=1: the bulk port has one transfer slot.
    server = serve(ReplicaStore(0, job_id=JOB), "localhost:0", provider, max_workers=1)
    assert server.bulk is not None
    hog = socket.create_connection(("127.0.0.1", server.bulk.port), timeout=DEADLINE_S)
    try:
        with noting(f"bulk fetch of {JOB}/busy/0 step newest ended early") as hog_done:
            try:
                hog.sendall(bulk.MAGIC + frame(request("busy/0")))
                assert entered.wait(DEADLINE_S)
                with caplog.at_level(logging.INFO, logger="splice.agent"):
                    got = fetch([server.address], JOB, WORKER)
            finally:
                server.stop()  # drops the hog's connection
                release.set()
                hog_done.wait(DEADLINE_S)  # its thread ends here, not in the next test
        assert fetched(got) == (5, b"meta", data)
        assert "1 transfers under way here; retry; fetching over gRPC instead" in caplog.text
        assert f"from {server.address} over gRPC" in caplog.text
    finally:
        hog.close()


def test_a_bulk_port_that_does_not_reply_in_time_falls_back_to_grpc(
        caplog: pytest.LogCaptureFixture) -> None:
    calls: list[str] = []
    release = threading.Event()
    data = payload(50_000, 8)

    def provider(job: str, worker: str, step: int) -> tuple[int, bytes, bytes]:
        calls.append(worker)
        if len(calls) == 1:  # the bulk port's lookup: no reply until released
            release.wait(DEADLINE_S)
        return 5, b"meta", data

    server = serve(ReplicaStore(0, job_id=JOB), "localhost:0", provider)
    with noting(f"bulk fetch of {JOB}/{WORKER} step newest ended early") as bulk_done:
        try:
            t0 = time.monotonic()
            with caplog.at_level(logging.INFO, logger="splice.agent"):
                got = fetch([server.address], JOB, WORKER, connect_timeout_s=0.5)
            took = time.monotonic() - t0
        finally:
            server.stop()  # drops the bulk connection still waiting on its lookup
            release.set()
            bulk_done.wait(DEADLINE_S)
    assert fetched(got) == (5, b"meta", data) and took < 5.0
    assert "within 0.5 s; fetching over gRPC instead" in caplog.text
    assert f"from {server.address} over gRPC" in caplog.text


@pytest.mark.parametrize("with_bulk", [True, False], ids=["bulk", "grpc"])
def test_a_cancelled_fetch_gets_nothing(caplog: pytest.LogCaptureFixture,
                                        with_bulk: bool) -> None:
    server = serve(ReplicaStore(0, job_id=JOB), "localhost:0", provider_of(payload(300_000, 4)),
                   with_bulk=with_bulk)
    cancelled = threading.Event()
    cancelled.set()
    try:
        with caplog.at_level(logging.INFO, logger="splice.agent"):
            with pytest.raises(ReplicationError) as info:
                fetch([server.address], JOB, WORKER, chunk_bytes=64 * 1024,
                      cancelled=cancelled)
    finally:
        server.stop()
    assert isinstance(info.value, bulk.FetchCancelled) or "FetchCancelled" in str(info.value)
    assert "fetching over gRPC instead" not in caplog.text  # a cancel is no cue to retry
    assert "fetched " not in caplog.text


def test_a_cancelled_fetch_asks_no_further_holder() -> None:
    asked: list[str] = []

    def provider_named(name: str) -> Callable[[str, str, int], tuple[int, bytes, bytes]]:
        def provide(job: str, worker: str, step: int) -> tuple[int, bytes, bytes]:
            asked.append(name)
            return 5, b"meta", payload(10_000, 2)
        return provide

    first = serve(ReplicaStore(0, job_id=JOB), "localhost:0", provider_named("first"))
    second = serve(ReplicaStore(0, job_id=JOB), "localhost:0", provider_named("second"))
    cancelled = threading.Event()
    cancelled.set()
    try:
        with pytest.raises(ReplicationError):
            fetch([first.address, second.address], JOB, WORKER, cancelled=cancelled)
    finally:
        first.stop()
        second.stop()
    assert "second" not in asked, "a cancelled fetch went on to the next holder"


# ---- sizes announced ------------------------------------------------------------------------

class _Sized(Exception):
    """Raised by an `into` to stop a fetch once it was asked for a buffer."""


@pytest.mark.parametrize("data_bytes, refused", [(MAX_DATA_BYTES + 1, True),
                                                 (MAX_DATA_BYTES, False)],
                         ids=["over-16-TiB", "16-TiB"])
def test_data_announced_over_the_limit_is_malformed_before_a_buffer_is_sized(
        data_bytes: int, refused: bool) -> None:
    sized: list[int] = []

    def into(n: int, meta: bytes) -> memoryview:
        sized.append(n)
        raise _Sized

    with fake_server(snapshot_reply(data_bytes=data_bytes)) as (port, _):
        with pytest.raises(MalformedStream if refused else _Sized) as info:
            bulk.fetch("127.0.0.1", port, request(step=7), timeout_s=DEADLINE_S, into=into)
    if refused:
        assert f"over the {MAX_DATA_BYTES} limit" in str(info.value)
    assert sized == ([] if refused else [MAX_DATA_BYTES])


def test_a_push_announcing_over_the_limit_is_malformed() -> None:
    store = ReplicaStore(MiB, job_id=JOB)
    before = state(store)
    header = pb.SnapshotHeader(job_id=JOB, worker_id=WORKER, step=1, epoch=1,
                               data_bytes=MAX_DATA_BYTES + 1)
    with pytest.raises(MalformedStream, match=f"over the {MAX_DATA_BYTES} limit"):
        store.begin(header)
    assert state(store) == before


# ---- a fetched slot's file is reserved up front ---------------------------------------------

def slot_meta(step: int, data_name: str = "slot0-1.data") -> bytes:
    """A committed slot's meta (checkpoint/slotmeta.py) naming `data_name`, no tree."""
    record = pickle.dumps({"data": data_name})
    body = struct.pack("<I", len(record)) + record
    crc = zlib.crc32(body, zlib.crc32(struct.pack("<q", step)))
    return struct.pack("<qQI", step, len(body), crc) + body


def no_space(fd: int, offset: int, length: int) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_fetched_slot_reserves_its_data_file_before_mapping_it(tmp_path: Path) -> None:
    directory = tmp_path / "fetched"
    incoming = IncomingSlot(str(directory))
    view = incoming.into(MiB, slot_meta(7))
    try:
        assert len(view) == MiB
        st = os.stat(directory / "slot0-1.data")
        assert st.st_size == MiB and st.st_blocks * 512 >= MiB  # allocated, not sparse
    finally:
        view.release()
        incoming.close()


def test_a_slot_that_finds_no_room_raises_and_leaves_no_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    directory = tmp_path / "fetched"
    incoming = IncomingSlot(str(directory))
    monkeypatch.setattr(os, "posix_fallocate", no_space)
    with pytest.raises(OSError) as info:
        incoming.into(MiB, slot_meta(7))
    assert info.value.errno == errno.ENOSPC
    assert not directory.exists() and incoming.record is None


@pytest.mark.parametrize("with_bulk", [True, False], ids=["bulk", "grpc"])
def test_a_fetch_into_a_slot_with_no_room_fails_as_an_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, with_bulk: bool) -> None:
    """An OSError (gRPC) or a ReplicationError naming it (bulk, where it comes up from
    within the transfer): either way the caller's `except`, not a crash of the worker."""
    data = payload(200_000, 9)
    server = serve(ReplicaStore(0, job_id=JOB), "localhost:0",
                   lambda job, worker, step: (7, slot_meta(7), data), with_bulk=with_bulk)
    directory = tmp_path / "fetched"
    incoming = IncomingSlot(str(directory))
    monkeypatch.setattr(os, "posix_fallocate", no_space)
    try:
        with pytest.raises((OSError, ReplicationError)) as info:
            fetch([server.address], JOB, WORKER, into=incoming.into)
    finally:
        server.stop()
    assert os.strerror(errno.ENOSPC) in str(info.value)
    assert not directory.exists()


def test_a_snapshot_that_cannot_be_read_is_refused_and_the_holder_skipped() -> None:
    # The agent's own snapshot whose file fails to read: the fetcher is told why (a plain
    # ReplicationError: the next holder, not gRPC against the same unreadable file).
    def lookup(request: pb.FetchRequest) -> bulk.Source:
        raise OSError("the slot's file is unreadable")

    server = bulk.BulkServer(lookup, "127.0.0.1")
    try:
        for _ in range(2):  # the server goes on serving
            with pytest.raises(ReplicationError, match="unreadable") as info:
                bulk.fetch("127.0.0.1", server.port, pb.FetchRequest(job_id=JOB,
                                                                      worker_id="n0/0"))
            assert type(info.value) is ReplicationError
    finally:
        server.close()
