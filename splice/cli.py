"""The `splice` command: controller, agent, status and the local demo.

Environment variables are not read here on purpose: every setting is a flag, so what a
process does is visible on its command line.
"""

from __future__ import annotations

import argparse
import logging
import signal
import socket
import sys
import threading

from splice.security_cli import add_admin_flags, add_certs_parser, add_tls_flags


def _controller(args: argparse.Namespace) -> int:
    import grpc

    from splice.controller.job import JobSpec
    from splice.controller.service import Controller, ControllerConfig
    from splice.controller.store import InMemoryStateStore, StateStore
    from splice.security import peer_identity, server_credentials
    from splice.security_cli import admin_policy_from_args, tls_from_args

    config = ControllerConfig(
        listen=args.listen, advertise_host=args.advertise_host, store_port=args.store_port,
        heartbeat_interval_s=args.heartbeat_interval_s, node_timeout_s=args.node_timeout_s,
        reattach_grace_s=args.reattach_grace_s,
        jobs=(JobSpec(job_id=args.job, world_size=args.world_size,
                      min_world_size=args.min_world_size),),
    )
    tls = tls_from_args(args)
    policy = admin_policy_from_args(args)

    def admin_check(context: grpc.ServicerContext, action: str) -> None:
        policy.check(peer_identity(context), action)

    agent_identities = set(args.agent_identity or ("agent",))

    def attach_check(context: grpc.ServicerContext, node_id: str) -> None:
        who = peer_identity(context)
        if who is None or who == node_id or who in agent_identities:
            return  # plaintext: nobody to check; a node's own cert; a shared agent cert
        raise PermissionError(f"certificate identity {who!r} may not attach as node "
                              f"{node_id!r}; agent identities: {sorted(agent_identities)}")

    store: StateStore
    election = None
    if args.store == "etcd":
        from splice.controller.etcd_store import EtcdStateStore
        from splice.controller.leader import LeaderElection

        if config.listen.endswith(":0"):
            raise ValueError("with --store etcd, --listen needs a fixed port: it is the "
                             "controller's identity in the leader election")
        etcd = EtcdStateStore(args.etcd, prefix=args.etcd_prefix)
        store = etcd
        identity = f"{args.advertise_host}:{config.listen.rpartition(':')[2]}"
        election = LeaderElection(etcd, key=f"{args.etcd_prefix}/leader", identity=identity,
                                  ttl_s=args.lease_ttl_s,
                                  on_lost=lambda reason: controller.on_leadership_lost(reason))
    else:
        store = InMemoryStateStore()
    from splice.controller.hang import HangConfig
    from splice.controller.telemetry_hub import DetectionConfig

    detection = DetectionConfig(
        hang=HangConfig(floor_s=args.hang_floor_s, multiple=args.hang_multiple),
        straggler_policy=args.straggler_policy)
    controller = Controller(config, store, election=election, detection=detection,
                            server_credentials=server_credentials(tls) if tls else None,
                            admin_check=admin_check, attach_check=attach_check)
    controller.start()
    if args.metrics_port >= 0:
        try:
            print(f"splice controller: metrics on http://"
                  f"{controller.serve_metrics(args.metrics_host, args.metrics_port)}/metrics",
                  flush=True)
        except OSError as e:
            print(f"splice controller: cannot serve metrics on port {args.metrics_port}: {e}",
                  file=sys.stderr)
    role = "campaigning for leadership" if election is not None else "leading"
    print(f"splice controller: job {args.job!r}, world {args.world_size}, serving on "
          f"{args.listen.rpartition(':')[0]}:{controller.port} "
          f"({'mutual TLS' if tls else 'plaintext'}, store {args.store}, {role})", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    controller.stop()
    return 0


def _agent(args: argparse.Namespace) -> int:
    from splice.agent.agent import AgentConfig, run_agent

    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    from splice.security import channel_credentials
    from splice.security_cli import tls_from_args

    config = AgentConfig(controller=args.controller, command=tuple(command), nproc=args.nproc,
                         job_id=args.job, node_id=args.node_id or socket.gethostname(),
                         gloo_host=args.gloo_host, connect_timeout_s=args.connect_timeout_s,
                         metrics_port=args.metrics_port, metrics_host=args.metrics_host,
                         spares=args.spares, replace=args.replace,
                         persist_dir=args.persist_dir, persist_every=args.persist_every,
                         snapshot_budget_mb=args.snapshot_budget_mb, tls=tls_from_args(args),
                         replicas=args.replicas, replica_budget_mb=args.replica_budget_mb,
                         failure_domain=args.failure_domain,
                         replicate_interval_s=args.replicate_interval_s)
    return run_agent(config, channel_credentials(config.tls) if config.tls else None)


def _status(args: argparse.Namespace) -> int:
    import grpc

    from splice.diagnostics.timeline import format_status
    from splice.proto import controller_pb2 as pb
    from splice.proto import controller_pb2_grpc as pb_grpc
    from splice.security import open_channel
    from splice.security_cli import tls_from_args

    with open_channel(args.controller, tls_from_args(args)) as channel:
        stub = pb_grpc.ControllerStub(channel)
        try:
            if args.cmd == "stop":
                status = stub.StopJob(pb.StopJobRequest(job_id=args.job, reason=args.reason),
                                      timeout=5)
            elif args.cmd == "check-replicas":
                status = stub.CheckReplicas(pb.CheckReplicasRequest(
                    job_id=args.job, reason=args.reason), timeout=5)
            else:
                status = stub.GetJobStatus(pb.JobStatusRequest(job_id=args.job), timeout=5)
        except grpc.RpcError as e:
            print(f"splice {args.cmd}: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    print(format_status(status))
    return 0


def _status_or_watch(args: argparse.Namespace) -> int:
    if not args.watch:
        return _status(args)
    from splice.diagnostics.live import run_watch
    from splice.security_cli import tls_from_args

    return run_watch(args.controller, args.job, tls_from_args(args), interval_s=args.interval_s)


def _diagnose(args: argparse.Namespace) -> int:
    from splice.diagnostics.diagnose import DiagnoseConfig, run_diagnose
    from splice.security_cli import tls_from_args

    return run_diagnose(DiagnoseConfig(controller=args.controller, job_id=args.job,
                                       out_dir=args.out, duration_s=args.duration_s,
                                       poll_s=args.poll_s, max_steps=args.steps),
                        tls_from_args(args))


def _demo(args: argparse.Namespace) -> int:
    from splice.diagnostics.demo import DemoConfig, run_demo

    # A node that joins must start its processes and import torch (seconds here): the
    # node-loss demo trains longer so the job is seen growing back before it ends.
    steps = args.steps or (600 if args.fault == "node-loss" else 300)
    return run_demo(DemoConfig(fault=args.fault, store=args.store, steps=steps,
                               straggler_policy=args.straggler_policy or (
                                   "rebalance" if args.fault == "straggler" else "alert"),
                               slowdown=args.slowdown,
                               json_output=args.json,
                               kill_at_step=args.kill_at_step, nodes=args.nodes,
                               nproc=args.nproc, skip_reference=args.no_reference,
                               replace=args.replace, tls=args.tls))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="splice", description="Keep distributed PyTorch training "
                                "running through failures.")
    sub = p.add_subparsers(dest="cmd", required=True)

    c = sub.add_parser("controller", help="run a job controller")
    c.add_argument("--listen", default="127.0.0.1:29400", help="gRPC address HOST:PORT")
    c.add_argument("--advertise-host", default="127.0.0.1",
                   help="address workers dial for the rendezvous store")
    c.add_argument("--store-port", type=int, default=0, help="rendezvous store port (0: any)")
    c.add_argument("--job", default="default", help="job id agents must name")
    c.add_argument("--world-size", type=int, required=True,
                   help="workers the job starts with (nodes x processes per node)")
    c.add_argument("--min-world-size", type=int, default=1,
                   help="stop the job instead of shrinking below this many workers")
    c.add_argument("--heartbeat-interval-s", type=float, default=1.0)
    c.add_argument("--node-timeout-s", type=float, default=10.0)
    c.add_argument("--store", choices=["memory", "etcd"], default="memory",
                   help="where epochs are persisted; etcd enables standby replicas")
    c.add_argument("--etcd", default="127.0.0.1:2379", help="etcd endpoints HOST:PORT[,...]")
    c.add_argument("--etcd-prefix", default="/splice", help="key prefix in etcd")
    c.add_argument("--lease-ttl-s", type=float, default=1.0,
                   help="leader lease TTL: a standby takes over about this long after the "
                        "leader dies (etcd may round it up)")
    c.add_argument("--metrics-port", type=int, default=9401,
                   help="Prometheus /metrics port (0: any free port, -1: off)")
    c.add_argument("--metrics-host", default="0.0.0.0", help="address /metrics binds to")
    c.add_argument("--straggler-policy", choices=["alert", "rebalance", "evict", "replace"],
                   default="alert", help="what a detected straggler triggers")
    c.add_argument("--hang-floor-s", type=float, default=1.0,
                   help="a hang is declared after max(this, --hang-multiple x median step)")
    c.add_argument("--hang-multiple", type=float, default=3.0)
    c.add_argument("--reattach-grace-s", type=float, default=5.0,
                   help="after a takeover, how long agents have to re-attach")
    add_tls_flags(c)
    add_admin_flags(c)
    c.add_argument("--agent-identity", action="append", default=None, metavar="NAME",
                   help="certificate CN that may attach as any node (repeatable; default: "
                        "agent). A certificate whose CN equals the node id may attach as "
                        "that node only.")
    c.set_defaults(func=_controller)

    a = sub.add_parser("agent", help="run a node agent that launches and supervises workers",
                       usage="splice agent --controller HOST:PORT --nproc N -- CMD ...")
    a.add_argument("--controller", required=True, help="controller address HOST:PORT")
    a.add_argument("--nproc", type=int, default=1, help="worker processes on this node")
    a.add_argument("--job", default="default")
    a.add_argument("--node-id", default="", help="unique node name (default: hostname)")
    a.add_argument("--gloo-host", default="127.0.0.1",
                   help="this node's address for gloo connections")
    a.add_argument("--connect-timeout-s", type=float, default=30.0)
    a.add_argument("--metrics-port", type=int, default=9400,
                   help="Prometheus /metrics port (0: any free port, -1: off)")
    a.add_argument("--metrics-host", default="0.0.0.0", help="address /metrics binds to")
    a.add_argument("--spares", type=int, default=0,
                   help="warm spare workers kept started (torch imported, waiting in "
                        "splice.init()) to replace a crashed worker within a second")
    a.add_argument("--replace", action="store_true",
                   help="replace a crashed worker (a warm spare, else a fresh process) "
                        "instead of training on with fewer ranks")
    a.add_argument("--persist-dir", default="",
                   help="persistent checkpoints go here (shared by every node); a job "
                        "started with checkpoints there resumes from the newest")
    a.add_argument("--snapshot-budget-mb", type=float, default=0.0,
                   help="host memory each worker's in-memory snapshots may take (two "
                        "steps' state); a worker over it stops with a clear error (0: no "
                        "limit)")
    a.add_argument("--persist-every", type=int, default=0,
                   help="rank 0 (with ShardedAdamW every rank, its shard) saves a checkpoint "
                        "every N steps, in the background (0: never; a cold start still "
                        "resumes from --persist-dir)")
    a.add_argument("--replicas", type=int, default=0,
                   help="push each worker's newest snapshot to this many peer agents on "
                        "other nodes (other failure domains first), ahead of a fault: a "
                        "joining worker falls back to them when no member's agent can "
                        "provide the resume step (0: off)")
    a.add_argument("--failure-domain", default="",
                   help="the rack or zone this node shares with others: replicas of its "
                        "snapshots go to nodes in other domains first (default: the node "
                        "is its own)")
    a.add_argument("--replica-budget-mb", type=float, default=0.0,
                   help="memory for peers' replicas held here; a push over it is refused "
                        "with a clear error (0: no limit)")
    a.add_argument("--replicate-interval-s", type=float, default=1.0,
                   help="push each worker's newest snapshot at most this often")
    add_tls_flags(a)
    a.add_argument("command", nargs=argparse.REMAINDER, help="-- worker command line")
    a.set_defaults(func=_agent)

    s = sub.add_parser("status", help="show a job's state and timeline")
    s.add_argument("--controller", default="127.0.0.1:29400")
    s.add_argument("--job", default="default")
    s.add_argument("--watch", action="store_true", help="redraw every --interval-s until Ctrl-C")
    s.add_argument("--interval-s", type=float, default=1.0)
    add_tls_flags(s)
    s.set_defaults(func=_status_or_watch)

    dg = sub.add_parser("diagnose", help="sample a running job and write a report with rank x "
                                         "step heatmaps of step and wait times")
    dg.add_argument("--controller", default="127.0.0.1:29400")
    dg.add_argument("--job", default="default")
    dg.add_argument("--out", required=True, help="directory for report.md and the PNGs")
    dg.add_argument("--duration-s", type=float, default=10.0,
                    help="how long to sample (stops earlier when the job ends)")
    dg.add_argument("--poll-s", type=float, default=0.2,
                    help="status sampling interval: shorter catches more steps")
    dg.add_argument("--steps", type=int, default=500, help="heatmap columns: the last N steps")
    add_tls_flags(dg)
    dg.set_defaults(func=_diagnose)

    st = sub.add_parser("stop", help="stop a job (administrative: needs an admin identity)")
    st.add_argument("--controller", default="127.0.0.1:29400")
    st.add_argument("--job", default="default")
    st.add_argument("--reason", default="stopped from the command line")
    add_tls_flags(st)
    st.set_defaults(func=_status)

    cr = sub.add_parser("check-replicas",
                        help="compare every replica's fingerprint at the next step boundary "
                             "(silent data corruption check on demand; needs an admin identity)")
    cr.add_argument("--controller", default="127.0.0.1:29400")
    cr.add_argument("--job", default="default")
    cr.add_argument("--reason", default="requested from the command line")
    add_tls_flags(cr)
    cr.set_defaults(func=_status)

    add_certs_parser(sub)

    d = sub.add_parser("demo", help="local demo: kill a worker mid-run and watch the job "
                                    "recover in place")
    d.add_argument("--fault", choices=["crash", "node-loss", "hang", "straggler", "bitflip",
                                       "controller-loss", "none"],
                   default="crash",
                   help="node-loss: SIGKILL a whole node (agent and workers); a new node "
                        "then joins and the job grows back")
    d.add_argument("--replace", action="store_true",
                   help="agents keep a warm spare and replace a crashed (or, with --fault "
                        "bitflip, evicted) worker with it: the job returns to full strength "
                        "with a peer's snapshot")
    d.add_argument("--straggler-policy", choices=["alert", "rebalance", "evict", "replace"],
                   default=None, help="what a straggler verdict does (default: rebalance with "
                                      "--fault straggler, alert otherwise)")
    d.add_argument("--slowdown", type=float, default=1.5, help="with --fault straggler")
    d.add_argument("--store", choices=["memory", "etcd"], default="memory",
                   help="state store (controller-loss needs etcd)")
    d.add_argument("--steps", type=int, default=0,
                   help="training steps (default 300; 600 with --fault node-loss)")
    d.add_argument("--kill-at-step", type=int, default=100)
    d.add_argument("--nodes", type=int, default=2)
    d.add_argument("--nproc", type=int, default=2)
    d.add_argument("--tls", action="store_true",
                   help="mutual TLS between controller, agents and the agents' snapshot "
                        "servers (a development CA is written to the run's log folder)")
    d.add_argument("--no-reference", action="store_true",
                   help="skip the fault-free reference run")
    d.add_argument("--json", action="store_true", help="print one JSON summary object")
    d.set_defaults(func=_demo)

    from splice.kube.cli import add_parser as add_operator_parser

    add_operator_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.cmd != "demo":
        logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                            format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return int(args.func(args))
    except ValueError as e:  # bad configuration: say so, no traceback
        print(f"splice {args.cmd}: {e}", file=sys.stderr)
        return 2
