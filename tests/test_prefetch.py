"""A joining worker's snapshot lands straight in its own snapshot directory, and may be
fetched before the resume step is decided: checkpoint/slotmeta.py `IncomingSlot` (the
fetch's `into`: the data file mapped as it arrives, the meta written last) and
agent/worker/peer_fetch.py `_start_prefetch`, `_prefetched`, `_drop_prefetch` and
`_fetch_state`, which takes the prefetched snapshot when it is of the decided step and
intact, and fetches from the holders otherwise; session.py `_join_newest`, which starts
the prefetch for a newcomer with no state and drops it when the state comes another way.
Real snapshot servers (bulk port and gRPC), real snapshot rings; the agent link replays a
recovery's messages and the process group is one that builds at once."""

from __future__ import annotations

import logging
import os
import shutil
import struct
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from splice.agent import replication
from splice.agent.worker.group import EpochSpec
from splice.agent.worker.session import HookConfig, Session
from splice.agent.worker.state_sources import ADOPTED
from splice.checkpoint import slotmeta
from splice.checkpoint.slotmeta import IncomingSlot, SlotUnreadable, open_committed
from splice.checkpoint.snapshot import SnapshotRing
from splice.proto import controller_pb2 as pb
from splice.proto import local_pb2 as lpb
from tests.test_fetch_state import JOB, _server, _state

ME = "node-2/0"
PREFETCHED = "prefetched while the resume step was decided"


@pytest.fixture()
def holder_dir(tmp_path: Path) -> Path:
    """node-0/0's snapshots of steps 6 and 7 (the newest), as its agent holds them."""
    d = tmp_path / "holder"
    ring = SnapshotRing(directory=str(d), owner="node-0/0")
    for step in (6, 7):
        ring.capture(step, _state(step))
    ring.close()
    return d


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


@pytest.fixture()
def holders() -> Iterator[Callable[..., Holder]]:
    started: list[Holder] = []

    def start(directory: Path, **kw: Any) -> Holder:
        started.append(Holder(directory, **kw))
        return started[-1]

    yield start
    for h in started:
        h.stop()


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


# ---- _join_newest: when a prefetch starts and what becomes of it ------------------------------

class ScriptedLink:
    """The agent link of a recovery told as data: `first` is announced; when this worker
    reports ready for an epoch, what `after_ready` maps that epoch to arrives (a newer
    membership: a fault during the recovery; or the epoch's resume)."""

    def __init__(self, first: pb.Membership,
                 after_ready: dict[int, pb.Membership | pb.Resume]) -> None:
        self._membership, self._after = first, after_ready
        self._resumes: dict[int, pb.Resume] = {}
        self.ready: list[tuple[int, list[int]]] = []  # (epoch, snapshot steps) reported

    def send(self, message: lpb.WorkerToAgent) -> None:
        r = message.recovery_ready
        self.ready.append((r.epoch, list(r.snapshot_steps)))
        nxt = self._after.get(r.epoch)
        if isinstance(nxt, pb.Membership):
            self._membership = nxt
        elif nxt is not None:
            self._resumes[nxt.epoch] = nxt

    def wait(self, predicate: Callable[[], bool], timeout_s: float) -> bool:
        return predicate()  # everything arrives in send(): nothing to wait for

    def membership_newer_than(self, epoch: int) -> pb.Membership | None:
        return self._membership if self._membership.epoch > epoch else None

    def latest_membership(self) -> pb.Membership:
        return self._membership

    def resume_for(self, epoch: int) -> pb.Resume | None:
        return self._resumes.get(epoch)

    def notify(self) -> None:
        pass


class BuiltGroup:
    """A process group whose every epoch is built at once (no peers to meet)."""

    def __init__(self) -> None:
        self.epoch, self.rank, self.world_size = 0, 0, 1

    def begin_build(self, spec: EpochSpec, on_done: Callable[[], None]) -> Any:
        done = threading.Event()
        done.set()
        return SimpleNamespace(spec=spec, done=done, error=None)

    def adopt(self, build: Any) -> None:
        s = build.spec
        self.epoch, self.rank, self.world_size = s.epoch, s.rank, s.world_size

    def abort(self, reason: str, *, below_epoch: int) -> None:
        pass

    def close(self) -> None:
        pass


@pytest.fixture()
def joining(tmp_path: Path) -> Iterator[Callable[[ScriptedLink], Session]]:
    """A newcomer (node-2/0) joining over `link`; `tmp_path/newcomer` is its directory."""
    made: list[Session] = []

    def make(link: ScriptedLink) -> Session:
        s = Session(worker_id=ME, link=None,
                    config=HookConfig(job_id=JOB, snapshot_dir=str(tmp_path / "newcomer"),
                                      recovery_timeout_s=20.0))
        s._link, s.group = link, BuiltGroup()  # type: ignore[assignment]
        made.append(s)
        return s

    yield make
    for s in made:
        s._drop_prefetch()
        s._snapshots.close()


def _recovery(epoch: int, members: list[str], address: str) -> pb.Membership:
    m = _membership(members, {"node-0": address, "node-1": address})
    m.epoch = epoch
    return m


def _resume(epoch: int, *, holders: list[pb.SnapshotHolder] | None = None,
            from_worker: str = "node-0/0") -> pb.Resume:
    transfers = [] if holders is None else [
        pb.StateTransfer(to_worker=ME, from_worker=from_worker, holders=holders)]
    return pb.Resume(epoch=epoch, step=7, reason="node-2 lost", transfers=transfers)


def test_a_newcomer_prefetches_and_joins_with_the_prefetched_snapshot(
        tmp_path: Path, holder_dir: Path, holders: Callable[..., Holder],
        joining: Callable[[ScriptedLink], Session], caplog: pytest.LogCaptureFixture) -> None:
    holder = holders(holder_dir)
    hold = [pb.SnapshotHolder(worker_id="node-0/0", address=holder.address)]
    link = ScriptedLink(_recovery(3, ["node-0/0", ME], holder.address),
                        {3: _resume(3, holders=hold)})
    session = joining(link)
    with caplog.at_level(logging.INFO, logger="splice.worker"):
        assert session._join_newest("node-2 lost", float("inf"))
    assert link.ready == [(3, [])]
    assert holder.requests == [("node-0/0", 0)]  # the prefetch; no fetch after it
    assert any(PREFETCHED in r.getMessage() for r in caplog.records)
    assert session._pending_state == (3, 7, ADOPTED, "node-0/0")
    assert session._snapshots.steps() == [7]
    _assert_holds(session._snapshots, 7)
    assert not (tmp_path / "newcomer.prefetch-3").exists()


def test_a_newcomer_whose_state_comes_over_the_group_drops_its_prefetch(
        tmp_path: Path, holder_dir: Path, holders: Callable[..., Holder],
        joining: Callable[[ScriptedLink], Session]) -> None:
    holder = holders(holder_dir)
    link = ScriptedLink(_recovery(3, ["node-0/0", ME], holder.address),
                        {3: _resume(3, holders=[])})  # node-0/0 sends it over the group
    session = joining(link)
    assert session._join_newest("node-2 lost", float("inf"))
    assert session._prefetch is None
    _prefetch_threads_end()  # dropped before or after it asked the holder
    assert holder.requests in ([], [("node-0/0", 0)])
    assert not (tmp_path / "newcomer.prefetch-3").exists()
    assert session._pending_state == (3, 7, 0, "node-0/0")  # rank 0 sends it
    assert session._snapshots.steps() == []


def test_a_replacement_holding_the_resume_step_adopts_it_and_its_prefetch_is_dropped(
        tmp_path: Path, holder_dir: Path, holders: Callable[..., Holder],
        joining: Callable[[ScriptedLink], Session]) -> None:
    holder = holders(holder_dir)
    shutil.copytree(holder_dir, tmp_path / "newcomer")  # its predecessor's, handed over
    link = ScriptedLink(_recovery(3, ["node-0/0", ME], holder.address), {3: _resume(3)})
    session = joining(link)
    assert session._join_newest("node-2/0 restarted", float("inf"))
    assert link.ready == [(3, [6, 7])]
    _prefetch_threads_end()
    # It asked for the step after its predecessor's (held by nobody), or was dropped first.
    assert holder.requests in ([], [("node-0/0", 8)])
    assert session._pending_state == (3, 7, ADOPTED, "")
    assert session._snapshots.steps() == [6, 7]
    assert not list(tmp_path.glob("newcomer.prefetch*"))


def test_a_replacement_whose_predecessor_died_taking_the_resume_step_prefetches_it(
        tmp_path: Path, holder_dir: Path, holders: Callable[..., Holder],
        joining: Callable[[ScriptedLink], Session], caplog: pytest.LogCaptureFixture) -> None:
    holder = holders(holder_dir)
    mine = tmp_path / "newcomer"
    shutil.copytree(holder_dir, mine)
    for index in (0, 1):  # its predecessor died before it committed step 7
        rec = slotmeta.read(str(mine), index)
        if rec is not None and rec.step == 7:
            os.remove(mine / f"slot{index}.meta")
    hold = [pb.SnapshotHolder(worker_id="node-0/0", address=holder.address)]
    link = ScriptedLink(_recovery(3, ["node-0/0", ME], holder.address),
                        {3: _resume(3, holders=hold)})
    session = joining(link)
    with caplog.at_level(logging.INFO, logger="splice.worker"):
        assert session._join_newest("node-2/0 restarted", float("inf"))
    assert link.ready == [(3, [6])]
    assert holder.requests == [("node-0/0", 7)]  # the step after its own, once
    assert any(PREFETCHED in r.getMessage() for r in caplog.records)
    assert session._snapshots.steps() == [7]
    _assert_holds(session._snapshots, 7)


def test_a_worker_that_has_joined_before_does_not_prefetch(
        tmp_path: Path, holder_dir: Path, holders: Callable[..., Holder],
        joining: Callable[[ScriptedLink], Session]) -> None:
    holder = holders(holder_dir)
    link = ScriptedLink(_recovery(3, ["node-0/0", ME], holder.address),
                        {3: _resume(3, holders=[])})
    session = joining(link)
    session.joined_once = True  # a member whose snapshots were all lost or corrupt
    assert session._join_newest("its snapshots are corrupt", float("inf"))
    assert holder.requests == []


def test_a_prefetch_started_for_a_superseded_epoch_leaves_nothing_behind(
        tmp_path: Path, holder_dir: Path, joining: Callable[[ScriptedLink], Session]
        ) -> None:
    """Epoch 3 is superseded by epoch 4 (node-1 lost too) while the newcomer's prefetch
    for it is still fetching; the newcomer joins epoch 4 with the prefetch it started for
    that one. The first must not outlive the join: once every fetch has ended, nothing of
    it may be left in shared memory."""
    release, first = threading.Event(), threading.Event()
    calls: list[tuple[str, int]] = []

    def provide(job: str, wid: str, step: int) -> Any:
        calls.append((wid, step))
        if not first.is_set():  # the first request stalls until the test lets it go
            first.set()
            release.wait(20.0)
        return open_committed(str(holder_dir), step)

    server = _server(provide)
    try:
        hold = [pb.SnapshotHolder(worker_id="node-0/0", address=server.address)]
        link = ScriptedLink(_recovery(3, ["node-0/0", "node-1/0", ME], server.address),
                            {3: _recovery(4, ["node-0/0", ME], server.address),
                             4: _resume(4, holders=hold)})
        session = joining(link)
        assert not session._join_newest("node-2 lost", float("inf"))  # superseded
        assert first.wait(20.0)  # epoch 3's prefetch is fetching (and stalled)
        assert session._join_newest("node-2 lost", float("inf"))
        assert session._snapshots.steps() == [7]
    finally:
        release.set()
        for t in threading.enumerate():  # every prefetch, let go, ends with its server up
            if t.name == "splice-prefetch":
                t.join(20.0)
        server.stop(0)
    assert link.ready == [(3, []), (4, [])]
    assert calls == [("node-0/0", 0), ("node-0/0", 0)]  # epoch 3's prefetch, epoch 4's
    orphan = tmp_path / "newcomer.prefetch-3"  # epoch 3's
    assert sorted(os.listdir(tmp_path)) == ["holder", "newcomer"], (
        f"epoch 3's prefetch outlived the join and left {sorted(os.listdir(orphan))} "
        f"(committed: {_metas(orphan)}) in shared memory" if orphan.exists() else "")
