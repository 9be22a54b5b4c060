"""Mutual TLS on the agents' snapshot servers: a snapshot (the whole model) goes only to a
caller with a certificate from the job's CA, over an encrypted channel, and only from an
agent's certificate (DNS name splice-agent), which in turn can never pass for the
controller's."""

from __future__ import annotations

import datetime
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from splice.agent.replication import FetchFailed, PeerServer, ReplicaStore, fetch, serve
from splice.security import (
    TLSConfig,
    channel_credentials,
    server_credentials,
    server_problem,
)
from tests.conftest import role

JOB = "job"


@pytest.fixture
def server(pki: dict[str, str]) -> Iterator[PeerServer]:
    data = bytes(range(256)) * 64

    def provider(job: str, worker: str, step: int) -> tuple[int, bytes, Any] | None:
        return (12, b"meta", data) if (job, worker) == (JOB, "node-0/0") else None

    srv = serve(ReplicaStore(0, job_id=JOB), "127.0.0.1:0", provider,
                credentials=server_credentials(role(pki, "agent")))
    yield srv
    srv.stop(0)


def test_a_caller_with_the_jobs_certificates_fetches(pki: dict[str, str],
                                                      server: PeerServer) -> None:
    got = fetch([f"127.0.0.1:{server.port}"], JOB, "node-0/0", 12,
                credentials=channel_credentials(role(pki, "agent")))
    assert (got.step, got.meta) == (12, b"meta")
    assert bytes(got.data.numpy()) == bytes(range(256)) * 64


def test_a_plaintext_caller_gets_nothing(server: PeerServer) -> None:
    with pytest.raises(FetchFailed):
        fetch([f"127.0.0.1:{server.port}"], JOB, "node-0/0", 12, connect_timeout_s=2.0)


def test_a_caller_from_another_ca_gets_nothing(other_pki: dict[str, str],
                                               server: PeerServer) -> None:
    with pytest.raises(FetchFailed):
        fetch([f"127.0.0.1:{server.port}"], JOB, "node-0/0", 12, connect_timeout_s=2.0,
              credentials=channel_credentials(role(other_pki, "agent")))


@pytest.mark.parametrize("server_pki, server_role", [("other_pki", "agent"),
                                                     ("pki", "controller")],
                         ids=["agent-of-another-ca", "the-controller"])
def test_a_worker_fetches_only_from_an_agent_of_its_ca(
        request: pytest.FixtureRequest, pki: dict[str, str],
        server_pki: str, server_role: str) -> None:
    # A rogue server (another CA's agent), or the controller's certificate, which does not
    # name splice-agent: the fetching worker refuses it, so a forged snapshot never arrives.
    srv = serve(ReplicaStore(0, job_id=JOB), "127.0.0.1:0",
                lambda job, worker, step: (12, b"forged", b"\0" * 64),
                credentials=server_credentials(role(request.getfixturevalue(server_pki),
                                                    server_role)))
    try:
        with pytest.raises(FetchFailed):
            fetch([f"127.0.0.1:{srv.port}"], JOB, "node-0/0", 12, connect_timeout_s=2.0,
                  credentials=channel_credentials(role(pki, "agent")))
    finally:
        srv.stop(0)


def test_the_dev_ca_issues_agent_certificates_that_serve_snapshots_only(
        pki: dict[str, str]) -> None:
    assert server_problem(role(pki, "agent")) == ""
    assert "client authentication only" in server_problem(role(pki, "admin"))
    assert "'splice-agent'" in server_problem(role(pki, "controller"))


def test_an_agent_certificate_cannot_pass_for_the_controller(pki: dict[str, str]) -> None:
    # A node's key serves its snapshots, but a client of the controller (an agent, the
    # CLI) refuses it: it names no host, only splice-agent.
    import grpc

    from splice.proto import controller_pb2 as cpb
    from splice.proto import controller_pb2_grpc as cpb_grpc
    from splice.security import add_port, open_channel

    rogue = grpc.server(__import__("concurrent.futures").futures.ThreadPoolExecutor(2))
    port = add_port(rogue, "127.0.0.1:0", role(pki, "agent"))
    rogue.start()
    try:
        with open_channel(f"127.0.0.1:{port}", role(pki, "admin")) as channel:
            with pytest.raises(grpc.RpcError) as e:
                cpb_grpc.ControllerStub(channel).GetJobStatus(
                    cpb.JobStatusRequest(job_id="j"), timeout=5)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE  # the handshake failed
    finally:
        rogue.stop(0)


def test_a_client_only_certificate_cannot_serve(pki: dict[str, str], tmp_path: Path) -> None:
    ca_cert = x509.load_pem_x509_certificate(Path(pki["ca"]).read_bytes())
    ca_key = serialization.load_pem_private_key(Path(pki["ca_key"]).read_bytes(), None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "old-agent")]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False)
            .sign(ca_key, hashes.SHA256()))  # type: ignore[arg-type]
    cert_file, key_file = tmp_path / "old.pem", tmp_path / "old-key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    tls = TLSConfig(ca_file=pki["ca"], cert_file=str(cert_file), key_file=str(key_file))
    assert "client authentication only" in server_problem(tls)


def test_an_agent_whose_certificate_cannot_serve_runs_no_snapshot_server(
        pki: dict[str, str]) -> None:
    # A client-only certificate: a plaintext server would hand the model to anyone, so
    # the agent serves none (state then goes over the group).
    from splice.agent.agent import Agent, AgentConfig

    agent = Agent(AgentConfig(controller="127.0.0.1:1", command=("true",), node_id="n0",
                              tls=role(pki, "admin")))
    try:
        assert agent.snapshot_address == ""
    finally:
        agent._release()
    agent = Agent(AgentConfig(controller="127.0.0.1:1", command=("true",), node_id="n0",
                              gloo_host="127.0.0.2", tls=role(pki, "agent")))
    try:  # any address: peers check the certificate's splice-agent name
        assert agent.snapshot_address.startswith("127.0.0.2:")
        with pytest.raises(FetchFailed):  # and it speaks TLS only
            fetch([agent.snapshot_address], JOB, "n0/0", 0, connect_timeout_s=2.0)
    finally:
        agent._close_probes()
        agent._release()
