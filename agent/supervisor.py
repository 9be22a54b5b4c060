"""Launches a node's worker processes and reports each exit the moment it happens.

One thread per worker blocks in wait(); its exit reaches the callback within milliseconds.
The supervisor never kills a surviving worker because another one died: the survivors are
the job. It only forwards termination signals that the agent itself received.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

log = logging.getLogger("splice.agent")


@dataclass(frozen=True)
class Exit:
    worker_id: str
    pid: int
    exit_code: int
    signal: int


class Supervisor:
    def __init__(self, on_exit: Callable[[Exit], None]) -> None:
        self._on_exit = on_exit
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._lock = threading.Lock()
        self._done = threading.Condition(self._lock)
        self._live = 0
        self._alive: set[str] = set()

    def launch(self, worker_id: str, argv: Sequence[str], env: Mapping[str, str]) -> int:
        proc = subprocess.Popen(list(argv), env=dict(env), close_fds=True)
        with self._lock:
            self._procs[worker_id] = proc
            self._live += 1
            self._alive.add(worker_id)
        threading.Thread(target=self._watch, args=(worker_id, proc), daemon=True,
                         name=f"splice-watch-{worker_id}").start()
        return proc.pid

    def _watch(self, worker_id: str, proc: subprocess.Popen[bytes]) -> None:
        code = proc.wait()
        sig = -code if code < 0 else 0
        self._on_exit(Exit(worker_id, proc.pid, 0 if sig else code, sig))
        with self._lock:
            self._live -= 1
            self._alive.discard(worker_id)
            self._done.notify_all()

    @property
    def live(self) -> int:
        """Worker processes still running."""
        with self._lock:
            return self._live

    def pids(self) -> dict[str, int]:
        with self._lock:
            return {w: p.pid for w, p in self._procs.items()}

    def wait_all(self, timeout_s: float | None = None) -> bool:
        with self._lock:
            return self._done.wait_for(lambda: self._live == 0, timeout=timeout_s)

    def wait_until(self, predicate: Callable[[set[str]], bool],
                   timeout_s: float | None = None) -> bool:
        """Block until `predicate(ids of workers still running)` holds."""
        with self._lock:
            return self._done.wait_for(lambda: predicate(set(self._alive)), timeout=timeout_s)

    def signal_all(self, sig: int) -> None:
        """Forward a signal the agent received (Ctrl-C, SIGTERM) to every live worker."""
        with self._lock:
            procs = [p for p in self._procs.values() if p.poll() is None]
        for p in procs:
            try:
                os.kill(p.pid, sig)
            except ProcessLookupError:
                pass

    def signal(self, worker_id: str, sig: int) -> bool:
        """Send `sig` to one worker (the controller's verdict on a hang's culprit)."""
        with self._lock:
            proc = self._procs.get(worker_id)
        if proc is None or proc.poll() is not None:
            return False
        try:
            os.kill(proc.pid, sig)
        except ProcessLookupError:
            return False
        return True

    def kill_all(self) -> None:
        self.signal_all(signal.SIGKILL)
