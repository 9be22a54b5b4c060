"""Lease leader election: the pure rule over a moving injected clock, and the elector
against the fake API server (optimistic concurrency decides a race)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator

import pytest

from splice.kube.client import api_client
from splice.kube.leader import LeaderElector, LeaseConfig, decide, micro_time
from tests.kube_fake_apiserver import FakeApiServer

T0 = dt.datetime(2026, 5, 1, 12, 0, 0, tzinfo=dt.timezone.utc)


def lease(holder: str, renewed: dt.datetime, duration_s: int = 15) -> dict:
    return {"holderIdentity": holder, "renewTime": micro_time(renewed),
            "leaseDurationSeconds": duration_s}


@pytest.mark.parametrize(("spec", "now", "take", "why"), [
    (None, T0, True, "no lease yet"),
    (lease("me", T0), T0, True, "renew"),
    (lease("", T0), T0, True, "released"),
    (lease("other", T0), T0 + dt.timedelta(seconds=14), False, "other holds the lease"),
    (lease("other", T0), T0 + dt.timedelta(seconds=15), False, "other holds the lease"),
    (lease("other", T0), T0 + dt.timedelta(seconds=15.001), True, "expired"),
    ({"holderIdentity": "other"}, T0, True, "expired"),
])
def test_decide(spec: dict | None, now: dt.datetime, take: bool, why: str) -> None:
    d = decide(spec, "me", now)
    assert d.take is take and d.leading is take and why in d.reason


def test_lease_config_is_validated() -> None:
    with pytest.raises(ValueError, match="identity"):
        LeaseConfig(identity="")
    with pytest.raises(ValueError, match="retry"):
        LeaseConfig(identity="a", duration_s=2, retry_s=2)


@pytest.fixture
def server() -> Iterator[FakeApiServer]:
    srv = FakeApiServer().start()
    yield srv
    srv.stop()


def test_electors_share_one_lease_and_take_over_after_expiry(server: FakeApiServer) -> None:
    now = [T0]
    api = api_client(host=server.url)
    cfg = LeaseConfig(namespace="ops", identity="a", duration_s=10, retry_s=1)
    a = LeaderElector(api, cfg, clock=lambda: now[0])
    b = LeaderElector(api, LeaseConfig(namespace="ops", identity="b", duration_s=10, retry_s=1),
                      clock=lambda: now[0])
    assert a.try_once() and not b.try_once()
    now[0] += dt.timedelta(seconds=5)
    assert a.try_once() and not b.try_once()        # renewed: b keeps waiting
    now[0] += dt.timedelta(seconds=11)               # a stops renewing
    assert b.try_once() and not a.try_once()
    spec = server.get("leases", "ops", "splice-operator")["spec"]
    assert spec["holderIdentity"] == "b" and spec["leaseTransitions"] == 1
    b.release()
    assert a.try_once()
    api.close()


def test_a_stale_write_loses_the_race(server: FakeApiServer) -> None:
    api = api_client(host=server.url)
    a = LeaderElector(api, LeaseConfig(namespace="ops", identity="a"), clock=lambda: T0)
    assert a.try_once()
    # another replica renews between a's read and write: a's conditional write gets 409
    real_read = a._api.read_namespaced_lease

    def read_then_interfere(*args, **kwargs):  # type: ignore[no-untyped-def]
        resp = real_read(*args, **kwargs)
        server.patch("leases", "ops", "splice-operator", {"spec": {"holderIdentity": "z"}})
        return resp
    a._api.read_namespaced_lease = read_then_interfere  # type: ignore[method-assign]
    assert not a.try_once() and not a.leading
    api.close()
