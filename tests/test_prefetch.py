"""A joining worker's snapshot lands straight in its own snapshot directory, and may be
fetched before the resume step is decided: checkpoint/slotmeta.py `IncomingSlot` (the
fetch's `into`: the data file mapped as it arrives, the meta written last) and
agent/worker/peer_fetch.py `_start_prefetch`, `_prefetched`, `_drop_prefetch` and
`_fetch_state`, which takes the prefetched snapshot when it is of the decided step and
intact, and fetches from the holders otherwise. Real snapshot servers (bulk port and
gRPC), real snapshot rings. How a join starts and drops a prefetch: test_prefetch_join.py."""

from __future__ import annotations

import contextlib
import logging
import os
import struct
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from splice.agent import replication
from splice.agent.worker.session import HookConfig, Session
from splice.checkpoint import slotmeta
from splice.checkpoint.slotmeta import IncomingSlot, SlotUnreadable, open_committed
from splice.checkpoint.snapshot import SnapshotRing
from splice.proto import controller_pb2 as pb
from tests.test_fetch_state import JOB, _server, _state, holder_snapshots

ME = "node-2/0"
PREFETCHED = "prefetched while the resume step was decided"


@pytest.fixture()
def holder_dir(tmp_path: Path) -> Path:
    return holder_snapshots(tmp_path)


class Holder:
    """A node's agent: serves `directory`'s snapshots (corrupted in flight with `damaged`:
    a byte of the model's weights flipped after capture) and records every request."""

    def __init__(self, directory: Path, *, damaged: bool = False, with_bulk: bool = True
                 ) -> None:
        self.directory, self.damaged = directory, damaged
        self.requests: list[tuple[str, int]] = []
        self._lock = threading.Lock()
        self.server = replication.serve(replication.ReplicaStore(0, job_id=JOB),
                                        "127.0.0.1:0", self._provide, with_bulk=with_bulk)
        self.address = self.server.address

    def _provide(self, job: str, wid: str, step: int) -> Any:
        with self._lock:
            self.requests.append((wid, step))
        got = open_committed(str(self.directory), step)
        if got is None or not self.damaged:
            return got
        data = bytearray(got[2])
        data[100] ^= 0x10  # sent as is (its transfer checksum holds), caught on adoption
        return got[0], got[1], memoryview(data)

    def stop(self) -> None:
        self.server.stop(0)


@contextlib.contextmanager
def started_holders() -> Iterator[Callable[..., Holder]]:
    """Starts Holders on demand; stops them all on the way out."""
    started: list[Holder] = []

    def start(directory: Path, **kw: Any) -> Holder:
        started.append(Holder(directory, **kw))
        return started[-1]

    try:
        yield start
    finally:
        for h in started:
            h.stop()


@pytest.fixture()
def holders() -> Iterator[Callable[..., Holder]]:
    with started_holders() as start:
        yield start


@pytest.fixture()
def session(tmp_path: Path) -> Iterator[Session]:
    """A newcomer on node-2 with its snapshot directory (no agent link)."""
    s = Session(worker_id=ME, link=None,
                config=HookConfig(job_id=JOB, snapshot_dir=str(tmp_path / "newcomer"),
                                  recovery_timeout_s=20.0))
    yield s
    s._drop_prefetch()  # joins a prefetch still running
    s._snapshots.close()
    s.group.close()


def _membership(members: list[str], agents: dict[str, str]) -> pb.Membership:
    return pb.Membership(epoch=3, members=members,
                         agents=[pb.PeerAgent(node_id=n, snapshot_address=a)
                                 for n, a in agents.items()])


def _prefetch_done(s: Session) -> None:
    """Wait for the prefetch's thread to end (it stays the session's to take)."""
    assert s._prefetch is not None
    assert s._prefetch.wait(20.0)


def _assert_holds(ring: SnapshotRing, step: int) -> None:
    ring.verify(step)
    want, got = _state(step), ring.restore(step)
    assert torch.equal(got["model"]["weight"], want["model"]["weight"])
    assert torch.equal(got["model"]["bias"], want["model"]["bias"])
    assert got["rng"]["python"].value == want["rng"]["python"].value
    assert got["step"] == step


def _metas(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob("*.meta")) if directory.exists() else []


# ---- IncomingSlot -------------------------------------------------------------------------

@pytest.mark.parametrize("with_bulk", [True, False], ids=["bulk", "grpc"])
def test_a_fetched_slot_adopts_once_finished_and_not_before(
        tmp_path: Path, holder_dir: Path, holders: Callable[..., Holder], with_bulk: bool,
        caplog: pytest.LogCaptureFixture) -> None:
    holder = holders(holder_dir, with_bulk=with_bulk)
    directory = tmp_path / "fetched"
    incoming = IncomingSlot(str(directory))
    at_into: list[list[str]] = []

    def into(data_bytes: int, meta: bytes) -> memoryview:
        view = incoming.into(data_bytes, meta)
        at_into.append(sorted(os.listdir(directory)))
        return view

    with caplog.at_level(logging.INFO, logger="splice.agent"):
        got = replication.fetch([holder.address], JOB, "node-0/0", 0, timeout_s=20.0,
                                into=into)
    how = "over its bulk port" if with_bulk else "over gRPC"
    assert any(how in r.getMessage() for r in caplog.records if r.name == "splice.agent")
    assert got.step == 7
    want = slotmeta.newest(str(holder_dir))
    assert want is not None and want.step == 7
    # The data file is there from the start, sized and mapped; no meta until finish(): a
    # worker that dies mid-fetch leaves nothing another would adopt.
    assert at_into == [[want.data_name]]
    assert _metas(directory) == []
    assert slotmeta.newest(str(directory)) is None
    early = SnapshotRing(directory=str(directory), owner=ME)
    assert early.adopt() == []
    early.close()
    assert (directory / want.data_name).read_bytes() == \
        (holder_dir / want.data_name).read_bytes()

    rec = incoming.finish()  # `got.data` still views the mapping: close() copes
    assert (rec.step, rec.index, rec.data_name) == (7, want.index, want.data_name)
    assert _metas(directory) == [f"slot{want.index}.meta"]
    ring = SnapshotRing(directory=str(directory), owner=ME)
    try:
        assert ring.adopt() == [7]
        assert ring.adopted_from == "node-0/0"
        _assert_holds(ring, 7)
    finally:
        ring.close()
    del got


def _meta_with_step(step: int, payload: bytes = b"") -> bytes:
    return struct.pack("<qQI", step, len(payload), 0) + payload


@pytest.mark.parametrize("meta", [
    _meta_with_step(-1),                              # never committed / being rewritten
    b"\x07\x00",                                      # shorter than its header
    _meta_with_step(7, b"\x00" * 32),                 # fails its CRC-32
    os.urandom(256),                                  # noise
], ids=["uncommitted", "short", "bad-crc", "noise"])
def test_an_uncommitted_or_garbled_meta_is_refused_and_writes_nothing(
        tmp_path: Path, meta: bytes) -> None:
    directory = tmp_path / "fetched"
    incoming = IncomingSlot(str(directory))
    with pytest.raises(SlotUnreadable):
        incoming.into(4096, meta)
    assert not directory.exists()
    assert incoming.record is None
    with pytest.raises(SlotUnreadable, match="nothing was received"):
        incoming.finish()
    assert not directory.exists()


def test_a_refused_meta_leaves_an_earlier_fetch_in_place(
        tmp_path: Path, holder_dir: Path) -> None:
    directory = tmp_path / "fetched"
    want = slotmeta.newest(str(holder_dir))
    assert want is not None
    data = (holder_dir / want.data_name).read_bytes()
    incoming = IncomingSlot(str(directory))
    incoming.into(len(data), want.meta)[:] = data
    incoming.finish()
    before = sorted(os.listdir(directory))
    with pytest.raises(SlotUnreadable):
        IncomingSlot(str(directory)).into(len(data), _meta_with_step(-1))
    assert sorted(os.listdir(directory)) == before
    assert slotmeta.newest(str(directory)) == want


def test_closing_with_a_live_view_does_not_raise(tmp_path: Path, holder_dir: Path) -> None:
    want = slotmeta.newest(str(holder_dir))
    assert want is not None
    incoming = IncomingSlot(str(tmp_path / "fetched"))
    view = incoming.into(4096, want.meta)
    incoming.close()
    incoming.close()
    view[:4] = b"abcd"  # still mapped while the view lives
    assert bytes(view[:4]) == b"abcd"
    del view
    # A second into() replaces the first directory's files, the first mapping closed.
    view = incoming.into(64, want.meta)
    assert len(view) == 64
    incoming.close()
    del view


# ---- _fetch_state with a prefetch ---------------------------------------------------------

def test_the_prefetched_snapshot_of_the_decided_step_is_taken_without_a_second_fetch(
        tmp_path: Path, holder_dir: Path, holders: Callable[..., Holder], session: Session,
        caplog: pytest.LogCaptureFixture) -> None:
    holder = holders(holder_dir)
    session._start_prefetch(_membership(["node-0/0", ME], {"node-0": holder.address}))
    _prefetch_done(session)
    assert holder.requests == [("node-0/0", 0)]  # the newest: the resume step to come
    assert _metas(tmp_path / "newcomer.prefetch-3") != []
    with caplog.at_level(logging.INFO, logger="splice.worker"):
        session._fetch_state(7, [pb.SnapshotHolder(worker_id="node-0/0",
                                                   address=holder.address)])
    assert holder.requests == [("node-0/0", 0)]  # nothing fetched twice
    fetched = [r.getMessage() for r in caplog.records
               if r.name == "splice.worker" and "fetched" in r.getMessage()]
    assert len(fetched) == 1 and PREFETCHED in fetched[0], fetched
    assert session._snapshots.steps() == [7]
    _assert_holds(session._snapshots, 7)
    assert session._state_source == "node-0/0 memory"
    assert session._prefetch is None
    assert not (tmp_path / "newcomer.prefetch-3").exists()  # it became the snapshot dir
    assert _metas(tmp_path / "newcomer") != []


def test_the_prefetched_snapshot_serves_with_its_holder_gone(
        tmp_path: Path, holder_dir: Path, holders: Callable[..., Holder],
        session: Session) -> None:
    holder = holders(holder_dir)
    session._start_prefetch(_membership(["node-0/0", ME], {"node-0": holder.address}))
    _prefetch_done(session)
    holder.stop()
    session._fetch_state(7, [pb.SnapshotHolder(worker_id="node-0/0",
                                               address=holder.address)])
    assert session._snapshots.steps() == [7]
    _assert_holds(session._snapshots, 7)


def test_a_prefetched_snapshot_of_another_step_is_dropped_and_the_holder_fetched(
        tmp_path: Path, holder_dir: Path, holders: Callable[..., Holder], session: Session,
        caplog: pytest.LogCaptureFixture) -> None:
    holder = holders(holder_dir)
    session._start_prefetch(_membership(["node-0/0", ME], {"node-0": holder.address}))
    _prefetch_done(session)
    with caplog.at_level(logging.INFO, logger="splice.worker"):
        session._fetch_state(6, [pb.SnapshotHolder(worker_id="node-0/0",
                                                   address=holder.address)])
    assert holder.requests == [("node-0/0", 0), ("node-0/0", 6)]
    messages = [r.getMessage() for r in caplog.records if r.name == "splice.worker"]
    assert any("prefetched snapshot (step 7 of node-0/0) is not of step 6" in m
               for m in messages), messages
    assert not any(PREFETCHED in m for m in messages), messages
    assert not (tmp_path / "newcomer.prefetch-3").exists()
    assert not (tmp_path / "newcomer.incoming").exists()
    assert session._snapshots.steps() == [6]
    _assert_holds(session._snapshots, 6)


def test_a_prefetched_snapshot_that_fails_its_checksums_is_skipped_for_the_holders(
        tmp_path: Path, holder_dir: Path, holders: Callable[..., Holder], session: Session,
        caplog: pytest.LogCaptureFixture) -> None:
    bad = holders(holder_dir, damaged=True)  # node-1's agent: prefetched from, corrupt
    good = holders(holder_dir)               # node-0's: the holder the controller names
    session._start_prefetch(_membership(["node-0/0", "node-1/0", ME],
                                        {"node-1": bad.address}))
    _prefetch_done(session)
    assert bad.requests == [("node-1/0", 0)]
    with caplog.at_level(logging.INFO, logger="splice.worker"):
        session._fetch_state(7, [pb.SnapshotHolder(worker_id="node-0/0",
                                                   address=good.address)])
    messages = [r.getMessage() for r in caplog.records if r.name == "splice.worker"]
    failures = [m for m in messages if "failed" in m]
    assert len(failures) == 1 and "node-1/0" in failures[0] and "corrupt" in failures[0], \
        messages
    assert not any(PREFETCHED in m for m in messages), messages
    assert good.requests == [("node-0/0", 7)]
    assert session._snapshots.steps() == [7]
    _assert_holds(session._snapshots, 7)
    assert session._state_source == "node-0/0 memory"
    assert not (tmp_path / "newcomer.prefetch-3").exists()
    assert not (tmp_path / "newcomer.incoming").exists()


# ---- which members a prefetch asks ----------------------------------------------------------

def test_the_prefetch_asks_other_nodes_first_from_the_next_rank_on(
        tmp_path: Path, holder_dir: Path, holders: Callable[..., Holder],
        session: Session) -> None:
    empty = tmp_path / "empty"  # every agent holds nothing: each candidate is asked in turn
    holder = holders(empty)
    members = ["node-0/0", "node-0/1", "node-1/0", "node-1/1", ME, "node-2/1", "node-3/0",
               "node-4/0"]
    session._start_prefetch(_membership(members, {
        "node-0": holder.address, "node-1": holder.address, "node-2": holder.address,
        "node-3": ""}))  # node-3's agent serves no snapshots; node-4's is not listed
    _prefetch_done(session)
    assert [w for w, _ in holder.requests] == ["node-0/0", "node-0/1", "node-1/0",
                                                "node-1/1", "node-2/1"]
    assert session._prefetched(7) is None  # none served one


def test_a_new_nodes_workers_start_at_different_holders(
        tmp_path: Path, holder_dir: Path, holders: Callable[..., Holder],
        session: Session) -> None:
    # This worker is its node's second: it starts at the second member of the others,
    # as the controller's round robin would send the node's second newcomer there.
    holder = holders(holder_dir)  # serves any worker's name the holder's snapshot
    members = ["node-0/0", "node-1/0", "node-2/9", ME]
    session._start_prefetch(_membership(members, {
        n: holder.address for n in ("node-0", "node-1", "node-2")}))
    _prefetch_done(session)
    assert [w for w, _ in holder.requests] == ["node-1/0"]
    got = session._prefetched(7)
    assert got is not None and got[0] == "node-1/0" and got[2].step == 7
    assert session._prefetch is None


@pytest.mark.parametrize("members, agents", [
    ([ME], {"node-2": "127.0.0.1:1"}),                       # alone
    (["node-0/0", ME], {"node-0": ""}),                      # no agent serves snapshots
    (["node-0/0", ME], {}),                                  # none listed
    (["node-0/0", ME, "node-2/1"], {"node-0": "", "node-2": ""}),
], ids=["alone", "no-address", "no-agents", "own-node-without-address"])
def test_no_candidate_means_no_prefetch(tmp_path: Path, session: Session,
                                        members: list[str], agents: dict[str, str]) -> None:
    session._start_prefetch(_membership(members, agents))
    assert session._prefetch is None
    assert not (tmp_path / "newcomer.prefetch-3").exists()


# ---- dropping it ------------------------------------------------------------------------------

def test_dropping_the_prefetch_removes_what_it_fetched(
        tmp_path: Path, holder_dir: Path, holders: Callable[..., Holder], session: Session,
        caplog: pytest.LogCaptureFixture) -> None:
    holder = holders(holder_dir)
    session._start_prefetch(_membership(["node-0/0", ME], {"node-0": holder.address}))
    _prefetch_done(session)
    assert (tmp_path / "newcomer.prefetch-3").exists()
    session._drop_prefetch()
    assert session._prefetch is None
    assert not (tmp_path / "newcomer.prefetch-3").exists()
    session._drop_prefetch()  # nothing left to drop
    # A fetch after it goes to the holders.
    with caplog.at_level(logging.INFO, logger="splice.worker"):
        session._fetch_state(7, [pb.SnapshotHolder(worker_id="node-0/0",
                                                   address=holder.address)])
    assert holder.requests == [("node-0/0", 0), ("node-0/0", 7)]
    assert not any(PREFETCHED in r.getMessage() for r in caplog.records)
    _assert_holds(session._snapshots, 7)


def _prefetch_threads_end() -> None:
    for t in threading.enumerate():
        if t.name == "splice-prefetch":
            t.join(20.0)
            assert not t.is_alive()


def test_dropping_a_prefetch_in_flight_does_not_wait_and_it_leaves_nothing(
        tmp_path: Path, holder_dir: Path, session: Session) -> None:
    release = threading.Event()
    asked = threading.Event()

    def slow(job: str, wid: str, step: int) -> Any:
        asked.set()
        release.wait(20.0)
        return open_committed(str(holder_dir), step)

    server = _server(slow)
    try:
        session._start_prefetch(_membership(["node-0/0", ME], {"node-0": server.address}))
        assert asked.wait(20.0)
        pre = session._prefetch
        assert pre is not None
        session._drop_prefetch()  # returns at once: the fetch is still stalled
        assert session._prefetch is None and not release.is_set()
        release.set()  # the fetch ends, and its thread removes what it fetched
        _prefetch_threads_end()
    finally:
        release.set()
        server.stop(0)
    assert pre.wait(0.0) and pre.result(7, 0.0) is None
    assert not (tmp_path / "newcomer.prefetch-3").exists()
