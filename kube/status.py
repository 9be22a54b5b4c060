"""The SpliceJob status: phase, conditions with reasons, and the job controller's figures.

Pure. `ControllerView` is what the operator learned from the job controller (GetJobStatus);
`build_status` folds it together with the pods into the `.status` the operator writes.
Conditions keep their lastTransitionTime while their status does not change.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from splice.kube import pods as manifests

if TYPE_CHECKING:
    from splice.kube.reconcile import JobView, PodView
    from splice.kube.spec import SpliceJobSpec

CONDITION_TYPES = ("Ready", "Progressing", "Degraded", "Recovering", "Suspended", "Complete",
                   "Failed")


@dataclass(frozen=True, kw_only=True)
class ControllerView:
    """The job controller's own account of the job (see proto JobStatus)."""
    phase: str                  # forming, running, recovering, complete, failed
    epoch: int = 0
    world_size: int = 0         # members of the current epoch
    recoveries: int = 0
    message: str = ""
    stragglers: tuple[str, ...] = ()
    last_snapshot_step: int | None = None


def rfc3339(t: dt.datetime) -> str:
    return t.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _condition(prev: Mapping[str, Any], type_: str, ok: bool, reason: str, message: str,
               now: dt.datetime, generation: int) -> dict[str, Any]:
    status = "True" if ok else "False"
    old = next((c for c in prev.get("conditions", []) if c.get("type") == type_), None)
    since = old["lastTransitionTime"] if old and old.get("status") == status \
        and old.get("lastTransitionTime") else rfc3339(now)
    return {"type": type_, "status": status, "reason": reason, "message": message,
            "lastTransitionTime": since, "observedGeneration": generation}


def build_status(job: JobView, spec: SpliceJobSpec | None, workers: Sequence[PodView],
                 controller: ControllerView | None, now: dt.datetime, *,
                 failed: tuple[str, str] | None = None, complete: bool = False,
                 extra: Mapping[str, Any] | None = None, creating: bool = False,
                 replacing: bool = False) -> dict[str, Any]:
    prev = job.status
    running = [p for p in workers if p.active and p.phase == "Running"]
    active = [p for p in workers if p.active]
    desired = spec.nodes.desired if spec else 0
    suspended = bool(spec and spec.suspend)
    recovering = replacing or (controller is not None and controller.phase == "recovering")
    if failed:
        phase, message = "Failed", failed[1]
    elif complete:
        phase, message = "Complete", "training finished"
    elif suspended:
        phase, message = "Suspended", "spec.suspend is true: no pods run"
    elif recovering:
        phase, message = "Recovering", (controller.message if controller and
                                        controller.phase == "recovering" else
                                        "replacing lost worker pods")
    elif controller is not None and controller.phase == "running" and len(running) == desired:
        phase, message = "Running", f"{len(running)} worker pods, epoch {controller.epoch}"
    elif controller is not None and controller.phase == "running":
        phase, message = "Running", f"{len(running)} of {desired} worker pods running"
    else:
        phase = "Pending"
        message = (f"{len(running)} of {desired} worker pods running; " +
                   ("job controller unreachable" if controller is None
                    else f"job controller is {controller.phase}"))
    degraded = not failed and not complete and not suspended and (
        int((extra or {}).get("unreplacedPods", 0)) > 0 or (phase == "Running"
                                                             and len(running) < desired))
    gen = job.generation
    progressing = creating or phase in ("Pending", "Recovering")
    conds = [
        _condition(prev, "Ready", phase == "Running" and len(running) == desired,
                   "AllWorkersRunning" if phase == "Running" and len(running) == desired
                   else f"Job{phase}", message, now, gen),
        _condition(prev, "Progressing", progressing and phase not in ("Failed", "Complete"),
                   "CreatingPods" if creating else ("WaitingForWorkers" if progressing
                                                    else "Stable"), message, now, gen),
        _condition(prev, "Degraded", degraded,
                   "BelowDesiredNodes" if degraded else "AtDesiredNodes",
                   f"{len(active)} of {desired} worker pods active", now, gen),
        _condition(prev, "Recovering", recovering and not failed,
                   ("ReplacingPods" if replacing else "ControllerRecovering")
                   if recovering else "NoRecovery", message if recovering else "", now, gen),
        _condition(prev, "Suspended", suspended, "SuspendedByUser" if suspended
                   else "NotSuspended", "", now, gen),
        _condition(prev, "Complete", complete and not failed,
                   "TrainingFinished" if complete else "NotFinished", "", now, gen),
        _condition(prev, "Failed", failed is not None, failed[0] if failed else "NoFailure",
                   failed[1] if failed else "", now, gen),
    ]
    out: dict[str, Any] = {
        "phase": phase, "message": message, "conditions": conds, "observedGeneration": gen,
        "nodes": len(active), "selector": manifests.selector(job.name, "worker"),
        "worldSize": int(prev.get("worldSize", 0)), "epoch": int(prev.get("epoch", 0)),
        "recoveries": int(prev.get("recoveries", 0)),
        "stragglers": list(prev.get("stragglers", [])),
        "controllerAddress": manifests.controller_address(job.ref),
    }
    if "lastSnapshot" in prev:
        out["lastSnapshot"] = prev["lastSnapshot"]
    if controller is not None:
        out.update(worldSize=controller.world_size, epoch=controller.epoch,
                   recoveries=controller.recoveries, stragglers=list(controller.stragglers))
        if controller.last_snapshot_step is not None and (
                prev.get("lastSnapshot", {}).get("step") != controller.last_snapshot_step):
            out["lastSnapshot"] = {"step": controller.last_snapshot_step, "time": rfc3339(now)}
    out.update(extra or {})
    return out
