"""`splice operator`: command-line entry of the Kubernetes operator.

Flags only (no environment variables): `--identity` defaults to the hostname, which in a
Deployment is the pod name, so each replica is distinct in the Lease.
"""

from __future__ import annotations

import argparse
import signal
import socket
import threading


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("operator", help="run the SpliceJob Kubernetes operator")
    p.add_argument("--namespace", default="",
                   help="watch SpliceJobs in this namespace only (default: all namespaces)")
    p.add_argument("--kubeconfig", default="",
                   help="kubeconfig file (default: in-cluster service account, then "
                        "~/.kube/config)")
    p.add_argument("--server", default="", help=argparse.SUPPRESS)  # plain URL, for tests
    p.add_argument("--lease-name", default="splice-operator",
                   help="coordination.k8s.io Lease the replicas elect a leader with")
    p.add_argument("--lease-namespace", default="splice-system")
    p.add_argument("--identity", default="", help="this replica's name in the Lease "
                   "(default: hostname)")
    p.add_argument("--lease-duration-s", type=float, default=15.0)
    p.add_argument("--no-leader-election", action="store_true",
                   help="act at once, without a Lease (one replica only)")
    p.add_argument("--resync-s", type=float, default=30.0,
                   help="reconcile every job at least this often")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from splice.kube.client import KubeApi, api_client
    from splice.kube.controller_status import GrpcControllerStatus
    from splice.kube.leader import LeaderElector, LeaseConfig
    from splice.kube.runner import Operator, OperatorConfig

    config = OperatorConfig(namespace=args.namespace or None, resync_s=args.resync_s)
    lease = LeaseConfig(name=args.lease_name, namespace=args.lease_namespace,
                        identity=args.identity or socket.gethostname(),
                        duration_s=args.lease_duration_s,
                        retry_s=max(args.lease_duration_s / 5, 0.5))
    api = api_client(kubeconfig=args.kubeconfig or None, host=args.server or None)
    elector = None if args.no_leader_election else LeaderElector(api, lease)
    controllers = GrpcControllerStatus()
    operator = Operator(KubeApi(api), controllers, config, elector)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    print(f"splice operator: {lease.identity}, watching "
          f"{config.namespace or 'all namespaces'}", flush=True)
    operator.start()
    stop.wait()
    operator.stop()
    controllers.close()
    return 0
