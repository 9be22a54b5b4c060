"""SpliceJob spec parsing and the Python twin of the CRD's validation rules (CEL included)."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from splice.kube.spec import SpecError, parse_spec

BASE: dict[str, Any] = {
    "nodes": {"min": 1, "max": 4, "desired": 2},
    "processesPerNode": 2,
    "template": {"spec": {"containers": [{"name": "worker", "image": "splice:dev",
                                          "command": ["python", "train.py"]}]}},
}


def spec_with(**changes: Any) -> dict[str, Any]:
    """BASE with dotted-path changes, e.g. spec_with(**{"nodes.min": 3})."""
    out = copy.deepcopy(BASE)
    for path, value in changes.items():
        *parents, leaf = path.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def test_defaults_fill_every_policy() -> None:
    s = parse_spec(BASE)
    assert (s.nodes.min, s.nodes.desired, s.nodes.max) == (1, 2, 4)
    assert s.fault_tolerance.recovery_strategy == "Replace"
    assert s.fault_tolerance.node_timeout_s > s.fault_tolerance.heartbeat_interval_s
    assert s.snapshot.replicas == 0 and not s.snapshot.persistent
    assert s.monitoring.port == 9400 and s.controller_image == "splice:dev"


def test_integers_are_accepted_where_seconds_are_numbers() -> None:
    s = parse_spec(spec_with(**{"faultTolerance.heartbeatIntervalSeconds": 2,
                                "faultTolerance.nodeTimeoutSeconds": 20}))
    assert s.fault_tolerance.heartbeat_interval_s == 2.0


@pytest.mark.parametrize(("changes", "message"), [
    ({"nodes.min": 0}, "nodes.min must be at least 1"),
    ({"nodes.desired": 5}, "min <= desired <= max"),
    ({"nodes.min": 3, "nodes.desired": 2}, "min <= desired <= max"),
    ({"nodes.max": "four"}, "spec.nodes.max: expected int"),
    ({"processesPerNode": 0}, "processesPerNode must be at least 1"),
    ({"processesPerNode": True}, "spec.processesPerNode: expected int"),
    ({"faultTolerance.recoveryStrategy": "Restart"}, "recoveryStrategy must be one of"),
    ({"faultTolerance.maxPodReplacements": -1}, "budgets must not be negative"),
    ({"faultTolerance.nodeTimeoutSeconds": 0.5}, "nodeTimeoutSeconds must exceed"),
    ({"faultTolerance.hangTimeoutSeconds": 1}, "hangTimeoutSeconds must exceed"),
    ({"faultTolerance.heartbeatIntervalSeconds": 0}, "heartbeatIntervalSeconds must be pos"),
    ({"stragglers.slowdownThreshold": 1.0}, "slowdownThreshold must be greater than 1"),
    ({"stragglers.windowSteps": 0}, "windowSteps must be at least 1"),
    ({"stragglers.action": "Kill"}, "stragglers.action must be one of"),
    ({"snapshot.replicas": 4}, "a replica lives on another node"),
    ({"snapshot.everySteps": 0}, "everySteps >= 1"),
    ({"snapshot.persistence": {"enabled": True}}, "persistence.path is required"),
    ({"monitoring.port": 29400}, "monitoring.port must be a port other than"),
    ({"monitoring.port": 70000}, "monitoring.port must be a port other than"),
    ({"template": {"spec": {"containers": []}}}, "at least one container"),
    ({"template": {"spec": {"containers": [{"name": "worker", "image": "x"}]}}},
     "needs a command"),
    ({"template": None}, "a worker pod template is required"),
    ({"nodes": [1, 2]}, "spec.nodes: expected an object"),
])
def test_invalid_specs_are_refused_with_the_field_named(changes: dict[str, Any],
                                                        message: str) -> None:
    with pytest.raises(SpecError, match=message.replace("(", r"\(")):
        parse_spec(spec_with(**changes))


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(SpecError) as e:
        parse_spec(spec_with(**{"nodes.min": 0, "stragglers.action": "Kill"}))
    assert "nodes.min" in str(e.value) and "stragglers.action" in str(e.value)


def test_spec_error_is_a_value_error() -> None:
    # The CLI turns ValueError into a clear message without a traceback.
    assert issubclass(SpecError, ValueError)


@pytest.mark.parametrize("snapshot, flags", [
    ({"replicas": 0}, []),
    ({"replicas": 2}, ["--replicas", "2"]),
    ({"replicas": 1, "persistence": {"enabled": True, "path": "/ckpt", "everySteps": 500}},
     ["--replicas", "1", "--persist-dir", "/ckpt", "--persist-every", "500"]),
])
def test_the_snapshot_policy_reaches_the_agents(snapshot: dict[str, Any],
                                                flags: list[str]) -> None:
    from splice.kube.pods import JobRef, worker_pod

    pod = worker_pod(JobRef(name="j", namespace="ns", uid="u-1"),
                     parse_spec(spec_with(snapshot=snapshot)), 0)
    command = pod["spec"]["containers"][0]["command"]
    cut = command.index("--")
    assert command[command.index("$(POD_IP)") + 1:cut] == flags
    assert command[cut + 1:] == ["python", "train.py"]
