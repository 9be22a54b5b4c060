"""session.py `_join_newest` and the prefetch (agent/worker/peer_fetch.py): a newcomer
with no state prefetches a member's newest snapshot and joins with it; a replacement that
adopted its predecessor's snapshots asks for the step after them; the prefetch is dropped
when the state comes another way, and one begun for a superseded epoch leaves nothing
behind. The agent link replays a recovery's messages and the process group is one that
builds at once; real snapshot servers and rings."""

from __future__ import annotations

import logging
import os
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from splice.agent.worker.group import EpochSpec
from splice.agent.worker.session import HookConfig, Session
from splice.agent.worker.state_sources import ADOPTED
from splice.checkpoint import slotmeta
from splice.checkpoint.slotmeta import open_committed
from splice.proto import controller_pb2 as pb
from splice.proto import local_pb2 as lpb
from tests.test_fetch_state import JOB, _server, holder_snapshots
from tests.test_prefetch import (
    ME,
    PREFETCHED,
    Holder,
    _assert_holds,
    _membership,
    _metas,
    _prefetch_threads_end,
    started_holders,
)


@pytest.fixture()
def holder_dir(tmp_path: Path) -> Path:
    return holder_snapshots(tmp_path)


@pytest.fixture()
def holders() -> Iterator[Callable[..., Holder]]:
    with started_holders() as start:
        yield start


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
