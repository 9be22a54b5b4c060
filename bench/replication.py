"""Snapshot replication throughput over loopback (issue 3, item 2), with memory bounds.

Two agent-like processes (spawned), each running a real SnapshotPeer gRPC server
(agent/replication.py): the sender holds one worker's snapshot (--mb of data plus a small
meta) and pushes it into the receiver's ReplicaStore; then it fetches its replica back
from the receiver (what a replacement worker on a node that lost its memory does).

For each chunk size, --runs pushes then --runs fetches:

    seconds_p50          one whole push (or fetch), median over the runs
    gb_per_s             data bytes / seconds_p50 (GB = 1e9 bytes)
    sender_rss_growth_mb, receiver_rss_growth_mb
                         peak RSS during the operation minus RSS just before it, max over
                         the runs (sampled every millisecond from /proc/self/statm). The
                         side that ends up with a copy grows by the snapshot itself; the
                         other side's growth is the transport's own memory: a few chunks.
    overhead_mb          the largest growth minus the snapshot's bytes kept: what the
                         transfer needed beyond its destination buffer

    python -m bench.replication [--mb 100] [--runs 3] [--chunks-kib 256,1024,4096]

Prints one JSON object per (operation, chunk size), then a summary object.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import threading
import time
from multiprocessing.connection import Connection
from typing import Any

MB = 1_000_000
PAGE = os.sysconf("SC_PAGE_SIZE")


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class PeakRss:
    """RSS sampled every millisecond on a thread, between `start` and `stop`."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.base = self.peak = 0

    def start(self) -> None:
        self.base = self.peak = _rss()
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, _rss())

    def stop(self) -> int:
        self._stop.set()
        assert self._thread is not None
        self._thread.join()
        self.peak = max(self.peak, _rss())
        return self.peak - self.base


def _node(conn: Connection, job_id: str, data_bytes: int) -> None:
    """One agent: a SnapshotPeer server, and commands from the parent over `conn`."""
    import torch  # noqa: F401  (fetch hands back a tensor; import it before measuring)

    from splice.agent.replication import ReplicaStore, fetch, push, serve

    store = ReplicaStore(0, job_id=job_id)
    server = serve(store, "localhost:0")
    data = bytearray(os.urandom(data_bytes)) if data_bytes else bytearray()
    meta = b"m" * 4096
    watch = PeakRss()
    conn.send(server.address)
    while True:
        cmd, *args = conn.recv()
        if cmd == "exit":
            break
        if cmd == "watch":
            watch.start()
            conn.send(None)
        elif cmd == "unwatch":
            conn.send(watch.stop())
        elif cmd == "push":
            address, step, chunk_bytes = args
            watch.start()
            t0 = time.perf_counter()
            push(address, job_id, "node-a/0", step, 1, meta, memoryview(data), chunk_bytes)
            seconds = time.perf_counter() - t0
            conn.send((seconds, watch.stop()))
        elif cmd == "fetch":
            address, step, chunk_bytes = args
            watch.start()
            t0 = time.perf_counter()
            got = fetch([address], job_id, "node-a/0", step, chunk_bytes=chunk_bytes)
            seconds = time.perf_counter() - t0
            growth = watch.stop()
            ok = got.meta == meta and got.data.numpy().tobytes() == bytes(data)
            del got
            conn.send((seconds, growth, ok))
    server.stop()


def run(mb: float, runs: int, chunks_kib: list[int]) -> list[dict[str, Any]]:
    ctx = mp.get_context("spawn")
    data_bytes = int(mb * MB)
    results = []
    for chunk_kib in chunks_kib:
        chunk_bytes = chunk_kib * 1024
        pipes, procs, addresses = [], [], []
        for size in (data_bytes, 0):  # sender, receiver
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_node, args=(child, "bench", size), daemon=True)
            proc.start()
            pipes.append(parent)
            procs.append(proc)
            addresses.append(parent.recv())
        sender, receiver = pipes
        try:
            for op in ("push", "fetch"):
                seconds, sender_growth, receiver_growth = [], [], []
                for i in range(runs):
                    receiver.send(("watch",))
                    receiver.recv()
                    sender.send((op, addresses[1], i + 1 if op == "push" else 0, chunk_bytes))
                    reply = sender.recv()
                    receiver.send(("unwatch",))
                    receiver_growth.append(receiver.recv())
                    seconds.append(reply[0])
                    sender_growth.append(reply[1])
                    if op == "fetch" and not reply[2]:
                        raise SystemExit("fetched snapshot differs from the pushed one")
                p50 = statistics.median(seconds)
                keeper = receiver_growth if op == "push" else sender_growth
                results.append({
                    "benchmark": "replication", "op": op, "chunk_kib": chunk_kib,
                    "data_mb": mb, "runs": runs, "seconds_p50": round(p50, 4),
                    "seconds": [round(s, 4) for s in seconds],
                    "gb_per_s": round(data_bytes / p50 / 1e9, 3),
                    "sender_rss_growth_mb": round(max(sender_growth) / MB, 1),
                    "receiver_rss_growth_mb": round(max(receiver_growth) / MB, 1),
                    "overhead_mb": round((max(keeper) - data_bytes) / MB, 1),
                })
                print(json.dumps(results[-1]), flush=True)
        finally:
            for conn, proc in zip(pipes, procs, strict=True):
                conn.send(("exit",))
                proc.join(30)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=100.0, help="snapshot data size, MB")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--chunks-kib", default="256,1024,4096",
                        help="comma-separated chunk sizes in KiB")
    args = parser.parse_args()
    chunks = [int(c) for c in args.chunks_kib.split(",")]
    load_before = os.getloadavg()[0]
    results = run(args.mb, args.runs, chunks)
    best = {op: max((r for r in results if r["op"] == op), key=lambda r: r["gb_per_s"])
            for op in ("push", "fetch")}
    print(json.dumps({
        "benchmark": "replication",
        "command": " ".join(["python -m bench.replication", *sys.argv[1:]]),
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus",
        "platform": platform.platform(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "data_mb": args.mb, "runs": args.runs, "chunks_kib": chunks,
        "push_best_gb_per_s": best["push"]["gb_per_s"],
        "push_best_chunk_kib": best["push"]["chunk_kib"],
        "fetch_best_gb_per_s": best["fetch"]["gb_per_s"],
        "fetch_best_chunk_kib": best["fetch"]["chunk_kib"],
        "max_transport_overhead_mb": max(r["overhead_mb"] for r in results),
        # Other work on the machine slows both ends: the 1-minute load, before and after.
        "loadavg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "note": "loopback, two spawned processes each with a SnapshotPeer server; fetch "
                "reads the replica back from the receiver's store; GB = 1e9 bytes; RSS "
                "growth = peak during the op minus RSS before it, max over runs",
    }), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
