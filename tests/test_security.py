"""Mutual TLS over real gRPC connections, file validation, the admin policy and
`splice certs`.

A small servicer of the real Controller service answers GetJobStatus with the caller's
identity as the controller sees it (`peer_identity`) in JobStatus.message, and refuses job
"admin-only" to non-admins through `authorize`: that is how the controller's own servicer
will use them. Every connection attempt is bounded by an RPC deadline; a refused handshake
fails the call with UNAVAILABLE.
"""

from __future__ import annotations

import argparse
import datetime
import os
import stat
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509

from splice.proto import controller_pb2 as pb
from splice.proto import controller_pb2_grpc as pb_grpc
from splice.security import (
    AdminPolicy,
    TLSConfig,
    add_port,
    authorize,
    channel_credentials,
    make_dev_ca,
    open_channel,
    peer_identity,
)
from splice.security_cli import add_certs_parser, add_tls_flags, tls_from_args
from tests.conftest import role

TIMEOUT_S = 10.0
NO_IDENTITY = "<none>"
POLICY = AdminPolicy(frozenset({"admin"}))


class EchoIdentity(pb_grpc.ControllerServicer):
    def __init__(self, policy: AdminPolicy) -> None:
        self._policy = policy

    def GetJobStatus(self, request: pb.JobStatusRequest,
                     context: grpc.ServicerContext) -> pb.JobStatus:
        if request.job_id == "admin-only":
            authorize(context, self._policy, "stop jobs")
        identity = peer_identity(context)
        return pb.JobStatus(job_id=request.job_id,
                            message=NO_IDENTITY if identity is None else identity)


@dataclass
class Server:
    port: int
    server: grpc.Server


def serve(tls: TLSConfig | None, policy: AdminPolicy = POLICY) -> Server:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_ControllerServicer_to_server(EchoIdentity(policy), server)
    port = add_port(server, "127.0.0.1:0", tls)
    assert port
    server.start()
    return Server(port, server)


def ask(channel: grpc.Channel, job_id: str = "j") -> str:
    status = pb_grpc.ControllerStub(channel).GetJobStatus(pb.JobStatusRequest(job_id=job_id),
                                                          timeout=TIMEOUT_S)
    return status.message


def assert_refused(channel: grpc.Channel) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as e:
        ask(channel)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE, e.value
    return e.value


@pytest.fixture(scope="module")
def tls_server(pki: dict[str, str]) -> Iterator[Server]:
    s = serve(role(pki, "controller"))
    yield s
    s.server.stop(None)


# ---- handshakes ---------------------------------------------------------------------------

@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
@pytest.mark.parametrize("name", ["agent", "admin"])
def test_ca_signed_client_connects_and_is_identified(pki: dict[str, str], tls_server: Server,
                                                     name: str, host: str) -> None:
    with open_channel(f"{host}:{tls_server.port}", role(pki, name)) as channel:
        assert ask(channel) == name


def test_client_without_a_certificate_is_refused(pki: dict[str, str],
                                                 tls_server: Server) -> None:
    ca = Path(pki["ca"]).read_bytes()
    creds = grpc.ssl_channel_credentials(root_certificates=ca)  # verifies the server only
    with grpc.secure_channel(f"127.0.0.1:{tls_server.port}", creds) as channel:
        assert_refused(channel)


def test_plaintext_client_is_refused(tls_server: Server) -> None:
    with open_channel(f"127.0.0.1:{tls_server.port}", None) as channel:
        assert_refused(channel)


def test_client_certificate_from_another_ca_is_refused(pki: dict[str, str],
                                                       other_pki: dict[str, str],
                                                       tls_server: Server) -> None:
    # Trusts the right CA (so the server passes) but presents a foreign "agent" certificate.
    forged = TLSConfig(ca_file=pki["ca"], cert_file=other_pki["agent_cert"],
                       key_file=other_pki["agent_key"])
    creds = grpc.ssl_channel_credentials(
        root_certificates=Path(forged.ca_file).read_bytes(),
        private_key=Path(forged.key_file).read_bytes(),
        certificate_chain=Path(forged.cert_file).read_bytes())
    with grpc.secure_channel(f"127.0.0.1:{tls_server.port}", creds) as channel:
        assert_refused(channel)


def test_server_from_another_ca_is_refused_by_the_client(pki: dict[str, str],
                                                         other_pki: dict[str, str]) -> None:
    impostor = serve(role(other_pki, "controller"))
    try:
        with open_channel(f"127.0.0.1:{impostor.port}", role(pki, "agent")) as channel:
            assert_refused(channel)
    finally:
        impostor.server.stop(None)


def test_server_certificate_for_another_host_is_refused(tmp_path: Path,
                                                        pki: dict[str, str]) -> None:
    elsewhere = make_dev_ca(str(tmp_path / "pki"), hosts=["controller.example.internal"],
                            identities=["agent"])
    s = serve(role(elsewhere, "controller"))
    try:
        with open_channel(f"127.0.0.1:{s.port}", role(elsewhere, "agent")) as channel:
            assert_refused(channel)
        # Control: the very same certificates work when the client expects that name, so the
        # refusal above was about the host name and nothing else.
        override = [("grpc.ssl_target_name_override", "controller.example.internal")]
        with open_channel(f"127.0.0.1:{s.port}", role(elsewhere, "agent"),
                          options=override) as channel:
            assert ask(channel) == "agent"
    finally:
        s.server.stop(None)


def test_plaintext_server_has_no_peer_identity() -> None:
    s = serve(None)
    try:
        with open_channel(f"127.0.0.1:{s.port}", None) as channel:
            assert ask(channel) == NO_IDENTITY
    finally:
        s.server.stop(None)


# ---- authorisation over gRPC --------------------------------------------------------------

def test_admin_command_allowed_for_admin_refused_for_agent(pki: dict[str, str],
                                                           tls_server: Server) -> None:
    with open_channel(f"127.0.0.1:{tls_server.port}", role(pki, "admin")) as channel:
        assert ask(channel, "admin-only") == "admin"
    with open_channel(f"127.0.0.1:{tls_server.port}", role(pki, "agent")) as channel:
        with pytest.raises(grpc.RpcError) as e:
            ask(channel, "admin-only")
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "'agent' is not allowed to stop jobs; allowed: admin" in e.value.details()


@pytest.mark.parametrize("allow_insecure", [False, True])
def test_admin_command_on_plaintext_server(allow_insecure: bool) -> None:
    s = serve(None, AdminPolicy(frozenset({"admin"}), allow_insecure=allow_insecure))
    try:
        with open_channel(f"127.0.0.1:{s.port}", None) as channel:
            if allow_insecure:
                assert ask(channel, "admin-only") == NO_IDENTITY
            else:
                with pytest.raises(grpc.RpcError) as e:
                    ask(channel, "admin-only")
                assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
                assert "unauthenticated" in e.value.details()
    finally:
        s.server.stop(None)


# ---- AdminPolicy --------------------------------------------------------------------------

def test_admin_policy() -> None:
    policy = AdminPolicy(frozenset({"admin", "ops"}))
    policy.check("admin")
    policy.check("ops", "drain nodes")
    with pytest.raises(PermissionError,
                       match=r"identity 'agent' is not allowed to drain nodes; allowed: admin, ops"):
        policy.check("agent", "drain nodes")
    with pytest.raises(PermissionError, match="unauthenticated.*--tls-ca"):
        policy.check(None)
    AdminPolicy(frozenset(), allow_insecure=True).check(None)
    with pytest.raises(PermissionError, match="allowed: nobody"):
        AdminPolicy(frozenset(), allow_insecure=True).check("admin")


# ---- TLSConfig.validate -------------------------------------------------------------------

def test_valid_configs_pass(pki: dict[str, str]) -> None:
    for name in ("controller", "agent", "admin"):
        role(pki, name).validate()


def test_missing_file_is_named(pki: dict[str, str], tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.pem")
    for tls, flag in [
        (TLSConfig(ca_file=missing, cert_file=pki["agent_cert"], key_file=pki["agent_key"]),
         "--tls-ca"),
        (TLSConfig(ca_file=pki["ca"], cert_file=missing, key_file=pki["agent_key"]),
         "--tls-cert"),
        (TLSConfig(ca_file=pki["ca"], cert_file=pki["agent_cert"], key_file=missing),
         "--tls-key"),
    ]:
        with pytest.raises(ValueError, match=f"{flag}.*nope.pem.*does not exist"):
            tls.validate()


def test_unreadable_file_is_named(pki: dict[str, str], tmp_path: Path) -> None:
    # A folder, not chmod 000: the suite may run as root, who reads any file.
    tls = TLSConfig(ca_file=pki["ca"], cert_file=pki["agent_cert"], key_file=str(tmp_path))
    with pytest.raises(ValueError, match="--tls-key.*cannot be read"):
        tls.validate()


def test_not_pem_is_refused(pki: dict[str, str], tmp_path: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("hello\n")
    with pytest.raises(ValueError, match="--tls-cert.*no PEM certificate"):
        TLSConfig(ca_file=pki["ca"], cert_file=str(junk), key_file=pki["agent_key"]).validate()
    with pytest.raises(ValueError, match="--tls-ca.*no PEM certificate"):
        TLSConfig(ca_file=pki["agent_key"], cert_file=pki["agent_cert"],
                  key_file=pki["agent_key"]).validate()
    with pytest.raises(ValueError, match="key file.*no usable PEM private key"):
        TLSConfig(ca_file=pki["ca"], cert_file=pki["agent_cert"],
                  key_file=pki["agent_cert"]).validate()


def test_key_not_matching_the_certificate_is_refused(pki: dict[str, str]) -> None:
    tls = TLSConfig(ca_file=pki["ca"], cert_file=pki["agent_cert"], key_file=pki["admin_key"])
    with pytest.raises(ValueError, match="does not belong to the certificate.*CN=agent"):
        tls.validate()


def test_certificate_of_another_ca_is_refused(pki: dict[str, str],
                                              other_pki: dict[str, str]) -> None:
    tls = TLSConfig(ca_file=pki["ca"], cert_file=other_pki["agent_cert"],
                    key_file=other_pki["agent_key"])
    with pytest.raises(ValueError, match="not signed by the CA.*same CA"):
        tls.validate()
    with pytest.raises(ValueError, match="not signed by the CA"):
        channel_credentials(tls)  # the credentials refuse before any connection is tried


def test_expired_and_not_yet_valid_certificates_are_refused(pki: dict[str, str]) -> None:
    cert = x509.load_pem_x509_certificate(Path(pki["agent_cert"]).read_bytes())
    tls = role(pki, "agent")
    after = cert.not_valid_after_utc + datetime.timedelta(seconds=1)
    with pytest.raises(ValueError, match="expired at"):
        tls.validate(now=after)
    before = cert.not_valid_before_utc - datetime.timedelta(seconds=1)
    with pytest.raises(ValueError, match="not valid before.*clock"):
        tls.validate(now=before)


# ---- make_dev_ca and `splice certs` -------------------------------------------------------

def test_dev_ca_contents(pki: dict[str, str]) -> None:
    server = x509.load_pem_x509_certificate(Path(pki["controller_cert"]).read_bytes())
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    cn = server.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value
    assert cn == "splice-controller"
    for name, path in pki.items():
        mode = stat.S_IMODE(os.stat(path).st_mode)
        if name.endswith("_key"):
            assert mode == 0o600, (name, oct(mode))
        else:
            assert mode & 0o077 == 0o044, (name, oct(mode))


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"hosts": []}, "at least one host"),
    ({"hosts": ["bad host"]}, "neither an IP address nor a DNS name"),
    ({"identities": ["../x"]}, "identity '../x'"),
    ({"identities": ["ca"]}, "identity 'ca'"),
    ({"identities": ["a", "a"]}, "duplicate"),
    ({"days": 0}, "days"),
])
def test_dev_ca_refuses_bad_arguments(tmp_path: Path, kwargs: dict, match: str) -> None:
    args = {"hosts": ["127.0.0.1"], "identities": ["agent"], **kwargs}
    with pytest.raises(ValueError, match=match):
        make_dev_ca(str(tmp_path / "pki"), **args)
    assert not (tmp_path / "pki").exists()


def test_dev_ca_does_not_overwrite(tmp_path: Path) -> None:
    make_dev_ca(str(tmp_path), hosts=["127.0.0.1"], identities=["agent"])
    before = Path(tmp_path / "ca.pem").read_bytes()
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        make_dev_ca(str(tmp_path), hosts=["127.0.0.1"], identities=["agent"])
    assert Path(tmp_path / "ca.pem").read_bytes() == before


def certs_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="splice")
    sub = p.add_subparsers(dest="cmd", required=True)
    add_certs_parser(sub)
    for command in ("controller", "agent"):
        add_tls_flags(sub.add_parser(command))
    return p


def test_splice_certs_writes_usable_files(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "certs"
    parser = certs_parser()
    args = parser.parse_args(["certs", "--out", str(out), "--host", "127.0.0.1",
                              "--host", "localhost", "--identity", "node-a",
                              "--identity", "admin", "--days", "3"])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    for name in ("ca.pem", "ca-key.pem", "controller.pem", "controller-key.pem", "node-a.pem",
                 "node-a-key.pem", "admin.pem", "admin-key.pem"):
        assert (out / name).is_file() and str(out / name) in printed
    assert (f"splice controller --tls-ca {out}/ca.pem --tls-cert {out}/controller.pem "
            f"--tls-key {out}/controller-key.pem") in printed
    assert f"splice agent --tls-ca {out}/ca.pem --tls-cert {out}/node-a.pem" in printed

    # The printed flags, parsed by the commands they are meant for, make a working pair.
    def flags_for(command: str) -> TLSConfig:
        line = next(ln for ln in printed.splitlines() if f"splice {command} " in ln)
        argv = line.split()[1:-1]  # drop "splice" and the trailing "..."
        tls = tls_from_args(parser.parse_args(argv))
        assert tls is not None
        return tls

    s = serve(flags_for("controller"))
    try:
        with open_channel(f"localhost:{s.port}", flags_for("agent")) as channel:
            assert ask(channel) == "node-a"
    finally:
        s.server.stop(None)
    cert = x509.load_pem_x509_certificate((out / "node-a.pem").read_bytes())
    assert cert.not_valid_after_utc - cert.not_valid_before_utc < datetime.timedelta(days=4)


def test_splice_certs_refuses_to_overwrite(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    parser = certs_parser()
    args = parser.parse_args(["certs", "--out", str(tmp_path)])
    assert args.func(args) == 0
    assert {p.name for p in tmp_path.iterdir()} == {
        "ca.pem", "ca-key.pem", "controller.pem", "controller-key.pem", "agent.pem",
        "agent-key.pem", "admin.pem", "admin-key.pem"}
    capsys.readouterr()
    assert args.func(args) == 2
    assert "refusing to overwrite" in capsys.readouterr().err


def test_tls_flags_go_together(pki: dict[str, str]) -> None:
    parser = certs_parser()
    assert tls_from_args(parser.parse_args(["agent"])) is None
    with pytest.raises(ValueError, match="--tls-key missing"):
        tls_from_args(parser.parse_args(["agent", "--tls-ca", pki["ca"],
                                         "--tls-cert", pki["agent_cert"]]))
