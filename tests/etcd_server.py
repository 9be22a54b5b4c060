"""A real etcd for tests and benchmarks: one member on loopback, free ports, a temporary data
directory, and the failures a store must survive (stop, SIGKILL, restart on the same ports
and data, so what was written persists).

Fixtures (add `from tests.etcd_server import etcd, etcd_shared  # noqa: F401` to
tests/conftest.py to offer them to every test module):
  etcd         a fresh server per test; for tests that stop or kill it
  etcd_shared  one server per module; give each test its own key prefix

Without the etcd binary the fixtures skip, except in CI (CI=true) where they fail: a CI run
that silently skipped every etcd test would prove nothing.

Also a contender process for leader-election tests and the failover benchmark:

    python -m tests.etcd_server contend --endpoints H:P --key K --identity I [--ttl-s 1]

prints one JSON line per event ({"event": "standby"|"leader"|"lost", "identity",
"t_monotonic", ...}; t_monotonic is CLOCK_MONOTONIC, comparable between processes) and holds leadership until killed or its stdin closes.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from splice.localetcd import ETCD_BINARY_ENV, EtcdServer, find_etcd_binary


def require_etcd_binary() -> str:
    """The etcd binary, or skip the test (fail it in CI, where a skip would hide a gap)."""
    binary = find_etcd_binary()
    if binary is None:
        reason = (f"etcd binary not found (PATH, /usr/bin/etcd or ${ETCD_BINARY_ENV}); "
                  "install etcd-server (Debian) to run the etcd store and election tests")
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason + " -- required in CI")
        pytest.skip(reason)
    return binary


def started_etcd() -> EtcdServer:
    server = EtcdServer(require_etcd_binary())
    try:
        server.start()
    except BaseException:
        server.close()
        raise
    return server


@pytest.fixture
def etcd() -> Iterator[EtcdServer]:
    """A fresh etcd for this test alone (it may stop, kill or restart it)."""
    with started_etcd() as server:
        yield server


@pytest.fixture(scope="module")
def etcd_shared() -> Iterator[EtcdServer]:
    """One etcd for the module: tests must use their own key prefix and leave it running."""
    with started_etcd() as server:
        yield server


# ---- a contender in its own process (so that it can be SIGKILLed) -------------------------


class Contender:
    """`python -m tests.etcd_server contend ...` as a child process, with its events."""

    def __init__(self, endpoints: str, key: str, identity: str, ttl_s: float = 1.0) -> None:
        self.identity = identity
        repo = str(Path(__file__).resolve().parent.parent)
        env = {**os.environ, "PYTHONPATH": repo + os.pathsep + os.environ.get("PYTHONPATH", "")}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.etcd_server", "contend", "--endpoints", endpoints,
             "--key", key, "--identity", identity, "--ttl-s", str(ttl_s)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=repo, env=env,
            start_new_session=True)
        self._events: list[dict] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self._events.append(json.loads(line))
                self._cond.notify_all()
        with self._cond:
            self._events.append({"event": "exited"})
            self._cond.notify_all()

    def wait_event(self, name: str, timeout_s: float) -> dict:
        """The first event called `name`; TimeoutError if none comes within `timeout_s`."""
        with self._cond:
            found = self._cond.wait_for(
                lambda: any(e["event"] in (name, "exited") for e in self._events), timeout_s)
            for e in self._events:
                if e["event"] == name:
                    return e
        raise TimeoutError(f"contender {self.identity}: no {name!r} event within {timeout_s} s"
                           f" (events: {self._events if found else 'none in time'})")

    def signal(self, sig: signal.Signals) -> None:
        os.killpg(self.proc.pid, sig)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()
        self._reader.join(timeout=5)


def _contend(args: argparse.Namespace) -> None:
    from splice.controller.etcd_store import EtcdStateStore
    from splice.controller.leader import LeaderElection

    def emit(event: str, **fields: object) -> None:
        print(json.dumps({"event": event, "identity": args.identity,
                          "t_monotonic": time.monotonic(), **fields}), flush=True)

    store = EtcdStateStore(args.endpoints, timeout_s=1.0)
    election = LeaderElection(store, args.key, args.identity, ttl_s=args.ttl_s,
                              on_lost=lambda reason: emit("lost", reason=reason))
    current = election.leader()
    if current is not None:
        emit("standby", leader=current)  # campaign's watch is milliseconds away
    fence = election.campaign(threading.Event())
    assert fence is not None
    emit("leader", revision=fence.revision)
    sys.stdin.read()  # hold leadership until the parent closes stdin (or kills us)
    election.resign()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.etcd_server")
    sub = parser.add_subparsers(dest="command", required=True)
    contend = sub.add_parser("contend", help="campaign for leadership and hold it")
    contend.add_argument("--endpoints", required=True)
    contend.add_argument("--key", required=True)
    contend.add_argument("--identity", required=True)
    contend.add_argument("--ttl-s", type=float, default=1.0)
    _contend(parser.parse_args(argv))


if __name__ == "__main__":
    main()
