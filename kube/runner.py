"""The operator's loop: watches wake it, the reconcile decides, KubeApi executes.

Watches on SpliceJobs and on the pods the operator labels only say *which* job to look
at; each reconcile then reads the job, its pods and Service afresh, so a lost or
duplicated event costs nothing (level-triggered). A watch that ends is resumed from the
last resourceVersion it saw; one answered 410 Gone (its version was compacted away)
relists and starts over from the list's version; other errors back off exponentially. A
periodic resync re-queues every job. Only the Lease holder reconciles.
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from kubernetes import watch
from kubernetes.client.rest import ApiException

from splice.kube import pods as manifests
from splice.kube.client import KubeApi
from splice.kube.controller_status import ControllerStatusSource
from splice.kube.leader import Clock, LeaderElector, utcnow
from splice.kube.reconcile import job_view, pod_view, reconcile
from splice.kube.spec import GROUP, LABEL_JOB, PLURAL, VERSION

log = logging.getLogger("splice.kube")
Key = tuple[str, str]   # (namespace, job name)


@dataclass(frozen=True, kw_only=True)
class OperatorConfig:
    namespace: str | None = None   # None: every namespace
    # Every job is reconciled at least this often even without events.
    resync_s: float = 30.0
    # Server-side watch timeout; the watch is then resumed from its resourceVersion.
    watch_timeout_s: int = 300
    # Backoff after a failed watch or reconcile: doubles from initial up to max.
    backoff_initial_s: float = 0.2
    backoff_max_s: float = 30.0
    # Record a Kubernetes Event for every pod created or deleted, with its reason.
    events: bool = True

    def __post_init__(self) -> None:
        if self.resync_s <= 0 or self.watch_timeout_s < 1:
            raise ValueError("resync and watch timeout must be positive")


class WorkQueue:
    """Keys due at a time; a key queued twice is processed once."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, Key]] = []
        self._due: dict[Key, float] = {}

    def add(self, key: Key, delay_s: float = 0.0) -> None:
        at = time.monotonic() + delay_s
        with self._cond:
            if key in self._due and self._due[key] <= at:
                return
            self._due[key] = at
            heapq.heappush(self._heap, (at, key))
            self._cond.notify()

    def get(self, stop: threading.Event) -> Key | None:
        with self._cond:
            while not stop.is_set():
                while self._heap and self._due.get(self._heap[0][1]) != self._heap[0][0]:
                    heapq.heappop(self._heap)   # superseded entry
                wait = self._heap[0][0] - time.monotonic() if self._heap else 0.5
                if self._heap and wait <= 0:
                    _, key = heapq.heappop(self._heap)
                    del self._due[key]
                    return key
                self._cond.wait(min(wait, 0.5))
            return None

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()


class Operator:
    def __init__(self, kube: KubeApi, controllers: ControllerStatusSource,
                 config: OperatorConfig, elector: LeaderElector | None = None,
                 clock: Clock = utcnow) -> None:
        self.kube, self.config = kube, config
        self._controllers, self._elector, self._clock = controllers, elector, clock
        self._queue = WorkQueue()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._watches: list[watch.Watch] = []
        self._lock = threading.Lock()
        self.relists: dict[str, int] = {"splicejobs": 0, "pods": 0}
        self.reconciles = 0

    @property
    def leading(self) -> bool:
        return self._elector is None or self._elector.leading

    def start(self) -> None:
        if self._elector is not None:
            self._elector.start()
        for name, target in (("watch-jobs", lambda: self._watch_loop("splicejobs")),
                             ("watch-pods", lambda: self._watch_loop("pods")),
                             ("reconcile", self._work_loop), ("resync", self._resync_loop)):
            t = threading.Thread(target=target, name=f"operator-{name}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        self._stop.set()
        self._queue.wake()
        with self._lock:
            for w in self._watches:
                w.stop()
        for t in self._threads:
            t.join(10)
        if self._elector is not None:
            self._elector.stop()

    # ---- watches ----------------------------------------------------------------------
    def _list(self, resource: str) -> tuple[list[dict[str, Any]], str]:
        ns = self.config.namespace
        return self.kube.list_jobs(ns) if resource == "splicejobs" else self.kube.list_pods(ns)

    def _stream(self, resource: str, rv: str, w: watch.Watch) -> Iterator[dict[str, Any]]:
        ns, kw = self.config.namespace, {"resource_version": rv, "timeout_seconds":
                                         self.config.watch_timeout_s}
        custom, core = self.kube.custom, self.kube.core
        if resource == "splicejobs" and ns:
            return w.stream(custom.list_namespaced_custom_object, GROUP, VERSION, ns, PLURAL,
                            **kw)
        if resource == "splicejobs":
            return w.stream(custom.list_cluster_custom_object, GROUP, VERSION, PLURAL, **kw)
        if ns:
            return w.stream(core.list_namespaced_pod, ns, label_selector=LABEL_JOB, **kw)
        return w.stream(core.list_pod_for_all_namespaces, label_selector=LABEL_JOB, **kw)

    def _watch_loop(self, resource: str) -> None:
        rv: str | None = None
        backoff = self.config.backoff_initial_s
        while not self._stop.is_set():
            try:
                if rv is None:   # (re)list: the state now, and the version to watch from
                    items, rv = self._list(resource)
                    self.relists[resource] += 1
                    for obj in items:
                        self._enqueue(resource, obj)
                w = watch.Watch()
                with self._lock:
                    self._watches.append(w)
                try:
                    for event in self._stream(resource, rv, w):
                        obj = event["raw_object"]
                        rv = obj["metadata"].get("resourceVersion", rv)
                        if event["type"] != "BOOKMARK":
                            self._enqueue(resource, obj)
                        backoff = self.config.backoff_initial_s
                finally:
                    with self._lock:
                        self._watches.remove(w)
            except ApiException as e:
                if e.status == 410:
                    log.info("watch on %s expired (410 Gone): relisting", resource)
                    rv = None
                    continue
                log.warning("watch on %s failed: %s %s", resource, e.status, e.reason)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self.config.backoff_max_s)
            except Exception as e:  # connection refused/reset, API server restarting
                if self._stop.is_set():
                    break
                log.warning("watch on %s broke: %s", resource, e)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self.config.backoff_max_s)

    def _enqueue(self, resource: str, obj: dict[str, Any]) -> None:
        meta = obj.get("metadata", {})
        name = meta.get("name") if resource == "splicejobs" else \
            (meta.get("labels") or {}).get(LABEL_JOB)
        if name:
            self._queue.add((meta.get("namespace", "default"), name))

    def _resync_loop(self) -> None:
        """Queue every job when this replica takes the lead, then every resync_s."""
        was_leading, next_at = False, 0.0
        while not self._stop.wait(0.1):
            leading, now = self.leading, time.monotonic()
            if leading and (not was_leading or now >= next_at):
                next_at = now + self.config.resync_s
                try:
                    for job in self.kube.list_jobs(self.config.namespace)[0]:
                        self._enqueue("splicejobs", job)
                except Exception as e:
                    log.warning("resync list failed: %s", e)
                    next_at = now + self.config.backoff_initial_s
            was_leading = leading

    # ---- reconciling ------------------------------------------------------------------
    def _work_loop(self) -> None:
        failures: dict[Key, int] = {}
        while (key := self._queue.get(self._stop)) is not None:
            if not self.leading:
                continue   # the leader handles it; we re-queue everything on taking over
            try:
                self.sync(*key)
                failures.pop(key, None)
            except Exception as e:
                n = failures[key] = failures.get(key, 0) + 1
                delay = 0.0 if isinstance(e, ApiException) and e.status == 409 else min(
                    self.config.backoff_initial_s * 2 ** n, self.config.backoff_max_s)
                log.warning("reconcile %s/%s failed (%s); retry in %.1fs", *key, e, delay)
                self._queue.add(key, delay)

    def sync(self, namespace: str, name: str) -> None:
        """Reconcile one job from a fresh read of everything it owns."""
        job = self.kube.get_job(namespace, name)
        if job is None:
            return   # gone: owner references let the garbage collector remove the rest
        pods, _ = self.kube.list_pods(namespace, job=name)
        services = self.kube.list_service_names(namespace, name)
        view = job_view(job)
        controller = None
        if any(p["metadata"].get("labels", {}).get("splice.dev/role") == "controller"
               and (p.get("status") or {}).get("phase") == "Running" for p in pods):
            controller = self._controllers.get(manifests.controller_address(view.ref), name)
        plan = reconcile(view, [pod_view(p) for p in pods], services, controller, self._clock())
        self.kube.execute(job, plan, events=self.config.events)
        self.reconciles += 1

