"""The agent's side of the worker channel: a Unix socket server, one thread per worker.

A worker must say hello (its worker id and pid) before anything else; a connection that
sends garbage, speaks for another worker or skips the hello is closed, and what it sent
is dropped.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable

from splice.agent.framing import FrameError, encode, read_frame
from splice.proto import local_pb2 as lpb

log = logging.getLogger("splice.agent")


class LocalServer:
    def __init__(self, path: str, expected_workers: set[str],
                 on_message: Callable[[str, lpb.WorkerToAgent], None],
                 on_disconnect: Callable[[str], None]) -> None:
        self.path = path
        self._expected = expected_workers
        self._on_message = on_message
        self._on_disconnect = on_disconnect
        self._conns: dict[str, socket.socket] = {}
        self._send_locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if os.path.exists(path):
            os.unlink(path)
        self._sock.bind(path)
        self._sock.listen(64)
        self._closed = False
        threading.Thread(target=self._accept, name="splice-local-accept", daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True,
                             name="splice-local-conn").start()

    def _serve(self, conn: socket.socket) -> None:
        wid = ""
        try:
            hello = read_frame(conn, lpb.WorkerToAgent)
            if hello is None:
                return
            if hello.WhichOneof("kind") != "hello" or hello.hello.worker_id not in self._expected:
                log.warning("closing a worker connection: first frame must be a hello from one "
                            "of %s, got %s", sorted(self._expected), hello.WhichOneof("kind"))
                return
            wid = hello.hello.worker_id
            with self._lock:
                if wid in self._conns:
                    log.warning("closing a second connection claiming to be %s", wid)
                    wid = ""
                    return
                self._conns[wid] = conn
                self._send_locks[wid] = threading.Lock()
            self._on_message(wid, hello)
            while True:
                msg = read_frame(conn, lpb.WorkerToAgent)
                if msg is None:
                    return
                if msg.WhichOneof("kind") == "hello":
                    raise FrameError("a second hello on one connection")
                self._on_message(wid, msg)
        except FrameError as e:
            log.warning("closing connection of worker %s: %s", wid or "(no hello)", e)
        except OSError:
            pass
        finally:
            conn.close()
            if wid:
                with self._lock:
                    self._conns.pop(wid, None)
                self._on_disconnect(wid)

    def send(self, wid: str, message: lpb.AgentToWorker) -> bool:
        with self._lock:
            conn = self._conns.get(wid)
            lock = self._send_locks.get(wid)
        if conn is None or lock is None:
            return False
        data = encode(message)
        try:
            with lock:
                conn.sendall(data)
            return True
        except OSError:
            return False

    def broadcast(self, message: lpb.AgentToWorker) -> None:
        with self._lock:
            wids = list(self._conns)
        for w in wids:
            self.send(w, message)

    def close(self) -> None:
        # shutdown() before close(): closing alone does not wake a thread blocked in
        # accept() or recv() on Linux.
        self._closed = True
        with self._lock:
            conns = list(self._conns.values())
        for s in (self._sock, *conns):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
