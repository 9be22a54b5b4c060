"""The operator's decision: observed objects + spec -> actions and the next status. Pure.

Level-triggered: `reconcile` looks only at what exists now (the job, its pods and Service,
the job controller's view) and the status it wrote last time, never at which event woke
it. Running it twice on the same observations gives the same plan, and pod names are
deterministic, so a plan executed twice creates nothing twice (the second create gets
409). The shell (kube/runner.py) gathers the observations and executes the plan.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from splice.kube import pods as manifests
from splice.kube.spec import (
    FINALIZER,
    LABEL_INDEX,
    LABEL_ROLE,
    SpecError,
    SpliceJobSpec,
    parse_spec,
)
from splice.kube.status import ControllerView, build_status

ACTIVE_PHASES = ("Pending", "Running")


@dataclass(frozen=True, kw_only=True)
class JobView:
    name: str
    namespace: str
    uid: str
    generation: int
    deleting: bool
    finalizers: tuple[str, ...]
    spec: Mapping[str, Any]
    status: Mapping[str, Any]

    @property
    def ref(self) -> manifests.JobRef:
        return manifests.JobRef(name=self.name, namespace=self.namespace, uid=self.uid)


@dataclass(frozen=True, kw_only=True)
class PodView:
    name: str
    role: str          # controller | worker
    index: int
    phase: str         # Pending, Running, Succeeded, Failed, Unknown
    terminating: bool  # deletionTimestamp set
    why: str = ""      # for a failed pod: how its container ended

    @property
    def active(self) -> bool:
        return not self.terminating and self.phase in ACTIVE_PHASES

    @property
    def lost(self) -> bool:
        return not self.terminating and self.phase in ("Failed", "Unknown")


def job_view(obj: Mapping[str, Any]) -> JobView:
    meta = obj.get("metadata", {})
    return JobView(name=meta["name"], namespace=meta.get("namespace", "default"),
                   uid=meta.get("uid", ""), generation=int(meta.get("generation", 0)),
                   deleting=bool(meta.get("deletionTimestamp")),
                   finalizers=tuple(meta.get("finalizers") or ()),
                   spec=obj.get("spec") or {}, status=obj.get("status") or {})


def pod_view(obj: Mapping[str, Any]) -> PodView:
    meta, status = obj.get("metadata", {}), obj.get("status") or {}
    labels = meta.get("labels") or {}
    why = ""
    for cs in status.get("containerStatuses") or []:
        term = (cs.get("state") or {}).get("terminated")
        if term:
            why = f"container {cs.get('name')} {term.get('reason', 'ended')} " \
                  f"(exit code {term.get('exitCode')})"
    if not why and status.get("reason"):
        why = f"{status['reason']}: {status.get('message', '')}".rstrip(": ")
    return PodView(name=meta["name"], role=labels.get(LABEL_ROLE, ""),
                   index=int(labels.get(LABEL_INDEX, "-1")),
                   phase=status.get("phase", "Pending"),
                   terminating=bool(meta.get("deletionTimestamp")), why=why)


# ---- actions ------------------------------------------------------------------------------
@dataclass(frozen=True)
class CreatePod:
    manifest: Mapping[str, Any]
    reason: str


@dataclass(frozen=True)
class DeletePod:
    name: str
    reason: str


@dataclass(frozen=True)
class CreateService:
    manifest: Mapping[str, Any]
    reason: str


@dataclass(frozen=True)
class DeleteService:
    name: str
    reason: str


@dataclass(frozen=True)
class AddFinalizer:
    reason: str = "guard cleanup of the job's pods"


@dataclass(frozen=True)
class RemoveFinalizer:
    reason: str = "every pod of the job is gone"


Action = CreatePod | DeletePod | CreateService | DeleteService | AddFinalizer | RemoveFinalizer


@dataclass(frozen=True)
class Plan:
    actions: tuple[Action, ...]
    status: Mapping[str, Any] | None   # None: leave the status alone (job being deleted)
    reasons: tuple[str, ...] = field(default=())


# ---- the decision -------------------------------------------------------------------------
def reconcile(job: JobView, observed_pods: Sequence[PodView], observed_services: Sequence[str],
              controller: ControllerView | None, now: dt.datetime) -> Plan:
    """What to do about `job` given what exists. `controller` is the job controller's own
    view (None when it cannot be reached); `now` stamps condition transitions."""
    if job.deleting:
        return _cleanup(job, observed_pods, observed_services)
    actions: list[Action] = []
    reasons: list[str] = []
    if FINALIZER not in job.finalizers:
        actions.append(AddFinalizer())
    try:
        spec = parse_spec(job.spec)
    except SpecError as e:
        return Plan(tuple(actions), build_status(job, None, [], controller, now,
                                                 failed=("InvalidSpec", str(e))), (str(e),))
    prev = job.status
    workers = sorted((p for p in observed_pods if p.role == "worker"), key=lambda p: p.index)
    next_index = max([int(prev.get("nextPodIndex", 0))] + [p.index + 1 for p in observed_pods])
    counters = {k: int(prev.get(k, 0)) for k in ("podReplacements", "lostPods", "unreplacedPods")}
    if int(prev.get("desiredNodes", spec.nodes.desired)) != spec.nodes.desired:
        counters["unreplacedPods"] = 0   # a new desired size supersedes earlier shortfalls
    failed: tuple[str, str] | None = None
    finishing = any(p.phase == "Succeeded" for p in workers)   # agents exit 0 when done
    complete = prev.get("phase") == "Complete" or (controller is not None
                                                   and controller.phase == "complete") or (
        finishing and not any(p.active for p in workers))
    if prev.get("phase") == "Failed" and _failed_reason(prev) != "InvalidSpec":
        failed = (_failed_reason(prev), str(prev.get("message", "")))
    elif controller is not None and controller.phase == "failed":
        failed = ("ControllerFailed", controller.message or "the job controller failed the job")
    elif controller is not None and controller.recoveries > spec.fault_tolerance.max_recoveries:
        failed = ("RecoveryBudgetExhausted", f"{controller.recoveries} recoveries exceed "
                  f"faultTolerance.maxRecoveries={spec.fault_tolerance.max_recoveries}")

    # Lost workers: failed pods, and pods that were running last time and are gone now.
    active = [p for p in workers if p.active]
    lost = [p for p in workers if p.lost]
    for p in lost:
        actions.append(DeletePod(p.name, f"worker pod {p.name} is lost ({p.why or p.phase})"))
    present = {p.name for p in workers if p.active}
    vanished = [n for n in prev.get("workerPods", []) if n not in present
                and n not in {p.name for p in lost}]
    newly_lost = [p.name for p in lost if p.name in prev.get("workerPods", [])] + vanished
    replace: list[str] = []
    for name in newly_lost:
        counters["lostPods"] += 1
        budget_left = spec.fault_tolerance.max_pod_replacements - counters["podReplacements"]
        if spec.fault_tolerance.recovery_strategy == "Replace" and budget_left > 0:
            counters["podReplacements"] += 1
            replace.append(name)
        else:
            counters["unreplacedPods"] += 1
            why = ("recoveryStrategy is Shrink" if spec.fault_tolerance.recovery_strategy
                   == "Shrink" else "the pod replacement budget is spent")
            reasons.append(f"worker pod {name} lost and not replaced: {why}")

    target = max(spec.nodes.desired - counters["unreplacedPods"], 0)
    if failed is None and not complete and len(active) + len(replace) < spec.nodes.min \
            and counters["unreplacedPods"] > 0:
        failed = ("TooFewNodes", f"{len(active)} worker pods left, fewer than nodes.min="
                  f"{spec.nodes.min}, and lost pods are not replaced")

    stop_all = spec.suspend or failed is not None or complete
    if spec.suspend or failed is not None:
        why = "the job is suspended" if spec.suspend else f"the job failed ({failed[0]})"
        for p in active:
            actions.append(DeletePod(p.name, f"stop worker pod {p.name}: {why}"))
        active = []
    if spec.suspend:
        for p in observed_pods:
            if p.role == "controller" and not p.terminating:
                actions.append(DeletePod(p.name, f"stop controller pod {p.name}: suspended"))

    if not stop_all:
        ref = job.ref
        if manifests.service_name(job.name) not in observed_services:
            actions.append(CreateService(manifests.controller_service(ref, spec),
                                         "the job's controller needs a stable address"))
        next_index = _ensure_controller(ref, spec, observed_pods, next_index, actions)
        if len(active) > target:   # scale down: newest (and not yet running) pods go first
            doomed = sorted(active, key=lambda p: (p.phase == "Running", -p.index))
            doomed = doomed[: len(active) - target]
            for p in doomed:
                actions.append(DeletePod(p.name, f"scale down to {target} worker pods"))
            active = [p for p in active if p not in doomed]
        for _ in range(0 if finishing else target - len(active)):
            name = manifests.pod_name(job.name, "worker", next_index)
            if replace:
                why = f"replace lost worker pod {replace.pop(0)}"
            else:
                why = f"bring worker pods up to {target}"
            actions.append(CreatePod(manifests.worker_pod(ref, spec, next_index), why))
            present.add(name)
            next_index += 1
    if stop_all:
        present = set()
    present -= {a.name for a in actions if isinstance(a, DeletePod)}
    reasons += [a.reason for a in actions if not isinstance(a, AddFinalizer)]
    status = build_status(
        job, spec, workers, controller, now, failed=failed, complete=complete,
        extra={"nextPodIndex": next_index, "workerPods": sorted(present),
               "desiredNodes": spec.nodes.desired, **counters},
        creating=any(isinstance(a, CreatePod) for a in actions), replacing=bool(newly_lost))
    return Plan(tuple(actions), status, tuple(reasons))


def _failed_reason(status: Mapping[str, Any]) -> str:
    for c in status.get("conditions", []):
        if c.get("type") == "Failed" and c.get("status") == "True":
            return str(c.get("reason", "Failed"))
    return "Failed"


def _ensure_controller(ref: manifests.JobRef, spec: SpliceJobSpec,
                       observed: Sequence[PodView], next_index: int,
                       actions: list[Action]) -> int:
    controllers = sorted((p for p in observed if p.role == "controller"), key=lambda p: p.index)
    for p in controllers:
        if p.lost:
            actions.append(DeletePod(p.name, f"controller pod {p.name} is lost "
                                             f"({p.why or p.phase})"))
    live = [p for p in controllers if p.active or p.phase == "Succeeded"]
    for extra in live[1:]:
        actions.append(DeletePod(extra.name, f"one controller per job: {live[0].name} stays"))
    if not live:
        lost = [p.name for p in controllers if p.lost]
        why = f"replace lost controller pod {lost[0]}" if lost else "start the job controller"
        actions.append(CreatePod(manifests.controller_pod(ref, spec, next_index), why))
        next_index += 1
    return next_index


def _cleanup(job: JobView, observed: Sequence[PodView], services: Sequence[str]) -> Plan:
    actions: list[Action] = [DeletePod(p.name, "the job is being deleted")
                             for p in observed if not p.terminating]
    actions += [DeleteService(s, "the job is being deleted") for s in services]
    if not observed and not services and FINALIZER in job.finalizers:
        actions.append(RemoveFinalizer())
    return Plan(tuple(actions), None, tuple(a.reason for a in actions))
