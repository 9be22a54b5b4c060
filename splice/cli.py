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


def _controller(args: argparse.Namespace) -> int:
    from splice.controller.job import JobSpec
    from splice.controller.service import Controller, ControllerConfig
    from splice.controller.store import InMemoryStateStore

    config = ControllerConfig(
        listen=args.listen, advertise_host=args.advertise_host, store_port=args.store_port,
        heartbeat_interval_s=args.heartbeat_interval_s, node_timeout_s=args.node_timeout_s,
        jobs=(JobSpec(job_id=args.job, world_size=args.world_size,
                      min_world_size=args.min_world_size),),
    )
    controller = Controller(config, InMemoryStateStore())
    controller.start()
    print(f"splice controller: job {args.job!r}, world {args.world_size}, serving on "
          f"{args.listen.rpartition(':')[0]}:{controller.port}", flush=True)
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
    config = AgentConfig(controller=args.controller, command=tuple(command), nproc=args.nproc,
                         job_id=args.job, node_id=args.node_id or socket.gethostname(),
                         gloo_host=args.gloo_host, connect_timeout_s=args.connect_timeout_s)
    return run_agent(config)


def _status(args: argparse.Namespace) -> int:
    import grpc

    from splice.diagnostics.timeline import format_status
    from splice.proto import controller_pb2 as pb
    from splice.proto import controller_pb2_grpc as pb_grpc

    with grpc.insecure_channel(args.controller) as channel:
        stub = pb_grpc.ControllerStub(channel)
        try:
            status = stub.GetJobStatus(pb.JobStatusRequest(job_id=args.job), timeout=5)
        except grpc.RpcError as e:
            print(f"splice status: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    print(format_status(status))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from splice.diagnostics.demo import DemoConfig, run_demo

    return run_demo(DemoConfig(fault=args.fault, steps=args.steps, json_output=args.json,
                               kill_at_step=args.kill_at_step, nodes=args.nodes,
                               nproc=args.nproc, skip_reference=args.no_reference))


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
    a.add_argument("command", nargs=argparse.REMAINDER, help="-- worker command line")
    a.set_defaults(func=_agent)

    s = sub.add_parser("status", help="show a job's state and timeline")
    s.add_argument("--controller", default="127.0.0.1:29400")
    s.add_argument("--job", default="default")
    s.set_defaults(func=_status)

    d = sub.add_parser("demo", help="local demo: kill a worker mid-run and watch the job "
                                    "recover in place")
    d.add_argument("--fault", choices=["crash", "none"], default="crash")
    d.add_argument("--steps", type=int, default=300)
    d.add_argument("--kill-at-step", type=int, default=100)
    d.add_argument("--nodes", type=int, default=2)
    d.add_argument("--nproc", type=int, default=2)
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
