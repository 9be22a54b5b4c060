"""A fetch whose caller checks the snapshot's own checksums (`checked_by_fetcher`, what a
joining worker asks for) skips the bulk port's whole-stream CRC-32 on both sides: the
server of a node's own snapshot sends a zero trailer without reading the bytes an extra
time, and the client takes none. A replica's trailer, recorded when it arrived, is still
sent. Without the flag nothing changes (tests/test_bulk.py)."""

from __future__ import annotations

import zlib
from typing import Any

import pytest

from splice.agent import bulk
from splice.agent.replication import ReplicaStore, SnapshotCorrupt, fetch, push, serve
from splice.proto import peer_pb2 as pb
from tests.test_bulk import (
    DATA,
    DEADLINE_S,
    JOB,
    META,
    WORKER,
    as_tensor,
    fake_server,
    fetched,
    flipped,
    snapshot_reply,
)
from tests.test_replication import payload

SIZE = 2 * bulk.PIECE_BYTES + 4093


def checked(step: int = 0) -> pb.FetchRequest:
    return pb.FetchRequest(job_id=JOB, worker_id=WORKER, step=step, checked_by_fetcher=True)


def test_the_server_takes_no_crc_of_its_own_snapshot_for_a_checked_fetch(
        monkeypatch: pytest.MonkeyPatch) -> None:
    meta, data = b"meta:" + bytes(range(256)), payload(SIZE, 5)

    def provider(job: str, worker: str, step: int) -> tuple[int, bytes, Any] | None:
        return (9, meta, as_tensor(data)) if (job, worker) == (JOB, WORKER) else None

    server = serve(ReplicaStore(0, job_id=JOB), "localhost:0", provider)
    crcs: list[int] = []
    real_crc32 = zlib.crc32

    def counted(data: Any, value: int = 0) -> int:
        crcs.append(len(data))
        return real_crc32(data, value)

    monkeypatch.setattr(bulk.zlib, "crc32", counted)
    try:
        assert server.bulk is not None
        got = bulk.fetch("localhost", server.bulk.port, checked(9), timeout_s=DEADLINE_S)
        assert fetched(got) == (9, meta, data)
        assert crcs == []  # neither side read the bytes for a CRC
        # The same fetch unflagged still takes one on each side, over every byte.
        plain = pb.FetchRequest(job_id=JOB, worker_id=WORKER, step=9)
        got = bulk.fetch("localhost", server.bulk.port, plain, timeout_s=DEADLINE_S)
        assert fetched(got) == (9, meta, data)
        assert sum(crcs) == 2 * (len(meta) + len(data))
        # Through replication.fetch, as the worker asks.
        crcs.clear()
        got = fetch([server.address], JOB, WORKER, 9, checked_by_fetcher=True)
        assert fetched(got) == (9, meta, data) and crcs == []
    finally:
        server.stop()


def test_a_replica_is_served_to_a_checked_fetch_byte_exact() -> None:
    store = ReplicaStore(0, job_id=JOB)
    server = serve(store, "localhost:0")
    data = payload(SIZE, 6)
    try:
        push(server.address, JOB, WORKER, 9, 2, b"hdr", data)
        assert server.bulk is not None
        got = bulk.fetch("localhost", server.bulk.port, checked(), timeout_s=DEADLINE_S)
        assert fetched(got) == (9, b"hdr", data)
    finally:
        server.stop()


def test_a_checked_fetch_leaves_damage_to_the_callers_check() -> None:
    """The client takes no CRC: flipped bytes reach the caller, whose check of the
    snapshot's own checksums (tests/test_fetch_state.py) is what catches them. Unflagged,
    the same reply is refused."""
    reply = snapshot_reply(data=flipped(DATA, 54_321), trailer=zlib.crc32(META + DATA))
    with fake_server(reply) as (port, seen):
        got = bulk.fetch("127.0.0.1", port, checked(7), timeout_s=DEADLINE_S)
    assert fetched(got) == (7, META, flipped(DATA, 54_321))
    assert seen[0][1].checked_by_fetcher
    with fake_server(reply) as (port, _):
        with pytest.raises(SnapshotCorrupt, match="of the bytes received"):
            bulk.fetch("127.0.0.1", port, pb.FetchRequest(job_id=JOB, worker_id=WORKER,
                                                          step=7), timeout_s=DEADLINE_S)
