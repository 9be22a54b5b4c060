"""One conformance suite for every StateStore: the in-memory fake and the etcd store pass the
same tests. Fences only mean something where there is an election, so the fence tests and
the outage tests run against etcd alone.

etcd tests share one server per module, each with its own key prefix; the outage tests get a
server of their own to stop and restart.
"""

from __future__ import annotations

import socket
import threading
import uuid
from collections.abc import Callable, Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from splice.controller.etcd_store import EtcdStateStore, parse_endpoints
from splice.controller.store import (
    EpochConflict,
    Fence,
    InMemoryStateStore,
    NotLeader,
    StateStore,
    StoreUnavailable,
)
from tests import etcd_server
from tests.etcd_server import EtcdServer, etcd, etcd_shared  # noqa: F401  (fixtures)
from tests.test_store import record


def _fresh_prefix() -> str:
    return f"/test/{uuid.uuid4().hex}"


@pytest.fixture(params=["in-memory", "etcd"])
def make_store(request: pytest.FixtureRequest) -> Iterator[Callable[[], StateStore]]:
    """A factory of empty stores of one kind (a factory, for property tests)."""
    if request.param == "in-memory":
        yield InMemoryStateStore
        return
    server: EtcdServer = request.getfixturevalue("etcd_shared")
    made: list[EtcdStateStore] = []

    def make() -> StateStore:
        made.append(EtcdStateStore(server.endpoint, prefix=_fresh_prefix()))
        return made[-1]

    yield make
    for s in made:
        s.close()


@pytest.fixture
def store(make_store: Callable[[], StateStore]) -> StateStore:
    return make_store()


@pytest.fixture
def etcd_store(etcd_shared: EtcdServer) -> Iterator[EtcdStateStore]:  # noqa: F811
    s = EtcdStateStore(etcd_shared.endpoint, prefix=_fresh_prefix())
    yield s
    s.close()


# ---- epochs -------------------------------------------------------------------------------


def test_empty_store_has_nothing(store: StateStore) -> None:
    assert store.load_epoch("j") is None
    assert store.decisions("j") == []
    assert store.load_job_spec("j") is None
    assert store.snapshot_inventory("j") == {}


def test_commit_chain_of_epochs(store: StateStore) -> None:
    store.commit_epoch(record(1), expected_epoch=0)
    store.commit_epoch(record(2, members=("a/0",)), expected_epoch=1)
    store.commit_epoch(record(5), expected_epoch=2)  # epochs may jump
    assert store.load_epoch("j") == record(5)


def test_conflict_leaves_store_unchanged_and_says_what_it_found(store: StateStore) -> None:
    store.commit_epoch(record(1), expected_epoch=0)
    store.commit_epoch(record(2), expected_epoch=1)
    with pytest.raises(EpochConflict, match="expected stored epoch 1, found 2"):
        store.commit_epoch(record(3, reason="the other controller"), expected_epoch=1)
    assert store.load_epoch("j") == record(2)
    with pytest.raises(EpochConflict, match="expected stored epoch 0, found 2"):
        store.commit_epoch(record(1), expected_epoch=0)  # as if the job were new
    with pytest.raises(EpochConflict, match="expected stored epoch 7, found 0"):
        store.commit_epoch(record(8, job_id="new"), expected_epoch=7)
    assert store.load_epoch("j") == record(2)
    assert store.load_epoch("new") is None


def test_epoch_that_does_not_advance_is_a_value_error_and_changes_nothing(
        store: StateStore) -> None:
    store.commit_epoch(record(3), expected_epoch=0)
    for bad in (3, 2):
        with pytest.raises(ValueError, match="does not advance"):
            store.commit_epoch(record(bad, reason="bad"), expected_epoch=3)
    assert store.load_epoch("j") == record(3)


def test_jobs_are_independent_even_when_ids_look_like_paths(store: StateStore) -> None:
    store.commit_epoch(record(1, job_id="x"), expected_epoch=0)
    store.commit_epoch(record(1, job_id="x/epoch"), expected_epoch=0)
    store.commit_epoch(record(2, job_id="x/epoch"), expected_epoch=1)
    loaded_x, loaded_y = store.load_epoch("x"), store.load_epoch("x/epoch")
    assert loaded_x is not None and loaded_x.epoch == 1
    assert loaded_y is not None and loaded_y.epoch == 2
    assert store.load_epoch("z") is None


def test_racing_writers_exactly_one_wins(store: StateStore) -> None:
    store.commit_epoch(record(1), expected_epoch=0)
    n = 8
    barrier = threading.Barrier(n)
    outcomes: dict[int, str] = {}

    def writer(i: int) -> None:
        barrier.wait()
        try:
            store.commit_epoch(record(2, reason=f"writer {i}"), expected_epoch=1)
            outcomes[i] = "won"
        except EpochConflict:
            outcomes[i] = "conflict"

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [i for i, o in outcomes.items() if o == "won"]
    assert len(winners) == 1 and list(outcomes.values()).count("conflict") == n - 1
    loaded = store.load_epoch("j")
    assert loaded is not None and loaded.reason == f"writer {winners[0]}"


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(st.tuples(st.sampled_from(["x", "y"]), st.integers(0, 5),
                              st.integers(0, 5)), max_size=15))
def test_commit_matches_naive_compare_and_swap(make_store: Callable[[], StateStore],
                                               ops: list[tuple[str, int, int]]) -> None:
    """Any sequence of commits behaves like a dict guarded by 'stored == expected'."""
    store = make_store()
    model: dict[str, int] = {}
    for job_id, expected, epoch in ops:
        rec = record(epoch, job_id=job_id, reason=f"{expected}->{epoch}")
        before = store.load_epoch(job_id)
        if epoch <= expected:
            with pytest.raises(ValueError):
                store.commit_epoch(rec, expected_epoch=expected)
        elif model.get(job_id, 0) != expected:
            with pytest.raises(EpochConflict):
                store.commit_epoch(rec, expected_epoch=expected)
        else:
            store.commit_epoch(rec, expected_epoch=expected)
            model[job_id] = epoch
            before = rec
        assert store.load_epoch(job_id) == before


# ---- job spec, inventory, decisions -------------------------------------------------------


def test_resume_is_persisted_for_the_stored_epoch_only(store: StateStore) -> None:
    assert store.load_resume("j") is None
    store.commit_epoch(record(1), expected_epoch=0)
    store.commit_resume("j", 1, 7)
    assert store.load_resume("j") == (1, 7)
    with pytest.raises(EpochConflict):
        store.commit_resume("j", 2, 9)  # not the stored epoch: refused, nothing written
    assert store.load_resume("j") == (1, 7)
    store.commit_epoch(record(2), expected_epoch=1)
    store.commit_resume("j", 2, 9)
    assert store.load_resume("j") == (2, 9)


def test_job_spec_round_trip_and_overwrite(store: StateStore) -> None:
    spec = {"nodes": 2, "nproc": 4, "command": ["python", "-m", "train"],
            "env": {"A": "1"}, "ratio": 0.5, "none": None}
    store.save_job_spec("j", spec)
    assert store.load_job_spec("j") == spec
    loaded = store.load_job_spec("j")
    assert loaded is not None
    loaded["nodes"] = 99
    assert store.load_job_spec("j") == spec, "a loaded spec is a copy"
    store.save_job_spec("j", {"nodes": 3})
    assert store.load_job_spec("j") == {"nodes": 3}
    assert store.load_job_spec("other") is None


def test_inventory_overwrites_per_worker_and_sorts(store: StateStore) -> None:
    store.put_snapshot_inventory("j", "node-a/0", [30, 10, 20])
    store.put_snapshot_inventory("j", "node-b/0", [10])
    store.put_snapshot_inventory("j", "node-a/0", [40, 30])  # replaces, not merges
    store.put_snapshot_inventory("other", "node-a/0", [1])
    inventory = store.snapshot_inventory("j")
    assert inventory == {"node-a/0": [30, 40], "node-b/0": [10]}
    inventory["node-a/0"].append(99)
    assert store.snapshot_inventory("j")["node-a/0"] == [30, 40], "a copy"
    store.put_snapshot_inventory("j", "node-b/0", [])
    assert store.snapshot_inventory("j")["node-b/0"] == []


def test_decision_log_keeps_order_and_returns_a_copy(store: StateStore) -> None:
    lines = [f"decision {i}: évict node-{i % 3}" for i in range(12)]
    for line in lines:
        store.append_decision("j", line)
    store.append_decision("k", "other job")
    log = store.decisions("j")
    assert log == lines
    log.append("tampered")
    assert store.decisions("j") == lines


def test_concurrent_appends_lose_nothing(store: StateStore) -> None:
    n, each = 4, 5
    barrier = threading.Barrier(n)

    def appender(i: int) -> None:
        barrier.wait()
        for k in range(each):
            store.append_decision("j", f"{i}.{k}")

    threads = [threading.Thread(target=appender, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    log = store.decisions("j")
    assert sorted(log) == sorted(f"{i}.{k}" for i in range(n) for k in range(each))
    for i in range(n):  # each appender's own lines stay in its order
        assert [x for x in log if x.startswith(f"{i}.")] == [f"{i}.{k}" for k in range(each)]


# ---- fences (etcd only: the in-memory store has no election to lose) ----------------------


def _elect(store: EtcdStateStore, identity: str, key: str = "leader") -> Fence:
    """Write a leader key directly (the election itself is tested in test_leader.py)."""
    full_key = f"{store.prefix}/{key}"
    store.connection.call("put", lambda c: c.put(full_key, identity))
    _, meta = store.connection.call("get", lambda c: c.get(full_key))
    return Fence(key=full_key, identity=identity, revision=meta.create_revision)


def test_commit_with_the_current_fence_succeeds(etcd_store: EtcdStateStore) -> None:
    fence = _elect(etcd_store, "10.0.0.1:7000")
    etcd_store.commit_epoch(record(1), expected_epoch=0, fence=fence)
    etcd_store.commit_epoch(record(2), expected_epoch=1, fence=fence)
    assert etcd_store.load_epoch("j") == record(2)


@pytest.mark.parametrize("how", ["another leader", "key deleted", "key re-created",
                                 "wrong identity"])
def test_stale_fence_is_not_leader_and_writes_nothing(etcd_store: EtcdStateStore,
                                                      how: str) -> None:
    fence = _elect(etcd_store, "10.0.0.1:7000")
    etcd_store.commit_epoch(record(1), expected_epoch=0, fence=fence)
    stale = fence
    if how == "another leader":
        _elect(etcd_store, "10.0.0.2:7000")
    elif how == "key deleted":
        etcd_store.connection.call("delete", lambda c: c.delete(fence.key))
    elif how == "key re-created":  # the same replica lost and won again: a new term
        etcd_store.connection.call("delete", lambda c: c.delete(fence.key))
        _elect(etcd_store, fence.identity)
    else:
        stale = Fence(key=fence.key, identity="10.0.0.9:7000", revision=fence.revision)
    with pytest.raises(NotLeader, match="leader"):
        etcd_store.commit_epoch(record(2), expected_epoch=1, fence=stale)
    assert etcd_store.load_epoch("j") == record(1)
    # NotLeader wins over EpochConflict: the deposed writer must stop, not just reload.
    with pytest.raises(NotLeader):
        etcd_store.commit_epoch(record(9), expected_epoch=5, fence=stale)
    assert etcd_store.load_epoch("j") == record(1)


def test_current_fence_with_stale_epoch_is_a_conflict(etcd_store: EtcdStateStore) -> None:
    fence = _elect(etcd_store, "10.0.0.1:7000")
    etcd_store.commit_epoch(record(1), expected_epoch=0, fence=fence)
    with pytest.raises(EpochConflict, match="expected stored epoch 0, found 1"):
        etcd_store.commit_epoch(record(2), expected_epoch=0, fence=fence)


def test_racing_fenced_writers_only_the_leader_wins(etcd_store: EtcdStateStore) -> None:
    old = _elect(etcd_store, "10.0.0.1:7000")
    new = _elect(etcd_store, "10.0.0.2:7000")  # overwrites: `old` is deposed
    etcd_store.commit_epoch(record(1), expected_epoch=0, fence=new)
    outcomes: dict[str, type[Exception] | None] = {}
    barrier = threading.Barrier(2)

    def writer(name: str, fence: Fence) -> None:
        barrier.wait()
        try:
            etcd_store.commit_epoch(record(2, reason=name), expected_epoch=1, fence=fence)
            outcomes[name] = None
        except (NotLeader, EpochConflict) as exc:
            outcomes[name] = type(exc)

    threads = [threading.Thread(target=writer, args=a) for a in (("old", old), ("new", new))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outcomes == {"old": NotLeader, "new": None}
    loaded = etcd_store.load_epoch("j")
    assert loaded is not None and loaded.reason == "new"


# ---- outages (etcd only) ------------------------------------------------------------------


def test_unreachable_etcd_is_store_unavailable_and_data_survives_restart(
        etcd: EtcdServer) -> None:  # noqa: F811
    store = EtcdStateStore(etcd.endpoint, prefix="/p", timeout_s=1.0)
    try:
        store.commit_epoch(record(1), expected_epoch=0)
        store.save_job_spec("j", {"nodes": 2})
        store.put_snapshot_inventory("j", "w", [5])
        store.append_decision("j", "one")
        etcd.kill()
        calls: list[Callable[[], object]] = [
            lambda: store.commit_epoch(record(2), expected_epoch=1),
            lambda: store.load_epoch("j"),
            lambda: store.save_job_spec("j", {"nodes": 3}),
            lambda: store.load_job_spec("j"),
            lambda: store.put_snapshot_inventory("j", "w", [6]),
            lambda: store.snapshot_inventory("j"),
            lambda: store.append_decision("j", "two"),
            lambda: store.decisions("j"),
        ]
        for call in calls:
            with pytest.raises(StoreUnavailable, match=f"etcd at {etcd.endpoint}") as info:
                call()
            assert info.value.retry_after_s > 0
        etcd.restart()
        # The very next call works (no reconnect backoff) and nothing half-written appears.
        assert store.load_epoch("j") == record(1)
        assert store.load_job_spec("j") == {"nodes": 2}
        assert store.snapshot_inventory("j") == {"w": [5]}
        assert store.decisions("j") == ["one"]
        store.commit_epoch(record(2), expected_epoch=1)
        assert store.load_epoch("j") == record(2)
    finally:
        store.close()


def test_first_reachable_endpoint_is_used(etcd_shared: EtcdServer) -> None:  # noqa: F811
    dead = _unused_port()
    store = EtcdStateStore(f"127.0.0.1:{dead},{etcd_shared.endpoint}",
                           prefix=_fresh_prefix(), timeout_s=1.0)
    try:
        with pytest.raises(StoreUnavailable, match=f"127.0.0.1:{dead}") as info:
            store.load_epoch("j")
        assert info.value.retry_after_s == 0.0, "another endpoint is there to try at once"
        store.commit_epoch(record(1), expected_epoch=0)
        assert store.load_epoch("j") == record(1)
    finally:
        store.close()


def _unused_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize("bad", ["", "host", "host:", ":2379", "a:1,b", "h:port"])
def test_bad_endpoints_are_a_value_error(bad: str) -> None:
    with pytest.raises(ValueError, match="not host:port"):
        parse_endpoints(bad)


def test_endpoints_parse() -> None:
    assert parse_endpoints("127.0.0.1:2379, etcd-1:2380") == [("127.0.0.1", 2379),
                                                             ("etcd-1", 2380)]


@pytest.mark.parametrize("ci, outcome", [("true", pytest.fail.Exception),
                                         ("", pytest.skip.Exception)])
def test_missing_etcd_fails_in_ci_and_skips_elsewhere(monkeypatch: pytest.MonkeyPatch,
                                                      ci: str, outcome: type) -> None:
    monkeypatch.setattr(etcd_server, "find_etcd_binary", lambda: None)
    monkeypatch.setenv("CI", ci)
    with pytest.raises(outcome, match="etcd binary not found"):
        etcd_server.require_etcd_binary()
