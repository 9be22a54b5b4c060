"""A real etcd member on loopback for local jobs, the demo, tests and benchmarks.

One member, free ports, a temporary data directory, and the failures a store must survive:
stop, SIGKILL, and restart on the same ports and data (what was written persists). It runs
the Debian `etcd` binary (package etcd-server); nothing is downloaded.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

ETCD_BINARY_ENV = "SPLICE_ETCD_BINARY"
READY_TIMEOUT_S = 20.0  # a cold start on a loaded 2-core machine takes ~1 s; leave room


def find_etcd_binary() -> str | None:
    return os.environ.get(ETCD_BINARY_ENV) or shutil.which("etcd") or (
        "/usr/bin/etcd" if os.path.exists("/usr/bin/etcd") else None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EtcdServer:
    """One etcd member. `endpoint` ("127.0.0.1:port") stays the same across restarts."""

    def __init__(self, binary: str, data_root: str | None = None) -> None:
        self.binary = binary
        self._own_root = data_root is None
        self.root = Path(data_root or tempfile.mkdtemp(prefix="splice-etcd-"))
        self.data_dir = self.root / "data"
        self.log_path = self.root / "etcd.log"
        self.client_port = _free_port()
        self.peer_port = _free_port()
        self.endpoint = f"127.0.0.1:{self.client_port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def argv(self) -> list[str]:
        client = f"http://127.0.0.1:{self.client_port}"
        peer = f"http://127.0.0.1:{self.peer_port}"
        return [self.binary, "--name", "n0", "--data-dir", str(self.data_dir),
                "--listen-client-urls", client, "--advertise-client-urls", client,
                "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                "--initial-cluster", f"n0={peer}", "--initial-cluster-state", "new",
                # Fast elections make etcd grant leases down to 1 s (its minimum lease TTL
                # is 1.5 election timeouts, rounded up to whole seconds).
                "--heartbeat-interval", "50", "--election-timeout", "500"]

    def start(self) -> None:
        assert self.proc is None, "already running"
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv(), stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)
        self.wait_ready()

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Poll the client port until etcd serves a read (bounded; readiness, not sync)."""
        import pyetcd

        deadline = time.monotonic() + timeout_s
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"etcd exited with {self.proc.returncode}:\n{self.log()}")
            client = pyetcd.MultiEndpointEtcd3Client(
                endpoints=[pyetcd.Endpoint("127.0.0.1", self.client_port, secure=False,
                                           time_retry=0)], timeout=0.5)
            try:
                client.get("/splice-readiness-probe")
                return
            except Exception:
                if time.monotonic() > deadline:
                    self.kill()
                    raise RuntimeError(
                        f"etcd did not serve within {timeout_s} s:\n{self.log()}") from None
                time.sleep(0.02)
            finally:
                client.close()

    def stop(self) -> None:
        """SIGTERM and wait: a clean shutdown."""
        self._end(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL and wait: a crash."""
        self._end(signal.SIGKILL)

    def _end(self, sig: signal.Signals) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        """Start again on the same ports and data directory (after stop or kill)."""
        self._end(signal.SIGTERM)
        self.start()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return "(no log)"

    def close(self) -> None:
        self.kill()
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> EtcdServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
