"""Two controllers that both believe they lead: the store's fence refuses the stale one.

Controller A is elected and forms the job. Then it is deposed without noticing (its lease
is revoked behind its back: a long GC pause or a partition looks the same to it), and B is
elected and adopts the job. When A next tries to act (a worker of its agent exits), its
epoch write carries A's old fence: etcd refuses it, A steps down, and nothing is announced.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator

import grpc
import pytest

from splice.controller.etcd_store import EtcdStateStore
from splice.controller.job import JobSpec
from splice.controller.leader import LeaderElection
from splice.controller.service import Controller, ControllerConfig
from splice.controller.store import Fence
from splice.proto import controller_pb2 as pb
from splice.proto import controller_pb2_grpc as pb_grpc
from tests.etcd_server import EtcdServer
from tests.test_bad_input import JOB, AgentStream

K = pb.WorkerEvent.Kind
Code = pb.Refusal.Code


class OneTermElection:
    """Wins once through a real etcd election, then never notices losing it."""

    def __init__(self, election: LeaderElection) -> None:
        self._election = election
        self._won = False

    def campaign(self, stop: threading.Event) -> Fence | None:
        if self._won:
            stop.wait()
            return None
        self._won = True
        return self._election.campaign(stop)

    def resign(self) -> None:
        self._election.resign()

    def leader(self) -> str | None:
        return self._election.leader()


@pytest.fixture
def store(etcd_shared: EtcdServer) -> Iterator[EtcdStateStore]:
    s = EtcdStateStore(etcd_shared.endpoint, prefix=f"/fencing-{uuid.uuid4().hex}")
    yield s
    s.close()


def start(store: EtcdStateStore, election: object) -> Controller:
    c = Controller(ControllerConfig(listen="127.0.0.1:0", node_timeout_s=120.0,
                                    reattach_grace_s=120.0,
                                    jobs=(JobSpec(job_id=JOB, world_size=2),)),
                   store, election=election)  # type: ignore[arg-type]
    c.start()
    assert c.wait_leading(10), "the controller was not elected"
    return c


def test_stale_leader_cannot_announce(store: EtcdStateStore) -> None:
    key = f"{store.prefix}/leader"
    election_a = LeaderElection(store, key=key, identity="a:1", ttl_s=1.0)
    a = start(store, OneTermElection(election_a))
    channel = grpc.insecure_channel(f"127.0.0.1:{a.port}")
    agent = AgentStream(pb_grpc.ControllerStub(channel))
    b = None
    try:
        agent.attach("a", 2)
        agent.event("a/0", K.READY, pid=10)
        agent.event("a/1", K.READY, pid=11)
        assert agent.expect("membership").epoch == 1
        assert store.load_epoch(JOB).epoch == 1

        # A is deposed behind its back; B is elected and adopts epoch 1.
        election_a.resign()
        b = start(store, LeaderElection(store, key=key, identity="b:1", ttl_s=1.0))
        assert b.job_status(JOB).epoch == 1 and a.leading  # both believe they lead

        # A acts on a fault: its fenced write is refused, it steps down, announces nothing.
        agent.event("a/1", K.EXITED, pid=11, signal=9)
        refusal = agent.expect_refusal(Code.NOT_LEADER)
        assert "stepped down" in refusal.message
        agent.expect_end()  # and A closes the stream: the agent goes to find the leader
        assert not a.leading
        assert store.load_epoch(JOB).epoch == 1, "a deposed leader persisted an epoch"
        assert b.leading and b.job_status(JOB).epoch == 1
    finally:
        agent.close()
        channel.close()
        a.stop(0.2)
        if b is not None:
            b.stop(0.2)
        election_a.close()
