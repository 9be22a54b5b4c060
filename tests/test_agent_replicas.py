"""Replicas ahead of a fault (agent --replicas): each agent pushes its workers' newest
committed snapshots to its peer agents on other nodes, which hold them within a budget; a
joining worker that no holder's agent can serve falls back to those replicas."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from splice.agent import replication
from splice.agent.agent import Agent, AgentConfig
from splice.agent.replication import (
    FetchFailed,
    ReplicaBudgetExceeded,
    ReplicaStore,
    SnapshotChanged,
    fetch,
    push,
    serve,
)
from splice.agent.worker.session import HookConfig, Session
from splice.checkpoint.slotmeta import open_committed
from splice.checkpoint.snapshot import SnapshotRing
from splice.proto import controller_pb2 as pb
from tests.test_fetch_state import _state

JOB = "replicas-test"


def _commit(directory: str, owner: str, *steps: int, epoch: int = 1) -> None:
    ring = SnapshotRing(directory=directory, owner=owner)
    ring.epoch = epoch
    for step in steps:
        ring.capture(step, _state(step))
    ring.close()


class _Link:
    """What `_fetch_state` asks of the agent link: the newest membership."""

    def __init__(self, membership: pb.Membership) -> None:
        self.membership = membership

    def latest_membership(self) -> pb.Membership:
        return self.membership


@pytest.fixture
def agents() -> Iterator[list[Agent]]:
    made: list[Agent] = []

    def make(node: str, **kw: Any) -> Agent:
        agent = Agent(AgentConfig(controller="127.0.0.1:1", command=("true",), node_id=node,
                                  job_id=JOB, replicas=1, metrics_port=0,
                                  metrics_host="127.0.0.1", **kw))
        made.append(agent)
        return agent

    yield make  # type: ignore[misc]
    for agent in made:
        agent._close_probes()
        agent._release()


def _connect(agent: Agent, wid: str) -> None:
    agent._state[wid].state = pb.WorkerResync.CONNECTED


def test_an_agent_pushes_its_workers_newest_snapshot_to_its_peer(agents: Any) -> None:
    a, b = agents("n0"), agents("n1")
    _commit(a.snapshots.directory("n0/0"), "n0/0", 4, 5)
    _connect(a, "n0/0")
    a.snapshots.peers = [("n0", a.snapshot_address, "n0"), ("n1", b.snapshot_address, "n1")]
    assert a.snapshots.targets() == [b.snapshot_address]
    assert a.snapshots.replicator is not None
    for f in a.snapshots.replicator.maybe_push():
        f.result(timeout=30)
    held = fetch([b.snapshot_address], JOB, "n0/0", 5)
    own = open_committed(a.snapshots.directory("n0/0"), 5)
    assert own is not None
    assert held.meta == own[1] and bytes(held.data.numpy()) == bytes(own[2])
    assert b.snapshots.replicas.bytes_held == len(own[1]) + len(own[2])
    # Pushed once: the next round has nothing newer to send.
    assert a.snapshots.replicator.maybe_push() == []
    assert a.snapshots.replicator.stats().pushes_ok == 1
    scraped = a.metrics.registry.get_sample_value(  # type: ignore[union-attr]
        "splice_agent_replica_pushes_total", {"job_name": JOB, "outcome": "ok"})
    assert scraped == 1.0
    assert b.metrics.registry.get_sample_value(  # type: ignore[union-attr]
        "splice_agent_replica_bytes", {"job_name": JOB, "node": "n1"}) == b.snapshots.replicas.bytes_held


def test_a_peer_over_its_replica_budget_refuses_clearly(agents: Any,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    a, b = agents("n0"), agents("n1", replica_budget_mb=0.01)
    _commit(a.snapshots.directory("n0/0"), "n0/0", 5)
    _connect(a, "n0/0")
    a.snapshots.peers = [("n0", a.snapshot_address, "n0"), ("n1", b.snapshot_address, "n1")]
    assert a.snapshots.replicator is not None
    with caplog.at_level(logging.WARNING):
        for f in a.snapshots.replicator.maybe_push():
            f.result(timeout=30)
    assert b.snapshots.replicas.bytes_held == 0
    refused = [r.getMessage() for r in caplog.records if "failed" in r.getMessage()]
    assert refused and "--replica-budget-mb" in refused[0], refused
    assert a.metrics.registry.get_sample_value(  # type: ignore[union-attr]
        "splice_agent_replica_pushes_total", {"job_name": JOB, "outcome": "failed"}) == 1.0


def test_replicas_go_to_other_nodes_only(agents: Any) -> None:
    a = agents("n0")
    assert a.snapshots.targets() == []  # no membership yet
    a.snapshots.peers = [("n0", a.snapshot_address, "n0")]
    assert a.snapshots.targets() == []  # alone: nowhere to push
    a.snapshots.peers = [("n0", a.snapshot_address, "n0"), ("n1", "", "n1"),
                      ("n2", "127.0.0.1:9", "n2")]
    assert a.snapshots.targets() == ["127.0.0.1:9"]  # n1 serves no snapshots


def test_replicas_go_to_another_failure_domain_first(agents: Any) -> None:
    a = agents("n0", failure_domain="rack-a")
    a.snapshots.peers = [("n0", a.snapshot_address, "rack-a"), ("n1", "127.0.0.1:11", "rack-a"),
                      ("n2", "127.0.0.1:12", "rack-b"), ("n3", "127.0.0.1:13", "rack-b")]
    (target,) = a.snapshots.targets()
    assert target in ("127.0.0.1:12", "127.0.0.1:13")  # not n1, in n0's own rack


def test_a_snapshot_rewritten_while_read_is_not_pushed(tmp_path: Path) -> None:
    d = tmp_path / "w"
    _commit(str(d), "n0/0", 5)
    got = open_committed(str(d), 5)
    assert got is not None
    store = ReplicaStore(0, job_id=JOB)
    server = serve(store, "127.0.0.1:0")
    try:
        with pytest.raises(SnapshotChanged):
            push(server.address, JOB, "n0/0", 5, 1, got[1], got[2], still_valid=lambda: False)
        assert store.bytes_held == 0
        push(server.address, JOB, "n0/0", 5, 1, got[1], got[2], still_valid=lambda: True)
        assert store.bytes_held > 0
    finally:
        server.stop(0)


def test_a_joining_worker_falls_back_to_a_replica_on_another_agent(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    holder = tmp_path / "holder"
    _commit(str(holder), "node-0/0", 6, 7)
    got = open_committed(str(holder), 7)
    assert got is not None

    def damaged(job: str, wid: str, step: int) -> Any:
        data = bytearray(got[2])
        data[100] ^= 0x10  # the holder's memory went bad after the replica was pushed
        return got[0], got[1], memoryview(data)

    holder_agent = serve(ReplicaStore(0, job_id=JOB), "127.0.0.1:0", damaged)
    other_agent = serve(ReplicaStore(0, job_id=JOB), "127.0.0.1:0")
    try:
        push(other_agent.address, JOB, "node-0/0", 7, 1, got[1], got[2])
        session = Session(worker_id="node-2/0", link=None,
                          config=HookConfig(job_id=JOB, snapshot_dir=str(tmp_path / "new"),
                                            recovery_timeout_s=20.0))
        session._link = _Link(pb.Membership(epoch=2, agents=[  # type: ignore[assignment]
            pb.PeerAgent(node_id="node-0", snapshot_address=holder_agent.address),
            pb.PeerAgent(node_id="node-1", snapshot_address=other_agent.address),
            pb.PeerAgent(node_id="node-2", snapshot_address="")]))
        with caplog.at_level(logging.INFO):
            session._fetch_state(7, [pb.SnapshotHolder(worker_id="node-0/0",
                                                       address=holder_agent.address)])
    finally:
        holder_agent.stop(0)
        other_agent.stop(0)
    messages = [r.getMessage() for r in caplog.records if r.name == "splice.worker"]
    assert any("failed" in m and "corrupt" in m for m in messages), messages
    assert any(f"from a replica of node-0/0's on the agent at {other_agent.address}" in m
               for m in messages), messages
    assert session._snapshots.steps() == [7]
    want, mine = _state(7), session._snapshots.restore(7)
    assert torch.equal(mine["model"]["weight"], want["model"]["weight"])
    assert session._state_source == f"node-0/0's replica at {other_agent.address}"


def test_with_no_replica_of_the_step_the_error_names_every_agent_asked(tmp_path: Path) -> None:
    empty = serve(ReplicaStore(0, job_id=JOB), "127.0.0.1:0")
    other = serve(ReplicaStore(0, job_id=JOB), "127.0.0.1:0")
    try:
        session = Session(worker_id="node-2/0", link=None,
                          config=HookConfig(job_id=JOB, snapshot_dir=str(tmp_path / "new"),
                                            recovery_timeout_s=20.0))
        session._link = _Link(pb.Membership(epoch=2, agents=[  # type: ignore[assignment]
            pb.PeerAgent(node_id="node-0", snapshot_address=empty.address),
            pb.PeerAgent(node_id="node-1", snapshot_address=other.address)]))
        from splice.agent.worker.state_sources import RecoveryFailed

        with pytest.raises(RecoveryFailed) as e:
            session._fetch_state(7, [pb.SnapshotHolder(worker_id="node-0/0",
                                                       address=empty.address)])
    finally:
        empty.stop(0)
        other.stop(0)
    assert empty.address in str(e.value) and other.address in str(e.value)
    assert session._snapshots.steps() == []


def test_fetch_of_a_missing_replica_fails_fast() -> None:
    server = serve(ReplicaStore(0, job_id=JOB), "127.0.0.1:0")
    try:
        with pytest.raises(FetchFailed):
            fetch([server.address], JOB, "node-0/0", 7, connect_timeout_s=2.0)
    finally:
        server.stop(0)
    assert replication.ReplicaBudgetExceeded is ReplicaBudgetExceeded


def _scraped(address: str, name: str) -> float:
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:  # the agent is still starting
        return 0.0
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == name)


@pytest.mark.integration
@pytest.mark.parametrize("tls", [False, True], ids=["plaintext", "mutual-tls"])
def test_in_a_running_job_each_agent_holds_its_peers_replicas(tmp_path: Path,
                                                              tls: bool) -> None:
    # The controller tells agents where their peers' snapshot servers are (with each
    # membership); every agent pushes its workers' snapshots to the other node's agent
    # (under mutual TLS with its certificate, to a server that requires one).
    from splice.localjob import LocalJob, LocalJobConfig, worker_argv

    cfg = LocalJobConfig(
        worker_command=worker_argv("tests.workers.fault_worker",
                                   ["--steps", "400", "--out", str(tmp_path / "out")]),
        nodes=2, nproc=2, log_dir=str(tmp_path), metrics=True, replicas=1,
        replicate_interval_s=0.05, tls_dir=str(tmp_path / "certs") if tls else "",
        extra_env=(("PYTHONPATH", str(Path(__file__).parent.parent)),))
    (tmp_path / "out").mkdir()
    with LocalJob(cfg) as job:
        def replicated(_: pb.JobStatus) -> bool:
            return all(_scraped(a, "splice_agent_replica_bytes") > 0
                       and _scraped(a, "splice_agent_replica_pushes_total") > 0
                       for a in job.agent_metrics)

        try:
            job.wait_until(replicated, 60.0, "both agents to hold replicas")
            status = job.wait_until(lambda s: s.phase in ("complete", "failed"), 120.0,
                                    "the job to end")
        except BaseException:
            print(job.logs())
            raise
        assert status.phase == "complete", job.logs()
        assert len(job.agent_metrics) == 2


def test_a_workers_pushes_start_at_least_the_gap_apart() -> None:
    from splice.agent.replicator import Replicator

    step = [5]
    sent: list[int] = []

    def snapshots() -> list[Any]:
        return [("n0/0", step[0], 1, b"meta", b"data")]

    def push_fn(peer: str, worker: str, s: int, epoch: int, meta: Any, data: Any) -> None:
        sent.append(s)

    for gap, expected in ((3600.0, [5]), (0.0, [5, 6])):
        sent.clear()
        step[0] = 5
        r = Replicator(JOB, snapshots, lambda: ["peer:1"], push_fn=push_fn, min_gap_s=gap)
        try:
            for f in r.maybe_push():
                f.result(timeout=10)
            step[0] = 6  # a newer step is committed right after the push
            for f in r.maybe_push():
                f.result(timeout=10)
        finally:
            r.close()
        assert sent == expected, (gap, sent)


def test_lost_shards_come_from_replicas_of_the_step_before_when_none_has_the_resume_step(
        tmp_path: Path) -> None:
    # One surviving rank of a 2-rank ZeRO layout resumes at step 3; old rank 1's shard is
    # in no member's memory, and the only agent replica of node-1/0 is of step 2. Every
    # member (here: one) goes back to step 2, which its ring still holds, and reads the
    # lost shard from that replica.
    from splice.agent.worker.zero import ShardedAdamW
    from splice.controller.resharding import partition, plan_reshard
    from splice.examples.toy import TeacherDataset, make_mlp, mse_loss

    session = Session(worker_id="node-0/0", link=None,
                      config=HookConfig(job_id=JOB, snapshot_dir=str(tmp_path / "ring")))
    model = make_mlp(hidden=16, seed=0)
    opt = ShardedAdamW(model.parameters(), session.group)
    session.register(model=model, optimizer=opt, dataset=TeacherDataset(), loss_fn=mse_loss,
                     global_batch_size=4, micro_batch_size=2)
    for _ in range(4):
        assert session.run_step() is not None
    session._restore(3)
    assert session._snapshots.steps() == [2, 3]
    n = opt.flat.numel()
    old = partition(n, 2)
    lost = {"start": old[1].start, "stop": old[1].stop, "step": 2,
            "exp_avg": torch.arange(len(old[1]), dtype=torch.float32),
            "exp_avg_sq": torch.full((len(old[1]),), 0.5)}
    replica_dir = tmp_path / "node-1_0"
    ring = SnapshotRing(directory=str(replica_dir), owner="node-1/0")
    ring.capture(2, {"model": {}, "optimizer": lost, "step": 2,
                     "zero": {"world": 2, "rank": 1, "replica": None}})
    ring.close()
    got = open_committed(str(replica_dir), 2)
    assert got is not None
    agent = serve(ReplicaStore(0, job_id=JOB), "127.0.0.1:0")
    try:
        push(agent.address, JOB, "node-1/0", 2, 1, got[1], got[2])
        session._link = _Link(pb.Membership(epoch=3, agents=[  # type: ignore[assignment]
            pb.PeerAgent(node_id="node-1", snapshot_address=agent.address)]))
        plan = plan_reshard(old, {0: [0]}, partition(n, 1))
        assert [g.old_rank for g in plan.missing] == [1]
        members = ["node-0/0", "node-1/0"]
        assert session._zero_replica_shards(plan, members) == 2
        assert session.step == 2 and session._snapshots.steps() == [2]
        (shard,) = session._zero_replica_shards(plan, members)  # type: ignore[misc]
    finally:
        agent.stop(0)
        session._link = None
    assert (shard.start, shard.stop) == (old[1].start, old[1].stop)
    assert torch.equal(shard.exp_avg, lost["exp_avg"])
    assert torch.equal(shard.exp_avg_sq, lost["exp_avg_sq"])


def test_replicas_are_ordered_by_the_epoch_a_snapshot_was_taken_in(agents: Any) -> None:
    # A new epoch alone re-sends nothing; after a rollback, the older step of the newer
    # epoch replaces what the peer holds.
    a, b = agents("n0"), agents("n1")
    directory = a.snapshots.directory("n0/0")
    _commit(directory, "n0/0", 9, 10, epoch=1)
    _connect(a, "n0/0")
    a.snapshots.peers = [("n0", a.snapshot_address, "n0"), ("n1", b.snapshot_address, "n1")]
    replicator = a.snapshots.replicator
    assert replicator is not None
    replicator.min_gap_s = 0.0
    for f in replicator.maybe_push():
        f.result(timeout=30)
    a._epoch = 2  # a recovery: the agent relays epoch 2, the snapshot is unchanged
    assert replicator.maybe_push() == []
    import shutil

    shutil.rmtree(directory)
    _commit(directory, "n0/0", 8, epoch=2)  # rolled back to step 8 in epoch 2
    for f in replicator.maybe_push():
        f.result(timeout=30)
    (held,) = [(h.step, h.epoch) for h in b.snapshots.replicas.holdings()]
    assert held == (8, 2)


def test_replicas_of_workers_gone_from_the_job_are_dropped_once_a_new_layout_trains(
        agents: Any) -> None:
    b = agents("n1")
    for wid in ("n0/0", "n2/0"):
        d = b.snapshots.directory("src-" + wid)
        _commit(d, wid, 5)
        got = open_committed(d, 5)
        assert got is not None
        push(b.snapshot_address, JOB, wid, 5, 1, got[1], got[2])

    def membership(epoch: int, members: list[str]) -> pb.Membership:
        return pb.Membership(epoch=epoch, members=members, agents=[
            pb.PeerAgent(node_id=w.split("/")[0], snapshot_address="127.0.0.1:9")
            for w in members])

    def held() -> list[str]:
        return [r.worker_id for r in b.snapshots.replicas.holdings()]

    b.snapshots.on_membership(membership(1, ["n0/0", "n1/0", "n2/0"]))
    b.snapshots.trained(1)
    assert held() == ["n0/0", "n2/0"]
    # n2 lost, then n0 while that recovery was under way: the snapshots to reshard are
    # still of epoch 1's layout, which needs both replicas.
    b.snapshots.on_membership(membership(2, ["n0/0", "n1/0"]))
    b.snapshots.on_membership(membership(3, ["n1/0"]))
    assert held() == ["n0/0", "n2/0"]
    b.snapshots.trained(3)  # epoch 3 trains: its layout is settled
    assert held() == []


def test_an_exited_workers_unfinished_fetches_are_removed(agents: Any) -> None:
    # A worker killed mid-fetch leaves its staging directories (peer_fetch.py): not
    # a snapshot, so removed, while its own and other workers' directories stay.
    a = agents("n0")
    base = a.snapshots.directory("n0/1")
    keep = [base, a.snapshots.directory("n0/0"), a.snapshots.directory("n0/0") + ".incoming"]
    for path in [*keep, base + ".incoming", base + ".prefetch-3", base + ".prefetch-4"]:
        os.makedirs(path)
        with open(os.path.join(path, "slot0-1.data"), "wb") as f:
            f.write(b"x")
    a.snapshots.discard_staging("n0/1")
    assert sorted(os.listdir(os.path.dirname(base))) == sorted(os.path.basename(p)
                                                                for p in keep)
