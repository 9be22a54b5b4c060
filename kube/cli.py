"""`splice operator`: command-line entry of the Kubernetes operator."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("operator", help="run the SpliceJob Kubernetes operator")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    raise SystemExit("splice operator: not implemented yet")
