"""InMemoryStateStore (controller/store.py): compare-and-swap on the epoch.

Written as a contract over a `StateStore` factory so an etcd-backed store can be added to
`STORES` and must pass the same tests.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from splice.controller.store import EpochConflict, EpochRecord, InMemoryStateStore, StateStore

STORES: dict[str, Callable[[], StateStore]] = {"in-memory": InMemoryStateStore}


@pytest.fixture(params=list(STORES))
def store(request: pytest.FixtureRequest) -> StateStore:
    return STORES[request.param]()


def record(epoch: int, job_id: str = "j", members: tuple[str, ...] = ("a/0", "a/1"),
           reason: str = "r") -> EpochRecord:
    return EpochRecord(job_id=job_id, epoch=epoch, members=members,
                       shares=(1.0,) * len(members), reason=reason,
                       decided_at_s=float(epoch))


def test_empty_store_has_no_epoch(store: StateStore) -> None:
    assert store.load_epoch("j") is None
    assert store.decisions("j") == []


def test_commit_chain_of_epochs(store: StateStore) -> None:
    store.commit_epoch(record(1), expected_epoch=0)
    store.commit_epoch(record(2, members=("a/0",)), expected_epoch=1)
    assert store.load_epoch("j") == record(2, members=("a/0",))


def test_conflict_leaves_store_unchanged_and_says_what_it_found(store: StateStore) -> None:
    store.commit_epoch(record(1), expected_epoch=0)
    store.commit_epoch(record(2), expected_epoch=1)
    with pytest.raises(EpochConflict, match="expected stored epoch 1, found 2"):
        store.commit_epoch(record(2, reason="the other controller"), expected_epoch=1)
    assert store.load_epoch("j") == record(2)
    with pytest.raises(EpochConflict):
        store.commit_epoch(record(1), expected_epoch=0)  # as if the job were new
    assert store.load_epoch("j") == record(2)


def test_epoch_that_does_not_advance_is_a_value_error_and_changes_nothing(
        store: StateStore) -> None:
    store.commit_epoch(record(3), expected_epoch=0)
    for bad in (3, 2):
        with pytest.raises(ValueError, match="does not advance"):
            store.commit_epoch(record(bad, reason="bad"), expected_epoch=3)
    assert store.load_epoch("j") == record(3)


def test_jobs_are_independent(store: StateStore) -> None:
    store.commit_epoch(record(1, job_id="x"), expected_epoch=0)
    store.commit_epoch(record(1, job_id="y"), expected_epoch=0)
    store.commit_epoch(record(2, job_id="y"), expected_epoch=1)
    loaded_x, loaded_y = store.load_epoch("x"), store.load_epoch("y")
    assert loaded_x is not None and loaded_x.epoch == 1
    assert loaded_y is not None and loaded_y.epoch == 2
    assert store.load_epoch("z") is None


def test_decision_log_appends_and_returns_a_copy(store: StateStore) -> None:
    store.append_decision("j", "first")
    store.append_decision("j", "second")
    store.append_decision("k", "other job")
    log = store.decisions("j")
    assert log == ["first", "second"]
    log.append("tampered")
    assert store.decisions("j") == ["first", "second"]


def test_racing_writers_exactly_one_wins(store: StateStore) -> None:
    store.commit_epoch(record(1), expected_epoch=0)
    n = 8
    barrier = threading.Barrier(n)
    outcomes: list[str] = []
    lock = threading.Lock()

    def writer(i: int) -> None:
        barrier.wait()
        try:
            store.commit_epoch(record(2, reason=f"writer {i}"), expected_epoch=1)
            result = f"won {i}"
        except EpochConflict:
            result = "conflict"
        with lock:
            outcomes.append(result)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [o for o in outcomes if o.startswith("won")]
    assert len(winners) == 1 and outcomes.count("conflict") == n - 1
    loaded = store.load_epoch("j")
    assert loaded is not None and loaded.reason == f"writer {winners[0].split()[1]}"


# ---- properties ---------------------------------------------------------------------------

finite = st.floats(allow_nan=False, allow_infinity=False)
records = st.builds(
    EpochRecord,
    job_id=st.text(min_size=1, max_size=10),
    epoch=st.integers(min_value=1, max_value=2**53),
    members=st.lists(st.text(max_size=8), max_size=5).map(tuple),
    shares=st.lists(finite, max_size=5).map(tuple),
    reason=st.text(),
    decided_at_s=finite,
)


@given(records)
def test_record_json_round_trip(rec: EpochRecord) -> None:
    assert EpochRecord.from_json(rec.to_json()) == rec


@settings(max_examples=100)
@given(ops=st.lists(st.tuples(st.sampled_from(["x", "y"]), st.integers(0, 6),
                              st.integers(0, 6)), max_size=30))
def test_commit_matches_naive_compare_and_swap(ops: list[tuple[str, int, int]]) -> None:
    """Any sequence of commits behaves like a dict guarded by 'stored == expected'."""
    for make in STORES.values():
        store = make()
        model: dict[str, int] = {}
        for job_id, expected, epoch in ops:
            rec = record(epoch, job_id=job_id, reason=f"{expected}->{epoch}")
            stored_before = store.load_epoch(job_id)
            committed = False
            if epoch <= expected:
                with pytest.raises(ValueError):
                    store.commit_epoch(rec, expected_epoch=expected)
            elif model.get(job_id, 0) != expected:
                with pytest.raises(EpochConflict):
                    store.commit_epoch(rec, expected_epoch=expected)
            else:
                store.commit_epoch(rec, expected_epoch=expected)
                model[job_id] = epoch
                committed = True
            loaded = store.load_epoch(job_id)
            if committed:
                assert loaded == rec
            else:
                assert loaded == stored_before, "a refused write leaves the store unchanged"
            assert (loaded is None) == (job_id not in model)
