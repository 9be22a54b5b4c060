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

from splice.agent.metrics import AgentMetrics
from splice.controller.metrics import FAULT_KINDS, RECOVERY_BUCKETS_S, ControllerMetrics
from tests.prometheus_server import dashboard_queries

DASHBOARD = Path(__file__).resolve().parent.parent / "manifests" / "grafana" / "dashboard.json"

CONTROLLER_METRICS = {
    "splice_epoch": "gauge", "splice_world_size": "gauge",
    "splice_faults_total": "counter", "splice_recoveries_total": "counter",
    "splice_recovery_duration_seconds": "histogram",
    "splice_detector_verdicts_total": "counter", "splice_straggler_score": "gauge",
    "splice_goodput_ratio": "gauge", "splice_controller_leader": "gauge",
    "splice_telemetry_records_total": "counter", "splice_telemetry_dropped_total": "counter",
}
AGENT_METRICS = {
    "splice_step_duration_seconds": "histogram", "splice_compute_duration_seconds": "histogram",
    "splice_collective_wait_seconds": "histogram",
    "splice_collective_transfer_bytes_total": "counter", "splice_worker_exits_total": "counter",
    "splice_workers": "gauge", "splice_snapshot_bytes": "gauge",
    "splice_snapshot_age_seconds": "gauge", "splice_node_memory_used_ratio": "gauge",
    "splice_node_cpu_throttled_ratio": "gauge",
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
    return m


def fed_agent() -> AgentMetrics:
    m = AgentMetrics("mlp", "node-0")
    m.step(0.12, 0.09, 0.03, 4 << 20)
    m.worker_exit("killed")
    m.set_workers(1)
    m.snapshot(num_bytes=48 << 20, age_s=0.1)
    m.node_health(memory_used_ratio=0.4, cpu_throttled_ratio=0.0)
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
        if re.search(r"duration|_age|latency|wait|time", name) and f.type != "counter":
            assert name.endswith("_seconds"), f"{name} measures time: end in _seconds"
        if f.type == "histogram":
            assert name.endswith(("_seconds", "_bytes")), name
            buckets = [s for s in f.samples if s.name == name + "_bucket"]
            assert buckets and buckets[-1].labels["le"] == "+Inf", name
            counts = [s.value for s in buckets]
            assert counts == sorted(counts), f"{name}: buckets must be cumulative"
            assert {s.name for s in f.samples} == {name + x for x in ("_bucket", "_sum",
                                                                      "_count")}


def test_the_recovery_buckets_span_10_ms_to_60_s() -> None:
    assert RECOVERY_BUCKETS_S[0] <= 0.01 and RECOVERY_BUCKETS_S[-1] >= 60.0
    assert list(RECOVERY_BUCKETS_S) == sorted(set(RECOVERY_BUCKETS_S))


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
