"""The bulk snapshot port (agent/bulk.py) over real sockets on localhost: byte-exact round
trips, bad requests refused without touching the store, a misbehaving server's replies
refused by the client, the fall back to gRPC, busy and stalled peers, close() under way,
and mutual TLS."""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
import torch

from splice.agent import bulk
from splice.agent.replication import (
    MalformedStream,
    MiB,
    PeerServer,
    ReplicaBusy,
    ReplicaStore,
    ReplicationError,
    SnapshotCorrupt,
    SnapshotNotHeld,
    UnknownJob,
    channel_to,
    fetch,
    push,
    serve,
)
from splice.proto import peer_pb2 as pb
from splice.proto import peer_pb2_grpc as pb_grpc
from splice.security import (
    AGENT_SERVER_NAME,
    TLSConfig,
    channel_credentials,
    server_credentials,
    ssl_client_context,
    ssl_server_context,
)
from tests.conftest import role
from tests.test_replication import JOB, payload, state

WORKER = "n1/0"
U32 = struct.Struct(">I")
DEADLINE_S = 10.0  # how long a test waits for what should take milliseconds


def request(worker: str = WORKER, step: int = 0, job: str = JOB) -> pb.FetchRequest:
    return pb.FetchRequest(job_id=job, worker_id=worker, step=step)


def frame(message: Any) -> bytes:
    raw = message.SerializeToString()
    return U32.pack(len(raw)) + raw


def recv_exact(conn: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        got = conn.recv(n - len(out))
        if not got:
            raise EOFError(f"{len(out)} of {n} bytes")
        out += got
    return bytes(out)


def read_reply(conn: socket.socket) -> pb.BulkReply:
    (n,) = U32.unpack(recv_exact(conn, 4))
    return pb.BulkReply.FromString(recv_exact(conn, n))


def read_request(conn: socket.socket) -> tuple[bytes, pb.FetchRequest]:
    """What a fake server reads of a fetch: the magic and the request."""
    magic = recv_exact(conn, 4)
    (n,) = U32.unpack(recv_exact(conn, 4))
    return magic, pb.FetchRequest.FromString(recv_exact(conn, n))


def drain(conn: socket.socket) -> int:
    """Read until the peer ends the stream (EOF or reset); the bytes read."""
    total = 0
    try:
        while chunk := conn.recv(4 * MiB):
            total += len(chunk)
    except ConnectionResetError:
        pass
    return total


def fetched(got: Any) -> tuple[int, bytes, bytes]:
    """(step, meta, data) of a replication.Fetched or a bulk.Received."""
    step = got.header.step if isinstance(got, bulk.Received) else got.step
    return step, got.meta, bytes(got.data.numpy())


def holdings(address: str, credentials: grpc.ChannelCredentials | None = None) -> pb.Holdings:
    with channel_to(address, credentials) as channel:
        return pb_grpc.SnapshotPeerStub(channel).List(pb.ListRequest(), timeout=DEADLINE_S)


def as_tensor(data: bytes) -> torch.Tensor:
    """A worker's snapshot buffer: a uint8 1-D CPU tensor."""
    if not data:
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def source_of(snapshots: dict[str, bytes], step: int = 1) -> bulk.Lookup:
    """A lookup serving `snapshots` (worker -> data) as the node's own, at `step`."""

    def lookup(r: pb.FetchRequest) -> bulk.Source:
        if r.worker_id not in snapshots:
            raise SnapshotNotHeld(f"{r.worker_id} not held here")
        header = pb.SnapshotHeader(job_id=r.job_id, worker_id=r.worker_id, step=step)
        return bulk.Source(header, b"meta", snapshots[r.worker_id], None)

    return lookup


# ---- round trips ----------------------------------------------------------------------------

SIZES = {"small": 50_000, "empty": 0, "odd-over-a-piece": 2 * bulk.PIECE_BYTES + 4093}


@pytest.mark.parametrize("size", SIZES.values(), ids=SIZES.keys())
@pytest.mark.parametrize("held_as", ["replica", "own"])
def test_a_fetch_over_the_bulk_port_is_byte_exact(caplog: pytest.LogCaptureFixture,
                                                  held_as: str, size: int) -> None:
    meta, data = (b"meta:" + bytes(range(256)) if size else b""), payload(size, 3)

    def provider(job: str, worker: str, step: int) -> tuple[int, bytes, Any] | None:
        mine = held_as == "own" and (job, worker) == (JOB, WORKER) and step in (0, 9)
        return (9, meta, as_tensor(data)) if mine else None

    server = serve(ReplicaStore(0, job_id=JOB), "localhost:0", provider)
    try:
        if held_as == "replica":
            push(server.address, JOB, WORKER, 9, 2, meta, data)
        assert server.bulk is not None and holdings(server.address).bulk_port == server.bulk.port
        with caplog.at_level(logging.INFO, logger="splice.agent"):
            got = fetch([server.address], JOB, WORKER, 9)
        assert fetched(got) == (9, meta, data)
        assert "over its bulk port" in caplog.text
        direct = bulk.fetch("localhost", server.bulk.port, request(step=9), timeout_s=DEADLINE_S)
        assert fetched(direct) == (9, meta, data)
        h = direct.header
        assert (h.job_id, h.worker_id, h.meta_bytes, h.data_bytes) == (JOB, WORKER, len(meta),
                                                                       len(data))
        assert h.epoch == (2 if held_as == "replica" else 0)
    finally:
        server.stop()


# ---- bad requests ---------------------------------------------------------------------------

@pytest.fixture
def holder() -> Iterator[tuple[ReplicaStore, PeerServer]]:
    """A peer holding a replica of WORKER at step 9, serving it on a bulk port."""
    store = ReplicaStore(0, job_id=JOB)
    server = serve(store, "localhost:0")
    try:
        push(server.address, JOB, WORKER, 9, 1, b"hdr", payload(30_000, 1))
        yield store, server
    finally:
        server.stop()


BAD_REQUESTS = {
    # Exactly what the server reads before it refuses: it answers, and nothing is left unread.
    "wrong-magic": (b"SPB0", "MalformedStream", "not a bulk fetch (magic b'SPB0')"),
    "request-over-the-limit": (bulk.MAGIC + U32.pack(bulk.MAX_REQUEST_BYTES + 1),
                               "MalformedStream",
                               f"over the {bulk.MAX_REQUEST_BYTES} limit"),
    "not-a-FetchRequest": (bulk.MAGIC + U32.pack(4) + b"\xff" * 4, "MalformedStream",
                           "malformed FetchRequest"),
    "unknown-job": (bulk.MAGIC + frame(request(job="job-b")), "UnknownJob",
                    f"this agent serves job {JOB!r}"),
    "not-held": (bulk.MAGIC + frame(request(worker="n9/0")), "SnapshotNotHeld",
                 "n9/0 step newest: not held here"),
    "another-step": (bulk.MAGIC + frame(request(step=4)), "SnapshotNotHeld",
                     "(replica of step 9 is)"),
}


@pytest.mark.parametrize("sent, kind, why", BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys())
def test_a_bad_request_is_refused_and_changes_nothing(
        holder: tuple[ReplicaStore, PeerServer], sent: bytes, kind: str, why: str) -> None:
    store, server = holder
    assert server.bulk is not None
    before = state(store)
    with socket.create_connection(("127.0.0.1", server.bulk.port), timeout=DEADLINE_S) as conn:
        conn.sendall(sent)
        reply = read_reply(conn)
        assert conn.recv(1) == b""  # a refusal ends the connection
    assert not reply.HasField("header")
    assert reply.refusal == kind and why in reply.error, reply
    assert state(store) == before
    got = bulk.fetch("localhost", server.bulk.port, request(), timeout_s=DEADLINE_S)
    assert fetched(got) == (9, b"hdr", payload(30_000, 1))


def test_the_server_refuses_with_the_matching_error_at_the_client(
        holder: tuple[ReplicaStore, PeerServer]) -> None:
    _, server = holder
    assert server.bulk is not None
    for wrong, error in [(request(job="job-b"), UnknownJob),
                         (request(worker="n9/0"), SnapshotNotHeld)]:
        with pytest.raises(error) as info:
            bulk.fetch("localhost", server.bulk.port, wrong, timeout_s=DEADLINE_S)
        assert type(info.value) is error


# ---- a misbehaving server -------------------------------------------------------------------

@contextlib.contextmanager
def fake_peer(act: Callable[[socket.socket, threading.Event], object],
              seen: list[tuple[bytes, pb.FetchRequest]] | None = None) -> Iterator[int]:
    """A bulk port that reads one request (appended to `seen`) and hands the connection
    to `act(conn, done)`; `done` is set as the test leaves. Yields its port."""
    listener = socket.create_server(("127.0.0.1", 0))
    done = threading.Event()

    def answer() -> None:
        try:
            conn, _ = listener.accept()
        except OSError:
            return  # closed without a client
        with conn:
            try:
                conn.settimeout(DEADLINE_S)
                request = read_request(conn)
                if seen is not None:
                    seen.append(request)
                act(conn, done)
            except (OSError, EOFError):
                pass  # the client went away

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        done.set()
        listener.shutdown(socket.SHUT_RDWR)  # wakes the accept
        listener.close()
        thread.join(timeout=DEADLINE_S)


@contextlib.contextmanager
def fake_server(reply: bytes) -> Iterator[tuple[int, list[tuple[bytes, pb.FetchRequest]]]]:
    """A bulk port that reads one request, answers the raw bytes `reply` and ends the
    stream. Yields its port and the (magic, request) pairs it read."""
    seen: list[tuple[bytes, pb.FetchRequest]] = []

    def answer(conn: socket.socket, done: threading.Event) -> None:
        conn.sendall(reply)
        conn.shutdown(socket.SHUT_WR)
        drain(conn)  # until the client hangs up, so no reset cuts the reply short

    with fake_peer(answer, seen) as port:
        yield port, seen


META, DATA = b"meta", payload(100_000, 2)


def snapshot_reply(*, worker: str = WORKER, step: int = 7, job: str = JOB,
                   meta: bytes = META, data: bytes = DATA, meta_bytes: int | None = None,
                   data_bytes: int | None = None, trailer: int | None = None) -> bytes:
    """A success reply: header, meta, data and trailer (by default all consistent)."""
    header = pb.SnapshotHeader(job_id=job, worker_id=worker, step=step,
                               meta_bytes=len(meta) if meta_bytes is None else meta_bytes,
                               data_bytes=len(data) if data_bytes is None else data_bytes)
    crc = zlib.crc32(meta + data) if trailer is None else trailer
    return frame(pb.BulkReply(header=header)) + meta + data + U32.pack(crc)


def flipped(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1:]


def test_the_fake_server_speaks_the_protocol() -> None:
    """The control for the cases below: an intact reply from the fake is accepted."""
    with fake_server(snapshot_reply()) as (port, seen):
        got = bulk.fetch("127.0.0.1", port, request(step=7), timeout_s=DEADLINE_S)
    assert fetched(got) == (7, META, DATA)
    assert seen == [(bulk.MAGIC, request(step=7))]


BAD_REPLIES = {
    "reply-over-the-limit": (U32.pack(bulk.MAX_REPLY_BYTES + 1), MalformedStream,
                             f"over the {bulk.MAX_REPLY_BYTES} limit"),
    "unparsable-reply": (U32.pack(4) + b"\xff" * 4, MalformedStream, "malformed reply"),
    "another-worker": (snapshot_reply(worker="n2/0"), MalformedStream,
                       f"sent {JOB}/n2/0 step 7"),
    "another-step": (snapshot_reply(step=8), MalformedStream, f"sent {JOB}/{WORKER} step 8"),
    "another-job": (snapshot_reply(job="job-b"), MalformedStream, f"sent job-b/{WORKER}"),
    "meta-over-the-limit": (snapshot_reply(meta_bytes=bulk.MAX_META_BYTES + 1),
                            MalformedStream, f"over the {bulk.MAX_META_BYTES} limit"),
    "cut-short-in-data": (snapshot_reply(data_bytes=len(DATA) + 10), MalformedStream,
                          "the stream ended early"),
    "no-trailer": (snapshot_reply()[:-4], MalformedStream, "the stream ended early"),
    "bytes-flipped": (snapshot_reply(data=flipped(DATA, 54_321),
                                     trailer=zlib.crc32(META + DATA)),
                      SnapshotCorrupt, "of the bytes received"),
    "trailer-wrong": (snapshot_reply(trailer=zlib.crc32(META + DATA) ^ 1), SnapshotCorrupt,
                      "of the bytes received"),
    "refusal": (frame(pb.BulkReply(refusal="SnapshotNotHeld", error="n1/0: not held here")),
                SnapshotNotHeld, "n1/0: not held here"),
    "refusal-without-a-reason": (frame(pb.BulkReply(refusal="ReplicaBusy")), ReplicaBusy,
                                 f"bulk fetch of {JOB}/{WORKER} step 7 refused"),
    "refusal-of-a-kind-unknown-here": (frame(pb.BulkReply(refusal="NewKind", error="why")),
                                       ReplicationError, "why"),
}


@pytest.mark.parametrize("reply, error, why", BAD_REPLIES.values(), ids=BAD_REPLIES.keys())
def test_a_bad_reply_is_refused_clearly(reply: bytes, error: type[ReplicationError],
                                        why: str) -> None:
    with fake_server(reply) as (port, _):
        with pytest.raises(ReplicationError) as info:
            bulk.fetch("127.0.0.1", port, request(step=7), timeout_s=DEADLINE_S)
    assert type(info.value) is error and why in str(info.value), repr(info.value)


def test_a_reply_announcing_more_than_can_be_allocated_is_a_replication_error() -> None:
    """A holder's header sizes the client's buffer; an absurd size must fail as a
    ReplicationError, so `replication.fetch` logs it and tries the next holder."""
    with fake_server(snapshot_reply(data_bytes=2**62)) as (port, _):
        with pytest.raises(ReplicationError):
            bulk.fetch("127.0.0.1", port, request(step=7), timeout_s=DEADLINE_S)


def test_a_bulk_port_that_refuses_connections_is_unreachable() -> None:
    with fake_server(b"") as (port, _):
        pass  # closed again: nothing listens there now
    with pytest.raises(bulk.BulkUnreachable, match=f"bulk port 127.0.0.1:{port}"):
        bulk.fetch("127.0.0.1", port, request(), timeout_s=DEADLINE_S)


# ---- falling back to gRPC -------------------------------------------------------------------

def test_an_unreachable_bulk_port_falls_back_to_grpc(caplog: pytest.LogCaptureFixture) -> None:
    meta, data = b"hdr", payload(70_000, 6)
    server = serve(ReplicaStore(0, job_id=JOB), "localhost:0")
    try:
        push(server.address, JOB, WORKER, 4, 1, meta, data)
        assert server.bulk is not None
        server.bulk.close()  # List still advertises the port; nothing answers there
        assert holdings(server.address).bulk_port == server.bulk.port
        with caplog.at_level(logging.INFO, logger="splice.agent"):
            got = fetch([server.address], JOB, WORKER, connect_timeout_s=2.0)
        assert fetched(got) == (4, meta, data)
        assert "fetching over gRPC instead" in caplog.text
        assert f"from {server.address} over gRPC" in caplog.text
        assert "over its bulk port" not in caplog.text
    finally:
        server.stop()


def test_a_server_without_a_bulk_port_advertises_none(caplog: pytest.LogCaptureFixture) -> None:
    server = serve(ReplicaStore(0, job_id=JOB), "localhost:0", with_bulk=False)
    try:
        push(server.address, JOB, WORKER, 4, 1, b"hdr", payload(5_000))
        assert server.bulk is None and holdings(server.address).bulk_port == 0
        with caplog.at_level(logging.INFO, logger="splice.agent"):
            got = fetch([server.address], JOB, WORKER)
        assert fetched(got) == (4, b"hdr", payload(5_000))
        assert f"from {server.address} over gRPC" in caplog.text
    finally:
        server.stop()


# ---- busy and stalled peers -----------------------------------------------------------------

class Noted(logging.Handler):
    """Sets `event` once a record's message contains `text`."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text, self.event = text, threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.event.set()


@contextlib.contextmanager
def noting(text: str) -> Iterator[threading.Event]:
    """An event set when the "splice.agent" logger logs a message containing `text`."""
    handler, logger = Noted(text), logging.getLogger("splice.agent")
    logger.addHandler(handler)
    try:
        yield handler.event
    finally:
        logger.removeHandler(handler)


def stalled_fetch(port: int, worker: str) -> socket.socket:
    """A fetcher that sends its request, reads the reply header, and then reads nothing."""
    conn = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE_S)
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    raw = request(worker).SerializeToString()
    conn.sendall(bulk.MAGIC + U32.pack(len(raw)) + raw)
    assert read_reply(conn).HasField("header")  # the transfer is under way
    return conn


def test_a_busy_peer_refuses_and_a_stalled_fetcher_is_dropped() -> None:
    big, small = bytes(64 * MiB), payload(10_000, 5)  # big: far more than socket buffers
    server = bulk.BulkServer(source_of({"big": big, "small": small}), "127.0.0.1",
                             max_transfers=1, stall_timeout_s=1.0)
    conn = None
    try:
        with noting(f"bulk fetch of {JOB}/big step newest ended early") as dropped:
            conn = stalled_fetch(server.port, "big")
            with pytest.raises(ReplicaBusy, match="1 transfers under way here; retry"):
                bulk.fetch("127.0.0.1", server.port, request("small"), timeout_s=DEADLINE_S)
            assert dropped.wait(DEADLINE_S), "the stalled fetcher was never dropped"
        deadline = time.monotonic() + DEADLINE_S
        while True:  # its slot is freed just after the log line
            try:
                got = bulk.fetch("127.0.0.1", server.port, request("small"),
                                 timeout_s=DEADLINE_S)
                break
            except ReplicaBusy:
                assert time.monotonic() < deadline, "the slot was never freed"
        assert fetched(got) == (1, b"meta", small)
        conn.settimeout(DEADLINE_S)
        assert drain(conn) < len(big)  # cut off, not sent everything after all
    finally:
        if conn is not None:
            conn.close()
        server.close()


# ---- closing under way ----------------------------------------------------------------------

def refused(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2.0):
            return False
    except ConnectionRefusedError:
        return True


@pytest.mark.parametrize("secure", [False, True], ids=["plaintext", "tls"])
def test_closing_the_server_ends_a_fetch_under_way(pki: dict[str, str], secure: bool) -> None:
    entered, release = threading.Event(), threading.Event()
    serve_snapshot = source_of({WORKER: b"late"})

    def lookup(r: pb.FetchRequest) -> bulk.Source:
        entered.set()
        release.wait(DEADLINE_S)
        return serve_snapshot(r)

    tls = role(pki, "agent")
    server = bulk.BulkServer(lookup, "127.0.0.1",
                             tls=ssl_server_context(tls) if secure else None)
    outcome: list[Any] = []

    def fetch_it() -> None:
        try:
            outcome.append(bulk.fetch("127.0.0.1", server.port, request(),
                                      tls=ssl_client_context(tls) if secure else None,
                                      server_name=AGENT_SERVER_NAME, timeout_s=DEADLINE_S))
        except Exception as e:  # any outcome is checked below
            outcome.append(e)

    fetcher = threading.Thread(target=fetch_it, daemon=True)
    with noting(f"{JOB}/{WORKER} step newest ended early") as server_done:
        try:
            fetcher.start()
            assert entered.wait(DEADLINE_S)
            server.close()
            fetcher.join(timeout=3.0)
            assert not fetcher.is_alive(), "the fetch still waits on a closed server"
            assert isinstance(outcome[0], ReplicationError), outcome
            assert refused(server.port)
        finally:
            release.set()
            fetcher.join(timeout=DEADLINE_S)
            if outcome and not isinstance(outcome[0], bulk.Received):
                # The server's thread, released, finds its connection gone: let it end
                # here, not in the next test.
                server_done.wait(DEADLINE_S)
            server.close()


def test_closing_the_server_cuts_a_transfer_mid_data() -> None:
    big = bytes(64 * MiB)
    server = bulk.BulkServer(source_of({"big": big}), "127.0.0.1")
    conn = None
    try:
        conn = stalled_fetch(server.port, "big")
        server.close()
        assert drain(conn) < len(big)  # the stream ends (not a timeout) and is incomplete
        assert refused(server.port)
    finally:
        if conn is not None:
            conn.close()
        server.close()


# ---- mutual TLS -----------------------------------------------------------------------------

def provider_of(data: bytes) -> Callable[[str, str, int], tuple[int, bytes, bytes] | None]:
    return lambda job, worker, step: (5, b"meta", data) if worker == WORKER else None


@pytest.fixture
def tls_holder(pki: dict[str, str]) -> Iterator[tuple[TLSConfig, PeerServer]]:
    tls = role(pki, "agent")
    server = serve(ReplicaStore(0, job_id=JOB), "localhost:0", provider_of(payload(90_000, 8)),
                   credentials=server_credentials(tls), bulk_tls=ssl_server_context(tls))
    try:
        yield tls, server
    finally:
        server.stop()


def test_mutual_tls_fetches_over_the_bulk_port(tls_holder: tuple[TLSConfig, PeerServer],
                                               caplog: pytest.LogCaptureFixture) -> None:
    tls, server = tls_holder
    assert server.bulk is not None
    assert holdings(server.address, channel_credentials(tls)).bulk_port == server.bulk.port
    with caplog.at_level(logging.INFO, logger="splice.agent"):
        got = fetch([server.address], JOB, WORKER, credentials=channel_credentials(tls),
                    bulk_tls=ssl_client_context(tls))
    assert fetched(got) == (5, b"meta", payload(90_000, 8))
    assert f"from {server.address} over its bulk port" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="splice.agent"):  # no context for the port
        got = fetch([server.address], JOB, WORKER, credentials=channel_credentials(tls))
    assert fetched(got) == (5, b"meta", payload(90_000, 8))
    assert f"from {server.address} over gRPC" in caplog.text


def test_a_tls_service_without_a_bulk_context_serves_no_plaintext_port(
        pki: dict[str, str], caplog: pytest.LogCaptureFixture) -> None:
    tls = role(pki, "agent")
    server = serve(ReplicaStore(0, job_id=JOB), "localhost:0", provider_of(b"abc"),
                   credentials=server_credentials(tls))
    try:
        assert server.bulk is None
        assert holdings(server.address, channel_credentials(tls)).bulk_port == 0
        with caplog.at_level(logging.INFO, logger="splice.agent"):
            got = fetch([server.address], JOB, WORKER, credentials=channel_credentials(tls),
                        bulk_tls=ssl_client_context(tls))
        assert fetched(got) == (5, b"meta", b"abc")
        assert f"from {server.address} over gRPC" in caplog.text
    finally:
        server.stop()


def mixed_context(pki: dict[str, str], other_pki: dict[str, str]) -> ssl.SSLContext:
    """Trusts the job's CA, but presents a certificate from another CA."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=pki["ca"])
    ctx.load_cert_chain(other_pki["agent_cert"], other_pki["agent_key"])
    return ctx


@pytest.mark.parametrize("client", ["plaintext", "other-ca", "other-ca-certificate"])
def test_the_tls_bulk_port_serves_only_the_jobs_certificates(
        tls_holder: tuple[TLSConfig, PeerServer], pki: dict[str, str],
        other_pki: dict[str, str], client: str) -> None:
    tls, server = tls_holder
    assert server.bulk is not None
    context = {"plaintext": None, "other-ca": ssl_client_context(role(other_pki, "agent")),
               "other-ca-certificate": mixed_context(pki, other_pki)}[client]
    with pytest.raises(ReplicationError):
        bulk.fetch("127.0.0.1", server.bulk.port, request(), tls=context,
                   server_name=AGENT_SERVER_NAME, timeout_s=DEADLINE_S)
    got = bulk.fetch("127.0.0.1", server.bulk.port, request(), tls=ssl_client_context(tls),
                     server_name=AGENT_SERVER_NAME, timeout_s=DEADLINE_S)
    assert fetched(got) == (5, b"meta", payload(90_000, 8))  # refusing wedged nothing
