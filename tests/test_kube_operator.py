"""The operator end to end against the in-process fake API server, through the real
`kubernetes` client: pods for a new job, replacement of a lost pod, scaling through the
scale subresource, suspend and resume, deletion with cleanup, relisting after a watch
answered 410 Gone, and leader election between two replicas."""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes.client import ApiClient, Configuration
from kubernetes.client.rest import ApiException

from splice.kube.client import KubeApi, api_client
from splice.kube.controller_status import FakeControllerStatus
from splice.kube.leader import LeaderElector, LeaseConfig
from splice.kube.runner import Operator, OperatorConfig
from splice.kube.spec import FINALIZER, GROUP, PLURAL, VERSION
from splice.kube.status import ControllerView
from tests.kube_fake_apiserver import FakeApiServer, json_schema_from_openapi

ROOT = Path(__file__).resolve().parent.parent
CRD = yaml.safe_load((ROOT / "manifests" / "10-crd.yaml").read_text())
SCHEMA = json_schema_from_openapi(CRD["spec"]["versions"][0]["schema"]["openAPIV3Schema"])
NS = "team-a"
JOB: dict[str, Any] = {
    "apiVersion": f"{GROUP}/{VERSION}", "kind": "SpliceJob",
    "metadata": {"name": "mlp", "namespace": NS},
    "spec": {"nodes": {"min": 1, "max": 4, "desired": 2}, "processesPerNode": 2,
             "template": {"spec": {"containers": [{
                 "name": "worker", "image": "splice:dev",
                 "command": ["python", "-m", "splice.examples.train_mlp"]}]}}},
}
WAIT_S = 10.0


class Cluster:
    def __init__(self, srv: FakeApiServer) -> None:
        self.srv = srv
        self.api = api_client(host=srv.url)          # the operator's (its user agent)
        self.kube = KubeApi(self.api)
        cfg = Configuration()
        cfg.host = srv.url
        self.user_api = ApiClient(cfg)                # what a user's kubectl would do
        self.user = KubeApi(self.user_api)
        self.controllers = FakeControllerStatus()
        self.operators: list[Operator] = []

    def start_operator(self, identity: str = "op-a", lease_s: float = 15.0) -> Operator:
        elector = LeaderElector(self.api, LeaseConfig(
            name="splice-operator", namespace="splice-system", identity=identity,
            duration_s=lease_s, retry_s=0.1))
        op = Operator(self.kube, self.controllers, OperatorConfig(
            resync_s=60, watch_timeout_s=60, backoff_initial_s=0.05), elector)
        op.start()
        self.operators.append(op)
        return op

    def workers(self) -> list[dict[str, Any]]:
        return self.srv.list("pods", NS, "splice.dev/job=mlp,splice.dev/role=worker")

    def worker_names(self) -> list[str]:
        return sorted(p["metadata"]["name"] for p in self.workers())

    def job(self) -> dict[str, Any] | None:
        return self.srv.get("splicejobs", NS, "mlp")

    def status(self) -> dict[str, Any]:
        return (self.job() or {}).get("status") or {}

    def run_all(self) -> None:
        for p in self.srv.list("pods", NS):
            if p["status"]["phase"] == "Pending":
                self.srv.set_pod_phase(NS, p["metadata"]["name"], "Running")

    def create_job(self, body: dict[str, Any] | None = None) -> None:
        self.user.custom.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL,
                                                         copy.deepcopy(body or JOB))

    def wait(self, predicate: Any, what: str) -> None:
        self.srv.wait_for(predicate, WAIT_S, what)


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    srv = FakeApiServer(splicejob_schema=SCHEMA).start()
    c = Cluster(srv)
    try:
        yield c
    finally:
        for op in c.operators:
            op.stop()
        c.api.close()
        c.user_api.close()
        srv.stop()


@pytest.fixture
def running(cluster: Cluster) -> Cluster:
    """A job whose pods all run and whose controller reports epoch 1 with 4 ranks."""
    cluster.controllers.views["mlp"] = ControllerView(phase="running", epoch=1, world_size=4,
                                                      last_snapshot_step=7)
    cluster.start_operator()
    cluster.create_job()
    cluster.wait(lambda: len(cluster.workers()) == 2, "two worker pods")
    cluster.run_all()
    cluster.wait(lambda: cluster.status().get("phase") == "Running", "phase Running")
    return cluster


def test_a_new_job_gets_its_controller_service_and_worker_pods(running: Cluster) -> None:
    c = running
    job = c.job()
    assert FINALIZER in job["metadata"]["finalizers"]
    assert c.worker_names() == ["mlp-worker-1", "mlp-worker-2"]
    assert [p["metadata"]["name"] for p in c.srv.list("pods", NS, "splice.dev/role=controller")
            ] == ["mlp-controller-0"]
    assert [s["metadata"]["name"] for s in c.srv.list("services", NS)] == ["mlp-controller"]
    for p in c.workers():
        assert p["metadata"]["ownerReferences"][0]["uid"] == job["metadata"]["uid"]
        assert p["spec"]["containers"][0]["command"][:2] == ["splice", "agent"]
    s = c.status()
    assert (s["worldSize"], s["epoch"], s["nodes"], s["lastSnapshot"]["step"]) == (4, 1, 2, 7)
    assert s["observedGeneration"] == job["metadata"]["generation"]
    assert {"mlp-controller.team-a.svc:29400"} == {a for a, _ in c.controllers.asked}
    reasons = {e["reason"] for e in c.srv.list("events", NS)}
    assert "CreatePod" in reasons


def test_a_deleted_worker_pod_is_replaced_and_the_survivor_untouched(running: Cluster) -> None:
    c = running
    survivor = c.srv.get("pods", NS, "mlp-worker-2")
    c.srv.delete("pods", NS, "mlp-worker-1")
    c.wait(lambda: c.worker_names() == ["mlp-worker-2", "mlp-worker-3"], "a replacement pod")
    assert c.srv.get("pods", NS, "mlp-worker-2")["metadata"]["uid"] == \
        survivor["metadata"]["uid"]
    c.wait(lambda: c.status().get("podReplacements") == 1, "the replacement counted")


def test_a_failed_worker_pod_is_deleted_and_replaced(running: Cluster) -> None:
    c = running
    c.srv.set_pod_phase(NS, "mlp-worker-2", "Failed", exit_code=137)
    c.wait(lambda: c.worker_names() == ["mlp-worker-1", "mlp-worker-3"], "the failed pod replaced")
    events = [e["message"] for e in c.srv.list("events", NS)]
    assert any("exit code 137" in m for m in events), events


def test_scaling_through_the_scale_subresource(running: Cluster) -> None:
    c = running
    c.user.custom.patch_namespaced_custom_object_scale(
        GROUP, VERSION, NS, PLURAL, "mlp", {"spec": {"replicas": 3}},
        _content_type="application/merge-patch+json")
    c.wait(lambda: len(c.workers()) == 3, "three worker pods")
    c.run_all()
    c.wait(lambda: c.status().get("nodes") == 3, "status.nodes 3")
    scale = c.user.custom.get_namespaced_custom_object_scale(GROUP, VERSION, NS, PLURAL, "mlp")
    assert scale["spec"]["replicas"] == 3 and scale["status"]["replicas"] == 3
    c.user.custom.patch_namespaced_custom_object_scale(
        GROUP, VERSION, NS, PLURAL, "mlp", {"spec": {"replicas": 1}},
        _content_type="application/merge-patch+json")
    c.wait(lambda: c.worker_names() == ["mlp-worker-1"], "the oldest pod kept")


def test_suspend_and_resume(running: Cluster) -> None:
    c = running
    c.srv.patch("splicejobs", NS, "mlp", {"spec": {"suspend": True}})
    c.wait(lambda: c.srv.list("pods", NS) == [] and c.status().get("phase") == "Suspended",
           "no pods, phase Suspended")
    c.srv.patch("splicejobs", NS, "mlp", {"spec": {"suspend": False}})
    c.wait(lambda: len(c.workers()) == 2 and c.status().get("phase") == "Pending", "pods back")


def test_deleting_the_job_cleans_up_everything(running: Cluster) -> None:
    c = running
    c.user.custom.delete_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "mlp")
    c.wait(lambda: c.job() is None, "the job gone (finalizer removed)")
    assert c.srv.list("pods", NS) == [] and c.srv.list("services", NS) == []


def test_a_watch_answered_410_gone_relists_and_keeps_working(running: Cluster) -> None:
    c = running
    op = c.operators[0]
    before = dict(op.relists)
    c.srv.expire_watches()
    c.wait(lambda: op.relists["splicejobs"] > before["splicejobs"]
           and op.relists["pods"] > before["pods"], "both watches relisted")
    # resync is 60 s away: only a working watch can see these
    c.srv.delete("pods", NS, "mlp-worker-1")
    c.wait(lambda: "mlp-worker-3" in c.worker_names(), "replacement after the relist")
    other = copy.deepcopy(JOB)
    other["metadata"]["name"] = "gpt"
    c.create_job(other)
    c.wait(lambda: len(c.srv.list("pods", NS, "splice.dev/job=gpt")) == 3, "the new job's pods")


def test_the_api_server_refuses_a_job_that_breaks_the_crd_schema(cluster: Cluster) -> None:
    bad = copy.deepcopy(JOB)
    bad["spec"]["processesPerNode"] = 0
    with pytest.raises(ApiException) as e:
        cluster.create_job(bad)
    assert e.value.status == 422 and "processesPerNode" in e.value.body


def test_only_the_lease_holder_acts_and_a_standby_takes_over(cluster: Cluster) -> None:
    c = cluster
    a = c.start_operator("op-a")
    c.wait(lambda: a.leading, "op-a leads")
    b = c.start_operator("op-b")
    c.create_job()
    c.wait(lambda: len(c.workers()) == 2, "pods from the leader")
    assert not b.leading and b.reconciles == 0
    a.stop()   # releases the lease
    c.operators.remove(a)
    c.wait(lambda: b.leading, "op-b takes over")
    c.srv.delete("pods", NS, "mlp-worker-1")
    c.wait(lambda: "mlp-worker-3" in c.worker_names(), "op-b replaces the pod")
    lease = c.srv.get("leases", "splice-system", "splice-operator")
    assert lease["spec"]["holderIdentity"] == "op-b" and lease["spec"]["leaseTransitions"] >= 1


def test_splice_operator_command_runs_against_the_api_server(cluster: Cluster) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "splice", "operator", "--server",
                             cluster.srv.url, "--namespace", NS, "--identity", "cli",
                             "--lease-namespace", NS], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        cluster.create_job()
        cluster.srv.wait_for(lambda: len(cluster.workers()) == 2, 30.0, "pods from the CLI")
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert cluster.srv.get("leases", NS, "splice-operator")["spec"]["holderIdentity"] == ""


def rbac_allows(method: str, path: str) -> bool:
    """Whether manifests/20-rbac.yaml grants the operator this request."""
    from urllib.parse import parse_qs, urlparse

    from tests.kube_fake_apiserver import PATH

    url = urlparse(path)
    m = PATH.match(url.path)
    assert m, path
    query = parse_qs(url.query)
    verb = {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}.get(
        method, "watch" if "watch" in query else ("get" if m["name"] else "list"))
    group = "" if m["gv"] == "api/v1" else m["gv"].split("/")[1]
    resource = m["plural"] + (f"/{m['sub']}" if m["sub"] else "")
    docs = list(yaml.safe_load_all((ROOT / "manifests" / "20-rbac.yaml").read_text()))
    for doc in docs:
        if doc["kind"] not in ("ClusterRole", "Role"):
            continue
        if doc["kind"] == "Role" and m["ns"] != doc["metadata"]["namespace"]:
            continue
        for rule in doc["rules"]:
            names = rule.get("resourceNames")
            if group in rule["apiGroups"] and resource in rule["resources"] \
                    and verb in rule["verbs"] and (not names or m["name"] in names):
                return True
    return False


def test_every_request_the_operator_makes_is_granted_by_its_rbac(running: Cluster) -> None:
    c = running
    c.srv.set_pod_phase(NS, "mlp-worker-1", "Failed", exit_code=1)
    c.wait(lambda: "mlp-worker-3" in c.worker_names(), "a replacement")
    c.srv.expire_watches()
    c.user.custom.delete_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "mlp")
    c.wait(lambda: c.job() is None, "the job gone")
    c.operators[0].stop()
    c.operators.clear()
    from splice.kube.client import USER_AGENT

    used = {(m, p.split("?")[0] + ("?watch" if "watch=true" in p else ""))
            for m, p, ua in c.srv.requests if ua == USER_AGENT}
    assert len(used) > 8
    denied = sorted(u for u in used if not rbac_allows(*u))
    assert not denied, f"requests the RBAC does not allow: {denied}"
