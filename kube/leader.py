"""Leader election among operator replicas with a coordination.k8s.io/v1 Lease.

`decide` is the pure rule (client-go's): take a lease that is free, expired or ours;
otherwise follow. `LeaderElector` applies it through the API with optimistic concurrency
(a write conditional on the lease's resourceVersion), so two replicas racing for an expired
lease cannot both win. The clock is injected.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from kubernetes import client
from kubernetes.client.rest import ApiException

log = logging.getLogger("splice.kube.leader")
Clock = Callable[[], dt.datetime]


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def micro_time(t: dt.datetime) -> str:
    return t.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(s: str) -> dt.datetime:
    return dt.datetime.fromisoformat(s.replace("Z", "+00:00"))


@dataclass(frozen=True, kw_only=True)
class Decision:
    take: bool           # write the lease with us as holder
    leading: bool        # we hold it after the write succeeds
    reason: str


def decide(lease_spec: Mapping[str, Any] | None, identity: str, now: dt.datetime) -> Decision:
    if lease_spec is None:
        return Decision(take=True, leading=True, reason="no lease yet: create it")
    holder = lease_spec.get("holderIdentity") or ""
    if holder == identity:
        return Decision(take=True, leading=True, reason="we hold the lease: renew it")
    if not holder:
        return Decision(take=True, leading=True, reason="the lease was released: take it")
    renewed = lease_spec.get("renewTime") or lease_spec.get("acquireTime")
    duration_s = float(lease_spec.get("leaseDurationSeconds") or 0)
    if renewed is None or now > parse_time(renewed) + dt.timedelta(seconds=duration_s):
        return Decision(take=True, leading=True,
                        reason=f"{holder}'s lease expired (not renewed for {duration_s:g}s)")
    return Decision(take=False, leading=False, reason=f"{holder} holds the lease")


@dataclass(frozen=True, kw_only=True)
class LeaseConfig:
    name: str = "splice-operator"
    namespace: str = "default"
    identity: str = ""
    # Followers wait this long after the last renewal before taking over.
    duration_s: float = 15.0
    # The leader renews (and followers retry) this often; well under duration_s.
    retry_s: float = 2.0

    def __post_init__(self) -> None:
        if not self.identity:
            raise ValueError("leader election needs an identity (--identity)")
        if not 0 < self.retry_s < self.duration_s:
            raise ValueError("lease retry interval must be positive and below its duration")


class LeaderElector:
    def __init__(self, api: client.ApiClient, config: LeaseConfig, clock: Clock = utcnow,
                 on_change: Callable[[bool], None] = lambda leading: None) -> None:
        self._api = client.CoordinationV1Api(api)
        self._config = config
        self._clock = clock
        self._on_change = on_change
        self._leading = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def leading(self) -> bool:
        return self._leading

    def try_once(self) -> bool:
        """One round: read the lease, decide, write if we may. Returns whether we lead."""
        c, now = self._config, self._clock()
        try:
            resp = self._api.read_namespaced_lease(c.name, c.namespace, _preload_content=False)
            lease: dict[str, Any] | None = json.loads(resp.data)
        except ApiException as e:
            if e.status != 404:
                return self._set(False, f"cannot read lease: {e.status} {e.reason}")
            lease = None
        spec = (lease or {}).get("spec", {})
        decision = decide(spec if lease else None, c.identity, now)
        if not decision.take:
            return self._set(False, decision.reason)
        new_spec = {**spec, "holderIdentity": c.identity, "leaseDurationSeconds":
                    int(c.duration_s), "renewTime": micro_time(now)}
        if spec.get("holderIdentity") != c.identity:
            new_spec["acquireTime"] = micro_time(now)
            new_spec["leaseTransitions"] = int(spec.get("leaseTransitions", 0)) + (
                1 if lease else 0)
        body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": c.name, "namespace": c.namespace}, "spec": new_spec}
        try:
            if lease is None:
                self._api.create_namespaced_lease(c.namespace, body, _preload_content=False)
            else:
                body["metadata"]["resourceVersion"] = lease["metadata"]["resourceVersion"]
                self._api.replace_namespaced_lease(c.name, c.namespace, body,
                                                   _preload_content=False)
        except ApiException as e:   # 409: another replica wrote first
            return self._set(False, f"lost the race for the lease ({e.status})")
        return self._set(True, decision.reason)

    def release(self) -> None:
        """Give the lease up so another replica need not wait for it to expire."""
        if not self._leading:
            return
        c = self._config
        try:
            resp = self._api.read_namespaced_lease(c.name, c.namespace, _preload_content=False)
            lease = json.loads(resp.data)
            if lease["spec"].get("holderIdentity") == c.identity:
                lease["spec"]["holderIdentity"] = ""
                self._api.replace_namespaced_lease(c.name, c.namespace, lease,
                                                   _preload_content=False)
        except ApiException as e:
            log.warning("could not release lease %s: %s", c.name, e.reason)
        self._set(False, "released the lease")

    def _set(self, leading: bool, reason: str) -> bool:
        if leading != self._leading:
            log.info("%s %s leadership: %s", self._config.identity,
                     "gained" if leading else "lost", reason)
            self._leading = leading
            self._on_change(leading)
        return leading

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="leader-election", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        self.release()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.try_once()
            except Exception as e:  # the API server may be away; keep trying
                self._set(False, f"lease renewal failed: {e}")
            self._stop.wait(self._config.retry_s)
