"""What the operator creates for a SpliceJob: the controller pod, its Service, worker pods.

Pure functions from (job identity, spec, index) to Kubernetes manifests as plain dicts. A
worker pod is the user's pod template with the agent as entrypoint: the template's worker
container command becomes the command the agent launches `processesPerNode` times.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from splice.kube.spec import (
    API_VERSION,
    CONTROLLER_PORT,
    KIND,
    LABEL_INDEX,
    LABEL_JOB,
    LABEL_ROLE,
    WORKER_CONTAINER,
    SnapshotPolicy,
    SpliceJobSpec,
    worker_container,
)


@dataclass(frozen=True, kw_only=True)
class JobRef:
    """Who owns the objects: every pod and Service carries an owner reference to the job,
    so the garbage collector removes them with it even if the operator is down."""
    name: str
    namespace: str
    uid: str


SHM_VOLUME = "splice-shm"


def service_name(job: str) -> str:
    return f"{job}-controller"


def controller_address(job: JobRef) -> str:
    """The controller's gRPC address as agents (and the operator) dial it."""
    return f"{service_name(job.name)}.{job.namespace}.svc:{CONTROLLER_PORT}"


def pod_name(job: str, role: str, index: int) -> str:
    return f"{job}-{role}-{index}"


def selector(job: str, role: str) -> str:
    return f"{LABEL_JOB}={job},{LABEL_ROLE}={role}"


def _metadata(job: JobRef, name: str, role: str, index: int | None,
              base: Mapping[str, Any] | None = None) -> dict[str, Any]:
    meta = copy.deepcopy(dict(base or {}))
    labels = dict(meta.get("labels") or {})
    labels.update({LABEL_JOB: job.name, LABEL_ROLE: role})
    if index is not None:
        labels[LABEL_INDEX] = str(index)
    meta.update(name=name, namespace=job.namespace, labels=labels, ownerReferences=[{
        "apiVersion": API_VERSION, "kind": KIND, "name": job.name, "uid": job.uid,
        "controller": True, "blockOwnerDeletion": True}])
    meta.pop("generateName", None)
    return meta


_POD_IP_ENV = {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}


def _ports(spec: SpliceJobSpec, extra: list[dict[str, Any]]) -> list[dict[str, Any]]:
    ports = list(extra)
    if spec.monitoring.enabled:
        ports.append({"name": "metrics", "containerPort": spec.monitoring.port})
    return ports


def controller_pod(job: JobRef, spec: SpliceJobSpec, index: int) -> dict[str, Any]:
    ft = spec.fault_tolerance
    world = spec.nodes.desired * spec.processes_per_node
    command = ["splice", "controller", "--job", job.name, "--world-size", str(world),
               "--min-world-size", str(spec.nodes.min * spec.processes_per_node),
               "--listen", f"0.0.0.0:{CONTROLLER_PORT}", "--advertise-host", "$(POD_IP)",
               "--heartbeat-interval-s", str(ft.heartbeat_interval_s),
               "--node-timeout-s", str(ft.node_timeout_s)]
    pod_spec: dict[str, Any] = {
        # The controller holds the job's state in memory: a restart in place keeps its
        # name and address; a lost pod is replaced by the operator.
        "restartPolicy": "OnFailure",
        "containers": [{
            "name": "controller", "image": spec.controller_image, "command": command,
            "env": [_POD_IP_ENV],
            "ports": _ports(spec, [{"name": "grpc", "containerPort": CONTROLLER_PORT}]),
            "readinessProbe": {"tcpSocket": {"port": CONTROLLER_PORT}, "periodSeconds": 2},
        }],
    }
    tmpl_spec = spec.template.get("spec", {})
    for key in ("imagePullSecrets", "serviceAccountName", "nodeSelector", "tolerations"):
        if key in tmpl_spec:
            pod_spec[key] = copy.deepcopy(tmpl_spec[key])
    name = pod_name(job.name, "controller", index)
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": _metadata(job, name, "controller", index), "spec": pod_spec}


def controller_service(job: JobRef, spec: SpliceJobSpec) -> dict[str, Any]:
    ports = [{"name": "grpc", "port": CONTROLLER_PORT, "targetPort": CONTROLLER_PORT}]
    if spec.monitoring.enabled:
        ports.append({"name": "metrics", "port": spec.monitoring.port,
                      "targetPort": spec.monitoring.port})
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": _metadata(job, service_name(job.name), "controller", None),
            "spec": {"selector": {LABEL_JOB: job.name, LABEL_ROLE: "controller"},
                     "ports": ports}}


def _snapshot_flags(sn: SnapshotPolicy) -> list[str]:
    """spec.snapshot as agent flags: replicas pushed to peer pods, persistent checkpoints."""
    flags = ["--replicas", str(sn.replicas)] if sn.replicas else []
    if sn.persistent:
        flags += ["--persist-dir", sn.persistent_path,
                  "--persist-every", str(sn.persistent_every_steps)]
    return flags


def worker_pod(job: JobRef, spec: SpliceJobSpec, index: int) -> dict[str, Any]:
    name = pod_name(job.name, "worker", index)
    template = copy.deepcopy(dict(spec.template))
    pod_spec = template.get("spec", {})
    # The agent replaces the pod's restarts: a failed pod is replaced by a new one (a new
    # node id), which is what lets survivors tell a replacement from a ghost.
    pod_spec["restartPolicy"] = "Never"
    pod_spec.setdefault("hostname", name)
    user = worker_container(spec.template)
    for c in pod_spec["containers"]:
        if c.get("name", "") != user.get("name", WORKER_CONTAINER):
            continue
        argv = list(c.get("command", [])) + list(c.get("args", []))
        c["command"] = ["splice", "agent", "--controller", controller_address(job),
                        "--nproc", str(spec.processes_per_node), "--node-id", name,
                        "--job", job.name, "--gloo-host", "$(POD_IP)",
                        *_snapshot_flags(spec.snapshot), "--", *argv]
        c.pop("args", None)
        c["env"] = [e for e in c.get("env", []) if e.get("name") != "POD_IP"] + [_POD_IP_ENV]
        c["ports"] = [p for p in c.get("ports", []) if p.get("name") != "metrics"]
        c["ports"] = _ports(spec, c["ports"])
        # Snapshots live in /dev/shm (the agent's shared memory), which a container gets
        # only 64 MiB of by default: mount a memory-backed volume there, unless the
        # template mounts one itself. It counts against the pod's memory limit.
        mounts = c.setdefault("volumeMounts", [])
        if not any(m.get("mountPath") == "/dev/shm" for m in mounts):
            mounts.append({"name": SHM_VOLUME, "mountPath": "/dev/shm"})
            pod_spec.setdefault("volumes", []).append(
                {"name": SHM_VOLUME, "emptyDir": {"medium": "Memory"}})
        break
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": _metadata(job, name, "worker", index, template.get("metadata")),
            "spec": pod_spec}
