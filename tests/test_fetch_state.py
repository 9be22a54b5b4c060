"""A joining worker fetches the resume step's snapshot from the holders' agents, which
serve it out of their workers' shared memory (agent/worker/peer_fetch.py
`_fetch_state`, checkpoint/slotmeta.py `open_committed`, agent/replication.py): a holder
that cannot be reached, or whose bytes fail the snapshot's own checksums, is skipped for
the next one; with none left, the error names every holder tried."""

from __future__ import annotations

import logging
import random
import socket
from pathlib import Path
from typing import Any

import pytest
import torch

from splice.agent import replication
from splice.agent.worker.session import HookConfig, Session
from splice.agent.worker.state_sources import RecoveryFailed
from splice.checkpoint.slotmeta import open_committed
from splice.checkpoint.snapshot import Frozen, SnapshotRing
from splice.proto import controller_pb2 as pb

JOB = "fetch-test"


def _state(step: int) -> dict[str, Any]:
    torch.manual_seed(step)
    model = torch.nn.Linear(64, 32)
    return {"model": model.state_dict(), "rng": {"torch": torch.get_rng_state(),
                                                 "python": Frozen(random.getstate())},
            "step": step}


def holder_snapshots(tmp_path: Path) -> Path:
    """node-0/0's snapshots of steps 6 and 7 (the newest), as its agent holds them, in
    `tmp_path`/holder."""
    d = tmp_path / "holder"
    ring = SnapshotRing(directory=str(d), owner="node-0/0")
    for step in (6, 7):
        ring.capture(step, _state(step))
    ring.close()
    return d


@pytest.fixture()
def holder_dir(tmp_path: Path) -> Path:
    return holder_snapshots(tmp_path)


def _server(provider: Any) -> replication.PeerServer:
    return replication.serve(replication.ReplicaStore(0, job_id=JOB), "127.0.0.1:0", provider)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _session(tmp_path: Path) -> Session:
    return Session(worker_id="node-2/0", link=None,
                   config=HookConfig(job_id=JOB, snapshot_dir=str(tmp_path / "newcomer"),
                                     recovery_timeout_s=20.0))


def test_the_snapshot_comes_from_the_first_holder_that_serves_it_intact(
        tmp_path: Path, holder_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    def good(job: str, wid: str, step: int) -> Any:
        return open_committed(str(holder_dir), step) if wid == "node-0/0" else None

    def damaged(job: str, wid: str, step: int) -> Any:
        got = open_committed(str(holder_dir), step)
        assert got is not None
        data = bytearray(got[2])
        data[100] ^= 0x10  # a byte of the model's weights: sent as is, caught on adoption
        return got[0], got[1], memoryview(data)

    servers = [_server(damaged), _server(good)]
    try:
        holders = [pb.SnapshotHolder(worker_id="node-1/0", address=f"127.0.0.1:{_free_port()}"),
                   pb.SnapshotHolder(worker_id="node-0/1", address=servers[0].address),
                   pb.SnapshotHolder(worker_id="node-0/0", address=servers[1].address)]
        session = _session(tmp_path)
        with caplog.at_level(logging.WARNING):
            session._fetch_state(7, holders)
    finally:
        for s in servers:
            s.stop(0)
    failures = [r.getMessage() for r in caplog.records
                if r.name == "splice.worker" and "failed" in r.getMessage()]
    assert len(failures) == 2, failures
    assert "node-1/0" in failures[0] and "node-0/1" in failures[1]
    assert "corrupt" in failures[1]
    assert session._snapshots.steps() == [7]
    want, got = _state(7), session._snapshots.restore(7)
    assert torch.equal(got["model"]["weight"], want["model"]["weight"])
    assert got["rng"]["python"].value == want["rng"]["python"].value
    assert session._state_source == "node-0/0 memory"


def test_with_no_holder_left_the_error_names_each(tmp_path: Path, holder_dir: Path) -> None:
    server = _server(lambda job, wid, step: None)  # holds nothing
    try:
        holders = [pb.SnapshotHolder(worker_id="node-0/0", address=server.address),
                   pb.SnapshotHolder(worker_id="node-0/1", address=f"127.0.0.1:{_free_port()}")]
        session = _session(tmp_path)
        with pytest.raises(RecoveryFailed, match="no holder could provide the snapshot of "
                                                 "step 7") as e:
            session._fetch_state(7, holders)
    finally:
        server.stop(0)
    assert "node-0/0 at" in str(e.value) and "node-0/1 at" in str(e.value)
    assert session._snapshots.steps() == []  # nothing half-fetched is offered


def test_the_served_bytes_are_the_holders_shared_memory(holder_dir: Path) -> None:
    got = open_committed(str(holder_dir), 0)
    assert got is not None and got[0] == 7
    assert open_committed(str(holder_dir), 6) is not None
    assert open_committed(str(holder_dir), 5) is None
