"""Pushing a node's snapshots to its peer agents (agent/replication.py's client), and
where they go: `place_replicas` picks each node's k peers across failure domains.

`Replicator` pushes each local worker's newest committed snapshot when it is newer than
the one last pushed, never queueing more than one per worker (intermediate steps are
skipped while a push is in flight).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import grpc

from splice.agent.replication import channel_to, push
from splice.agent.replication_wire import (
    DEFAULT_CHUNK_BYTES,
    AlreadyHeld,
    Buffer,
    ReplicationError,
    _byte_view,
)

log = logging.getLogger("splice.agent")
# ---- pushing the node's snapshots -----------------------------------------------------------

LocalSnapshot = tuple[str, int, int, "bytes | memoryview", Buffer]  # worker, step, epoch, meta, data
PushFn = Callable[[str, str, int, int, "bytes | memoryview", Buffer], None]


@dataclass(frozen=True)
class ReplicatorStats:
    bytes_pushed: int
    pushes_ok: int
    pushes_failed: int
    last_push_s: float       # duration of the last successful push
    lag_steps: int           # max over workers and peers: newest local step - step pushed
    in_flight: int


class Replicator:
    """Pushes each local worker's newest snapshot to the node's peers, on its own thread.

    Each round reads `snapshots()` (the newest committed snapshot of each local worker)
    and `peers()`; a worker whose snapshot is newer than what a peer holds from us gets one
    push task, unless one is in flight already: steps committed meanwhile are skipped, the
    next round sends the newest. Rounds run every `interval_s` and on `poke()`; a worker's
    pushes start at least `min_gap_s` apart."""

    def __init__(self, job_id: str, snapshots: Callable[[], list[LocalSnapshot]],
                 peers: Callable[[], list[str]], *, interval_s: float = 0.5,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES, timeout_s: float = 300.0,
                 max_concurrent_pushes: int = 2, push_fn: PushFn | None = None,
                 min_gap_s: float = 0.0) -> None:
        self.job_id, self.interval_s = job_id, interval_s
        # A worker's next push starts at least this long after its previous one started,
        # so replication takes a bounded share of the node's CPU and network.
        self.min_gap_s = min_gap_s
        self._started: dict[str, float] = {}  # worker -> time.monotonic() of its last push
        self._snapshots, self._peers = snapshots, peers
        self._chunk_bytes, self._timeout_s = chunk_bytes, timeout_s
        self._push_fn = push_fn or self._push_grpc
        self._pool = ThreadPoolExecutor(max_concurrent_pushes, thread_name_prefix="splice-repl")
        self._cond = threading.Condition()
        self._channels: dict[str, grpc.Channel] = {}
        self._pushed: dict[tuple[str, str], tuple[int, int]] = {}  # (worker, peer) -> (epoch, step)
        self._newest: dict[str, tuple[int, int]] = {}  # worker -> (epoch, step) committed
        self._peers_seen: list[str] = []
        self._in_flight: set[str] = set()
        self._bytes = self._ok = self._failed = 0
        self._last_s = 0.0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="splice-replicator", daemon=True)

    def start(self) -> Replicator:
        self._thread.start()
        return self

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def poke(self) -> None:
        """A snapshot was committed: run a round now rather than at the next interval."""
        self._wake.set()

    def maybe_push(self) -> list[Future[None]]:
        """One round: start the pushes due; returns their futures."""
        peers = self._peers()
        with self._cond:
            self._peers_seen = list(peers)
        started = []
        now = time.monotonic()
        for worker, step, epoch, meta, data in self._snapshots():
            with self._cond:
                self._newest[worker] = (epoch, step)
                if worker in self._in_flight or self._stop.is_set():
                    continue
                if now - self._started.get(worker, -1e18) < self.min_gap_s:
                    continue
                due = [p for p in peers if self._pushed.get((worker, p), (-1, -1)) < (epoch, step)]
                if not due:
                    continue
                self._in_flight.add(worker)
                self._started[worker] = now
            started.append(self._pool.submit(self._push_one, worker, step, epoch, meta, data,
                                             due))
        return started

    def _push_one(self, worker: str, step: int, epoch: int, meta: bytes | memoryview,
                  data: Buffer, peers: list[str]) -> None:
        size = len(meta) + len(_byte_view(data))
        try:
            for peer in peers:
                t0 = time.perf_counter()
                try:
                    self._push_fn(peer, worker, step, epoch, meta, data)
                except AlreadyHeld:
                    pass
                except (ReplicationError, grpc.RpcError, OSError) as e:
                    log.warning("replica of %s step %d to %s failed: %s", worker, step, peer, e)
                    with self._cond:
                        self._failed += 1
                    continue
                with self._cond:
                    self._pushed[(worker, peer)] = (epoch, step)
                    self._ok += 1
                    self._bytes += size
                    self._last_s = time.perf_counter() - t0
                    self._cond.notify_all()
        finally:
            with self._cond:
                self._in_flight.discard(worker)
                self._cond.notify_all()
            self._wake.set()  # a newer step may have been committed meanwhile

    def _push_grpc(self, peer: str, worker: str, step: int, epoch: int,
                   meta: bytes | memoryview, data: Buffer) -> None:
        with self._cond:
            channel = self._channels.get(peer)
            if channel is None:
                channel = self._channels[peer] = channel_to(peer)
        push(channel, self.job_id, worker, step, epoch, meta, data, self._chunk_bytes,
             timeout_s=self._timeout_s)

    def stats(self) -> ReplicatorStats:
        with self._cond:
            lag = 0
            for worker, (epoch, newest) in self._newest.items():
                for peer in self._peers_seen:
                    held_epoch, held = self._pushed.get((worker, peer), (epoch, 0))
                    lag = max(lag, newest - (held if held_epoch == epoch else 0))
            return ReplicatorStats(self._bytes, self._ok, self._failed, self._last_s, lag,
                                   len(self._in_flight))

    def wait_pushed(self, worker_id: str, step: int, peer: str, timeout_s: float) -> bool:
        """Block until `peer` holds `worker_id`'s `step` (or newer) from us, up to timeout_s."""
        with self._cond:
            return self._cond.wait_for(
                lambda: self._pushed.get((worker_id, peer), (0, -1))[1] >= step, timeout_s)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.maybe_push()
            except Exception:
                log.exception("replication round failed")
            self._wake.wait(self.interval_s)
            self._wake.clear()

    def close(self) -> None:
        """Stop: no new pushes; those in flight are cancelled (their channels closed)."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join()
        with self._cond:
            channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            channel.close()
        self._pool.shutdown(wait=True)


# ---- placement ------------------------------------------------------------------------------

def place_replicas(nodes: Sequence[str], k: int,
                   domain_of: Mapping[str, str] | Callable[[str], str] | None = None,
                   ) -> dict[str, list[str]]:
    """Each node's k peers to hold its workers' replicas. Pure.

    A node's peers are on other nodes and, whenever k nodes outside its failure domain
    (`domain_of`: rack, zone; default: each node its own) exist, outside its domain.
    Nodes are ordered round-robin over the domains (largest first) and each takes as peers
    the nodes 1, 2, 3, ... places after it, skipping its own domain (a second pass takes
    those only where too few others exist). Every shift is a bijection, so nodes that
    accept the same shifts receive exactly k replicas each: always without domains, and
    with domains of equal size; with unequal ones, about k. With fewer than k other
    nodes, each gets all the others."""
    if k < 0:
        raise ValueError(f"replica count k must be >= 0, got {k}")
    if len(set(nodes)) != len(nodes):
        raise ValueError(f"duplicate node ids in {list(nodes)}")
    if domain_of is None:
        domain: Callable[[str], str] = lambda n: n  # noqa: E731
    else:
        domain = domain_of.__getitem__ if isinstance(domain_of, Mapping) else domain_of
    by_domain: dict[str, list[str]] = {}
    for node in sorted(nodes):
        by_domain.setdefault(domain(node), []).append(node)
    groups = sorted(by_domain.values(), key=lambda g: (-len(g), g[0]))
    order = [g[i] for i in range(len(groups[0]) if groups else 0) for g in groups if i < len(g)]
    n, want = len(order), min(k, len(order) - 1)
    placement: dict[str, list[str]] = {node: [] for node in order}
    for same_domain in (False, True):
        for shift in range(1, n):
            if all(len(peers) == want for peers in placement.values()):
                break
            for i, node in enumerate(order):
                peers, target = placement[node], order[(i + shift) % n]
                if len(peers) < want and (domain(target) == domain(node)) == same_domain:
                    peers.append(target)
    return placement
