"""The controller's and agent's metrics as a scraper reads them: names, types, units and
labels follow the Prometheus conventions, label values stay bounded, registries are
private, and every metric the Grafana dashboard queries exists. The exposition text is
parsed with prometheus_client's own parser, as a scrape would be."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from splice.agent import replication
from splice.agent.agent import Agent, AgentConfig
from splice.agent.metrics import AgentMetrics, snapshot_shm_bytes
from splice.controller.job import JobSpec
from splice.controller.metrics import (
    FAULT_KINDS,
    LINK_BANDWIDTH_BUCKETS,
    LINK_RTT_BUCKETS_S,
    RECOVERY_BUCKETS_S,
    ControllerMetrics,
)
from splice.controller.service import PROTOCOL_VERSION, AgentSession, Controller, ControllerConfig
from splice.controller.store import InMemoryStateStore
from splice.proto import controller_pb2 as pb
from tests.prometheus_server import dashboard_queries

DASHBOARD = Path(__file__).resolve().parent.parent / "manifests" / "grafana" / "dashboard.json"

CONTROLLER_METRICS = {
    "splice_epoch": "gauge", "splice_world_size": "gauge",
    "splice_faults_total": "counter", "splice_recoveries_total": "counter",
    "splice_recovery_duration_seconds": "histogram",
    "splice_detector_verdicts_total": "counter", "splice_straggler_score": "gauge",
    "splice_goodput_ratio": "gauge", "splice_controller_leader": "gauge",
    "splice_telemetry_records_total": "counter", "splice_telemetry_dropped_total": "counter",
    "splice_link_probe_rounds_total": "counter", "splice_link_probes_total": "counter",
    "splice_link_probe_rtt_seconds": "histogram",
    "splice_link_probe_bandwidth_bytes_per_second": "histogram",
}
AGENT_METRICS = {
    "splice_step_duration_seconds": "histogram", "splice_compute_duration_seconds": "histogram",
    "splice_collective_wait_seconds": "histogram",
    "splice_collective_transfer_bytes_total": "counter", "splice_worker_exits_total": "counter",
    "splice_workers": "gauge", "splice_snapshot_bytes": "gauge",
    "splice_snapshot_age_seconds": "gauge", "splice_node_memory_used_ratio": "gauge",
    "splice_node_cpu_throttled_ratio": "gauge",
    "splice_agent_snapshot_shm_bytes": "gauge",
    "splice_agent_snapshot_handovers_total": "counter",
    "splice_agent_snapshots_served_total": "counter",
    "splice_agent_snapshot_served_bytes_total": "counter",
    "splice_agent_replica_bytes": "gauge",
    "splice_agent_replica_pushes_total": "counter",
    "splice_agent_replica_pushed_bytes_total": "counter",
}
# Per controller process, not per job: the scrape target says which replica it is.
PROCESS_LEVEL = {"splice_controller_leader", "splice_telemetry_records_total",
                 "splice_telemetry_dropped_total"}
NOT_BASE_UNITS = re.compile(r"_(ms|millis|milliseconds|us|microseconds|ns|minutes|hours|"
                            r"kb|mb|gb|kib|mib|gib|kilobytes|megabytes|percent)(_|$)")


def fed_controller(job: str = "mlp") -> ControllerMetrics:
    """A controller whose every update method has been called."""
    m = ControllerMetrics()
    m.set_membership(job, epoch=2, world_size=3)
    m.fault(job, "crash")
    m.recovery(job, "crash", "resumed", duration_s=0.04)
    m.verdict(job, "straggler", "report")
    m.straggler_score(job, rank=1, score=1.3)
    m.set_goodput(job, 0.95)
    m.set_leader(True)
    m.telemetry_batch(num_records=10, dropped=1)
    m.link_probe_round(job)
    m.link_probe(job, rtt_s=0.0003, bandwidth_bytes_per_s=1.1e9)
    m.link_probe_failed(job)
    return m


def fed_agent() -> AgentMetrics:
    m = AgentMetrics("mlp", "node-0")
    m.step(0.12, 0.09, 0.03, 4 << 20)
    m.worker_exit("killed")
    m.set_workers(1)
    m.snapshot(num_bytes=48 << 20, age_s=0.1)
    m.node_health(memory_used_ratio=0.4, cpu_throttled_ratio=0.0)
    m.snapshot_handed_over()
    m.counting_served(lambda job, wid, step: (7, b"meta", memoryview(bytes(96))))(
        "mlp", "node-0/0", 0)
    m.watch_replicas(lambda: 1 << 20)
    m.replica_pushed(True, 1 << 20)
    m.replica_pushed(False)
    return m


def families(registry: CollectorRegistry) -> dict[str, Metric]:
    """The families a scrape of `registry` yields, by exposed name (counters with _total),
    without the `*_created` gauges prometheus_client adds beside counters and histograms."""
    parsed = list(text_string_to_metric_families(generate_latest(registry).decode()))
    bases = {f.name for f in parsed if f.type in ("counter", "histogram")}
    out = {}
    for f in parsed:
        if f.type == "gauge" and f.name.endswith("_created") and f.name[:-8] in bases:
            continue
        out[f.name + ("_total" if f.type == "counter" else "")] = f
    return out


FED = {"controller": fed_controller, "agent": fed_agent}


def test_the_exported_metrics_are_the_documented_set() -> None:
    assert {n: f.type for n, f in families(fed_controller().registry).items()} == \
        CONTROLLER_METRICS
    assert {n: f.type for n, f in families(fed_agent().registry).items()} == AGENT_METRICS


@pytest.mark.parametrize("side", FED)
def test_names_types_and_units_follow_the_conventions(side: str) -> None:
    for name, f in families(FED[side]().registry).items():
        assert re.fullmatch(r"splice_[a-z][a-z0-9_]*", name), name
        assert f.documentation.strip(), f"{name} has no help text"
        assert not NOT_BASE_UNITS.search(name), f"{name}: use base units (seconds, bytes)"
        assert f.samples, f"{name} has no series after every update was called"
        if f.type == "counter":
            assert all(s.name == name for s in f.samples), name   # each sample ends _total
        else:
            assert not name.endswith("_total"), f"{name}: only counters end in _total"
        if re.search(r"_(duration|age|latency|wait|time|rtt)(_|$)", name) and \
                f.type != "counter":
            assert name.endswith("_seconds"), f"{name} measures time: end in _seconds"
        if f.type == "histogram":
            assert name.endswith(("_seconds", "_bytes", "_bytes_per_second")), name
            buckets = [s for s in f.samples if s.name == name + "_bucket"]
            assert buckets and buckets[-1].labels["le"] == "+Inf", name
            counts = [s.value for s in buckets]
            assert counts == sorted(counts), f"{name}: buckets must be cumulative"
            assert {s.name for s in f.samples} == {name + x for x in ("_bucket", "_sum",
                                                                      "_count")}


def test_the_recovery_buckets_span_10_ms_to_60_s() -> None:
    assert RECOVERY_BUCKETS_S[0] <= 0.01 and RECOVERY_BUCKETS_S[-1] >= 60.0
    assert list(RECOVERY_BUCKETS_S) == sorted(set(RECOVERY_BUCKETS_S))


def test_the_link_probe_buckets_span_loopback_to_slow_cross_region_links() -> None:
    assert LINK_RTT_BUCKETS_S[0] <= 0.00005 and LINK_RTT_BUCKETS_S[-1] >= 10.0
    assert LINK_BANDWIDTH_BUCKETS[0] <= 1.25e8 / 100 and LINK_BANDWIDTH_BUCKETS[-1] >= 1e11
    for buckets in (LINK_RTT_BUCKETS_S, LINK_BANDWIDTH_BUCKETS):
        assert list(buckets) == sorted(set(buckets))


@pytest.mark.parametrize("side", FED)
def test_every_series_names_its_job_and_only_node_gauges_name_the_node(side: str) -> None:
    for name, f in families(FED[side]().registry).items():
        for s in f.samples:
            if name in PROCESS_LEVEL:
                assert "job_name" not in s.labels, name
            else:
                assert s.labels["job_name"] == "mlp", name
            assert ("node" in s.labels) == (side == "agent" and f.type == "gauge"), name


def test_label_values_stay_bounded_whatever_the_callers_pass() -> None:
    m = ControllerMetrics()
    m.set_membership("mlp", epoch=1, world_size=512)
    for i in range(300):
        m.fault("mlp", f"weird-{i}")
        m.recovery("mlp", f"weird-{i}", "failed", duration_s=1.0)
        m.verdict("mlp", f"detector-{i}", f"action-{i}")
        m.straggler_score("mlp", rank=i, score=1.5)
    for i in range(300):
        m.clear_straggler("mlp", rank=i)
    m.verdict("mlp", "Straggler", "Report")   # the SpliceJob spec spells actions this way

    f = families(m.registry)
    assert {s.labels["kind"] for s in f["splice_faults_total"].samples} == set(FAULT_KINDS)
    faults = {s.labels["kind"]: s.value for s in f["splice_faults_total"].samples}
    assert faults["other"] == 300 and faults["crash"] == 0   # initialised at 0, not absent
    verdicts = {(s.labels["detector"], s.labels["action"]): s.value
                for s in f["splice_detector_verdicts_total"].samples}
    assert verdicts == {("other", "other"): 300, ("straggler", "report"): 1}
    assert not f["splice_straggler_score"].samples   # every flag cleared: no series left
    recoveries = {(s.labels["kind"], s.labels["outcome"]): s.value
                  for s in f["splice_recoveries_total"].samples}
    assert len(recoveries) == len(FAULT_KINDS) * 2 and recoveries["other", "failed"] == 300


def test_straggler_series_exist_only_while_flagged_and_a_new_epoch_drops_them() -> None:
    m = ControllerMetrics()
    m.set_membership("mlp", epoch=1, world_size=4)

    def scores() -> dict[str, float]:
        return {s.labels["rank"]: s.value
                for s in families(m.registry)["splice_straggler_score"].samples}

    m.straggler_score("mlp", rank=2, score=1.2)
    m.straggler_score("mlp", rank=3, score=1.4)
    m.straggler_score("mlp", rank=2, score=1.3)
    assert scores() == {"2": 1.3, "3": 1.4}
    m.clear_straggler("mlp", rank=3)
    m.clear_straggler("mlp", rank=0)        # never flagged: nothing happens
    assert scores() == {"2": 1.3}
    m.set_membership("mlp", epoch=1, world_size=4)   # same epoch: ranks mean the same
    assert scores() == {"2": 1.3}
    m.set_membership("mlp", epoch=2, world_size=3)   # renumbered: old flags are meaningless
    assert scores() == {}


def test_closed_vocabularies_refuse_unknown_values() -> None:
    with pytest.raises(ValueError, match="outcome"):
        ControllerMetrics().recovery("mlp", "crash", "maybe", duration_s=1.0)
    with pytest.raises(ValueError, match="exit kind"):
        AgentMetrics("mlp", "node-0").worker_exit("vanished")


def scrape(port: int) -> dict[str, Metric]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def test_two_controllers_in_one_process_keep_separate_registries_and_servers() -> None:
    a, b = ControllerMetrics(), ControllerMetrics()   # no "Duplicated timeseries" error
    a.set_membership("job-a", epoch=5, world_size=4)
    b.set_membership("job-b", epoch=9, world_size=2)
    ports = [a.serve(), b.serve()]
    try:
        assert ports[0] != ports[1] and 0 not in ports
        for port, job, epoch in ((ports[0], "job-a", 5), (ports[1], "job-b", 9)):
            [sample] = scrape(port)["splice_epoch"].samples
            assert sample.labels == {"job_name": job} and sample.value == epoch
    finally:
        a.close()
        b.close()
    assert not any(f.name.startswith("splice_") for f in REGISTRY.collect())
    with pytest.raises(urllib.error.URLError):
        scrape(ports[0])
    assert a.serve() > 0   # serving again after close works
    a.close()


def test_every_metric_the_dashboard_queries_is_exported() -> None:
    exported = {s.name for m in (fed_controller(), fed_agent())
                for f in m.registry.collect() for s in f.samples}
    queried = {name for _, expr in dashboard_queries(json.loads(DASHBOARD.read_text()))
               for name in re.findall(r"\bsplice_[a-z0-9_]+", expr)}
    assert queried, "the dashboard queries no splice metric"
    assert queried <= exported, f"the dashboard queries unknown metrics: {queried - exported}"


def value(m: AgentMetrics | ControllerMetrics, name: str, **labels: str) -> float:
    """The one sample of `name` (as exposed, counters with _total) whose labels include
    `labels`."""
    [v] = [s.value for f in families(m.registry).values() for s in f.samples
           if s.name == name and labels.items() <= s.labels.items()]
    return v


def test_snapshot_shm_bytes_are_the_files_in_the_worker_directories(tmp_path: Path) -> None:
    root = tmp_path / "snapshots"
    assert snapshot_shm_bytes(str(root)) == 0            # no worker has written yet
    m = AgentMetrics("mlp", "node-0")
    m.watch_snapshot_shm(str(root))
    assert value(m, "splice_agent_snapshot_shm_bytes", node="node-0") == 0
    for wid, sizes in (("node-0_0", (4096, 100)), ("node-0_1", (8192,))):
        (root / wid).mkdir(parents=True)
        for i, size in enumerate(sizes):
            (root / wid / f"slot{i}-0.data").write_bytes(bytes(size))
    (root / "stray-file").write_bytes(bytes(10))        # not a worker's directory
    (root / "node-0_1" / "nested").mkdir()              # not a slot file
    (root / "node-0_1" / "nested" / "x").write_bytes(bytes(10))
    assert snapshot_shm_bytes(str(root)) == 4096 + 100 + 8192
    assert value(m, "splice_agent_snapshot_shm_bytes", node="node-0") == 4096 + 100 + 8192
    # A handover renames the directory: the memory stays; a worker that leaves frees it.
    (root / "node-0_0").rename(root / "node-0_2")
    assert value(m, "splice_agent_snapshot_shm_bytes") == 4096 + 100 + 8192
    for f in (root / "node-0_2").iterdir():
        f.unlink()
    (root / "node-0_2").rmdir()
    assert value(m, "splice_agent_snapshot_shm_bytes") == 8192


def test_served_snapshots_are_counted_by_outcome_as_a_peer_fetches_them() -> None:
    data = memoryview(bytes(range(256)) * 64)
    m = AgentMetrics("mlp", "node-0")

    def provider(job_id: str, wid: str, step: int) -> tuple[int, bytes, memoryview] | None:
        if wid == "node-0/9":
            raise OSError("the slot's file is unreadable")
        return (12, b"skeleton", data) if wid == "node-0/0" else None

    for outcome in ("ok", "missing", "error"):      # present before the first fetch
        assert value(m, "splice_agent_snapshots_served_total", outcome=outcome) == 0
    server = replication.serve(replication.ReplicaStore(0, job_id="mlp"), "127.0.0.1:0",
                               m.counting_served(provider))
    address = f"127.0.0.1:{server.port}"
    try:
        got = replication.fetch([address], "mlp", "node-0/0")
        assert got.step == 12 and bytes(got.data) == bytes(data)
        for wid in ("node-0/1", "node-0/9"):
            with pytest.raises(replication.FetchFailed):
                replication.fetch([address], "mlp", wid)
    finally:
        server.stop(grace_s=0)
    served = {o: value(m, "splice_agent_snapshots_served_total", outcome=o)
              for o in ("ok", "missing", "error")}
    assert served == {"ok": 1, "missing": 1, "error": 1}
    assert value(m, "splice_agent_snapshot_served_bytes_total") == len(b"skeleton") + len(data)


def test_an_agent_exports_its_snapshot_metrics_from_the_start_and_counts_fetches() -> None:
    agent = Agent(AgentConfig(controller="127.0.0.1:1", command=("true",), job_id="mlp",
                              node_id="node-0", metrics_port=0, metrics_host="127.0.0.1",
                              connect_timeout_s=0))
    assert agent.metrics is not None and agent.snapshot_address
    port = int(agent.metrics_address.rpartition(":")[2])
    try:
        [shm] = scrape(port)["splice_agent_snapshot_shm_bytes"].samples
        assert shm.value == 0 and shm.labels == {"job_name": "mlp", "node": "node-0"}
        with pytest.raises(replication.FetchFailed):   # no worker has written a snapshot
            replication.fetch([agent.snapshot_address], "mlp", "node-0/0")
        served = {s.labels["outcome"]: s.value
                  for s in scrape(port)["splice_agent_snapshots_served"].samples
                  if s.name.endswith("_total")}
        assert served == {"ok": 0, "missing": 1, "error": 0}
    finally:
        assert agent.run() == 2   # no controller: it stops its servers and gives up
        agent.metrics.close()


def _attach(c: Controller, node: str) -> AgentSession:
    opened = c.open_session(pb.AgentHello(protocol_version=PROTOCOL_VERSION, job_id="mlp",
                                          node_id=node, num_workers=1,
                                          probe_address=f"127.0.0.1:{1000 + int(node[-1])}"))
    assert isinstance(opened, AgentSession), opened
    return opened


def test_link_probe_rounds_and_results_reaching_the_controller_are_observed() -> None:
    c = Controller(ControllerConfig(listen="127.0.0.1:0",
                                    jobs=(JobSpec(job_id="mlp", world_size=3),)),
                   InMemoryStateStore())
    c.start()
    try:
        c.serve_metrics()
        m = c.metrics
        sessions = [_attach(c, f"node-{i}") for i in range(3)]
        assert c.probe_links("mlp") == 3
        assert value(m, "splice_link_probe_rounds_total", job_name="mlp") == 1
        rtts = iter([0.0002, 0.004])
        for session in sessions:
            while (msg := session.outbox.get(timeout=5.0)).WhichOneof("kind") != "probe_links":
                pass
            req = msg.probe_links
            results = []
            for t in req.targets:   # one pair probes fine, one is slow, one fails
                rtt_s = next(rtts, None)
                results.append(pb.LinkProbeResult(
                    from_node=session.node_id, to_node=t.node_id, at_s=1.0,
                    rtt_s=rtt_s or 0.0, bandwidth_bytes_per_s=2e9 if rtt_s else 0.0,
                    error="" if rtt_s else "connection refused"))
            c.on_agent_message(session, pb.AgentMessage(
                link_probes=pb.LinkProbeReport(round=req.round, results=results)))
        probes = {o: value(m, "splice_link_probes_total", outcome=o) for o in ("ok", "error")}
        assert probes == {"ok": 2, "error": 1}
        assert value(m, "splice_link_probe_rtt_seconds_count") == 2
        assert value(m, "splice_link_probe_rtt_seconds_sum") == pytest.approx(0.0042)
        assert value(m, "splice_link_probe_rtt_seconds_bucket", le="0.00025") == 1
        assert value(m, "splice_link_probe_bandwidth_bytes_per_second_bucket", le="1e+09") == 0
        assert value(m, "splice_link_probe_bandwidth_bytes_per_second_bucket",
                     le="2.5e+09") == 2
        # A malformed report is refused before it is observed.
        c.on_agent_message(sessions[0], pb.AgentMessage(link_probes=pb.LinkProbeReport(
            round=1, results=[pb.LinkProbeResult(from_node="node-1", to_node="node-2",
                                                 rtt_s=0.001, bandwidth_bytes_per_s=1.0)])))
        assert value(m, "splice_link_probe_rtt_seconds_count") == 2
    finally:
        c.stop(grace_s=0.1)
