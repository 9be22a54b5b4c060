"""Per-worker progress counters in shared memory: written by the hook, read by the agent.

The agent reads them directly, so a worker wedged inside a C++ collective or holding the
GIL is still observed: its counters simply stop moving. One 128-byte record per worker,
guarded by a sequence lock (odd generation while a write is in progress) so the reader never
sees a torn record. Wall-clock nanoseconds, comparable across processes on a node.
"""

from __future__ import annotations

import mmap
import os
import struct
import threading
import time
from dataclasses import dataclass

_RECORD = struct.Struct("<16q")
SIZE = _RECORD.size
(GEN, EPOCH, STEP, SEQ_IN, SEQ_OUT, IN_SINCE, LAST_PROGRESS, OP, OP_BYTES, PID,
 COMPUTE_NS, WAIT_NS, BYTES_TOTAL, HEARTBEAT) = range(14)
OPS = ("", "all_reduce", "broadcast", "all_gather", "barrier")


@dataclass(frozen=True)
class Progress:
    epoch: int
    step: int
    seq_entered: int
    seq_exited: int
    in_collective_since_s: float  # 0.0 when not inside a collective
    last_progress_s: float
    op: str
    op_bytes: int
    pid: int
    # Beaten by a thread of its own: it goes on while the training thread computes or
    # sleeps, and stops when the whole process is stopped or wedged holding the GIL.
    heartbeat_s: float


def create(path: str) -> None:
    """Make a zeroed record (the agent does this before launching the worker)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, bytes(SIZE))
    finally:
        os.close(fd)


def _map(path: str) -> mmap.mmap:
    fd = os.open(path, os.O_RDWR)
    try:
        return mmap.mmap(fd, SIZE)
    finally:
        os.close(fd)


class ProgressWriter:
    """The hook's side. Thread-safe: collectives may complete on gloo's threads."""

    def __init__(self, path: str) -> None:
        self._mm = _map(path)
        self._v = list(_RECORD.unpack_from(self._mm))
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._v[PID] = os.getpid()
        self._write()

    def _write(self) -> None:
        v = self._v
        v[GEN] += 1  # odd: a write is in progress
        struct.pack_into("<q", self._mm, 0, v[GEN])
        _RECORD.pack_into(self._mm, 0, *v)
        v[GEN] += 1  # even: complete
        struct.pack_into("<q", self._mm, 0, v[GEN])

    def begin_epoch(self, epoch: int, step: int) -> None:
        with self._lock:
            now = time.time_ns()
            v = self._v
            v[EPOCH], v[STEP], v[SEQ_IN], v[SEQ_OUT] = epoch, step, 0, 0
            v[IN_SINCE], v[LAST_PROGRESS] = 0, now
            self._write()

    def step(self, step: int) -> None:
        with self._lock:
            self._v[STEP], self._v[LAST_PROGRESS] = step, time.time_ns()
            self._write()

    def enter(self, op: str, num_bytes: int) -> None:
        with self._lock:
            now = time.time_ns()
            v = self._v
            v[SEQ_IN] += 1
            v[IN_SINCE], v[LAST_PROGRESS] = now, now
            v[OP], v[OP_BYTES] = OPS.index(op), num_bytes
            v[BYTES_TOTAL] += num_bytes
            self._write()

    def exit(self) -> None:
        with self._lock:
            v = self._v
            v[SEQ_OUT] += 1
            v[IN_SINCE], v[LAST_PROGRESS] = 0, time.time_ns()
            self._write()

    def beat(self) -> None:
        with self._lock:
            self._v[HEARTBEAT] = time.time_ns()
            self._write()

    def start_heartbeat(self, interval_s: float = 0.1) -> None:
        """Beat from a daemon thread until the process ends."""
        def run() -> None:
            while not self._closed.wait(interval_s):  # a period, not synchronisation
                self.beat()

        self.beat()
        threading.Thread(target=run, name="splice-heartbeat", daemon=True).start()

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            self._mm.close()


class ProgressReader:
    """The agent's side: a consistent copy of the record, or None if the writer keeps
    rewriting it faster than we can read (a few retries)."""

    def __init__(self, path: str) -> None:
        self._mm = _map(path)

    def read(self) -> Progress | None:
        for _ in range(100):
            v = _RECORD.unpack_from(self._mm)
            if v[GEN] % 2 == 0 and struct.unpack_from("<q", self._mm, 0)[0] == v[GEN]:
                return Progress(
                    epoch=v[EPOCH], step=v[STEP], seq_entered=v[SEQ_IN], seq_exited=v[SEQ_OUT],
                    in_collective_since_s=v[IN_SINCE] / 1e9,
                    last_progress_s=v[LAST_PROGRESS] / 1e9,
                    op=OPS[v[OP]] if 0 <= v[OP] < len(OPS) else "?", op_bytes=v[OP_BYTES],
                    pid=v[PID], heartbeat_s=v[HEARTBEAT] / 1e9)
        return None

    def close(self) -> None:
        self._mm.close()
