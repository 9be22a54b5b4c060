"""Offline checks of manifests/: built-in kinds against the Kubernetes JSON schemas
(kubernetes-validate, strict), SpliceJobs against the CRD's own schema and the Python twin
of its CEL rules, and the objects the operator generates against the Pod/Service schemas."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from splice.kube import pods
from splice.kube.dashboard import configmap_yaml
from splice.kube.reconcile import job_view, reconcile
from splice.kube.spec import SpecError, parse_spec
from splice.kube.status import ControllerView
from tests.kube_fake_apiserver import json_schema_from_openapi
from tests.test_kube_reconcile import T0

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = ROOT / "manifests"
K8S_VERSIONS = ("1.30.0", "1.37.0")   # oldest cluster we claim, newest schemas shipped
PROMETHEUS_OPERATOR_KINDS = {"PodMonitor", "ServiceMonitor"}


def documents(*globs: str) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for pattern in globs:
        for path in sorted(MANIFESTS.glob(pattern)):
            for doc in yaml.safe_load_all(path.read_text()):
                if doc:
                    out.append((f"{path.relative_to(MANIFESTS)}:{doc['kind']}/"
                                f"{doc['metadata']['name']}", doc))
    return out


ALL = documents("*.yaml", "monitoring/*.yaml", "examples/*.yaml")
CRD = next(d for _, d in ALL if d["kind"] == "CustomResourceDefinition")
OPENAPI = CRD["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
STRICT_SCHEMA = json_schema_from_openapi(OPENAPI, strict=True)
BUILTIN = [(n, d) for n, d in ALL if d["kind"] != "SpliceJob"
           and d["kind"] not in PROMETHEUS_OPERATOR_KINDS]
EXAMPLES = [(n, d) for n, d in ALL if d["kind"] == "SpliceJob"]


def test_the_manifests_hold_what_an_install_needs() -> None:
    kinds = {d["kind"] for _, d in ALL}
    assert {"Namespace", "CustomResourceDefinition", "ServiceAccount", "ClusterRole",
            "ClusterRoleBinding", "Role", "RoleBinding", "Deployment", "ConfigMap",
            "PodMonitor", "ServiceMonitor", "SpliceJob"} <= kinds
    assert len(EXAMPLES) >= 2
    # `kubectl apply -f manifests/` applies only Kubernetes objects, namespace first
    top = sorted(p.name for p in MANIFESTS.iterdir() if p.suffix in (".yaml", ".yml", ".json"))
    assert top[0] == "00-namespace.yaml"


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize(("name", "doc"), BUILTIN, ids=[n for n, _ in BUILTIN])
def test_builtin_kinds_match_the_kubernetes_schema(name: str, doc: dict, version: str) -> None:
    kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize(("name", "doc"), EXAMPLES, ids=[n for n, _ in EXAMPLES])
def test_example_splicejobs_match_the_crd_schema_and_its_rules(name: str, doc: dict) -> None:
    jsonschema.validate(doc, STRICT_SCHEMA)
    parse_spec(doc["spec"])   # the CEL rules' Python twin


def generated_objects() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for name, doc in EXAMPLES:
        job = copy.deepcopy(doc)
        job["metadata"].update(uid="00000000-0000-0000-0000-000000000001", generation=1)
        plan = reconcile(job_view(job), [], [], None, T0)
        out += [(f"{name}->{a.manifest['metadata']['name']}", dict(a.manifest))
                for a in plan.actions if hasattr(a, "manifest")]
    return out


GENERATED = generated_objects()


@pytest.mark.parametrize(("name", "obj"), GENERATED, ids=[n for n, _ in GENERATED])
def test_objects_the_operator_creates_match_the_kubernetes_schema(name: str, obj: dict) -> None:
    kubernetes_validate.validate(obj, K8S_VERSIONS[-1], strict=True)


def test_the_status_the_operator_writes_matches_the_crd_schema() -> None:
    _, doc = EXAMPLES[0]
    job = copy.deepcopy(doc)
    job["metadata"].update(uid="u", generation=3)
    for controller in (None, ControllerView(phase="running", epoch=2, world_size=4,
                                            stragglers=("mlp-worker-1/0",),
                                            last_snapshot_step=10)):
        job["status"] = reconcile(job_view(job), [], [], controller, T0).status
        jsonschema.validate(job, STRICT_SCHEMA)


# Each CEL rule in the CRD, paired with a change to a valid spec that breaks it. The Python
# twin (spec.validation_errors) must refuse every one of them; a CEL rule added to the CRD
# without a row here fails test_every_cel_rule_has_a_python_twin.
CEL_CASES = {
    "self.min <= self.max": {"nodes": {"min": 3, "max": 2, "desired": 2}},
    "self.min <= self.desired && self.desired <= self.max": {"nodes": {"min": 1, "max": 2,
                                                                       "desired": 3}},
    "self.nodeTimeoutSeconds > self.heartbeatIntervalSeconds": {"faultTolerance": {
        "heartbeatIntervalSeconds": 5, "nodeTimeoutSeconds": 5}},
    "self.hangTimeoutSeconds > self.heartbeatIntervalSeconds": {"faultTolerance": {
        "heartbeatIntervalSeconds": 5, "nodeTimeoutSeconds": 10, "hangTimeoutSeconds": 4}},
    "self > 1.0": {"stragglers": {"slowdownThreshold": 0.9}},
    "self != 29400": {"monitoring": {"port": 29400}},
    "!self.enabled || (has(self.path) && size(self.path) > 0)": {"snapshot": {
        "persistence": {"enabled": True}}},
    "replicas": {"snapshot": {"replicas": 4}},
    "containers": {"template": {"spec": {"containers": [{"name": "worker", "image": "x"}]}}},
}


def cel_rules(node: Any) -> list[dict[str, str]]:
    if isinstance(node, list):
        return [r for n in node for r in cel_rules(n)]
    if not isinstance(node, dict):
        return []
    return list(node.get("x-kubernetes-validations", [])) + [
        r for k, v in node.items() if k != "x-kubernetes-validations" for r in cel_rules(v)]


def case_for(rule: str) -> str:
    return next(k for k in CEL_CASES if k == rule or (k in rule and not k.startswith("self")))


def test_every_cel_rule_has_a_python_twin() -> None:
    rules = [r["rule"] for r in cel_rules(OPENAPI)]
    assert len(rules) == len(CEL_CASES)
    assert sorted(case_for(r) for r in rules) == sorted(CEL_CASES)


@pytest.mark.parametrize("rule", [r["rule"] for r in cel_rules(OPENAPI)])
def test_cel_rules_are_plausible_and_refuse_what_python_refuses(rule: str) -> None:
    r = next(x for x in cel_rules(OPENAPI) if x["rule"] == rule)
    assert r.get("message"), "every rule explains itself"
    depth = 0
    for ch in re.sub(r"'[^']*'", "", rule):   # balanced brackets outside string literals
        depth += {"(": 1, "[": 1, ")": -1, "]": -1}.get(ch, 0)
        assert depth >= 0, rule
    assert depth == 0 and "self" in rule
    words = set(re.findall(r"[A-Za-z_][A-Za-z_0-9]*", re.sub(r"'[^']*'", "", rule)))
    assert words <= {"self", "has", "size", "exists", "c", "true", "false", "min", "max",
                     "desired", "nodes", "snapshot", "replicas", "template", "spec",
                     "containers", "command", "name", "enabled", "path",
                     "nodeTimeoutSeconds", "heartbeatIntervalSeconds",
                     "hangTimeoutSeconds"}, words
    _, example = EXAMPLES[0]
    spec = copy.deepcopy(example["spec"])
    for key, value in CEL_CASES[case_for(rule)].items():
        spec[key] = {**spec.get(key, {}), **value} if isinstance(value, dict) else value
    with pytest.raises(SpecError):
        parse_spec(spec)


def test_printer_columns_and_scale_paths_point_at_schema_fields() -> None:
    version = CRD["spec"]["versions"][0]
    scale = version["subresources"]["scale"]
    paths = [c["jsonPath"] for c in version["additionalPrinterColumns"]] + [
        scale["specReplicasPath"], scale["statusReplicasPath"], scale["labelSelectorPath"]]
    for path in paths:
        if path.startswith(".metadata."):
            continue   # ObjectMeta: not part of the CRD's schema
        node = OPENAPI
        for part in path.strip(".").split("."):
            node = node["properties"][part]
        assert node, path
    assert {"Phase", "World", "Epoch", "Recoveries"} <= {
        c["name"] for c in version["additionalPrinterColumns"]}


def test_monitors_select_the_pods_and_port_the_operator_creates() -> None:
    pod_monitor = next(d for _, d in ALL if d["kind"] == "PodMonitor")
    svc_monitor = next(d for _, d in ALL if d["kind"] == "ServiceMonitor")
    worker = next(o for n, o in GENERATED if "worker" in n)
    service = next(o for n, o in GENERATED if o["kind"] == "Service")
    for expr in pod_monitor["spec"]["selector"]["matchExpressions"]:
        assert expr["operator"] == "Exists" and expr["key"] in worker["metadata"]["labels"]
    assert pod_monitor["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    assert any(p.get("name") == "metrics" for c in worker["spec"]["containers"]
               for p in c.get("ports", []))
    assert svc_monitor["spec"]["selector"]["matchLabels"].items() <= \
        service["metadata"]["labels"].items()
    assert "metrics" in {p["name"] for p in service["spec"]["ports"]}
    assert svc_monitor["apiVersion"] == pod_monitor["apiVersion"] == "monitoring.coreos.com/v1"


def test_the_dashboard_uses_splice_metrics_and_its_configmap_is_current() -> None:
    text = (MANIFESTS / "grafana" / "dashboard.json").read_text()
    dash = json.loads(text)
    exprs = " ".join(t["expr"] for p in dash["panels"] for t in p["targets"])
    for metric in ("splice_epoch", "splice_world_size", "splice_recoveries_total",
                   "splice_faults_total", "splice_recovery_duration_seconds_bucket",
                   "splice_step_duration_seconds"):
        assert metric in exprs
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
    cm = (MANIFESTS / "monitoring" / "grafana-dashboard-configmap.yaml").read_text()
    assert cm == configmap_yaml(text), "regenerate: python -m splice.kube.dashboard ..."


def test_the_image_recipe_copies_every_package_folder() -> None:
    tomllib = pytest.importorskip("tomllib")   # Python 3.11+

    mapping = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-dir"]
    dockerfile = (MANIFESTS / "Dockerfile").read_text()
    for folder in set(mapping.values()):
        assert re.search(rf"^COPY {folder} {folder}$", dockerfile, re.M), folder


def test_the_operator_deployment_runs_the_operator_with_its_service_account() -> None:
    dep = next(d for _, d in ALL if d["kind"] == "Deployment")
    pod = dep["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "splice-operator"
    assert pod["containers"][0]["command"][:2] == ["splice", "operator"]
    assert pods.CONTROLLER_PORT == 29400
