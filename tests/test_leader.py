"""Leader election (controller/leader.py): the pure lease timing, then real etcd stories —
two contenders, resignation, a SIGKILLed leader (in its own process), a paused leader that
wakes up deposed, an administrator deleting the key, etcd itself going away.

Takeover times are printed and recorded (`record_property`), never asserted: a loaded CI
machine must not fail a correctness test. Waits have generous deadlines instead.
"""

from __future__ import annotations

import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from splice.controller.etcd_store import EtcdStateStore
from splice.controller.leader import (
    LeaderElection,
    leadership_lost_reason,
    lease_ttl_to_request,
    next_refresh_at,
)
from splice.controller.store import Fence, NotLeader
from tests.etcd_server import Contender, EtcdServer, etcd, etcd_shared  # noqa: F401
from tests.test_store import record

DEADLINE_S = 10.0  # generous: takeover is expected in ~1-1.5 s with a 1 s TTL

# ---- pure timing --------------------------------------------------------------------------


def test_ttl_is_rounded_up_to_whole_seconds() -> None:
    assert [lease_ttl_to_request(t) for t in (0.2, 1.0, 1.01, 2.5)] == [1, 1, 2, 3]
    with pytest.raises(ValueError, match="positive"):
        lease_ttl_to_request(0)


def test_refresh_every_third_of_the_ttl_and_back_off_after_a_failure() -> None:
    assert next_refresh_at(confirmed_s=10.0, attempted_s=10.0, ttl_s=3.0) == 11.0
    # A failed try at 11.0: try again 0.3 s later, not in a busy loop.
    assert next_refresh_at(confirmed_s=10.0, attempted_s=11.0, ttl_s=3.0) == pytest.approx(11.3)


def test_leadership_is_lost_exactly_when_the_lease_may_have_expired() -> None:
    assert leadership_lost_reason(now_s=10.99, confirmed_s=10.0, ttl_s=1.0) is None
    reason = leadership_lost_reason(now_s=11.0, confirmed_s=10.0, ttl_s=1.0)
    assert reason is not None and "no lease refresh confirmed for 1.00 s" in reason
    assert "TTL 1 s" in reason


@given(ttl_s=st.floats(0.5, 60), latency_frac=st.floats(0, 0.15),
       failures=st.lists(st.booleans(), max_size=40))
def test_schedule_tries_twice_before_the_deadline_and_never_overstays(
        ttl_s: float, latency_frac: float, failures: list[bool]) -> None:
    """Replay a keepalive against a fake clock: whatever refreshes fail, the replica counts
    itself leader only while the lease is provably alive on etcd, and after a success there
    are always at least two more tries before the deadline."""
    now = confirmed = attempted = 0.0
    for failed in failures:
        at = next_refresh_at(confirmed, attempted, ttl_s)
        if at >= confirmed + ttl_s:
            assert leadership_lost_reason(confirmed + ttl_s, confirmed, ttl_s) is not None
            return
        now = attempted = at
        if failed:
            continue
        now += latency_frac * ttl_s  # the answer arrives
        server_expiry = attempted + latency_frac * ttl_s + ttl_s  # renewed on arrival
        confirmed = attempted
        assert leadership_lost_reason(now, confirmed, ttl_s) is None
        assert confirmed + ttl_s <= server_expiry
        tries = 0
        t, last = confirmed, confirmed
        while (t := next_refresh_at(confirmed, last, ttl_s)) < confirmed + ttl_s:
            tries, last = tries + 1, t
        assert tries >= 2


# ---- real etcd ----------------------------------------------------------------------------


@pytest.fixture
def store(etcd_shared: EtcdServer) -> Iterator[EtcdStateStore]:  # noqa: F811
    s = EtcdStateStore(etcd_shared.endpoint, prefix=f"/test/{uuid.uuid4().hex}")
    yield s
    s.close()


class Campaign:
    """`election.campaign` on a thread, with what it returned and every on_lost reason."""

    def __init__(self, store: EtcdStateStore, key: str, identity: str,
                 any_done: threading.Event | None = None) -> None:
        self.any_done = any_done or threading.Event()
        self.lost: list[str] = []
        self.lost_event = threading.Event()
        self.election = LeaderElection(store, key, identity, ttl_s=1.0,
                                       on_lost=self._on_lost)
        self.stop = threading.Event()
        self.fence: Fence | None = None
        self.done = threading.Event()
        self.started_s = time.monotonic()
        self.elected_s: float | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _on_lost(self, reason: str) -> None:
        self.lost.append(reason)
        self.lost_event.set()

    def _run(self) -> None:
        self.fence = self.election.campaign(self.stop)
        self.elected_s = time.monotonic()
        self.done.set()
        self.any_done.set()

    def wait(self) -> Fence:
        assert self.done.wait(DEADLINE_S), f"{self.election.identity} not elected in time"
        assert self.fence is not None
        return self.fence

    def close(self) -> None:
        self.stop.set()
        self._thread.join(DEADLINE_S)
        self.election.close()


@pytest.fixture
def campaigns() -> Iterator[list[Campaign]]:
    made: list[Campaign] = []
    yield made
    for c in made:
        c.close()


@pytest.fixture
def contenders() -> Iterator[list[Contender]]:
    made: list[Contender] = []
    yield made
    for c in made:
        c.close()


def test_one_of_two_wins_and_the_other_takes_over_when_it_resigns(
        store: EtcdStateStore, campaigns: list[Campaign]) -> None:
    key = f"{store.prefix}/leader"
    first_done = threading.Event()
    campaigns += [Campaign(store, key, "10.0.0.1:7000", first_done),
                  Campaign(store, key, "10.0.0.2:7000", first_done)]
    assert first_done.wait(DEADLINE_S), "nobody was elected"
    winner, loser = campaigns if campaigns[0].done.is_set() else campaigns[::-1]
    fence = winner.wait()
    assert winner.election.granted_ttl_s == 1.0, "etcd granted a different TTL"
    assert winner.election.leader() == loser.election.leader() == winner.election.identity
    assert not loser.done.is_set(), "both were elected"
    store.commit_epoch(record(1), expected_epoch=0, fence=fence)

    winner.election.resign()
    new_fence = loser.wait()
    assert new_fence.revision > fence.revision
    assert loser.election.leader() == loser.election.identity
    with pytest.raises(NotLeader):
        store.commit_epoch(record(2), expected_epoch=1, fence=fence)
    store.commit_epoch(record(2), expected_epoch=1, fence=new_fence)
    assert winner.lost == [] and loser.lost == [], "resigning is not losing"


def test_standby_takes_over_from_a_sigkilled_leader(
        store: EtcdStateStore, campaigns: list[Campaign], contenders: list[Contender],
        record_property: Callable[[str, object], None]) -> None:
    key = f"{store.prefix}/leader"
    contenders.append(Contender(store.endpoints, key, "10.0.0.1:7000"))
    elected = contenders[0].wait_event("leader", DEADLINE_S)
    old_fence = Fence(key=key, identity="10.0.0.1:7000", revision=elected["revision"])
    store.commit_epoch(record(1), expected_epoch=0, fence=old_fence)

    standby = Campaign(store, key, "10.0.0.2:7000")
    campaigns.append(standby)
    assert standby.election.leader() == "10.0.0.1:7000"
    killed_s = time.monotonic()
    contenders[0].signal(signal.SIGKILL)
    new_fence = standby.wait()
    assert standby.elected_s is not None
    takeover_s = standby.elected_s - killed_s
    print(f"takeover after SIGKILL: {takeover_s:.3f} s")
    record_property("takeover_after_sigkill_s", round(takeover_s, 3))

    with pytest.raises(NotLeader, match="10.0.0.2:7000"):
        store.commit_epoch(record(2, reason="zombie"), expected_epoch=1, fence=old_fence)
    assert store.load_epoch("j") == record(1)
    store.commit_epoch(record(2), expected_epoch=1, fence=new_fence)


def test_a_paused_leader_wakes_up_deposed_and_is_told(
        store: EtcdStateStore, campaigns: list[Campaign], contenders: list[Contender]) -> None:
    """A GC pause or a stopped VM: the leader's lease expires while it cannot run."""
    key = f"{store.prefix}/leader"
    contenders.append(Contender(store.endpoints, key, "10.0.0.1:7000"))
    elected = contenders[0].wait_event("leader", DEADLINE_S)
    old_fence = Fence(key=key, identity="10.0.0.1:7000", revision=elected["revision"])
    contenders[0].signal(signal.SIGSTOP)
    standby = Campaign(store, key, "10.0.0.2:7000")
    campaigns.append(standby)
    standby.wait()
    contenders[0].signal(signal.SIGCONT)
    lost = contenders[0].wait_event("lost", DEADLINE_S)
    assert "lease" in lost["reason"]
    with pytest.raises(NotLeader):
        store.commit_epoch(record(1), expected_epoch=0, fence=old_fence)
    assert store.load_epoch("j") is None
    assert standby.election.leader() == "10.0.0.2:7000", "the woken leader freed nothing"
    assert standby.lost == []


def test_on_lost_fires_when_the_key_is_deleted_and_the_replica_can_campaign_again(
        store: EtcdStateStore, campaigns: list[Campaign]) -> None:
    key = f"{store.prefix}/leader"
    leader = Campaign(store, key, "10.0.0.1:7000")
    campaigns.append(leader)
    first = leader.wait()
    store.connection.call("delete", lambda c: c.delete(key))  # an administrator's hand
    assert leader.lost_event.wait(DEADLINE_S), "the deposed leader was not told"
    assert leader.lost == [f"leader key {key!r} was deleted (lease revoked or expired)"]
    assert leader.election.fence is None
    again = leader.election.campaign(threading.Event())
    assert again is not None and again.revision > first.revision
    assert len(leader.lost) == 1, "a stale report from the first term"
    leader.election.resign()


def test_leader_steps_down_when_etcd_is_unreachable(etcd: EtcdServer) -> None:  # noqa: F811
    store = EtcdStateStore(etcd.endpoint, prefix="/p", timeout_s=1.0)
    lost = threading.Event()
    reasons: list[str] = []

    def on_lost(reason: str) -> None:
        reasons.append(reason)
        lost.set()

    election = LeaderElection(store, "/p/leader", "10.0.0.1:7000", ttl_s=1.0,
                              on_lost=on_lost)
    try:
        assert election.campaign(threading.Event()) is not None
        etcd.kill()
        assert lost.wait(DEADLINE_S), "leader kept believing in a lease it cannot refresh"
        assert len(reasons) == 1 and "no lease refresh confirmed" in reasons[0]
        assert election.fence is None
    finally:
        election.close()
        store.close()


def test_campaign_gives_up_when_stopped(store: EtcdStateStore,
                                        campaigns: list[Campaign]) -> None:
    key = f"{store.prefix}/leader"
    leader = Campaign(store, key, "10.0.0.1:7000")
    campaigns.append(leader)
    leader.wait()
    standby = Campaign(store, key, "10.0.0.2:7000")
    campaigns.append(standby)
    standby.stop.set()
    assert standby.done.wait(DEADLINE_S)
    assert standby.fence is None
    assert leader.election.leader() == "10.0.0.1:7000"


def test_nobody_leads_an_empty_key(store: EtcdStateStore) -> None:
    election = LeaderElection(store, f"{store.prefix}/leader", "10.0.0.1:7000")
    try:
        assert election.leader() is None
    finally:
        election.close()
