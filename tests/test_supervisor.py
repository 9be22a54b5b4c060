"""The supervisor's exit reports (agent/supervisor.py): each worker's exit is reported
exactly once, as soon as the kernel has begun tearing the process down (read from
/proc/<pid>/stat) or, failing that, when wait() reaps it."""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path

import pytest

from splice.agent import supervisor as sup
from splice.agent.supervisor import Exit, Supervisor, decode_status, exiting_status

TIMEOUT_S = 30.0
# A child that lives until the test kills it (60 s at most).
BLOCK = [sys.executable, "-c", "import time; time.sleep(60)"]


def _stat(flags: int, status: int, name: str = "python3") -> bytes:
    # pid (name) state ppid ... : fields 3 .. 52, flags is field 9, exit_code field 52.
    rest = ["S", "1"] + ["0"] * 48
    rest[6], rest[49] = str(flags), str(status)
    return f"4242 ({name}) {' '.join(rest)}\n".encode()


def test_a_stat_line_of_an_exiting_task_gives_its_wait_status() -> None:
    assert exiting_status(_stat(0x4 | 0x40, 9)) == 9
    assert exiting_status(_stat(0x4, 3 << 8)) == 3 << 8
    # A name with spaces and parentheses does not shift the fields.
    assert exiting_status(_stat(0x4, 9, name="a) b (c")) == 9


@pytest.mark.parametrize("stat", [
    _stat(0x40, 9),          # not exiting (yet)
    _stat(0x4, 0),           # exiting, status not set yet, or a clean exit: wait() reports it
    b"4242 (python3) S 1 0",  # truncated
    b"garbage",
    _stat(0x4, 9).replace(b" 9\n", b" x\n"),
])
def test_other_stat_lines_give_nothing(stat: bytes) -> None:
    assert exiting_status(stat) is None


def test_wait_statuses_decode_as_wait_reports_them() -> None:
    assert decode_status(9) == (0, 9)
    assert decode_status(11 | 0x80) == (0, 11)  # core dumped
    assert decode_status(3 << 8) == (3, 0)
    assert decode_status(0) == (0, 0)


class _Exits:
    def __init__(self) -> None:
        self.got: list[Exit] = []
        self.cond = threading.Condition()
        self.alive_when_reported: list[bool] = []

    def __call__(self, ex: Exit) -> None:
        with self.cond:
            self.got.append(ex)
            self.cond.notify_all()

    def wait_for(self, n: int) -> list[Exit]:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.got) >= n, TIMEOUT_S), self.got
            return list(self.got)


@pytest.mark.parametrize("poll_s", [0.005, 0.0])
def test_a_killed_worker_is_reported_once_with_its_signal(poll_s: float) -> None:
    exits = _Exits()
    s = Supervisor(exits, exit_poll_s=poll_s)
    pid = s.launch("node-0/0", BLOCK, dict(os.environ))
    os.kill(pid, signal.SIGKILL)
    assert exits.wait_for(1) == [Exit("node-0/0", pid, 0, signal.SIGKILL)]
    assert s.wait_all(TIMEOUT_S) and s.live == 0
    assert exits.got == [Exit("node-0/0", pid, 0, signal.SIGKILL)]  # not again at the reap


@pytest.mark.parametrize("code", [0, 3])
def test_an_exit_code_is_reported_once(code: int) -> None:
    exits = _Exits()
    s = Supervisor(exits, exit_poll_s=0.005)
    pid = s.launch("node-0/1", [sys.executable, "-c", f"raise SystemExit({code})"],
                   dict(os.environ))
    assert exits.wait_for(1) == [Exit("node-0/1", pid, code, 0)]
    assert s.wait_all(TIMEOUT_S)
    assert exits.got == [Exit("node-0/1", pid, code, 0)]


def test_a_teardown_seen_in_proc_is_reported_before_the_process_is_reaped(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A stand-in /proc in which the live child already reads as exiting (killed by
    # signal 9): the poller reports it while wait() is still blocked.
    exits = _Exits()
    s = Supervisor(exits, exit_poll_s=0.005)
    s._proc_root = str(tmp_path)
    pid = s.launch("node-1/0", BLOCK, dict(os.environ))
    (tmp_path / str(pid)).mkdir()
    (tmp_path / str(pid) / "stat").write_bytes(_stat(0x4, 9))
    try:
        assert exits.wait_for(1) == [Exit("node-1/0", pid, 0, 9)]
        assert s.live == 1  # still running: counted live until reaped
        with open(f"/proc/{pid}/stat", "rb") as f:  # the real one: not exiting at all
            assert exiting_status(f.read()) is None
    finally:
        os.kill(pid, signal.SIGKILL)
    assert s.wait_all(TIMEOUT_S)
    assert exits.got == [Exit("node-1/0", pid, 0, 9)]


def test_without_proc_exits_come_from_wait_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sup, "_PROC", "/nonexistent-proc")
    exits = _Exits()
    s = Supervisor(exits, exit_poll_s=0.005)
    assert s._poller is None
    pid = s.launch("node-0/0", BLOCK, dict(os.environ))
    assert s._poller is None  # no poller thread is started
    os.kill(pid, signal.SIGKILL)
    assert exits.wait_for(1) == [Exit("node-0/0", pid, 0, signal.SIGKILL)]
    assert s.wait_all(TIMEOUT_S)
