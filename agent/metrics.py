"""The agent's Prometheus metrics: step timing, collectives, worker exits, snapshots (in
shared memory, handed over, served to peers, replicas pushed and held), node health.

One `AgentMetrics` per agent, with its own `CollectorRegistry` (several agents share a
process in tests). Every series carries `job_name`; the node-level gauges also carry
`node`. Step timings are histograms (one observation per worker step) so that a dashboard
can take quantiles across the job; the scrape target (`pod`, `instance`) tells agents
apart, so they need no `node` label and the series count stays fixed per agent.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from splice.controller.metrics import ServesMetrics

WORKER_EXIT_KINDS = ("clean", "crash", "killed")
# What a peer's Fetch got from the agent's snapshot provider: a snapshot, nothing (no such
# worker or step here), or an exception (the Fetch then fails).
SERVED_OUTCOMES = ("ok", "missing", "error")

# The agent's snapshot provider (agent/replication.py's Provider, as the agent types it):
# (job id, worker id, step) -> (step, meta, data) or None.
SnapshotProvider = Callable[[str, str, int], "tuple[int, bytes, memoryview] | None"]

# Steps of a toy model take ~1 ms, of a large one minutes; past 120 s lands in +Inf.
STEP_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                  10.0, 30.0, 60.0, 120.0)
# Waiting inside collectives is ~100 us when ranks are balanced, seconds behind a
# straggler, up to the hang timeout when a peer is stuck.
WAIT_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                  0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class AgentMetrics(ServesMetrics):
    def __init__(self, job_id: str, node_id: str) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        job = ["job_name"]
        node = ["job_name", "node"]
        self._step_s = Histogram("splice_step_duration_seconds", "Wall time of one "
                                 "training step of one worker.", job,
                                 buckets=STEP_BUCKETS_S, registry=r).labels(job_id)
        self._compute_s = Histogram("splice_compute_duration_seconds", "Time of one step "
                                    "of one worker spent outside collectives (forward, "
                                    "backward, optimizer).", job,
                                    buckets=STEP_BUCKETS_S, registry=r).labels(job_id)
        self._wait_s = Histogram("splice_collective_wait_seconds", "Time of one step of "
                                 "one worker spent inside collectives (waiting for peers "
                                 "and transferring).", job,
                                 buckets=WAIT_BUCKETS_S, registry=r).labels(job_id)
        self._transfer = Counter("splice_collective_transfer_bytes", "Bytes workers passed "
                                 "to collectives.", job, registry=r).labels(job_id)
        self._exits = Counter("splice_worker_exits", "Worker processes that exited, by "
                              "kind (clean, crash, killed).", [*job, "kind"], registry=r)
        for kind in WORKER_EXIT_KINDS:   # present at 0, so increase() sees the first exit
            self._exits.labels(job_id, kind)
        self._workers = Gauge("splice_workers", "Worker processes alive on this node.",
                              node, registry=r).labels(job_id, node_id)
        self._snapshot_bytes = Gauge("splice_snapshot_bytes", "Size of the newest "
                                     "in-memory snapshots held on this node.", node,
                                     registry=r)
        self._snapshot_age = Gauge("splice_snapshot_age_seconds", "Age of the newest "
                                   "snapshot on this node when last reported.", node,
                                   registry=r)
        self._memory = Gauge("splice_node_memory_used_ratio", "Fraction of the node's "
                             "memory in use (0..1).", node, registry=r)
        self._throttled = Gauge("splice_node_cpu_throttled_ratio", "Fraction of recent CPU "
                                "scheduling periods the node's cgroup was throttled (0..1).",
                                node, registry=r)
        # Snapshot and health series appear with their first report, not as a made-up 0.
        # Shared memory is measured, not reported: 0 is the truth until a worker writes.
        self._shm_bytes = Gauge("splice_agent_snapshot_shm_bytes", "Bytes of snapshot files "
                                "in this agent's shared memory, summed over its workers "
                                "(and the dead ones' kept for their replacements).", node,
                                registry=r).labels(job_id, node_id)
        self._handovers = Counter("splice_agent_snapshot_handovers", "Dead workers' "
                                  "snapshots handed to their replacement in shared memory "
                                  "(no transfer).", job, registry=r).labels(job_id)
        self._served = Counter("splice_agent_snapshots_served", "Snapshot fetches of peers "
                               "answered from this agent's shared memory, by outcome (" +
                               ", ".join(SERVED_OUTCOMES) + ").", [*job, "outcome"],
                               registry=r)
        for outcome in SERVED_OUTCOMES:   # present at 0, so increase() sees the first one
            self._served.labels(job_id, outcome)
        self._served_bytes = Counter("splice_agent_snapshot_served_bytes", "Bytes (meta and "
                                     "data) of the snapshots handed to peers' fetches.", job,
                                     registry=r).labels(job_id)
        self._replica_bytes = Gauge("splice_agent_replica_bytes", "Bytes of replicas of "
                                    "other nodes' snapshots this agent holds (within "
                                    "--replica-budget-mb).", node,
                                    registry=r).labels(job_id, node_id)
        self._replica_pushes = Counter("splice_agent_replica_pushes", "Replicas of this "
                                       "node's snapshots pushed to peer agents, by outcome "
                                       "(ok, failed).", [*job, "outcome"], registry=r)
        for outcome in ("ok", "failed"):
            self._replica_pushes.labels(job_id, outcome)
        self._replica_pushed_bytes = Counter("splice_agent_replica_pushed_bytes", "Bytes of "
                                             "replicas pushed to peer agents.", job,
                                             registry=r).labels(job_id)
        self.job_id = job_id
        self.node_id = node_id

    def watch_replicas(self, held_bytes: Callable[[], int]) -> None:
        """`splice_agent_replica_bytes` is read at each scrape."""
        self._replica_bytes.set_function(held_bytes)

    def replica_pushed(self, ok: bool, num_bytes: int = 0) -> None:
        self._replica_pushes.labels(self.job_id, "ok" if ok else "failed").inc()
        if ok:
            self._replica_pushed_bytes.inc(num_bytes)

    def step(self, step_time_s: float, compute_s: float, wait_s: float,
             collective_bytes: int) -> None:
        """One worker finished one step."""
        self._step_s.observe(step_time_s)
        self._compute_s.observe(compute_s)
        self._wait_s.observe(wait_s)
        self._transfer.inc(collective_bytes)

    def worker_exit(self, kind: str) -> None:
        """A worker exited: "clean" (status 0), "crash" (other status or signal) or
        "killed" (SIGKILL, by us or the OOM killer)."""
        if kind not in WORKER_EXIT_KINDS:
            raise ValueError(f"worker exit kind must be one of {WORKER_EXIT_KINDS}, "
                             f"got {kind!r}")
        self._exits.labels(self.job_id, kind).inc()

    def set_workers(self, alive: int) -> None:
        self._workers.set(alive)

    def snapshot(self, num_bytes: int, age_s: float) -> None:
        self._snapshot_bytes.labels(self.job_id, self.node_id).set(num_bytes)
        self._snapshot_age.labels(self.job_id, self.node_id).set(age_s)

    def watch_snapshot_shm(self, root: str) -> None:
        """`splice_agent_snapshot_shm_bytes` is measured at each scrape: the files in the
        worker directories under `root` (`snapshot_shm_bytes`)."""
        self._shm_bytes.set_function(lambda: snapshot_shm_bytes(root))

    def snapshot_handed_over(self) -> None:
        """A dead worker's snapshots became its replacement's."""
        self._handovers.inc()

    def counting_served(self, provider: SnapshotProvider) -> SnapshotProvider:
        """`provider`, counting what it hands to peers' Fetch streams (and the bytes of
        each snapshot handed over, whether or not the peer then reads the stream to its
        end); an exception is counted as "error" and raised on."""
        def counted(job_id: str, worker_id: str, step: int
                    ) -> tuple[int, bytes, memoryview] | None:
            try:
                own = provider(job_id, worker_id, step)
            except Exception:
                self._served.labels(self.job_id, "error").inc()
                raise
            if own is None:
                self._served.labels(self.job_id, "missing").inc()
                return None
            _, meta, data = own
            self._served.labels(self.job_id, "ok").inc()
            self._served_bytes.inc(len(meta) + data.nbytes)
            return own
        return counted

    def node_health(self, memory_used_ratio: float, cpu_throttled_ratio: float) -> None:
        self._memory.labels(self.job_id, self.node_id).set(memory_used_ratio)
        self._throttled.labels(self.job_id, self.node_id).set(cpu_throttled_ratio)


def snapshot_shm_bytes(root: str) -> int:
    """Bytes of the files in each directory under `root` (one per worker; 0 if `root` is
    missing). The slots' pages are reserved up front (posix_fallocate), so a file's size is
    the memory it holds. Directories come and go under the scan (removed with their worker,
    renamed on a handover); one that vanished midway counts 0 until the next scrape."""
    total = 0
    try:
        with os.scandir(root) as workers:
            dirs = [w.path for w in workers if w.is_dir(follow_symlinks=False)]
    except FileNotFoundError:
        return 0
    for path in dirs:
        try:
            with os.scandir(path) as files:
                for f in files:
                    try:
                        if f.is_file(follow_symlinks=False):
                            total += f.stat(follow_symlinks=False).st_size
                    except FileNotFoundError:   # a slot file replaced by a new layout's
                        continue
        except FileNotFoundError:   # the worker's directory went meanwhile
            continue
    return total
