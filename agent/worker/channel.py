"""The worker's side of the agent channel: a Unix socket and one reader thread.

The reader thread is the control path. A new membership aborts the current epoch's
collectives right there, without waiting for the training thread to look: that is what
unblocks a rank stuck in an all-reduce within milliseconds of the controller's decision.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable

from splice.agent.framing import FrameError, encode, read_frame
from splice.proto import controller_pb2 as pb
from splice.proto import local_pb2 as lpb

log = logging.getLogger("splice.worker")


class AgentLost(Exception):
    """The agent's channel closed; this worker can no longer be steered and should exit."""


class AgentLink:
    def __init__(self, path: str, worker_id: str,
                 on_membership: Callable[[pb.Membership], None],
                 on_closed: Callable[[str], None] = lambda reason: None) -> None:
        self.worker_id = worker_id
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.connect(path)
        self._send_lock = threading.Lock()
        self._cond = threading.Condition()
        self._membership: pb.Membership | None = None
        self._resumes: dict[int, pb.Resume] = {}
        self._closed: str | None = None
        self._on_membership = on_membership
        self._on_closed = on_closed
        # An on-demand replica check was asked for (the hook folds it into its next
        # gradient all-reduce, so every rank runs the check at the same step).
        self.check_requested = False
        self.send(lpb.WorkerToAgent(hello=lpb.WorkerHello(worker_id=worker_id, pid=os.getpid())))
        threading.Thread(target=self._read, name="splice-agent-link", daemon=True).start()

    def send(self, message: lpb.WorkerToAgent) -> None:
        data = encode(message)
        with self._send_lock:
            try:
                self._sock.sendall(data)
            except OSError as e:
                raise AgentLost(f"agent channel closed: {e}") from e

    def _read(self) -> None:
        reason = "agent closed the channel"
        try:
            while True:
                msg = read_frame(self._sock, lpb.AgentToWorker)
                if msg is None:
                    break
                kind = msg.WhichOneof("kind")
                if kind == "membership":
                    self._take_membership(msg.membership)
                elif kind == "resume":
                    with self._cond:
                        self._resumes[msg.resume.epoch] = msg.resume
                        self._cond.notify_all()
                elif kind == "check_replicas":
                    self.check_requested = True
                elif kind == "refusal":
                    log.warning("controller refused: %s", msg.refusal.message)
                elif kind == "shutdown":
                    reason = f"shutdown: {msg.shutdown.reason}"
                    break
        except (FrameError, OSError) as e:
            reason = f"agent channel failed: {e}"
        with self._cond:
            self._closed = reason
            self._cond.notify_all()
        self._on_closed(reason)

    def _take_membership(self, m: pb.Membership) -> None:
        with self._cond:
            if self._membership is not None and m.epoch <= self._membership.epoch:
                log.info("ignoring stale membership of epoch %d", m.epoch)
                return
            self._membership = m
            self._cond.notify_all()
        self._on_membership(m)

    def latest_membership(self) -> pb.Membership | None:
        with self._cond:
            return self._membership

    def wait(self, predicate: Callable[[], bool], timeout_s: float) -> bool:
        """Wait until `predicate()` holds (evaluated under the channel's lock) or time runs
        out; raises AgentLost when the channel closes first."""
        with self._cond:
            ok = self._cond.wait_for(lambda: predicate() or self._closed is not None,
                                     timeout=timeout_s)
            if self._closed is not None and not predicate():
                raise AgentLost(self._closed)
            return ok

    def membership_newer_than(self, epoch: int) -> pb.Membership | None:
        m = self._membership
        return m if m is not None and m.epoch > epoch else None

    def resume_for(self, epoch: int) -> pb.Resume | None:
        return self._resumes.get(epoch)

    def notify(self) -> None:
        """Wake `wait` callers so they re-check state changed outside the channel."""
        with self._cond:
            self._cond.notify_all()

    def close(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
