"""The resilient group's epochs (agent/worker/group.py): an aborted epoch's collectives,
parked, may fail late, when the dead peer's sockets finally close. That failure belongs to
the old epoch: it must neither fail the epoch that replaced it nor count in its progress
(the hang detector reads those counters)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch

from splice.agent.worker.group import CollectiveAborted, EpochSpec, ResilientGroup


class _Work:
    def __init__(self) -> None:
        self.future: torch.futures.Future[Any] = torch.futures.Future()

    def get_future(self) -> torch.futures.Future[Any]:
        return self.future


class _FakePG:
    """A process group whose all-reduces complete (or fail) when the test says so."""

    def __init__(self) -> None:
        self.works: list[_Work] = []

    def allreduce(self, tensors: Any, opts: Any) -> _Work:
        self.works.append(_Work())
        return self.works[-1]


class _Progress:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def enter(self, op: str, num_bytes: int) -> None:
        self.calls.append("enter")

    def exit(self) -> None:
        self.calls.append("exit")

    def begin_epoch(self, epoch: int, step: int) -> None:
        self.calls.append(f"epoch {epoch}")


def _install(group: ResilientGroup, epoch: int) -> _FakePG:
    pg = _FakePG()
    spec = EpochSpec(epoch=epoch, rank=0, world_size=2, store_host="", store_port=0,
                     store_prefix="")
    group.adopt(SimpleNamespace(done=SimpleNamespace(is_set=lambda: True), error=None,
                                pg=pg, spec=spec))  # type: ignore[arg-type]
    return pg


def test_a_parked_epochs_late_failure_leaves_the_new_epoch_alone() -> None:
    group = ResilientGroup()
    progress = group.progress = _Progress()  # type: ignore[assignment]
    old = _install(group, 1)
    out = group.all_reduce_future(torch.ones(3))
    group.abort("epoch 2 announced", below_epoch=2)
    with pytest.raises(CollectiveAborted, match="epoch 2 announced"):
        out.wait()
    new = _install(group, 2)
    assert group.aborted is None
    # The old epoch's work fails now, its peer's connection closed at last.
    old.works[0].future.set_exception(RuntimeError("Connection closed by peer"))
    assert group.aborted is None
    group.check()  # the new epoch goes on
    assert progress.calls == ["epoch 1", "enter", "epoch 2"]  # no late exit in epoch 2
    assert group.take_stats() == (0.0, 0)
    # A failure of the new epoch's own work does fail it.
    out = group.all_reduce_future(torch.ones(3))
    new.works[0].future.set_exception(RuntimeError("Connection reset by peer"))
    with pytest.raises(CollectiveAborted, match="Connection reset by peer"):
        out.wait()
    assert group.aborted is not None and "Connection reset by peer" in group.aborted
    with pytest.raises(CollectiveAborted):
        group.check()
    assert progress.calls[-2:] == ["enter", "exit"]


def test_a_completed_collective_counts_in_its_own_epoch() -> None:
    group = ResilientGroup()
    progress = group.progress = _Progress()  # type: ignore[assignment]
    pg = _install(group, 1)
    t = torch.ones(4)
    out = group.all_reduce_future(t)
    pg.works[0].future.set_result([t])
    assert torch.equal(out.wait(), t)
    wait_s, num_bytes = group.take_stats()
    assert num_bytes == t.numel() * t.element_size() and wait_s >= 0
    assert progress.calls == ["epoch 1", "enter", "exit"]
    assert group.aborted is None
