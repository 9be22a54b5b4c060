"""The operator's pure reconcile: failure stories as tables, and properties over random
histories of pod losses, scaling, suspension and deletion checked against invariants."""

from __future__ import annotations

import copy
import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from splice.kube.reconcile import (
    AddFinalizer,
    CreatePod,
    CreateService,
    DeletePod,
    DeleteService,
    Plan,
    PodView,
    RemoveFinalizer,
    job_view,
    pod_view,
    reconcile,
)
from splice.kube.spec import FINALIZER
from splice.kube.status import ControllerView
from tests.test_kube_spec import BASE

T0 = dt.datetime(2026, 5, 1, 12, 0, 0, tzinfo=dt.timezone.utc)
RUNNING = ControllerView(phase="running", epoch=1, world_size=4)


@dataclass
class World:
    """A tiny cluster the plans are applied to: pods appear at once, as Running."""
    spec: dict[str, Any] = field(default_factory=lambda: copy.deepcopy(BASE))
    status: dict[str, Any] = field(default_factory=dict)
    finalizers: list[str] = field(default_factory=lambda: [FINALIZER])
    deleting: bool = False
    generation: int = 1
    pods: dict[str, PodView] = field(default_factory=dict)
    services: set[str] = field(default_factory=set)
    ever_created: list[str] = field(default_factory=list)

    def job(self) -> Any:
        meta: dict[str, Any] = {"name": "j", "namespace": "ns", "uid": "u-1",
                                "generation": self.generation, "finalizers": self.finalizers}
        if self.deleting:
            meta["deletionTimestamp"] = "2026-05-01T12:00:00Z"
        return job_view({"metadata": meta, "spec": self.spec, "status": self.status})

    def plan(self, controller: ControllerView | None = RUNNING, now: dt.datetime = T0) -> Plan:
        return reconcile(self.job(), list(self.pods.values()), sorted(self.services),
                         controller, now)

    def apply(self, plan: Plan) -> None:
        for a in plan.actions:
            if isinstance(a, CreatePod):
                name = a.manifest["metadata"]["name"]
                if name in self.pods:
                    continue   # 409 AlreadyExists
                self.pods[name] = pod_view({**a.manifest, "status": {"phase": "Running"}})
                self.ever_created.append(name)
            elif isinstance(a, DeletePod):
                self.pods.pop(a.name, None)
            elif isinstance(a, CreateService):
                self.services.add(a.manifest["metadata"]["name"])
            elif isinstance(a, DeleteService):
                self.services.discard(a.name)
            elif isinstance(a, AddFinalizer):
                self.finalizers.append(FINALIZER)
            elif isinstance(a, RemoveFinalizer):
                self.finalizers.remove(FINALIZER)
        if plan.status is not None:
            self.status = copy.deepcopy(dict(plan.status))

    def step(self, controller: ControllerView | None = RUNNING) -> Plan:
        plan = self.plan(controller)
        self.apply(plan)
        return plan

    def workers(self) -> list[str]:
        return sorted((p.name for p in self.pods.values() if p.role == "worker" and p.active),
                      key=lambda n: int(n.rsplit("-", 1)[1]))

    def fail(self, name: str) -> None:
        p = self.pods[name]
        self.pods[name] = PodView(name=p.name, role=p.role, index=p.index, phase="Failed",
                                  terminating=False, why="container worker Error (exit code 1)")

    def scale(self, desired: int) -> None:
        self.spec["nodes"]["desired"] = desired
        self.generation += 1


def kinds(plan: Plan) -> list[str]:
    return [type(a).__name__ for a in plan.actions]


def condition(status: Any, type_: str) -> dict[str, Any]:
    return next(c for c in status["conditions"] if c["type"] == type_)


# ---- tables: one failure story each -------------------------------------------------------
def test_a_new_job_gets_a_finalizer_service_controller_and_its_workers() -> None:
    w = World(finalizers=[])
    plan = w.step(controller=None)
    assert kinds(plan) == ["AddFinalizer", "CreateService", "CreatePod", "CreatePod",
                           "CreatePod"]
    assert sorted(w.pods) == ["j-controller-0", "j-worker-1", "j-worker-2"]
    assert plan.status["phase"] == "Pending" and plan.status["nodes"] == 0   # observed
    assert plan.status["workerPods"] == ["j-worker-1", "j-worker-2"]
    assert condition(plan.status, "Progressing")["reason"] == "CreatingPods"
    assert "start the job controller" in plan.reasons


def test_a_settled_job_is_a_fixed_point() -> None:
    w = World()
    w.step()
    plan = w.step()
    assert plan.actions == ()
    assert plan.status["phase"] == "Running"
    assert condition(plan.status, "Ready") == {**condition(plan.status, "Ready"),
                                               "status": "True", "reason": "AllWorkersRunning"}


def test_a_failed_worker_is_replaced_by_a_new_pod_and_survivors_are_untouched() -> None:
    w = World()
    w.step()
    w.fail("j-worker-1")
    plan = w.step()
    assert [a.name for a in plan.actions if isinstance(a, DeletePod)] == ["j-worker-1"]
    created = [a.manifest["metadata"]["name"] for a in plan.actions if isinstance(a, CreatePod)]
    assert created == ["j-worker-3"]
    assert "replace lost worker pod j-worker-1" in plan.reasons
    assert any("exit code 1" in r for r in plan.reasons)
    assert w.workers() == ["j-worker-2", "j-worker-3"]
    assert plan.status["podReplacements"] == 1 and plan.status["phase"] == "Recovering"
    assert condition(plan.status, "Recovering")["reason"] == "ReplacingPods"


def test_a_vanished_worker_is_replaced() -> None:
    w = World()
    w.step()
    del w.pods["j-worker-2"]
    plan = w.step()
    assert kinds(plan) == ["CreatePod"]
    assert "replace lost worker pod j-worker-2" in plan.reasons
    assert w.step().actions == ()


def test_replacement_budget_spent_leaves_the_job_degraded() -> None:
    w = World()
    w.spec["faultTolerance"] = {"maxPodReplacements": 1}
    w.step()
    w.fail("j-worker-1")
    w.step()
    w.fail("j-worker-2")
    plan = w.step()
    assert not any(isinstance(a, CreatePod) for a in plan.actions)
    assert any("replacement budget is spent" in r for r in plan.reasons)
    assert condition(plan.status, "Degraded")["status"] == "True"
    assert w.workers() == ["j-worker-3"] and w.step().actions == ()


def test_shrink_strategy_does_not_replace_and_fails_below_min() -> None:
    w = World()
    w.spec["faultTolerance"] = {"recoveryStrategy": "Shrink"}
    w.scale(3)
    w.step()
    w.fail("j-worker-1")
    plan = w.step()
    assert kinds(plan) == ["DeletePod"] and plan.status["unreplacedPods"] == 1
    w.spec["nodes"]["min"] = 2
    w.fail("j-worker-2")
    plan = w.step()
    assert plan.status["phase"] == "Failed"
    assert condition(plan.status, "Failed")["reason"] == "TooFewNodes"
    assert w.workers() == []


def test_scale_up_and_down_keeps_the_oldest_running_pods() -> None:
    w = World()
    w.step()
    w.scale(4)
    plan = w.step()
    assert kinds(plan) == ["CreatePod", "CreatePod"] and len(w.workers()) == 4
    # a pending pod goes before a running one, then the newest
    p = w.pods["j-worker-3"]
    w.pods["j-worker-3"] = PodView(name=p.name, role=p.role, index=p.index, phase="Pending",
                                   terminating=False)
    w.scale(2)
    plan = w.step()
    assert [a.name for a in plan.actions] == ["j-worker-3", "j-worker-4"]
    assert w.workers() == ["j-worker-1", "j-worker-2"]
    assert plan.status["podReplacements"] == 0 and plan.status["lostPods"] == 0


def test_suspend_stops_every_pod_and_resume_starts_fresh_ones() -> None:
    w = World()
    w.step()
    w.spec["suspend"] = True
    plan = w.step()
    assert sorted(a.name for a in plan.actions) == ["j-controller-0", "j-worker-1",
                                                    "j-worker-2"]
    assert plan.status["phase"] == "Suspended" and w.pods == {}
    assert condition(plan.status, "Suspended")["reason"] == "SuspendedByUser"
    assert w.step().actions == ()
    w.spec["suspend"] = False
    w.step()
    assert w.workers() == ["j-worker-4", "j-worker-5"] and "j-controller-3" in w.pods
    assert w.status["lostPods"] == 0


def test_deleting_the_job_removes_pods_then_the_finalizer() -> None:
    w = World()
    w.step()
    w.deleting = True
    plan = w.step()
    assert plan.status is None
    assert sorted(kinds(plan)) == ["DeletePod"] * 3 + ["DeleteService"]
    plan = w.step()
    assert kinds(plan) == ["RemoveFinalizer"] and w.finalizers == []
    assert w.step().actions == ()


def test_terminating_pods_hold_the_finalizer_back() -> None:
    w = World()
    w.deleting = True
    w.pods["j-worker-1"] = PodView(name="j-worker-1", role="worker", index=1,
                                   phase="Running", terminating=True)
    assert w.plan().actions == ()


def test_an_invalid_spec_fails_the_job_and_creates_nothing() -> None:
    w = World()
    w.spec["nodes"]["desired"] = 9
    plan = w.step()
    assert kinds(plan) == [] and plan.status["phase"] == "Failed"
    assert condition(plan.status, "Failed")["reason"] == "InvalidSpec"
    w.spec["nodes"]["desired"] = 2   # fixing the spec un-fails it
    assert w.step().status["phase"] != "Failed" and len(w.workers()) == 2


def test_a_controller_failure_is_sticky_and_stops_the_workers() -> None:
    w = World()
    w.step()
    plan = w.step(ControllerView(phase="failed", message="world below minimum"))
    assert sorted(a.name for a in plan.actions) == ["j-worker-1", "j-worker-2"]
    assert condition(plan.status, "Failed")["reason"] == "ControllerFailed"
    assert w.step(None).status["phase"] == "Failed" and w.step().actions == ()


def test_too_many_recoveries_fail_the_job() -> None:
    w = World()
    w.spec["faultTolerance"] = {"maxRecoveries": 2}
    w.step()
    plan = w.step(ControllerView(phase="running", recoveries=3))
    assert condition(plan.status, "Failed")["reason"] == "RecoveryBudgetExhausted"


def test_completion_creates_nothing_more() -> None:
    w = World()
    w.step()
    w.pods["j-worker-1"] = pod_view({"metadata": {"name": "j-worker-1", "labels": {
        "splice.dev/role": "worker", "splice.dev/index": "1"}}, "status": {"phase": "Succeeded"}})
    assert kinds(w.step()) == []            # finishing: the succeeded pod is not replaced
    plan = w.step(ControllerView(phase="complete"))
    assert plan.status["phase"] == "Complete" and kinds(plan) == []
    assert condition(plan.status, "Complete")["reason"] == "TrainingFinished"


def test_a_lost_controller_pod_is_replaced_under_a_new_name() -> None:
    w = World()
    w.step()
    w.fail("j-controller-0")
    plan = w.step()
    assert [a.name for a in plan.actions if isinstance(a, DeletePod)] == ["j-controller-0"]
    assert "replace lost controller pod j-controller-0" in plan.reasons
    assert "j-controller-3" in w.pods and w.workers() == ["j-worker-1", "j-worker-2"]


def test_the_controller_view_is_mirrored_into_status() -> None:
    w = World()
    w.step()
    view = ControllerView(phase="recovering", epoch=3, world_size=3, recoveries=2,
                          stragglers=("j-worker-2/1",), last_snapshot_step=120,
                          message="epoch 3: lost j-worker-1/0")
    plan = w.step(view)
    s = plan.status
    assert (s["epoch"], s["worldSize"], s["recoveries"]) == (3, 3, 2)
    assert s["stragglers"] == ["j-worker-2/1"] and s["lastSnapshot"]["step"] == 120
    assert s["phase"] == "Recovering" and s["message"] == view.message
    assert condition(s, "Recovering")["reason"] == "ControllerRecovering"
    # unreachable controller: the last known figures stay
    assert w.step(None).status["epoch"] == 3


def test_condition_transition_times_move_only_on_change() -> None:
    w = World()
    w.step()
    w.step()
    first = condition(w.status, "Ready")
    later = T0 + dt.timedelta(minutes=5)
    same = condition(w.plan(now=later).status, "Ready")
    assert same["lastTransitionTime"] == first["lastTransitionTime"]
    w.fail("j-worker-1")
    changed = condition(w.plan(now=later).status, "Ready")
    assert changed["status"] == "False" and changed["lastTransitionTime"] == "2026-05-01T12:05:00Z"


def test_every_condition_has_a_camel_case_reason() -> None:
    w = World()
    for ctl in (None, RUNNING, ControllerView(phase="recovering"), ControllerView(phase="failed")):
        for c in w.step(ctl).status["conditions"]:
            assert c["reason"][:1].isupper() and c["reason"].isalnum(), c


def test_worker_pods_wrap_the_user_command_in_the_agent() -> None:
    w = World()
    plan = w.step()
    pod = next(a.manifest for a in plan.actions if isinstance(a, CreatePod)
               and a.manifest["metadata"]["name"] == "j-worker-1")
    c = pod["spec"]["containers"][0]
    assert c["command"] == ["splice", "agent", "--controller", "j-controller.ns.svc:29400",
                            "--nproc", "2", "--node-id", "j-worker-1", "--job", "j",
                            "--gloo-host", "$(POD_IP)", "--", "python", "train.py"]
    assert pod["spec"]["restartPolicy"] == "Never"
    assert pod["metadata"]["ownerReferences"][0]["uid"] == "u-1"
    # The snapshots' shared memory: a memory-backed /dev/shm, not the 64 MiB default.
    assert {"name": "splice-shm", "mountPath": "/dev/shm"} in c["volumeMounts"]
    assert {"name": "splice-shm", "emptyDir": {"medium": "Memory"}} in pod["spec"]["volumes"]
    assert {"name": "metrics", "containerPort": 9400} in c["ports"]
    ctl = next(a.manifest for a in plan.actions if isinstance(a, CreatePod)
               and a.manifest["metadata"]["name"] == "j-controller-0")
    argv = ctl["spec"]["containers"][0]["command"]
    assert argv[:2] == ["splice", "controller"] and argv[argv.index("--world-size") + 1] == "4"


# ---- properties ---------------------------------------------------------------------------
OPS = st.one_of(
    st.tuples(st.just("fail"), st.integers(0, 7)),
    st.tuples(st.just("vanish"), st.integers(0, 7)),
    st.tuples(st.just("scale"), st.integers(1, 4)),
    st.tuples(st.just("suspend"), st.booleans()),
    st.tuples(st.just("controller"), st.sampled_from(["running", "recovering", "forming"])),
    st.tuples(st.just("strategy"), st.sampled_from(["Replace", "Shrink"])),
)


@settings(max_examples=150, deadline=None)
@given(ops=st.lists(OPS, max_size=14), budget=st.integers(0, 3), delete_at_end=st.booleans())
def test_random_histories_keep_the_invariants(ops: list[tuple[str, Any]], budget: int,
                                              delete_at_end: bool) -> None:
    w = World()
    w.spec["faultTolerance"] = {"maxPodReplacements": budget}
    ctl = RUNNING
    w.step(ctl)
    for op, arg in ops:
        if op == "fail" and w.workers():
            w.fail(w.workers()[arg % len(w.workers())])
        elif op == "vanish" and w.workers():
            del w.pods[w.workers()[arg % len(w.workers())]]
        elif op == "scale":
            w.scale(arg)
        elif op == "suspend":
            w.spec["suspend"] = arg
        elif op == "controller":
            ctl = ControllerView(phase=arg)
        elif op == "strategy":
            w.spec["faultTolerance"]["recoveryStrategy"] = arg
        before = {n: p for n, p in w.pods.items() if p.active and p.role == "worker"}
        plan = w.plan(ctl)
        assert plan == w.plan(ctl), "reconcile must be deterministic"
        w.apply(plan)
        s = w.status
        # survivors are deleted only to scale down, suspend or stop a failed job
        deleted_survivors = [a.name for a in plan.actions
                             if isinstance(a, DeletePod) and a.name in before
                             and before[a.name].active and w.pods.get(a.name) is None]
        if deleted_survivors and s["phase"] not in ("Suspended", "Failed"):
            assert all("scale down" in a.reason for a in plan.actions
                       if isinstance(a, DeletePod) and a.name in deleted_survivors)
        # a second pass over the result changes nothing: level-triggered fixed point
        assert w.plan(ctl).actions == (), (op, arg)
        assert s["podReplacements"] <= budget
        assert len(set(w.ever_created)) == len(w.ever_created), "pod names are never reused"
        controllers = [p for p in w.pods.values() if p.role == "controller"]
        if s["phase"] not in ("Suspended",):
            assert len(controllers) == 1 or s["phase"] == "Failed"
        if s["phase"] not in ("Suspended", "Failed"):
            assert len(w.workers()) == w.spec["nodes"]["desired"] - s["unreplacedPods"]
            assert w.spec["nodes"]["min"] <= len(w.workers()) or s["unreplacedPods"] == 0
        else:
            assert w.workers() == []
        for c in s["conditions"]:
            assert c["reason"] and c["status"] in ("True", "False")
    if delete_at_end:
        w.deleting = True
        for _ in range(2):
            w.step(ctl)
        assert w.pods == {} and w.services == set() and w.finalizers == []
