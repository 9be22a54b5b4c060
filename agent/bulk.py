"""Bulk snapshot transfer: a fetch as one raw byte stream, for the recovery path.

A joining worker fetches 100 MB or more from a peer agent while the job waits for it. Over
gRPC (agent/replication.py) each 1 MiB chunk is copied into a message, framed, parsed
and copied again on both sides: about 0.6 GB/s over loopback in Python. Here the same
snapshot goes over a plain TCP connection (mutual TLS when the agent has certificates):
the server writes meta and data straight from shared memory or the replica store, the
client reads them straight into their destination, and one CRC-32 taken in the same pass
on each side checks the whole. gRPC stays the control path: the client learns this port
from `List` (`Holdings.bulk_port`), and falls back to gRPC's Fetch when the port cannot
be reached.

The exchange (proto/peer.proto, BulkReply):

    client: b"SPB1", u32 length, FetchRequest
    server: u32 length, BulkReply     (a refusal ends the connection here)
            meta, data                (the header's sizes, raw)
            u32 CRC-32 of meta ++ data

Integers are big-endian. A replica's trailer is the checksum recorded when it arrived, so
damage at rest shows at the fetcher; the node's own snapshots get theirs taken as they go.
Bad requests (wrong magic, oversized or unparsable) get a MalformedStream refusal and
change nothing; a peer that stalls is dropped after `stall_timeout_s`.
"""

from __future__ import annotations

import logging
import socket
import ssl
import struct
import threading
import time
import zlib
from collections.abc import Callable
from typing import Any, NamedTuple

from google.protobuf.message import DecodeError

from splice.agent.replication_wire import (
    MAX_META_BYTES,
    Buffer,
    MalformedStream,
    MiB,
    ReplicaBusy,
    ReplicationError,
    SnapshotCorrupt,
    _byte_view,
    _check_header,
    refusal,
)
from splice.proto import peer_pb2 as pb

log = logging.getLogger("splice.agent")

MAGIC = b"SPB1"
MAX_REQUEST_BYTES = 64 * 1024
MAX_REPLY_BYTES = MAX_META_BYTES + 64 * 1024
PIECE_BYTES = MiB  # one CRC then one send per piece: the piece is still in cache for both
_U32 = struct.Struct(">I")


class BulkUnreachable(ReplicationError):
    """The bulk port could not be reached or did not complete the TLS handshake; the
    caller may use gRPC instead."""


class FetchCancelled(ReplicationError):
    """The fetcher gave the transfer up (its `cancelled` event was set)."""


class Source(NamedTuple):
    """What a fetch sends: the header (sizes filled in), meta, data, and the checksum to
    send after them (None: take it over the bytes as they go)."""

    header: pb.SnapshotHeader
    meta: Buffer
    data: Buffer
    checksum: int | None


# `lookup(request)` -> the Source, or raises the ReplicationError to refuse with.
Lookup = Callable[[pb.FetchRequest], Source]


def _recv_exact(conn: socket.socket, view: memoryview, crc: int | None = None,
                deadline: float | None = None,
                cancelled: threading.Event | None = None) -> int:
    """Fill `view` from `conn`; the CRC-32 of the bytes folded into `crc` when given.
    EOFError if the stream ends first, TimeoutError past `deadline` (time.monotonic),
    FetchCancelled once `cancelled` is set."""
    got, n = 0, len(view)
    while got < n:
        if cancelled is not None and cancelled.is_set():
            raise FetchCancelled(f"cancelled after {got} of {n} bytes")
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{got} of {n} bytes within the deadline")
            conn.settimeout(left)
        k = conn.recv_into(view[got:], min(n - got, 4 * MiB))
        if k == 0:
            raise EOFError(got)
        if crc is not None:
            crc = zlib.crc32(view[got:got + k], crc)
        got += k
    return crc or 0


def _read_frame(conn: socket.socket, limit: int, what: str,
                deadline: float | None = None) -> bytes:
    head = bytearray(4)
    _recv_exact(conn, memoryview(head), None, deadline)
    (n,) = _U32.unpack(head)
    if n > limit:
        raise MalformedStream(f"{what} of {n} bytes, over the {limit} limit")
    body = bytearray(n)
    _recv_exact(conn, memoryview(body), None, deadline)
    return bytes(body)


def _send_frame(conn: socket.socket, message: Any) -> None:
    raw = message.SerializeToString()
    conn.sendall(_U32.pack(len(raw)) + raw)


# ---- the server ----------------------------------------------------------------------------

class BulkServer:
    """Serves fetches on a TCP port of `host` (0: a free one), each connection on its own
    thread: at most `max_connections` open (more are closed at once) and `max_transfers`
    sending (a request beyond is refused with ReplicaBusy). A connection has
    `request_timeout_s` to complete the TLS handshake and its request; a transfer stalls
    at most `stall_timeout_s` and lasts at most `transfer_timeout_s`."""

    def __init__(self, lookup: Lookup, host: str, port: int = 0, *,
                 tls: ssl.SSLContext | None = None, max_transfers: int = 8,
                 max_connections: int = 64, request_timeout_s: float = 10.0,
                 stall_timeout_s: float = 60.0, transfer_timeout_s: float = 600.0) -> None:
        self._lookup, self._tls = lookup, tls
        self._max, self._max_connections = max_transfers, max_connections
        self._request_timeout_s, self._stall_timeout_s = request_timeout_s, stall_timeout_s
        self._transfer_timeout_s = transfer_timeout_s
        self._listener = socket.create_server((host, port), family=_family(host),
                                              backlog=64, reuse_port=False)
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._active = 0
        self._closed = False
        self._thread = threading.Thread(target=self._accept_loop, name="splice-bulk",
                                        daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop accepting and drop every connection (a transfer under way fails at its
        client, which tries the next holder)."""
        with self._lock:
            self._closed = True
            conns, self._open = list(self._open), set()
        try:
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()
        for conn in conns:
            _drop(conn)
        self._thread.join(timeout=5.0)

    def _accept_loop(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return  # closed
            with self._lock:
                if self._closed:
                    _drop(conn)
                    return
                if len(self._open) >= self._max_connections:
                    _drop(conn)  # a flood of idle connections gets no threads
                    continue
                self._open.add(conn)
            try:
                threading.Thread(target=self._serve, args=(conn,), daemon=True,
                                 name="splice-bulk-transfer").start()
            except RuntimeError as e:  # no thread to be had: this one is dropped
                log.warning("bulk port: cannot serve a connection (%s)", e)
                with self._lock:
                    self._open.discard(conn)
                _drop(conn)

    def _serve(self, conn: socket.socket) -> None:
        stream: socket.socket = conn
        what = "a bulk fetch"
        counted = False
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.settimeout(self._request_timeout_s)
            if self._tls is not None:
                stream = self._tls.wrap_socket(conn, server_side=True)
                with self._lock:  # the socket now is `stream`: close() must drop that
                    self._open.discard(conn)
                    self._open.add(stream)
                    if self._closed:
                        raise OSError("the server is closing")
            request = self._request(stream)
            what = (f"the bulk fetch of {request.job_id}/{request.worker_id} step "
                    f"{request.step or 'newest'}")
            with self._lock:  # a transfer slot, once a whole request is in
                counted = self._active < self._max
                self._active += counted
            if not counted:
                raise ReplicaBusy(f"{what}: {self._max} transfers under way here; retry")
            try:
                source = self._lookup(request)
            except ReplicationError:
                raise
            except Exception as e:  # e.g. a slot's file unreadable: the fetcher is told
                raise ReplicationError(f"{what}: cannot be read here ({e})") from e
            self._send(stream, source, time.monotonic() + self._transfer_timeout_s,
                       take_crc=not request.checked_by_fetcher)
        except ReplicationError as e:
            log.warning("%s refused: %s", what, e)
            try:
                _send_frame(stream, pb.BulkReply(refusal=type(e).__name__, error=str(e)))
            except OSError:
                pass
        except (OSError, EOFError) as e:  # the fetcher went away, stalled, or failed TLS
            log.warning("%s ended early: %s", what, e or type(e).__name__)
        finally:
            with self._lock:
                self._open.discard(conn)
                self._open.discard(stream)
                self._active -= counted
            _drop(stream)

    @staticmethod
    def _request(stream: socket.socket) -> pb.FetchRequest:
        magic = bytearray(4)
        _recv_exact(stream, memoryview(magic))
        if bytes(magic) != MAGIC:
            raise MalformedStream(f"not a bulk fetch (magic {bytes(magic)!r})")
        raw = _read_frame(stream, MAX_REQUEST_BYTES, "a request")
        try:
            return pb.FetchRequest.FromString(raw)
        except DecodeError as e:
            raise MalformedStream(f"malformed FetchRequest ({e})") from None

    def _send(self, stream: socket.socket, source: Source, deadline: float,
              take_crc: bool = True) -> None:
        meta, data = _byte_view(source.meta), _byte_view(source.data)
        header = pb.SnapshotHeader()
        header.CopyFrom(source.header)
        header.meta_bytes, header.data_bytes, header.checksum = len(meta), len(data), 0
        stream.settimeout(self._stall_timeout_s)
        _send_frame(stream, pb.BulkReply(header=header))
        crc = 0
        for buf in (meta, data):
            for i in range(0, len(buf), PIECE_BYTES):
                piece = buf[i:i + PIECE_BYTES]
                if source.checksum is None and take_crc:
                    crc = zlib.crc32(piece, crc)
                left = deadline - time.monotonic()
                if left <= 0:  # a fetcher reading a trickle holds no thread for ever
                    raise TimeoutError(f"not sent within {self._transfer_timeout_s:g} s")
                stream.settimeout(min(self._stall_timeout_s, left))
                stream.sendall(piece)
        stream.sendall(_U32.pack(crc if source.checksum is None else source.checksum))


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _drop(conn: socket.socket) -> None:
    try:
        conn.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    conn.close()


# ---- the client ----------------------------------------------------------------------------

def data_tensor(num_bytes: int, name: str) -> Any:
    """A uint8 tensor for a snapshot's data; MalformedStream when a peer announces more than
    this host can hold (the caller then tries the next holder)."""
    import torch

    try:
        return torch.empty(num_bytes, dtype=torch.uint8)
    except RuntimeError as e:
        raise MalformedStream(f"snapshot {name}: {num_bytes} bytes of data announced, which "
                              f"cannot be held here ({e})") from None


class Received(NamedTuple):
    header: pb.SnapshotHeader
    meta: bytes
    data: Any  # torch.Tensor, uint8, 1-D; what `into` gave when given


# `into(data_bytes, meta)` -> a writable buffer of `data_bytes` for the data to land in.
Into = Callable[[int, bytes], memoryview]


def fetch(host: str, port: int, request: pb.FetchRequest, *,
          tls: ssl.SSLContext | None = None, server_name: str = "",
          timeout_s: float = 300.0, connect_timeout_s: float = 2.0,
          into: Into | None = None, cancelled: threading.Event | None = None) -> Received:
    """One snapshot from the bulk port at host:port into a fresh tensor (or into what
    `into` gives once the meta is in), its checksum checked, all within `timeout_s`.

    BulkUnreachable if the port cannot be reached, the TLS handshake fails, or no reply
    comes within `connect_timeout_s` (the caller may use gRPC then); the server's refusal
    as its ReplicationError subclass; MalformedStream for a reply that does not parse or
    names another snapshot, or a stream cut short; SnapshotCorrupt when the bytes fail the
    checksum; FetchCancelled once `cancelled` is set (checked between reads). With
    `request.checked_by_fetcher` no CRC-32 is taken or checked: the caller checks the
    snapshot's own checksums (a stream-level check would read every byte once more on
    each side, ~30 ms per 100 MB on one idle core)."""
    deadline = time.monotonic() + timeout_s
    name = f"{request.job_id}/{request.worker_id} step {request.step or 'newest'}"
    try:
        conn = socket.create_connection((host, port), timeout=connect_timeout_s)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if tls is not None:
            conn = tls.wrap_socket(conn, server_hostname=server_name or host)
    except (OSError, ssl.SSLError) as e:
        raise BulkUnreachable(f"bulk port {host}:{port}: {e}") from None
    try:
        try:
            raw = request.SerializeToString()
            conn.sendall(MAGIC + _U32.pack(len(raw)) + raw)
            reply_raw = _read_frame(conn, MAX_REPLY_BYTES, "a reply",
                                    min(deadline, time.monotonic() + connect_timeout_s))
        except TimeoutError:
            raise BulkUnreachable(f"bulk port {host}:{port}: no reply to the fetch of {name} "
                                  f"within {connect_timeout_s:g} s") from None
        except (EOFError, ConnectionError) as e:  # e.g. turned away: too many connections
            raise BulkUnreachable(f"bulk port {host}:{port}: closed before replying to the "
                                  f"fetch of {name} ({type(e).__name__})") from None
        try:
            reply = pb.BulkReply.FromString(reply_raw)
        except DecodeError as e:
            raise MalformedStream(f"bulk fetch of {name}: malformed reply ({e})") from None
        if not reply.HasField("header"):
            raise refusal(reply.refusal, reply.error or f"bulk fetch of {name} refused")
        h = reply.header
        _check_header(h)
        if (h.job_id, h.worker_id) != (request.job_id, request.worker_id) or \
                request.step not in (0, h.step):
            raise MalformedStream(f"bulk fetch of {name}: sent {h.job_id}/{h.worker_id} "
                                  f"step {h.step}")
        meta = bytearray(h.meta_bytes)
        crc: int | None = None if request.checked_by_fetcher else 0
        crc = _recv_exact(conn, memoryview(meta), crc, deadline, cancelled)
        if into is None:
            data = data_tensor(h.data_bytes, name)
            view = data.numpy().data.cast("B")
        else:
            data = view = into(h.data_bytes, bytes(meta))
            if len(view) != h.data_bytes:
                raise ValueError(f"into() gave {len(view)} bytes for {h.data_bytes}")
        crc = _recv_exact(conn, view, None if request.checked_by_fetcher else crc, deadline,
                          cancelled)
        trailer = bytearray(4)
        _recv_exact(conn, memoryview(trailer), None, deadline, cancelled)
        (sent,) = _U32.unpack(trailer)
        if not request.checked_by_fetcher and crc != sent:
            raise SnapshotCorrupt(f"bulk fetch of {name}: checksum {crc:#010x} of the bytes "
                                  f"received, {sent:#010x} sent")
        return Received(h, bytes(meta), data)
    except EOFError as e:
        raise MalformedStream(f"bulk fetch of {name}: the stream ended early "
                              f"({e.args[0] if e.args else 0} bytes into a part)") from None
    except (OSError, ssl.SSLError) as e:  # TimeoutError included: past `timeout_s`
        raise ReplicationError(f"bulk fetch of {name}: {e}") from None
    finally:
        _drop(conn)
