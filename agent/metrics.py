"""The agent's Prometheus metrics: step timing, collectives, worker exits, snapshots, node
health.

One `AgentMetrics` per agent, with its own `CollectorRegistry` (several agents share a
process in tests). Every series carries `job_name`; the node-level gauges also carry
`node`. Step timings are histograms (one observation per worker step) so that a dashboard
can take quantiles across the job; the scrape target (`pod`, `instance`) tells agents
apart, so they need no `node` label and the series count stays fixed per agent.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from splice.controller.metrics import ServesMetrics

WORKER_EXIT_KINDS = ("clean", "crash", "killed")

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
        self.job_id = job_id
        self.node_id = node_id

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

    def node_health(self, memory_used_ratio: float, cpu_throttled_ratio: float) -> None:
        self._memory.labels(self.job_id, self.node_id).set(memory_used_ratio)
        self._throttled.labels(self.job_id, self.node_id).set(cpu_throttled_ratio)
