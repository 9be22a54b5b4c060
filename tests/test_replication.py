"""Snapshot replication between agents (agent/replication.py, replication_wire.py,
replicator.py) over real gRPC on localhost:
push/fetch round trips, every refusal leaving the store as it was, the budget, fetch
falling back past corrupt or missing holders, backpressure, the Replicator, placement."""

from __future__ import annotations

import logging
import threading
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest
import torch
from google.protobuf.message import DecodeError
from hypothesis import given, settings
from hypothesis import strategies as st

from splice.agent.replication import (
    BUDGET_FLAG,
    AlreadyHeld,
    Chunk,
    FetchFailed,
    ReplicaBudgetExceeded,
    ReplicaBusy,
    ReplicaStore,
    ReplicationError,
    SnapshotCorrupt,
    SnapshotPeerServicer,
    StaleReplica,
    Transit,
    UnknownJob,
    add_to_server,
    channel_to,
    crc32_combine,
    decode_chunk,
    encode_chunk,
    fetch,
    push,
    push_chunks,
    serve,
    snapshot_chunks,
)
from splice.agent.replicator import Replicator, place_replicas
from splice.proto import peer_pb2 as pb
from splice.proto import peer_pb2_grpc as pb_grpc

JOB = "job-a"
KiB = 1024


def payload(n: int, seed: int = 0) -> bytes:
    """Deterministic bytes that differ by seed; the period is prime, so no chunk aligns."""
    block = bytes((i * 131 + seed * 7 + seed * i // 61) & 0xFF for i in range(4093))
    return (block * (n // len(block) + 1))[:n]


@pytest.fixture(params=["bulk", "grpc"])
def peer(request: pytest.FixtureRequest) -> Iterator[tuple[ReplicaStore, str]]:
    """A peer agent's snapshot server; fetches from it go over its bulk port, or over
    gRPC's Fetch when it has none."""
    store = ReplicaStore(0, job_id=JOB)
    server = serve(store, "localhost:0", with_bulk=request.param == "bulk")
    yield store, server.address
    server.stop()


def state(store: ReplicaStore) -> list[tuple[Any, ...]]:
    """Everything observable about a store: holdings with their bytes, and the accounting."""
    return [(r.job_id, r.worker_id, r.step, r.epoch, r.checksum, bytes(r.meta), bytes(r.data))
            for r in store.holdings()] + [store.bytes_held, store.bytes_in_transit]


def decoded(message: pb.SnapshotChunk) -> Chunk:
    return decode_chunk(message.SerializeToString())


def raw_push(address: str, chunks: list[pb.SnapshotChunk]) -> grpc.RpcError:
    with channel_to(address) as channel:
        with pytest.raises(grpc.RpcError) as info:
            pb_grpc.SnapshotPeerStub(channel).Push(iter(chunks), timeout=30)
    return info.value


def chunks_of(step: int, meta: bytes, data: bytes, *, epoch: int = 1, job: str = JOB,
              worker: str = "n1/0", chunk_bytes: int = 4 * KiB) -> list[pb.SnapshotChunk]:
    header = pb.SnapshotHeader(job_id=job, worker_id=worker, step=step, epoch=epoch)
    return [pb.SnapshotChunk.FromString(c)
            for c in snapshot_chunks(header, meta, data, chunk_bytes)]


# ---- checksums ------------------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(a=st.binary(max_size=300), b=st.binary(max_size=3000))
def test_crc32_combine_matches_zlib(a: bytes, b: bytes) -> None:
    assert crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)


@settings(max_examples=60, deadline=None)
@given(offset=st.integers(0, 2**64 - 1), part=st.binary(max_size=300),
       crc=st.integers(0, 2**32 - 1), with_header=st.booleans(),
       step=st.integers(0, 2**64 - 1), worker=st.text(max_size=20))
def test_encoded_chunks_are_what_protobuf_serialises(offset: int, part: bytes, crc: int,
                                                     with_header: bool, step: int,
                                                     worker: str) -> None:
    header = pb.SnapshotHeader(job_id=JOB, worker_id=worker, step=step, data_bytes=len(part))
    message = pb.SnapshotChunk(offset=offset, data=part, crc32=crc)
    if with_header:
        message.header.CopyFrom(header)
    encoded = encode_chunk(offset, memoryview(part), crc, header if with_header else None)
    assert encoded == message.SerializeToString()
    chunk = decode_chunk(encoded)
    assert (chunk.offset, bytes(chunk.data), chunk.crc32, chunk.error) == (offset, part, crc, "")
    assert chunk.header == (header if with_header else None)


@settings(max_examples=200, deadline=None)
@given(raw=st.binary(max_size=64))
def test_decoding_garbage_reports_it_or_agrees_with_protobuf(raw: bytes) -> None:
    chunk = decode_chunk(raw)
    try:
        message = pb.SnapshotChunk.FromString(raw)
    except DecodeError:
        assert chunk.error.startswith("malformed SnapshotChunk"), chunk
        return
    if chunk.error:  # stricter than protobuf (e.g. an invalid wire type 6/7 it skipped)
        return
    assert (chunk.offset, bytes(chunk.data), chunk.crc32) == (
        message.offset, message.data, message.crc32)
    assert chunk.header == (message.header if message.HasField("header") else None)


def test_a_garbage_chunk_is_refused_clearly(peer: tuple[ReplicaStore, str]) -> None:
    store, address = peer
    with channel_to(address) as channel:
        call = channel.stream_unary("/splice.v1.SnapshotPeer/Push")
        with pytest.raises(grpc.RpcError) as info:
            call(iter([b"\x1a\xff\xff"]), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "malformed SnapshotChunk" in info.value.details()
    assert state(store) == [0, 0]


# ---- round trips ----------------------------------------------------------------------------

@pytest.mark.parametrize(("meta_n", "data_n", "chunk_bytes"), [
    (0, 0, 4 * KiB), (10, 0, 4 * KiB), (0, 1, 4 * KiB), (5000, 70_001, 4 * KiB),
    (300, 1 << 20, 1 << 20), (300, (1 << 20) + 1, 256 * KiB)])
def test_push_then_fetch_is_byte_exact(peer: tuple[ReplicaStore, str], meta_n: int,
                                       data_n: int, chunk_bytes: int) -> None:
    store, address = peer
    meta, data = payload(meta_n, 1), payload(data_n, 2)
    ack = push(address, JOB, "n1/0", 7, 3, meta, memoryview(data), chunk_bytes)
    assert ack.bytes_received == meta_n + data_n == store.bytes_held
    step, got_meta, got = fetch([address], JOB, "n1/0")
    assert step == 7 and got_meta == meta
    assert got.dtype == torch.uint8 and got.shape == (data_n,)
    assert bytes(got.numpy()) == data
    assert fetch([address], JOB, "n1/0", 7, chunk_bytes=chunk_bytes).meta == meta
    listing = pb_grpc.SnapshotPeerStub(channel_to(address)).List(pb.ListRequest(job_id=JOB))
    assert [(h.worker_id, h.step, h.epoch, h.bytes) for h in listing.holdings] == \
        [("n1/0", 7, 3, meta_n + data_n)]
    assert store.bytes_in_transit == 0


def test_push_accepts_a_tensor_and_fetch_serves_own_workers_first() -> None:
    data = torch.arange(10_000, dtype=torch.int32).view(torch.uint8)
    own = {("n0/0", 12): (b"own-meta", data)}

    def provider(job: str, worker: str, step: int) -> tuple[int, bytes, Any] | None:
        assert job == JOB
        held = [s for (w, s) in own if w == worker and step in (0, s)]
        return (max(held), *own[(worker, max(held))]) if held else None

    store = ReplicaStore(0, job_id=JOB)
    server = serve(store, "localhost:0", provider)
    try:
        push(server.address, JOB, "n1/0", 3, 1, b"replica-meta", data[:100])
        assert fetch([server.address], JOB, "n0/0").meta == b"own-meta"
        got = fetch([server.address], JOB, "n0/0", 12)
        assert torch.equal(got.data, data) and got.step == 12
        assert fetch([server.address], JOB, "n1/0").meta == b"replica-meta"
        with pytest.raises(FetchFailed, match="not held here"):
            fetch([server.address], JOB, "n0/0", 11)
    finally:
        server.stop()


# ---- refusals -------------------------------------------------------------------------------

def _flip(chunk: pb.SnapshotChunk) -> None:
    data = bytearray(chunk.data)
    data[len(data) // 2] ^= 0x01
    chunk.data = bytes(data)


def _bad_whole(chunks: list[pb.SnapshotChunk]) -> None:
    chunks[0].header.checksum ^= 1


def _drop(i: int) -> Any:
    return lambda chunks: chunks.pop(i)


def _repeat_first(chunks: list[pb.SnapshotChunk]) -> None:
    chunks.insert(1, chunks[1])
    chunks[1].offset = chunks[1].offset - 1  # overlaps its predecessor by a byte


def _short_header(chunks: list[pb.SnapshotChunk]) -> None:
    chunks[0].header.data_bytes -= 1


def _long_header(chunks: list[pb.SnapshotChunk]) -> None:
    chunks[0].header.data_bytes += 1


def _late_header(chunks: list[pb.SnapshotChunk]) -> None:
    chunks[2].header.CopyFrom(chunks[0].header)


def _no_header(chunks: list[pb.SnapshotChunk]) -> None:
    chunks[0].ClearField("header")


def _huge_meta(chunks: list[pb.SnapshotChunk]) -> None:
    chunks[0].header.meta_bytes = (1 << 20) + 1


def _span(chunks: list[pb.SnapshotChunk]) -> None:
    first, second = chunks[0], chunks[1]  # meta is one chunk: glue the first data chunk on
    first.data += second.data
    first.crc32 = zlib.crc32(first.data)
    chunks.pop(1)


REFUSALS = [
    ("chunk crc", lambda c: _flip(c[3]), grpc.StatusCode.DATA_LOSS, "fails its CRC-32"),
    ("whole checksum", _bad_whole, grpc.StatusCode.DATA_LOSS, "announced"),
    ("gap", _drop(3), grpc.StatusCode.INVALID_ARGUMENT, "(gap)"),
    ("overlap", _repeat_first, grpc.StatusCode.INVALID_ARGUMENT, "(overlap)"),
    ("truncated", _drop(-1), grpc.StatusCode.INVALID_ARGUMENT, "stream ended after"),
    ("data longer than announced", _short_header, grpc.StatusCode.INVALID_ARGUMENT,
     "past the announced"),
    ("data shorter than announced", _long_header, grpc.StatusCode.INVALID_ARGUMENT,
     "stream ended after"),
    ("header on a later chunk", _late_header, grpc.StatusCode.INVALID_ARGUMENT,
     "header after the first"),
    ("no header", _no_header, grpc.StatusCode.INVALID_ARGUMENT, "has no header"),
    ("meta over the limit", _huge_meta, grpc.StatusCode.INVALID_ARGUMENT, "over the"),
    ("chunk spanning meta and data", _span, grpc.StatusCode.INVALID_ARGUMENT, "spans"),
]


@pytest.mark.parametrize(("damage", "code", "text"), [r[1:] for r in REFUSALS],
                         ids=[r[0] for r in REFUSALS])
def test_a_bad_push_is_refused_and_the_held_replica_is_untouched(
        peer: tuple[ReplicaStore, str], damage: Any, code: grpc.StatusCode, text: str) -> None:
    store, address = peer
    meta, old = payload(1000, 1), payload(20_000, 2)
    push(address, JOB, "n1/0", 5, 1, meta, old, 4 * KiB)
    before = state(store)
    chunks = chunks_of(6, meta, payload(20_000, 3))
    damage(chunks)
    err = raw_push(address, chunks)
    assert err.code() == code and text in err.details(), err.details()
    assert state(store) == before
    assert store.bytes_in_transit == 0
    assert bytes(fetch([address], JOB, "n1/0").data.numpy()) == old
    # The store is not wedged: the next good push is taken.
    push(address, JOB, "n1/0", 6, 1, meta, payload(20_000, 3), 4 * KiB)
    assert store.get(JOB, "n1/0").step == 6


class AbortSignallingStore(ReplicaStore):
    """A store that says when a transit was abandoned (the servicer's cleanup ran)."""

    def __init__(self) -> None:
        super().__init__(0, job_id=JOB)
        self.aborted = threading.Event()
        self.begins = 0
        self.second_begun = threading.Event()  # the second push has reserved its room

    def begin(self, header: pb.SnapshotHeader) -> Transit:
        transit, aborted = super().begin(header), self.aborted
        self.begins += 1
        if self.begins == 2:
            self.second_begun.set()

        class Signalling:
            write, commit = transit.write, transit.commit

            def abort(self) -> None:
                transit.abort()
                aborted.set()

        return Signalling()  # type: ignore[return-value]


def test_a_sender_vanishing_mid_stream_frees_its_reservation() -> None:
    store = AbortSignallingStore()
    server = serve(store, "localhost:0")
    try:
        push(server.address, JOB, "n1/0", 1, 1, b"m", payload(50_000))
        before = state(store)

        def dies_midway() -> Iterator[bytes]:
            header = pb.SnapshotHeader(job_id=JOB, worker_id="n1/0", step=2, epoch=1)
            chunks = snapshot_chunks(header, b"m", payload(50_000, 8), 4 * KiB)
            yield next(chunks)
            yield next(chunks)
            # Dies once the receiver has reserved room for it (else there is nothing to
            # free: the call could end before the server saw a chunk).
            store.second_begun.wait(30)
            raise ConnectionError("sender lost")

        with channel_to(server.address) as channel, \
                pytest.raises(ReplicationError, match="iterating requests"):
            push_chunks(channel, dies_midway(), timeout_s=30)
        assert store.aborted.wait(30)
        assert state(store) == before and store.bytes_in_transit == 0
    finally:
        server.stop()


@pytest.mark.parametrize(("job", "step", "epoch", "error", "text"), [
    ("job-b", 9, 1, UnknownJob, "serves job 'job-a', not 'job-b'"),
    (JOB, 4, 1, StaleReplica, "step 5 (epoch 1) is held, which is newer"),
    (JOB, 9, 0, StaleReplica, "step 5 (epoch 1) is held, which is newer"),
    (JOB, 5, 1, AlreadyHeld, "is held already"),
])
def test_a_push_for_another_job_or_not_newer_is_refused(
        peer: tuple[ReplicaStore, str], job: str, step: int, epoch: int,
        error: type[Exception], text: str) -> None:
    store, address = peer
    push(address, JOB, "n1/0", 5, 1, b"m", payload(5000))
    before = state(store)
    with pytest.raises(error, match=text.replace("(", r"\(").replace(")", r"\)")):
        push(address, job, "n1/0", step, epoch, b"m2", payload(5000, 9))
    assert state(store) == before


def test_a_newer_epoch_supersedes_a_higher_step(peer: tuple[ReplicaStore, str]) -> None:
    """After a recovery the job may resume from an older step in a new epoch."""
    store, address = peer
    push(address, JOB, "n1/0", 12, 1, b"old", b"x" * 100)
    push(address, JOB, "n1/0", 10, 2, b"new", b"y" * 100)
    assert fetch([address], JOB, "n1/0") [:2] == (10, b"new")


def test_the_budget_is_enforced_with_a_clear_error(peer: tuple[ReplicaStore, str]) -> None:
    store = ReplicaStore(3 * 10_000, job_id=JOB)
    server = serve(store, "localhost:0")
    try:
        push(server.address, JOB, "n1/0", 1, 1, b"", bytes(10_000))
        push(server.address, JOB, "n1/1", 1, 1, b"", bytes(10_000))
        before = state(store)
        # A newer replica of n1/0 needs room beside the one it replaces: 3 x 10 kB + 1 > budget.
        with pytest.raises(ReplicaBudgetExceeded) as info:
            push(server.address, JOB, "n1/0", 2, 1, b"", bytes(10_001))
        message = str(info.value)
        assert message == (
            "replica of job-a/n1/0 step 2 needs 10001 bytes; the replica budget is 30000 "
            "bytes, with 20000 bytes held and 0 bytes in transit (a replica needs room for "
            f"itself beside the one it replaces); raise {BUDGET_FLAG}")
        assert state(store) == before
        push(server.address, JOB, "n1/0", 2, 1, b"", bytes(10_000))  # exactly fits
        assert store.bytes_held == 20_000
    finally:
        server.stop()


def test_one_push_per_worker_in_transit_and_the_old_replica_kept_until_commit() -> None:
    store = ReplicaStore(0, job_id=JOB)
    good = chunks_of(1, b"m", payload(9000))
    first = store.begin(good[0].header)
    for chunk in good:
        first.write(decoded(chunk))
    first.commit()
    newer = chunks_of(2, b"m", payload(9000, 5))
    transit = store.begin(newer[0].header)
    assert store.bytes_in_transit == 9001 and store.bytes_held == 9001
    with pytest.raises(ReplicaBusy, match="step 2 is in transit"):
        store.begin(chunks_of(3, b"m", b"z")[0].header)
    for chunk in newer[:-1]:
        transit.write(decoded(chunk))
    assert store.get(JOB, "n1/0").step == 1  # not before the newer one is whole
    transit.write(decoded(newer[-1]))
    transit.commit()
    assert store.get(JOB, "n1/0").step == 2 and store.bytes_in_transit == 0
    assert bytes(store.get(JOB, "n1/0").data) == payload(9000, 5)


# ---- fetch falls back -----------------------------------------------------------------------

class CorruptingServicer(SnapshotPeerServicer):
    """A holder whose bytes get damaged on the wire: one chunk flipped after its CRC."""

    def Fetch(self, request: pb.FetchRequest, context: grpc.ServicerContext) -> Any:
        for i, encoded in enumerate(super().Fetch(request, context)):
            if i == 1:
                chunk = pb.SnapshotChunk.FromString(encoded)
                _flip(chunk)
                encoded = chunk.SerializeToString()
            yield encoded


@pytest.mark.parametrize("with_bulk", [True, False])
def test_fetch_falls_back_past_corrupt_missing_and_unreachable_holders(
        caplog: pytest.LogCaptureFixture, with_bulk: bool) -> None:
    meta, data = b"hdr", payload(50_000, 4)
    stores = [ReplicaStore(0, job_id=JOB) for _ in range(4)]
    servers = [serve(s, "localhost:0", with_bulk=with_bulk) for s in stores]
    wire = grpc.server(ThreadPoolExecutor(2))
    add_to_server(CorruptingServicer(stores[0]), wire)
    wire_port = wire.add_insecure_port("localhost:0")
    wire.start()
    try:
        for server in servers[:3]:
            push(server.address, JOB, "n1/0", 8, 1, meta, data, 16 * KiB)
        at_rest = stores[1].get(JOB, "n1/0")
        at_rest.data[123] ^= 0xFF  # damaged in memory after it was verified
        dead = serve(ReplicaStore(0, job_id=JOB), "localhost:0")
        dead.stop()
        holders = [dead.address, f"localhost:{wire_port}", servers[1].address,
                   servers[3].address, servers[2].address]
        with caplog.at_level(logging.INFO, logger="splice.agent"):
            got = fetch(holders, JOB, "n1/0", 8, connect_timeout_s=0.5, chunk_bytes=16 * KiB)
        assert got.step == 8 and got.meta == meta and bytes(got.data.numpy()) == data
        reasons = "\n".join(r.getMessage() for r in caplog.records)
        assert "unreachable" in reasons and "fails its CRC-32" in reasons
        if with_bulk:  # the damaged replica's bytes fail the checksum sent after them
            assert "received, 0x" in reasons and "SnapshotNotHeld" in reasons
            assert "over its bulk port" in reasons
        else:
            assert "announced" in reasons and "NOT_FOUND" in reasons
            assert "over gRPC" in reasons
        with pytest.raises(FetchFailed) as info:
            fetch(holders[:4], JOB, "n1/0", connect_timeout_s=0.5)
        for address in holders[:4]:
            assert address in str(info.value)
    finally:
        wire.stop(None).wait()
        for server in servers:
            server.stop()


# ---- backpressure ---------------------------------------------------------------------------

class RecordingStore(ReplicaStore):
    """A store whose transits note, on each chunk, how far the sender's generator is ahead,
    and do extra work per chunk (a slow consumer)."""

    def __init__(self, produced: list[int]) -> None:
        super().__init__(0, job_id=JOB)
        self.produced, self.leads = produced, list[int]()

    def begin(self, header: pb.SnapshotHeader) -> Transit:
        transit, store = super().begin(header), self

        class Slow:
            def write(self, chunk: Chunk) -> None:
                store.leads.append(store.produced[0] - (len(store.leads) + 1))
                for _ in range(4):
                    zlib.crc32(chunk.data)
                transit.write(chunk)

            commit, abort = transit.commit, transit.abort

        return Slow()  # type: ignore[return-value]


def test_a_slow_receiver_holds_the_sender_a_bounded_number_of_chunks_ahead() -> None:
    chunk, num_chunks = 16 * KiB, 256
    produced = [0]
    store = RecordingStore(produced)
    # BDP probing off pins the receive window at HTTP/2's 64 KiB, so the bound is small.
    server = serve(store, "localhost:0", options=[("grpc.http2.bdp_probe", 0)])
    data = payload(chunk * num_chunks, 6)

    def counted() -> Iterator[bytes]:
        header = pb.SnapshotHeader(job_id=JOB, worker_id="n1/0", step=1, epoch=1)
        for c in snapshot_chunks(header, b"", data, chunk):
            produced[0] += 1
            yield c

    try:
        with channel_to(server.address) as channel:
            push_chunks(channel, counted(), timeout_s=60)
        assert len(store.leads) == produced[0] == num_chunks
        # Without flow control the generator would be drained at once: ~256 chunks ahead.
        assert max(store.leads) * chunk <= 256 * KiB, max(store.leads)
        assert bytes(store.get(JOB, "n1/0").data) == data
    finally:
        server.stop()


# ---- the Replicator -------------------------------------------------------------------------

class Source:
    """The node's workers' newest committed snapshots, advanced by the test."""

    def __init__(self) -> None:
        self.step = 1

    def snapshots(self) -> list[tuple[str, int, int, bytes, bytes]]:
        return [("n0/0", self.step, 1, b"m%d" % self.step, payload(3000, self.step))]


def test_replicator_skips_steps_committed_while_a_push_is_in_flight() -> None:
    source, calls = Source(), []
    entered, release = threading.Event(), threading.Event()

    def slow_push(peer: str, worker: str, step: int, epoch: int, meta: Any, data: Any) -> None:
        calls.append((peer, worker, step))
        if step == 1:
            entered.set()
            assert release.wait(30)
        if peer == "bad":
            raise SnapshotCorrupt("refused")

    rep = Replicator(JOB, source.snapshots, lambda: ["p1", "bad"], push_fn=slow_push)
    try:
        (first,) = rep.maybe_push()
        assert entered.wait(30)
        for step in (2, 3, 4):
            source.step = step
            assert rep.maybe_push() == []  # one in flight per worker: nothing queued
        assert rep.stats().in_flight == 1
        release.set()
        first.result(30)
        (second,) = rep.maybe_push()
        second.result(30)
        assert [c for c in calls if c[0] == "p1"] == [("p1", "n0/0", 1), ("p1", "n0/0", 4)]
        stats = rep.stats()
        assert (stats.pushes_ok, stats.pushes_failed, stats.in_flight) == (2, 2, 0)
        assert stats.bytes_pushed == 2 * 3002
        assert stats.lag_steps == 4  # "bad" holds nothing
        source.step = 5
        (third,) = rep.maybe_push()  # p1 is behind again; "bad" is retried
        third.result(30)
        assert calls[-2:] == [("p1", "n0/0", 5), ("bad", "n0/0", 5)]
    finally:
        release.set()
        rep.close()


def test_replicator_pushes_to_real_peers_on_its_thread(peer: tuple[ReplicaStore, str]) -> None:
    store, address = peer
    source = Source()
    rep = Replicator(JOB, source.snapshots, lambda: [address], interval_s=60).start()
    assert rep.running
    try:
        assert rep.wait_pushed("n0/0", 1, address, 30)
        source.step = 2
        rep.poke()
        assert rep.wait_pushed("n0/0", 2, address, 30)
        got = fetch([address], JOB, "n0/0")
        assert got.step == 2 and got.meta == b"m2"
        assert bytes(got.data.numpy()) == payload(3000, 2)
        assert rep.stats().lag_steps == 0 and rep.stats().pushes_ok == 2
    finally:
        rep.close()
    assert not rep.running


# ---- placement ------------------------------------------------------------------------------

@settings(max_examples=150, deadline=None)
@given(num_nodes=st.integers(0, 12), k=st.integers(0, 4),
       domains=st.one_of(st.none(), st.lists(st.integers(0, 3), min_size=12, max_size=12)))
def test_place_replicas_properties(num_nodes: int, k: int, domains: list[int] | None) -> None:
    nodes = [f"node-{i:02d}" for i in range(num_nodes)]
    domain_of = None if domains is None else (lambda n: f"rack-{domains[int(n[5:])]}")
    placement = place_replicas(list(reversed(nodes)), k, domain_of)
    assert placement == place_replicas(nodes, k, domain_of)  # order-independent
    assert set(placement) == set(nodes)
    domain = domain_of or (lambda n: n)
    load = dict.fromkeys(nodes, 0)
    for node, peers in placement.items():
        assert node not in peers and len(set(peers)) == len(peers) == min(k, num_nodes - 1)
        outside = [n for n in nodes if domain(n) != domain(node)]
        if len(outside) >= k:
            assert all(domain(p) != domain(node) for p in peers), (node, peers)
        else:
            assert set(outside) <= set(peers)
        for p in peers:
            load[p] += 1
    if domains is None and nodes:
        # Balanced: each node holds about k nodes' replicas.
        assert max(load.values()) - min(load.values()) <= 1, load


@settings(max_examples=100, deadline=None)
@given(num_domains=st.integers(2, 4), per_domain=st.integers(1, 4), data=st.data())
def test_place_replicas_is_balanced_over_equal_domains(num_domains: int, per_domain: int,
                                                       data: st.DataObject) -> None:
    domains = {f"n{d}-{i}": f"rack-{d}" for d in range(num_domains) for i in range(per_domain)}
    k = data.draw(st.integers(0, len(domains) - per_domain))
    placement = place_replicas(list(domains), k, domains)
    loads = [sum(n in peers for peers in placement.values()) for n in domains]
    assert max(loads) - min(loads) <= 1, (k, placement)
    assert all(domains[p] != domains[n] for n, peers in placement.items() for p in peers)


def test_place_replicas_spreads_over_racks() -> None:
    racks = {"a1": "A", "a2": "A", "b1": "B", "b2": "B", "c1": "C", "c2": "C"}
    placement = place_replicas(sorted(racks), 2, racks)
    for node, peers in placement.items():
        assert {racks[p] for p in peers} == {"A", "B", "C"} - {racks[node]}, (node, peers)
    loads = [sum(n in p for p in placement.values()) for n in racks]
    assert loads == [2] * 6
    with pytest.raises(ValueError, match="k must be >= 0"):
        place_replicas(["a"], -1)
    with pytest.raises(ValueError, match="duplicate"):
        place_replicas(["a", "a"], 1)
