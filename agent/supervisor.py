"""Launches a node's worker processes and reports each exit the moment it happens.

One thread per worker blocks in wait(). That returns only once the kernel has torn the
process down, which for a worker killed with a few hundred MB of memory on busy cores
takes 0.1-0.9 s (measured: 280-900 ms for a 480 MB process beside two busy loops on two
cores). On Linux a poller therefore also reads each live worker's /proc/<pid>/stat every
`exit_poll_s`: a task the kernel has begun to tear down has PF_EXITING among its flags
and, from then on, its wait status in the exit_code field, which for a death by a signal
or a non-zero exit is reported at once (5-10 ms after a SIGKILL in the same measurement).
An exit with status 0 waits for wait(). Each exit is reported once, by whichever sees it
first; a worker counts as live until it is reaped.

The supervisor never kills a surviving worker because another one died: the survivors are
the job. It only forwards termination signals that the agent itself received.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

log = logging.getLogger("splice.agent")


@dataclass(frozen=True)
class Exit:
    worker_id: str
    pid: int
    exit_code: int
    signal: int


_PF_EXITING = 0x4  # include/linux/sched.h
_PROC = "/proc"


def exiting_status(stat: bytes) -> int | None:
    """The wait status in a /proc/<pid>/stat line of a task being torn down (PF_EXITING
    in its flags, field 9; the status in exit_code, field 52, Linux >= 3.5), or None while
    it is not exiting or its status is not set yet (or is 0: a clean exit is left to
    wait())."""
    rest = stat[stat.rfind(b")") + 2:]  # the name, in parentheses, may hold spaces
    head = rest.split(maxsplit=7)  # the flags first: most reads stop there
    try:
        if len(head) < 8 or not int(head[6]) & _PF_EXITING:
            return None
        fields = rest.split()
        status = int(fields[49]) if len(fields) >= 50 else 0
    except ValueError:
        return None
    return status or None


def decode_status(status: int) -> tuple[int, int]:
    """(exit code, signal) of a wait status, as `Exit` carries them."""
    sig = status & 0x7F
    return (0, sig) if sig else ((status >> 8) & 0xFF, 0)


class Supervisor:
    def __init__(self, on_exit: Callable[[Exit], None], *, exit_poll_s: float = 0.02) -> None:
        """`exit_poll_s`: how often live workers' /proc entries are read for an exit the
        kernel has begun (module docstring); 0 leaves exits to wait() alone."""
        self._on_exit = on_exit
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._lock = threading.Lock()
        self._done = threading.Condition(self._lock)
        self._live = 0
        self._alive: set[str] = set()
        self._reported: set[str] = set()
        # Live workers' /proc/<pid>/stat, opened by the poller (None: not yet).
        self._stats: dict[str, int | None] = {}
        self._proc_root = _PROC
        self._exit_poll_s = exit_poll_s if os.path.isdir(_PROC) else 0.0
        self._poller: threading.Thread | None = None

    def launch(self, worker_id: str, argv: Sequence[str], env: Mapping[str, str]) -> int:
        proc = subprocess.Popen(list(argv), env=dict(env), close_fds=True)
        with self._lock:
            self._procs[worker_id] = proc
            self._live += 1
            self._alive.add(worker_id)
            self._reported.discard(worker_id)
            if self._exit_poll_s > 0:
                try:  # now, while the pid is surely this worker's (not reaped yet)
                    self._stats[worker_id] = os.open(f"{self._proc_root}/{proc.pid}/stat",
                                                     os.O_RDONLY)
                except OSError:
                    self._stats[worker_id] = None  # the poller tries again
                if self._poller is None:
                    self._poller = threading.Thread(target=self._poll, daemon=True,
                                                    name="splice-exit-poll")
                    self._poller.start()
        threading.Thread(target=self._watch, args=(worker_id, proc), daemon=True,
                         name=f"splice-watch-{worker_id}").start()
        return proc.pid

    def _report(self, worker_id: str, pid: int, status: int) -> None:
        """Report an exit unless it was reported already."""
        with self._lock:
            if worker_id in self._reported:
                return
            self._reported.add(worker_id)
        code, sig = decode_status(status)
        try:
            self._on_exit(Exit(worker_id, pid, code, sig))
        except Exception:  # the poller must outlive one failed report
            log.exception("handling the exit of %s (pid %d) failed", worker_id, pid)

    def _poll(self) -> None:
        """The poller thread: live workers whose teardown has begun are reported now.
        (The pid cannot be reused before the watch thread reaps it.)"""
        while True:
            time.sleep(self._exit_poll_s)  # a polling period, not synchronisation
            found = []
            with self._lock:  # the watch thread closes a reaped worker's fd under it
                for worker_id, fd in list(self._stats.items()):
                    proc = self._procs[worker_id]
                    pid = proc.pid
                    try:
                        if fd is None:
                            if proc.returncode is not None:
                                continue  # reaped: its pid may be another process's now
                            fd = self._stats[worker_id] = os.open(
                                f"{self._proc_root}/{pid}/stat", os.O_RDONLY)
                        status = exiting_status(os.pread(fd, 4096, 0))
                    except OSError:
                        continue  # not readable (yet): wait() reports it
                    if status is not None and worker_id not in self._reported:
                        found.append((worker_id, pid, status))
            for worker_id, pid, status in found:
                self._report(worker_id, pid, status)

    def _watch(self, worker_id: str, proc: subprocess.Popen[bytes]) -> None:
        code = proc.wait()
        with self._lock:
            fd = self._stats.pop(worker_id, None)
        if fd is not None:
            os.close(fd)
        self._report(worker_id, proc.pid, (-code) & 0x7F if code < 0 else (code & 0xFF) << 8)
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
