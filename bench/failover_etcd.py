"""Controller failover on etcd: SIGKILL the leader, time until a standby holds leadership.

Each run starts two contender processes (`python -m tests.etcd_server contend`) on a fresh
leader key of one local etcd (started with --heartbeat-interval 50 --election-timeout 500):
the first becomes leader, the second reports it is standing by, then the leader's process
group is SIGKILLed. takeover_s = kill -> the standby's campaign returned (both CLOCK_MONOTONIC
on this machine). It is lease TTL left at the kill + etcd's expiry sweep (every 500 ms) +
the watch and one transaction.

    python -m bench.failover_etcd [--runs 7] [--ttl-s 1]

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time

from bench.torchrun_baseline import percentile
from splice.controller.etcd_store import EtcdStateStore
from splice.controller.leader import LeaderElection
from tests.etcd_server import Contender, EtcdServer, find_etcd_binary

EVENT_TIMEOUT_S = 30.0


def one_run(endpoint: str, run: int, ttl_s: float) -> float:
    key = f"/bench/failover/{run}/leader"
    leader = Contender(endpoint, key, f"10.0.0.1:{7000 + run}", ttl_s)
    standby = None
    try:
        leader.wait_event("leader", EVENT_TIMEOUT_S)
        standby = Contender(endpoint, key, f"10.0.0.2:{7000 + run}", ttl_s)
        standby.wait_event("standby", EVENT_TIMEOUT_S)
        killed_s = time.monotonic()
        leader.signal(signal.SIGKILL)
        elected = standby.wait_event("leader", EVENT_TIMEOUT_S)
        return float(elected["t_monotonic"]) - killed_s
    finally:
        leader.close()
        if standby is not None:
            standby.close()


def granted_ttl(endpoint: str, ttl_s: float) -> float | None:
    store = EtcdStateStore(endpoint)
    election = LeaderElection(store, "/bench/ttl-probe", "probe", ttl_s=ttl_s)
    try:
        election.campaign(threading.Event())
        return election.granted_ttl_s
    finally:
        election.close()
        store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--ttl-s", type=float, default=1.0)
    args = parser.parse_args()
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    binary = find_etcd_binary()
    if binary is None:
        sys.exit("etcd binary not found: install etcd-server or set SPLICE_ETCD_BINARY")
    etcd_version = subprocess.run([binary, "--version"], capture_output=True, text=True,
                                  check=True).stdout.splitlines()[0]
    with EtcdServer(binary) as server:
        server.start()
        granted = granted_ttl(server.endpoint, args.ttl_s)
        takeovers = [one_run(server.endpoint, run, args.ttl_s) for run in range(args.runs)]
    print(json.dumps({
        "bench": "failover_etcd",
        "metric": "leader SIGKILL -> standby holds leadership",
        "runs": args.runs,
        "requested_ttl_s": args.ttl_s,
        "granted_ttl_s": granted,
        "etcd": f"{etcd_version}, --heartbeat-interval 50 --election-timeout 500",
        "takeover_s": [round(t, 3) for t in takeovers],
        "p50_s": round(percentile(takeovers, 50), 3),
        "p90_s": round(percentile(takeovers, 90), 3),
        "max_s": round(max(takeovers), 3),
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", "-m", "bench.failover_etcd", *sys.argv[1:]]),
    }))


if __name__ == "__main__":
    main()
