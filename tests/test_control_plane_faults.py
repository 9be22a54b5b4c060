"""The control plane under faults of its own: a state store that cannot be reached, and a
secured (mutual TLS) controller with real agents and workers."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from splice.controller.job import JobSpec
from splice.controller.service import Controller, ControllerConfig
from splice.controller.store import EpochRecord, Fence, InMemoryStateStore, StoreUnavailable
from splice.proto import controller_pb2 as pb
from splice.proto import controller_pb2_grpc as pb_grpc
from splice.security import TLSConfig, make_dev_ca, peer_identity, server_credentials
from tests.test_bad_input import JOB, AgentStream

K = pb.WorkerEvent.Kind


class FlakyStore(InMemoryStateStore):
    """An in-memory store that is unreachable while `down` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.down = threading.Event()
        self.refused = 0

    def commit_epoch(self, record: EpochRecord, *, expected_epoch: int,
                     fence: Fence | None = None) -> None:
        if self.down.is_set():
            self.refused += 1
            raise StoreUnavailable("store is down (test)", retry_after_s=0.05)
        super().commit_epoch(record, expected_epoch=expected_epoch, fence=fence)


@pytest.fixture
def flaky() -> Iterator[tuple[Controller, FlakyStore, AgentStream]]:
    store = FlakyStore()
    c = Controller(ControllerConfig(listen="127.0.0.1:0", node_timeout_s=120.0,
                                    jobs=(JobSpec(job_id=JOB, world_size=2),)), store)
    c.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{c.port}")
    agent = AgentStream(pb_grpc.ControllerStub(channel))
    try:
        yield c, store, agent
    finally:
        agent.close()
        channel.close()
        c.stop(0.2)


def test_no_epoch_is_announced_while_the_store_is_down(
        flaky: tuple[Controller, FlakyStore, AgentStream]) -> None:
    controller, store, agent = flaky
    agent.attach("a", 2)
    store.down.set()
    agent.event("a/0", K.READY, pid=10)
    agent.event("a/1", K.READY, pid=11)
    # The controller keeps retrying; nothing may be announced that was not persisted.
    agent.barrier("a")
    while store.refused < 3:  # wait for retries to happen (bounded by the test timeout)
        agent.barrier("a")
    assert controller.job_status(JOB).epoch == 0
    assert store.load_epoch(JOB) is None
    store.down.clear()
    m = agent.expect("membership")  # the retried event goes through once the store is back
    assert m.epoch == 1 and list(m.members) == ["a/0", "a/1"]
    assert store.load_epoch(JOB).epoch == 1


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return make_dev_ca(str(tmp_path_factory.mktemp("ca")), hosts=["127.0.0.1", "localhost"],
                       identities=["agent", "admin"])


@pytest.mark.integration
def test_secured_job_trains_and_refuses_plaintext_and_non_admins(
        tmp_path: Path, certs: dict[str, str]) -> None:
    """mTLS end to end: agents with client certificates run a job; a plaintext agent
    cannot attach; StopJob needs the admin identity."""
    server_tls = TLSConfig(ca_file=certs["ca"], cert_file=certs["controller_cert"],
                           key_file=certs["controller_key"])
    admins = {"admin"}

    def admin_check(context: grpc.ServicerContext, action: str) -> None:
        if peer_identity(context) not in admins:
            raise PermissionError(f"{peer_identity(context)!r} may not {action}")

    def attach_check(context: grpc.ServicerContext, node_id: str) -> None:
        if peer_identity(context) not in ("agent", node_id):
            raise PermissionError(f"{peer_identity(context)!r} may not attach as {node_id}")

    c = Controller(ControllerConfig(listen="127.0.0.1:0",
                                    jobs=(JobSpec(job_id=JOB, world_size=2),)),
                   InMemoryStateStore(), server_credentials=server_credentials(server_tls),
                   admin_check=admin_check, attach_check=attach_check)
    c.start()
    address = f"127.0.0.1:{c.port}"
    tls_flags = ["--tls-ca", certs["ca"], "--tls-cert", certs["agent_cert"],
                 "--tls-key", certs["agent_key"]]
    worker = [sys.executable, "-m", "splice.examples.train_mlp", "--steps", "5",
              "--hidden", "16"]
    try:
        plain = subprocess.run(
            [sys.executable, "-m", "splice", "agent", "--controller", address, "--job", JOB,
             "--node-id", "p", "--connect-timeout-s", "2", "--", *worker],
            capture_output=True, text=True, timeout=60)
        assert plain.returncode == 2, plain.stderr  # never attached, no worker started
        agent = subprocess.run(
            [sys.executable, "-m", "splice", "agent", "--controller", address, "--job", JOB,
             "--node-id", "s", "--nproc", "2", *tls_flags, "--", *worker],
            capture_output=True, text=True, timeout=120)
        assert agent.returncode == 0, agent.stderr[-3000:]
        assert c.job_status(JOB).phase == "complete"

        def stop_as(identity: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-m", "splice", "stop", "--controller", address, "--job", JOB,
                 "--tls-ca", certs["ca"], "--tls-cert", certs[f"{identity}_cert"],
                 "--tls-key", certs[f"{identity}_key"]],
                capture_output=True, text=True, timeout=60)

        impostor = subprocess.run(  # an admin certificate is not an agent's
            [sys.executable, "-m", "splice", "agent", "--controller", address, "--job", JOB,
             "--node-id", "s", "--tls-ca", certs["ca"], "--tls-cert", certs["admin_cert"],
             "--tls-key", certs["admin_key"], "--connect-timeout-s", "5", "--", *worker],
            capture_output=True, text=True, timeout=60)
        assert impostor.returncode == 2 and "may not attach" in impostor.stderr, impostor.stderr

        refused = stop_as("agent")
        assert refused.returncode == 1 and "PERMISSION_DENIED" in refused.stderr
        allowed = stop_as("admin")
        assert allowed.returncode == 0, allowed.stderr
    finally:
        c.stop(0.2)
