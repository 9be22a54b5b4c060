"""The controller's Prometheus metrics: membership, faults, recoveries, detector verdicts,
link probes.

Each `ControllerMetrics` owns its own `CollectorRegistry`, never prometheus_client's global
one, so several controllers (HA replicas, tests) can live in one process without clashing.
Every label value is bounded: job names are one per controller, fault kinds, detectors and
actions come from the fixed vocabularies below (anything else is counted as "other"),
straggler ranks exist only while flagged, and link probes are histograms over all node
pairs (a pair label would grow with the square of the node count; the slow pair is named
in the "link" verdict's reason). Units are base units (seconds), counters end in
`_total`; see docs/kubernetes.md for the dashboard that reads them.

`MetricsServer` (a registry served over HTTP on a daemon thread) is shared with the agent.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

OTHER = "other"
# What failed. A fault or recovery of a kind not listed here is counted as "other", so a
# new detector cannot grow the series count before this list (and the dashboard) knows it.
FAULT_KINDS = ("crash", "node_lost", "hang", "straggler", "bitflip", OTHER)
RECOVERY_OUTCOMES = ("resumed", "failed")
DETECTORS = ("hang", "straggler", "bitflip", "node_health", "link", OTHER)
ACTIONS = ("none", "report", "evict", "recover", "alert", OTHER)   # compared lower-cased
LINK_PROBE_OUTCOMES = ("ok", "error")

# Recoveries take ~20 ms (a worker crash on one host) to tens of seconds (a lost node, a
# hang caught by its timeout); anything past 60 s lands in +Inf.
RECOVERY_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0)
# A probe's round trip: ~50 us on loopback, 0.1-1 ms in a data centre, 10-100 ms across
# regions; the agent gives up at the probe timeout (10 s by default).
LINK_RTT_BUCKETS_S = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
                      0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
# A probe's bulk transfer: ~1 Gb/s (1.25e8 B/s) to 400 Gb/s (5e10 B/s) links, loopback at
# several GB/s; a link that is slow stands out below 1e8.
LINK_BANDWIDTH_BUCKETS = (1e6, 1e7, 5e7, 1e8, 2.5e8, 5e8, 1e9, 2.5e9, 5e9, 1e10, 2.5e10,
                          5e10, 1e11)


def bounded(value: str, allowed: Sequence[str]) -> str:
    """`value` lower-cased if it is in `allowed`, else "other" (which `allowed` must hold)."""
    value = value.lower()
    return value if value in allowed else OTHER


class MetricsServer:
    """A registry's `/metrics` over HTTP on a daemon thread, until `close()`."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        # prometheus_client >= 0.20 returns the server and its thread, so it can be stopped.
        server, thread = start_http_server(port, addr=host, registry=registry)
        self._server: WSGIServer = server
        self._thread = thread
        self.port = int(server.server_port)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


class ServesMetrics:
    """`serve()`/`close()` for a class with a `registry`."""

    registry: CollectorRegistry
    _server: MetricsServer | None = None

    def serve(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Start serving `/metrics` on a daemon thread; returns the bound port (0: any)."""
        assert self._server is None, "already serving"
        self._server = MetricsServer(self.registry, host, port)
        return self._server.port

    def close(self) -> None:
        """Stop serving (no-op if not serving); the metrics keep their values."""
        if self._server is not None:
            self._server.close()
            self._server = None


class ControllerMetrics(ServesMetrics):
    """The controller's metrics. Methods take `job_id` (the `job_name` label) because one
    controller process may serve more than one job in tests; in production it is one."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        job = ["job_name"]
        self._epoch = Gauge("splice_epoch", "Current membership epoch of the job; it "
                            "moves on every recovery and scale change.", job, registry=r)
        self._world_size = Gauge("splice_world_size", "Ranks in the current membership.",
                                 job, registry=r)
        self._faults = Counter("splice_faults", "Faults detected, by kind (" +
                               ", ".join(FAULT_KINDS) + ").", [*job, "kind"], registry=r)
        self._recoveries = Counter("splice_recoveries", "Recoveries finished, by the kind of "
                                   "fault and outcome (resumed, failed).",
                                   [*job, "kind", "outcome"], registry=r)
        self._recovery_s = Histogram("splice_recovery_duration_seconds", "From fault "
                                     "detection to the new membership resuming (or giving "
                                     "up), by fault kind.", [*job, "kind"],
                                     buckets=RECOVERY_BUCKETS_S, registry=r)
        self._verdicts = Counter("splice_detector_verdicts", "Verdicts of the fault "
                                 "detectors, by detector and the action taken.",
                                 [*job, "detector", "action"], registry=r)
        # One series per *flagged* rank, removed when the flag clears (or the epoch
        # changes, which renumbers ranks): at most world-size series, usually none.
        self._straggler = Gauge("splice_straggler_score", "Slowdown score of a rank "
                                "flagged as a straggler (its step time over the group's, "
                                "1.0 = normal); present only while the rank is flagged.",
                                [*job, "rank"], registry=r)
        self._goodput = Gauge("splice_goodput_ratio", "Fraction of wall time spent on "
                              "training steps that were kept (0..1).", job, registry=r)
        # Per controller process (replica), not per job: the scrape target tells which.
        self._leader = Gauge("splice_controller_leader", "1 if this controller replica "
                             "leads (acts on the job), 0 if it stands by.", registry=r)
        self._records = Counter("splice_telemetry_records", "Telemetry records (steps, "
                                "collectives, progress) received from agents.", registry=r)
        self._dropped = Counter("splice_telemetry_dropped", "Telemetry records agents "
                                "dropped before sending (their buffer was full).",
                                registry=r)
        self._probe_rounds = Counter("splice_link_probe_rounds", "Link probe rounds "
                                     "started (every node pair measured once).", job,
                                     registry=r)
        self._probes = Counter("splice_link_probes", "Node pairs probed, by outcome (ok, "
                               "error: the probe failed or timed out).", [*job, "outcome"],
                               registry=r)
        self._probe_rtt_s = Histogram("splice_link_probe_rtt_seconds", "Round trip of a "
                                      "link probe between two nodes (median of a few "
                                      "pings), over all node pairs.", job,
                                      buckets=LINK_RTT_BUCKETS_S, registry=r)
        self._probe_bandwidth = Histogram("splice_link_probe_bandwidth_bytes_per_second",
                                          "Bandwidth of a link probe's bulk transfer from "
                                          "one node to another, over all node pairs.", job,
                                          buckets=LINK_BANDWIDTH_BUCKETS, registry=r)
        self._jobs: set[str] = set()
        self._epochs: dict[str, int] = {}
        self._flagged: dict[str, set[int]] = {}
        self._lock = threading.Lock()   # guards the three dicts above

    def _maybe_init_job(self, job_id: str) -> None:
        # Counters exist at 0 from the job's first update, so increase() sees the first
        # fault and a dashboard shows 0 rather than "no data". Bounded: 6 + 6 x 2 + 1 + 2.
        with self._lock:
            if job_id in self._jobs:
                return
            self._jobs.add(job_id)
        for kind in FAULT_KINDS:
            self._faults.labels(job_id, kind)
            for outcome in RECOVERY_OUTCOMES:
                self._recoveries.labels(job_id, kind, outcome)
        self._probe_rounds.labels(job_id)
        for outcome in LINK_PROBE_OUTCOMES:
            self._probes.labels(job_id, outcome)

    def set_membership(self, job_id: str, epoch: int, world_size: int) -> None:
        """A new membership. A new epoch renumbers ranks: straggler flags are dropped."""
        self._maybe_init_job(job_id)
        self._epoch.labels(job_id).set(epoch)
        self._world_size.labels(job_id).set(world_size)
        with self._lock:
            previous = self._epochs.get(job_id)
            self._epochs[job_id] = epoch
            stale = self._flagged.pop(job_id, set()) if previous != epoch else set()
        for rank in stale:
            self._straggler.remove(job_id, str(rank))

    def fault(self, job_id: str, kind: str) -> None:
        self._maybe_init_job(job_id)
        self._faults.labels(job_id, bounded(kind, FAULT_KINDS)).inc()

    def recovery(self, job_id: str, kind: str, outcome: str, duration_s: float) -> None:
        """A recovery from a fault of `kind` ended: `outcome` "resumed" or "failed"."""
        if outcome not in RECOVERY_OUTCOMES:
            raise ValueError(f"recovery outcome must be one of {RECOVERY_OUTCOMES}, "
                             f"got {outcome!r}")
        self._maybe_init_job(job_id)
        kind = bounded(kind, FAULT_KINDS)
        self._recoveries.labels(job_id, kind, outcome).inc()
        self._recovery_s.labels(job_id, kind).observe(duration_s)

    def verdict(self, job_id: str, detector: str, action: str) -> None:
        self._verdicts.labels(job_id, bounded(detector, DETECTORS),
                              bounded(action, ACTIONS)).inc()

    def straggler_score(self, job_id: str, rank: int, score: float) -> None:
        """Rank `rank` is flagged (or still is) with this score."""
        with self._lock:
            self._flagged.setdefault(job_id, set()).add(rank)
        self._straggler.labels(job_id, str(rank)).set(score)

    def clear_straggler(self, job_id: str, rank: int) -> None:
        """The flag on `rank` cleared: its series goes away (no-op if it was not flagged)."""
        with self._lock:
            flagged = self._flagged.get(job_id, set())
            if rank not in flagged:
                return
            flagged.discard(rank)
        self._straggler.remove(job_id, str(rank))

    def link_probe_round(self, job_id: str) -> None:
        """A probe round started (the agents were asked to measure every node pair)."""
        self._maybe_init_job(job_id)
        self._probe_rounds.labels(job_id).inc()

    def link_probe(self, job_id: str, rtt_s: float, bandwidth_bytes_per_s: float) -> None:
        """One node pair measured."""
        self._maybe_init_job(job_id)
        self._probes.labels(job_id, "ok").inc()
        self._probe_rtt_s.labels(job_id).observe(rtt_s)
        self._probe_bandwidth.labels(job_id).observe(bandwidth_bytes_per_s)

    def link_probe_failed(self, job_id: str) -> None:
        """One node pair's probe failed (refused, timed out)."""
        self._maybe_init_job(job_id)
        self._probes.labels(job_id, "error").inc()

    def set_goodput(self, job_id: str, ratio: float) -> None:
        self._goodput.labels(job_id).set(ratio)

    def set_leader(self, is_leader: bool) -> None:
        self._leader.set(1 if is_leader else 0)

    def telemetry_batch(self, num_records: int, dropped: int) -> None:
        """A telemetry batch arrived with `num_records`; the agent dropped `dropped`."""
        self._records.inc(num_records)
        self._dropped.inc(dropped)

