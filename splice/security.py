"""Mutual TLS for the control plane, who a peer is, and who may administer a job.

Agents and operators reach the controller over gRPC. Without TLS anyone who can reach the
port can attach as any node or act on a job; with it, both ends prove themselves with
certificates signed by one CA, and the controller learns each caller's identity from its
client certificate. That identity is the certificate's subject Common Name (not a SAN):
`splice certs` issues client certificates with CN = identity ("agent", "admin", ...) and
no SAN, and gRPC's own peer identity would be the server-style SAN when one is present.

`make_dev_ca` writes a throwaway CA and certificates for development and tests; production
deployments bring their own CA (cert-manager, Vault, ...) and pass the same three files.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import (
    PrivateKeyTypes,
    PublicKeyTypes,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# The subject CN of the controller's certificate. Clients check the SANs, not this name.
SERVER_COMMON_NAME = "splice-controller"
# The name an agent's certificate carries (a DNS SAN) to serve snapshots to its peers.
# Workers and agents dialling a peer's snapshot server check this name instead of the
# address they dialled: any agent may serve snapshots, and only agents can, while an
# agent's certificate, naming no host, can never pass for the controller's.
AGENT_SERVER_NAME = "splice-agent"
# Identities that are people's or tools', not nodes': their certificates do not serve.
CLIENT_ONLY_IDENTITIES = frozenset({"admin"})
# Certificates become valid this long before they are issued, so a node whose clock lags
# the issuer's by a few minutes does not reject a fresh certificate as "not yet valid".
_CLOCK_SKEW = datetime.timedelta(minutes=5)
# An identity names a file in the output folder and a CN: keep it to a safe alphabet.
_IDENTITY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_RESERVED_NAMES = frozenset({"ca", "controller"})


@dataclass(frozen=True, kw_only=True)
class TLSConfig:
    """The three PEM files one end of a mutual-TLS connection needs."""

    # CA certificate(s) the peer's certificate must be signed by.
    ca_file: str
    # This end's certificate; intermediates, if any, follow it in the same file.
    cert_file: str
    # The private key of `cert_file`, unencrypted PEM.
    key_file: str

    def validate(self, *, now: datetime.datetime | None = None) -> None:
        """Raise ValueError naming the file and the fix if the three files cannot work
        together: missing or unreadable, not PEM, key not matching the certificate, the
        certificate not issued by the CA, or outside its validity period at `now`
        (default: the current time)."""
        now = now or datetime.datetime.now(datetime.timezone.utc)
        cas = _load_certs(self.ca_file, "CA file (--tls-ca)")
        chain = _load_certs(self.cert_file, "certificate file (--tls-cert)")
        key = _load_key(self.key_file)
        leaf = chain[0]
        if _spki(leaf.public_key()) != _spki(key.public_key()):
            raise ValueError(f"the key in {self.key_file!r} does not belong to the certificate "
                             f"in {self.cert_file!r} ({_subject(leaf)}); pass the key that "
                             f"was issued with that certificate")
        dated = [(c, self.cert_file) for c in chain] + [(c, self.ca_file) for c in cas]
        for cert, path in dated:
            if now < cert.not_valid_before_utc:
                raise ValueError(f"{_subject(cert)} in {path!r} is not valid before "
                                 f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC; check "
                                 f"this machine's clock")
            if now > cert.not_valid_after_utc:
                raise ValueError(f"{_subject(cert)} in {path!r} expired at "
                                 f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC; issue a "
                                 f"new one (splice certs for development)")
        for child, parent in zip(chain, chain[1:], strict=False):
            if not _issued_by(child, parent):
                raise ValueError(f"{self.cert_file!r}: {_subject(child)} is not issued by the "
                                 f"next certificate in the file, {_subject(parent)}; list "
                                 f"the leaf first, then its issuers in order")
        if not any(_issued_by(chain[-1], ca) for ca in cas):
            raise ValueError(f"{_subject(chain[-1])} in {self.cert_file!r} is not signed by "
                             f"the CA in {self.ca_file!r} ({', '.join(map(_subject, cas))}); "
                             f"both ends must use certificates from the same CA")


# ---- gRPC credentials ---------------------------------------------------------------------

def server_credentials(tls: TLSConfig) -> grpc.ServerCredentials:
    """Credentials for the controller: present its certificate, require a client
    certificate signed by the CA from every caller."""
    tls.validate()
    return grpc.ssl_server_credentials(
        [(_read(tls.key_file, "key file (--tls-key)"),
          _read(tls.cert_file, "certificate file (--tls-cert)"))],
        root_certificates=_read(tls.ca_file, "CA file (--tls-ca)"),
        require_client_auth=True)


def channel_credentials(tls: TLSConfig) -> grpc.ChannelCredentials:
    """Credentials for agents and the CLI: check the controller's certificate against the
    CA and its SANs against the dialled host; present this end's certificate."""
    tls.validate()
    return grpc.ssl_channel_credentials(
        root_certificates=_read(tls.ca_file, "CA file (--tls-ca)"),
        private_key=_read(tls.key_file, "key file (--tls-key)"),
        certificate_chain=_read(tls.cert_file, "certificate file (--tls-cert)"))


def ssl_server_context(tls: TLSConfig) -> ssl.SSLContext:
    """The same mutual TLS as `server_credentials`, for a plain socket server (the
    snapshot bulk port, agent/bulk.py): this end's certificate, a CA-signed client
    certificate required."""
    tls.validate()
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=tls.ca_file)
    ctx.load_cert_chain(tls.cert_file, tls.key_file)
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def ssl_client_context(tls: TLSConfig) -> ssl.SSLContext:
    """Mutual TLS for dialling a peer agent's bulk port: its certificate is checked
    against the CA and for AGENT_SERVER_NAME (pass it as server_hostname), as
    `peer_channel_options` does for gRPC."""
    tls.validate()
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=tls.ca_file)
    ctx.load_cert_chain(tls.cert_file, tls.key_file)
    return ctx


def server_problem(tls: TLSConfig) -> str:
    """Why this agent's certificate cannot serve snapshots to its peers, or "" if it can:
    it must allow server authentication and carry the DNS name AGENT_SERVER_NAME."""
    leaf = _load_certs(tls.cert_file, "certificate file (--tls-cert)")[0]
    try:
        usage = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        if ExtendedKeyUsageOID.SERVER_AUTH not in usage:
            return (f"{_subject(leaf)} in {tls.cert_file!r} is for client authentication "
                    f"only; issue it with serverAuth as well (splice certs does)")
    except x509.ExtensionNotFound:
        pass
    try:
        sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        sans = x509.SubjectAlternativeName([])
    if x509.DNSName(AGENT_SERVER_NAME) not in sans:
        names = [str(getattr(n, "value", n)) for n in sans]
        return (f"{_subject(leaf)} in {tls.cert_file!r} names {names or 'nothing'}, not "
                f"{AGENT_SERVER_NAME!r}; agents' certificates carry that DNS name to serve "
                f"snapshots to their peers (splice certs issues them so)")
    return ""


def peer_channel_options(credentials: grpc.ChannelCredentials | None
                         ) -> list[tuple[str, str]]:
    """Channel options for dialling a peer agent's snapshot server: with TLS, its
    certificate is checked for AGENT_SERVER_NAME, not for the address dialled."""
    return [] if credentials is None else [("grpc.ssl_target_name_override",
                                            AGENT_SERVER_NAME)]


def open_channel(target: str, tls: TLSConfig | None, *,
                 options: Sequence[tuple[str, int | str]] = ()) -> grpc.Channel:
    """A channel to `target`: mutual TLS with `tls`, plaintext without."""
    if tls is None:
        return grpc.insecure_channel(target, options=list(options))
    return grpc.secure_channel(target, channel_credentials(tls), options=list(options))


def add_port(server: grpc.Server, address: str, tls: TLSConfig | None) -> int:
    """Listen on `address` (mutual TLS with `tls`, plaintext without); the bound port, 0 if
    binding failed (as grpc's add_*_port)."""
    if tls is None:
        return server.add_insecure_port(address)
    return server.add_secure_port(address, server_credentials(tls))


def peer_identity(context: grpc.ServicerContext) -> str | None:
    """The Common Name of the caller's verified client certificate; None on a plaintext
    connection (there is no authenticated peer to name)."""
    auth = context.auth_context()
    if auth.get("transport_security_type") != [b"ssl"]:
        return None
    names = auth.get("x509_common_name")
    return names[0].decode("utf-8", "replace") if names else None


# ---- authorisation ------------------------------------------------------------------------

@dataclass(frozen=True)
class AdminPolicy:
    """Who may run administrative commands (those that change a job, not those that read
    it). On a plaintext controller nobody is authenticated, so they are refused unless
    `allow_insecure` says a trusted network stands in for authentication."""

    # Client-certificate Common Names allowed to administer ("admin" from splice certs).
    admin_identities: frozenset[str]
    # Let unauthenticated callers of a plaintext controller administer it. Only for a
    # development controller on a loopback address or an isolated network.
    allow_insecure: bool = False

    def check(self, identity: str | None, action: str = "run administrative commands"
              ) -> None:
        """Return if `identity` may perform `action`; raise PermissionError saying why not."""
        if identity is None:
            if self.allow_insecure:
                return
            raise PermissionError(
                f"an unauthenticated caller is not allowed to {action}: this controller "
                f"serves plaintext; start it with --tls-ca/--tls-cert/--tls-key and call it "
                f"with an admin certificate, or allow insecure administration explicitly")
        if identity not in self.admin_identities:
            allowed = ", ".join(sorted(self.admin_identities)) or "nobody"
            raise PermissionError(f"identity {identity!r} is not allowed to {action}; "
                                  f"allowed: {allowed}")


def authorize(context: grpc.ServicerContext, policy: AdminPolicy,
              action: str = "run administrative commands") -> str | None:
    """For a servicer method: the caller's identity if `policy` lets it perform `action`;
    otherwise the call is aborted with PERMISSION_DENIED and the reason."""
    identity = peer_identity(context)
    try:
        policy.check(identity, action)
    except PermissionError as e:
        context.abort(grpc.StatusCode.PERMISSION_DENIED, str(e))
    return identity


# ---- a development CA ---------------------------------------------------------------------

def make_dev_ca(out_dir: str, *, hosts: list[str], identities: list[str],
                days: int = 30) -> dict[str, str]:
    """Write a new CA, a controller certificate valid for `hosts` (IP addresses and DNS
    names) and one client certificate per identity (CN = identity) into `out_dir`. An
    identity's certificate also serves snapshots to peer agents (serverAuth, DNS name
    AGENT_SERVER_NAME, no host), except for CLIENT_ONLY_IDENTITIES ("admin").

    Keys are EC P-256, written mode 0600. Returns the written paths by name: "ca",
    "ca_key", "controller_cert", "controller_key", "<identity>_cert", "<identity>_key".
    Raises ValueError for bad arguments and FileExistsError rather than overwrite a file
    (a new CA would invalidate every certificate issued by the old one).
    """
    if not hosts:
        raise ValueError("the controller certificate needs at least one host name or address")
    if days < 1:
        raise ValueError(f"days must be >= 1, got {days}")
    for ident in identities:
        if not _IDENTITY.fullmatch(ident) or ident in _RESERVED_NAMES:
            raise ValueError(f"identity {ident!r} must be 1-64 letters, digits, '.', '_' or "
                             f"'-' (starting with a letter or digit) and not one of "
                             f"{sorted(_RESERVED_NAMES)}")
    if len(set(identities)) != len(identities):
        raise ValueError(f"duplicate identities: {identities}")
    sans = [_san(h) for h in hosts]

    out = Path(out_dir)
    names = {"ca": "ca.pem", "ca_key": "ca-key.pem", "controller_cert": "controller.pem",
             "controller_key": "controller-key.pem"}
    for ident in identities:
        names[f"{ident}_cert"] = f"{ident}.pem"
        names[f"{ident}_key"] = f"{ident}-key.pem"
    paths = {k: str(out / v) for k, v in names.items()}
    existing = [p for p in paths.values() if os.path.lexists(p)]
    if existing:
        raise FileExistsError(f"refusing to overwrite {', '.join(existing)}; choose another "
                              f"output folder or delete them")
    out.mkdir(parents=True, exist_ok=True)

    now = datetime.datetime.now(datetime.timezone.utc)
    not_after = now + datetime.timedelta(days=days)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "splice development CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW).not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=False, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _write_key(paths["ca_key"], ca_key)
    _write_cert(paths["ca"], ca_cert)

    def issue(cn: str, usage: list[x509.ObjectIdentifier], san: list[x509.GeneralName],
              cert_path: str, key_path: str) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _CLOCK_SKEW).not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usage), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
                ca_ski), critical=False)
        )
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        _write_key(key_path, key)
        _write_cert(cert_path, builder.sign(ca_key, hashes.SHA256()))

    issue(SERVER_COMMON_NAME, [ExtendedKeyUsageOID.SERVER_AUTH], sans,
          paths["controller_cert"], paths["controller_key"])
    for ident in identities:
        if ident in CLIENT_ONLY_IDENTITIES:
            issue(ident, [ExtendedKeyUsageOID.CLIENT_AUTH], [], paths[f"{ident}_cert"],
                  paths[f"{ident}_key"])
            continue
        # Agents also serve: their snapshot servers, dialled by workers of other nodes.
        issue(ident, [ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH],
              [x509.DNSName(AGENT_SERVER_NAME)], paths[f"{ident}_cert"],
              paths[f"{ident}_key"])
    return paths


# ---- helpers ------------------------------------------------------------------------------

def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    if not host or host.startswith(".") or any(c.isspace() or c in "/:@" for c in host):
        raise ValueError(f"{host!r} is neither an IP address nor a DNS name")
    return x509.DNSName(host)


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise ValueError(f"TLS {what} {path!r} does not exist") from None
    except OSError as e:
        raise ValueError(f"TLS {what} {path!r} cannot be read: {e.strerror or e}") from None


def _load_certs(path: str, what: str) -> list[x509.Certificate]:
    data = _read(path, what)
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        certs = []
    if not certs:
        raise ValueError(f"TLS {what} {path!r} holds no PEM certificate "
                         f"(expected '-----BEGIN CERTIFICATE-----')")
    return certs


def _load_key(path: str) -> PrivateKeyTypes:
    data = _read(path, "key file (--tls-key)")
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:  # the key is encrypted
        raise ValueError(f"TLS key file {path!r} is encrypted; gRPC needs an unencrypted "
                         f"key (keep it mode 0600)") from None
    except (ValueError, UnsupportedAlgorithm) as e:
        raise ValueError(f"TLS key file {path!r} holds no usable PEM private key: {e}") \
            from None


def _spki(public_key: PublicKeyTypes) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER,
                                   serialization.PublicFormat.SubjectPublicKeyInfo)


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _subject(cert: x509.Certificate) -> str:
    return f"certificate {cert.subject.rfc4514_string()!r}"


def _write_key(path: str, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    # O_EXCL with mode 0600: the key is never readable by others, not even for a moment.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)


def _write_cert(path: str, cert: x509.Certificate) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
