"""Command-line pieces for mutual TLS: `splice certs` and the flags that pass certificates
and the admin policy to `splice controller`, `splice agent` and `splice status`.

Kept out of cli.py so the security surface is one module to read; cli.py registers it.
"""

from __future__ import annotations

import argparse
import shlex
import sys

from splice.security import AdminPolicy, TLSConfig, make_dev_ca

DEFAULT_HOSTS = ("127.0.0.1", "localhost")
DEFAULT_IDENTITIES = ("agent", "admin")


def add_certs_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "certs", help="write a development CA and certificates for mutual TLS",
        description="Write a development CA, a controller certificate and client "
                    "certificates (CN = identity) for mutual TLS. For production use your "
                    "own CA; splice only needs the three PEM files per process.")
    p.add_argument("--out", required=True, help="folder to write the PEM files to")
    p.add_argument("--host", action="append", default=None, metavar="HOST",
                   help="IP address or DNS name agents dial the controller by; repeat for "
                        f"several (default: {' '.join(DEFAULT_HOSTS)})")
    p.add_argument("--identity", action="append", default=None, metavar="NAME",
                   help="client certificate to issue, repeatable "
                        f"(default: {' '.join(DEFAULT_IDENTITIES)})")
    p.add_argument("--days", type=int, default=30, help="validity of every certificate")
    p.set_defaults(func=run_certs)


def run_certs(args: argparse.Namespace) -> int:
    hosts = list(args.host or DEFAULT_HOSTS)
    identities = list(args.identity or DEFAULT_IDENTITIES)
    try:
        paths = make_dev_ca(args.out, hosts=hosts, identities=identities, days=args.days)
    except FileExistsError as e:
        print(f"splice certs: {e}", file=sys.stderr)
        return 2
    print(f"splice certs: wrote a development CA valid {args.days} days for "
          f"{', '.join(hosts)}:")
    for name, path in paths.items():
        print(f"  {name:<20} {path}")

    def flags(role: str) -> str:
        return (f"--tls-ca {shlex.quote(paths['ca'])} "
                f"--tls-cert {shlex.quote(paths[role + '_cert'])} "
                f"--tls-key {shlex.quote(paths[role + '_key'])}")

    print("\nPass these flags:")
    print(f"  splice controller {flags('controller')} ...")
    for ident in identities:
        # "admin" is the default --admin-identity: it may stop jobs; the others attach.
        command = "stop" if ident == "admin" else "agent"
        print(f"  splice {command} {flags(ident)} ...")
    print(f"Keep {paths['ca_key']} private: it can issue certificates every splice "
          f"process trusts.")
    return 0


def add_tls_flags(parser: argparse.ArgumentParser) -> None:
    """--tls-ca/--tls-cert/--tls-key, for every command that serves or dials gRPC."""
    g = parser.add_argument_group("mutual TLS (all three, or none for plaintext)")
    g.add_argument("--tls-ca", default="", metavar="PEM",
                   help="CA certificate the peer must be signed by")
    g.add_argument("--tls-cert", default="", metavar="PEM", help="this process's certificate")
    g.add_argument("--tls-key", default="", metavar="PEM", help="its private key")


def tls_from_args(args: argparse.Namespace) -> TLSConfig | None:
    """The TLS configuration the flags name, None for plaintext; ValueError if only some
    of the three flags are given."""
    given = {"--tls-ca": args.tls_ca, "--tls-cert": args.tls_cert, "--tls-key": args.tls_key}
    if not any(given.values()):
        return None
    missing = [flag for flag, value in given.items() if not value]
    if missing:
        raise ValueError(f"{', '.join(missing)} missing: mutual TLS needs --tls-ca, "
                         f"--tls-cert and --tls-key together")
    tls = TLSConfig(ca_file=args.tls_ca, cert_file=args.tls_cert, key_file=args.tls_key)
    tls.validate()
    return tls


def add_admin_flags(parser: argparse.ArgumentParser) -> None:
    """The controller's admin policy flags."""
    parser.add_argument("--admin-identity", action="append", default=None, metavar="NAME",
                        help="client certificate CN allowed to run administrative commands; "
                             "repeatable (default: admin)")
    parser.add_argument("--allow-insecure-admin", action="store_true",
                        help="without TLS, let anyone who reaches the port run "
                             "administrative commands (development only)")


def admin_policy_from_args(args: argparse.Namespace) -> AdminPolicy:
    return AdminPolicy(frozenset(args.admin_identity or ("admin",)),
                       allow_insecure=args.allow_insecure_admin)
