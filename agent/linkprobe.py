"""Link probes: measure the network path between two nodes, to localise a slow link.

A link straggler shows up as ranks spending too long in their own transfers, but step
timings cannot tell *which* link is slow. So each agent runs a tiny TCP probe server on
its gloo address, and on the controller's request probes other agents' servers: the
median round trip of a few short pings, then the bandwidth of one bulk transfer. The
controller compares all pairs (controller/stragglers.py `localise_slow_link`).

Wire format, both ways: a 5-byte header (1 byte kind, 4 bytes big-endian length) and
`length` bytes. PING echoes its payload (at most 64 bytes); BULK is read and discarded,
then acknowledged with ACK whose length field is the byte count received. Anything else,
or a length over the bounds, closes the connection.

`delay_s` (the agent's SPLICE_PROBE_DELAY_S) makes a server answer each ping and each MiB
received that much later: a slow inbound link to that node, for tests and demos.
"""

from __future__ import annotations

import logging
import socket
import statistics
import struct
import threading
import time

log = logging.getLogger("splice.agent")

_HEADER = struct.Struct("!cI")
PING, BULK, ACK = b"P", b"B", b"A"
MAX_PING_BYTES = 64
MAX_BULK_BYTES = 64 * 1024 * 1024
_CHUNK = 64 * 1024
_MIB = 1024 * 1024


class ProbeError(Exception):
    """A probe did not complete (peer unreachable, timed out, or answered nonsense); the
    link is unmeasured this round, not known to be slow."""


def delay_from_env(value: str | None) -> float:
    """SPLICE_PROBE_DELAY_S as a number of seconds (0 when unset); ValueError if bad."""
    if not value:
        return 0.0
    delay = float(value)
    if not 0 <= delay <= 10:
        raise ValueError(f"SPLICE_PROBE_DELAY_S must be in [0, 10] seconds, got {value!r}")
    return delay


def _recv_exact(conn: socket.socket, n: int) -> bytes | None:
    """`n` bytes, or None if the peer closed before sending any of them."""
    buf = bytearray()
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            if buf:
                raise ConnectionError(f"peer closed after {len(buf)} of {n} bytes")
            return None
        buf += chunk
    return bytes(buf)


class ProbeServer:
    """Answers probes on HOST:PORT (port 0: a free one) until `close()`."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, delay_s: float = 0.0,
                 max_connections: int = 8, idle_timeout_s: float = 10.0) -> None:
        if delay_s < 0 or max_connections < 1 or idle_timeout_s <= 0:
            raise ValueError("delay_s must be >= 0, max_connections >= 1, "
                             "idle_timeout_s > 0")
        self.delay_s = delay_s
        # Each connection holds a thread; more concurrent probers than this are turned
        # away (a node is probed by at most its peers, one at a time each).
        self._max_connections = max_connections
        # A prober silent this long is dropped: a stalled peer cannot pin a thread.
        self._idle_timeout_s = idle_timeout_s
        self._sock = socket.create_server((host, port))
        self.port = int(self._sock.getsockname()[1])
        self.address = f"{host}:{self.port}"
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._conns: dict[socket.socket, threading.Thread] = {}
        self._accepter = threading.Thread(target=self._accept_loop, daemon=True,
                                          name="splice-probe-accept")
        self._accepter.start()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return  # closed
            with self._lock:
                if len(self._conns) >= self._max_connections or self._stop.is_set():
                    conn.close()
                    continue
                t = threading.Thread(target=self._serve, args=(conn,), daemon=True,
                                     name="splice-probe-conn")
                self._conns[conn] = t
            t.start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(self._idle_timeout_s)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while not self._stop.is_set():
                header = _recv_exact(conn, _HEADER.size)
                if header is None:
                    return
                kind, n = _HEADER.unpack(header)
                if kind == PING and n <= MAX_PING_BYTES:
                    payload = _recv_exact(conn, n) if n else b""
                    if payload is None:
                        return
                    if self.delay_s:
                        self._stop.wait(self.delay_s)  # the simulated slow link
                    conn.sendall(_HEADER.pack(PING, n) + payload)
                elif kind == BULK and 0 < n <= MAX_BULK_BYTES:
                    conn.sendall(_HEADER.pack(ACK, self._drain(conn, n)))
                else:
                    log.debug("probe server: closing a connection that sent kind %r "
                              "length %d", kind, n)
                    return
        except OSError as e:  # timeouts, resets, a peer gone mid-transfer
            log.debug("probe connection ended: %s", e)
        finally:
            conn.close()
            with self._lock:
                self._conns.pop(conn, None)

    def _drain(self, conn: socket.socket, n: int) -> int:
        received, delay_at = 0, _MIB
        while received < n:
            chunk = conn.recv(min(_CHUNK, n - received))
            if not chunk:
                raise ConnectionError(f"prober closed after {received} of {n} bytes")
            received += len(chunk)
            while self.delay_s and received >= delay_at:
                self._stop.wait(self.delay_s)
                delay_at += _MIB
        return received

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop accepting, end every connection and join the threads."""
        self._stop.set()
        try:
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        except OSError:
            pass
        self._sock.close()
        self._accepter.join(timeout_s)
        with self._lock:
            conns = dict(self._conns)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for t in conns.values():
            t.join(timeout_s)

    @property
    def connections(self) -> int:
        with self._lock:
            return len(self._conns)


def probe(address: str, payload_bytes: int = 4 * _MIB, timeout_s: float = 5.0, *,
          pings: int = 5) -> tuple[float, float]:
    """(median round trip in s, bandwidth in bytes/s) to the probe server at HOST:PORT.

    The whole probe must finish within `timeout_s`; ProbeError otherwise."""
    if not 0 < payload_bytes <= MAX_BULK_BYTES or pings < 1 or timeout_s <= 0:
        raise ValueError(f"payload_bytes must be in (0, {MAX_BULK_BYTES}], pings >= 1, "
                         f"timeout_s > 0")
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"probe address must be HOST:PORT, got {address!r}")
    deadline = time.monotonic() + timeout_s

    def left() -> float:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ProbeError(f"probe of {address} took over {timeout_s:.1f} s")
        return remaining

    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=left()) as s:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            rtts = []
            for i in range(pings):
                payload = struct.pack("!Q", i)
                s.settimeout(left())
                t0 = time.perf_counter()
                s.sendall(_HEADER.pack(PING, len(payload)) + payload)
                reply = _recv_exact(s, _HEADER.size + len(payload))
                rtts.append(time.perf_counter() - t0)
                if reply != _HEADER.pack(PING, len(payload)) + payload:
                    raise ProbeError(f"{address} answered a ping with {reply!r}")
            block = bytes(_CHUNK)
            t0 = time.perf_counter()
            s.settimeout(left())
            s.sendall(_HEADER.pack(BULK, payload_bytes))
            sent = 0
            while sent < payload_bytes:
                s.settimeout(left())
                n = min(_CHUNK, payload_bytes - sent)
                s.sendall(block[:n] if n < _CHUNK else block)
                sent += n
            s.settimeout(left())
            ack = _recv_exact(s, _HEADER.size)
            elapsed = time.perf_counter() - t0
    except OSError as e:
        raise ProbeError(f"probe of {address} failed: {e}") from e
    if ack != _HEADER.pack(ACK, payload_bytes):
        raise ProbeError(f"{address} acknowledged the bulk transfer with {ack!r}")
    return statistics.median(rtts), payload_bytes / max(elapsed, 1e-9)
