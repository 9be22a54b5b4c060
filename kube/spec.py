"""The SpliceJob resource as typed, validated configuration.

The CRD (manifests/10-crd.yaml) validates what the API server accepts, CEL rules included.
This module parses a SpliceJob object into frozen dataclasses and re-checks the same rules
in Python, so the operator never acts on a spec the API server would have refused (and so
the rules are tested here, where no API server is needed). Errors name the field path.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

GROUP = "splice.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "SpliceJob"
PLURAL = "splicejobs"
FINALIZER = "splice.dev/cleanup"

# Labels the operator puts on everything it creates; pods are found by them.
LABEL_JOB = "splice.dev/job"
LABEL_ROLE = "splice.dev/role"      # "controller" or "worker"
LABEL_INDEX = "splice.dev/index"    # the pod's sequence number within its job

CONTROLLER_PORT = 29400   # gRPC port of the job controller (and its Service)
WORKER_CONTAINER = "worker"   # the template container the agent wraps (else the first one)

RECOVERY_STRATEGIES = ("Replace", "Shrink")
STRAGGLER_ACTIONS = ("Report", "Evict")


class SpecError(ValueError):
    """The SpliceJob's spec is invalid; fix the resource (the message names the field)."""


@dataclass(frozen=True, kw_only=True)
class NodeRange:
    # The job never runs with fewer worker pods than `min` (below it the job fails),
    # never more than `max`; the operator keeps `desired` pods (the scale subresource).
    min: int = 1
    max: int = 1
    desired: int = 1


@dataclass(frozen=True, kw_only=True)
class FaultTolerance:
    # Replace: a lost worker pod is replaced by a new pod that joins the running job.
    # Shrink: lost pods are not replaced; survivors go on while at least nodes.min remain.
    recovery_strategy: str = "Replace"
    # Worker pods the operator may replace over the job's life before it stops replacing.
    max_pod_replacements: int = 10
    # In-place recoveries (controller epochs after faults) before the job is failed.
    max_recoveries: int = 100
    # Passed to the controller: agents heartbeat this often...
    heartbeat_interval_s: float = 1.0
    # ...and an agent silent this long is declared lost.
    node_timeout_s: float = 10.0
    # A collective that makes no progress this long counts as a hang (controller detector).
    hang_timeout_s: float = 60.0


@dataclass(frozen=True, kw_only=True)
class StragglerPolicy:
    enabled: bool = True
    # A rank this many times slower than the median step time is a straggler.
    slowdown_threshold: float = 1.2
    # Steps of evidence needed before a rank is flagged.
    window_steps: int = 30
    # Report: flag it in status and metrics. Evict: also replace its pod.
    action: str = "Report"


@dataclass(frozen=True, kw_only=True)
class SnapshotPolicy:
    # Copies of each rank's in-memory snapshot pushed to peers' agents (0: none). Off by
    # default: with data-parallel state every survivor holds the resume step already, and
    # each replica costs host memory on the peer and CPU and network all along.
    replicas: int = 0
    every_steps: int = 1
    # Persistent checkpoints: the fall-back when every in-memory copy of a shard is lost.
    persistent: bool = False
    persistent_path: str = ""
    persistent_every_steps: int = 1000


@dataclass(frozen=True, kw_only=True)
class Monitoring:
    enabled: bool = True
    port: int = 9400   # the container port named "metrics" (PodMonitor/ServiceMonitor)


@dataclass(frozen=True, kw_only=True)
class SpliceJobSpec:
    template: Mapping[str, Any]           # the worker pod template (PodTemplateSpec)
    nodes: NodeRange = field(default_factory=NodeRange)
    processes_per_node: int = 1
    image: str = ""                       # controller image; default: the worker's image
    suspend: bool = False
    fault_tolerance: FaultTolerance = field(default_factory=FaultTolerance)
    stragglers: StragglerPolicy = field(default_factory=StragglerPolicy)
    snapshot: SnapshotPolicy = field(default_factory=SnapshotPolicy)
    monitoring: Monitoring = field(default_factory=Monitoring)

    @property
    def controller_image(self) -> str:
        return self.image or worker_container(self.template).get("image", "")


def worker_container(template: Mapping[str, Any]) -> Mapping[str, Any]:
    containers = template.get("spec", {}).get("containers", [])
    for c in containers:
        if c.get("name") == WORKER_CONTAINER:
            return c
    return containers[0] if containers else {}


def _get(obj: Mapping[str, Any], key: str, kind: type | tuple[type, ...], default: Any,
         path: str) -> Any:
    value = obj.get(key, default)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise SpecError(f"{path}.{key}: expected {getattr(kind, '__name__', kind)}, "
                        f"got {value!r}")
    return value


def _section(spec: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = spec.get(key) or {}
    if not isinstance(value, Mapping):
        raise SpecError(f"spec.{key}: expected an object, got {value!r}")
    return value


def parse_spec(spec: Mapping[str, Any]) -> SpliceJobSpec:
    """The SpliceJob `.spec` as a validated SpliceJobSpec; SpecError names what is wrong."""
    if not isinstance(spec, Mapping):
        raise SpecError(f"spec: expected an object, got {spec!r}")
    template = spec.get("template")
    if not isinstance(template, Mapping):
        raise SpecError("spec.template: a worker pod template is required")
    n, ft, st = _section(spec, "nodes"), _section(spec, "faultTolerance"), _section(spec, "stragglers")
    sn, mo = _section(spec, "snapshot"), _section(spec, "monitoring")
    pe = sn.get("persistence") or {}
    node_min = _get(n, "min", int, 1, "spec.nodes")
    parsed = SpliceJobSpec(
        template=template,
        nodes=NodeRange(min=node_min, max=_get(n, "max", int, node_min, "spec.nodes"),
                        desired=_get(n, "desired", int, node_min, "spec.nodes")),
        processes_per_node=_get(spec, "processesPerNode", int, 1, "spec"),
        image=_get(spec, "image", str, "", "spec"),
        suspend=_get(spec, "suspend", bool, False, "spec"),
        fault_tolerance=FaultTolerance(
            recovery_strategy=_get(ft, "recoveryStrategy", str, "Replace", "spec.faultTolerance"),
            max_pod_replacements=_get(ft, "maxPodReplacements", int, 10, "spec.faultTolerance"),
            max_recoveries=_get(ft, "maxRecoveries", int, 100, "spec.faultTolerance"),
            heartbeat_interval_s=_get(ft, "heartbeatIntervalSeconds", float, 1.0,
                                      "spec.faultTolerance"),
            node_timeout_s=_get(ft, "nodeTimeoutSeconds", float, 10.0, "spec.faultTolerance"),
            hang_timeout_s=_get(ft, "hangTimeoutSeconds", float, 60.0, "spec.faultTolerance")),
        stragglers=StragglerPolicy(
            enabled=_get(st, "enabled", bool, True, "spec.stragglers"),
            slowdown_threshold=_get(st, "slowdownThreshold", float, 1.2, "spec.stragglers"),
            window_steps=_get(st, "windowSteps", int, 30, "spec.stragglers"),
            action=_get(st, "action", str, "Report", "spec.stragglers")),
        snapshot=SnapshotPolicy(
            replicas=_get(sn, "replicas", int, 0, "spec.snapshot"),
            every_steps=_get(sn, "everySteps", int, 1, "spec.snapshot"),
            persistent=_get(pe, "enabled", bool, False, "spec.snapshot.persistence"),
            persistent_path=_get(pe, "path", str, "", "spec.snapshot.persistence"),
            persistent_every_steps=_get(pe, "everySteps", int, 1000,
                                        "spec.snapshot.persistence")),
        monitoring=Monitoring(enabled=_get(mo, "enabled", bool, True, "spec.monitoring"),
                              port=_get(mo, "port", int, 9400, "spec.monitoring")),
    )
    problems = validation_errors(parsed)
    if problems:
        raise SpecError("; ".join(problems))
    return parsed


def validation_errors(s: SpliceJobSpec) -> list[str]:
    """Every rule the CRD enforces (OpenAPI bounds and the CEL x-kubernetes-validations),
    as messages; empty when the spec is valid. Keep in step with manifests/10-crd.yaml."""
    e: list[str] = []
    n, ft, st, sn = s.nodes, s.fault_tolerance, s.stragglers, s.snapshot
    if n.min < 1:
        e.append("spec.nodes.min must be at least 1")
    if not n.min <= n.desired <= n.max:
        e.append(f"spec.nodes: need min <= desired <= max, got min={n.min} "
                 f"desired={n.desired} max={n.max}")
    if s.processes_per_node < 1:
        e.append("spec.processesPerNode must be at least 1")
    if ft.recovery_strategy not in RECOVERY_STRATEGIES:
        e.append(f"spec.faultTolerance.recoveryStrategy must be one of {RECOVERY_STRATEGIES}")
    if ft.max_pod_replacements < 0 or ft.max_recoveries < 0:
        e.append("spec.faultTolerance budgets must not be negative")
    if ft.heartbeat_interval_s <= 0:
        e.append("spec.faultTolerance.heartbeatIntervalSeconds must be positive")
    if ft.node_timeout_s <= ft.heartbeat_interval_s:
        e.append("spec.faultTolerance.nodeTimeoutSeconds must exceed heartbeatIntervalSeconds")
    if ft.hang_timeout_s <= ft.heartbeat_interval_s:
        e.append("spec.faultTolerance.hangTimeoutSeconds must exceed heartbeatIntervalSeconds")
    if st.slowdown_threshold <= 1.0:
        e.append("spec.stragglers.slowdownThreshold must be greater than 1")
    if st.window_steps < 1:
        e.append("spec.stragglers.windowSteps must be at least 1")
    if st.action not in STRAGGLER_ACTIONS:
        e.append(f"spec.stragglers.action must be one of {STRAGGLER_ACTIONS}")
    if sn.replicas < 0 or sn.every_steps < 1 or sn.persistent_every_steps < 1:
        e.append("spec.snapshot: replicas >= 0, everySteps >= 1, persistence.everySteps >= 1")
    if sn.replicas >= n.max and sn.replicas > 0:
        e.append(f"spec.snapshot.replicas ({sn.replicas}) must be less than nodes.max "
                 f"({n.max}): a replica lives on another node")
    if sn.persistent and not sn.persistent_path:
        e.append("spec.snapshot.persistence.path is required when persistence is enabled")
    if not 1 <= s.monitoring.port <= 65535 or s.monitoring.port == CONTROLLER_PORT:
        e.append(f"spec.monitoring.port must be a port other than {CONTROLLER_PORT}")
    containers = s.template.get("spec", {}).get("containers") or []
    if not containers:
        e.append("spec.template.spec.containers must name at least one container")
    elif not worker_container(s.template).get("command"):
        e.append("spec.template: the worker container needs a command (the training "
                 "program the agent launches)")
    return e
