"""Snapshot replication between agents: why a lost node loses no worker state.

Each agent streams its workers' newest snapshots to k peer agents on other nodes
(`place_replicas` picks them, across failure domains) and serves snapshots back to peers
and joining workers, over the `SnapshotPeer` gRPC service (proto/peer.proto).

A snapshot is `(worker_id, step, meta, data)`: a small opaque header and a large flat
buffer, shipped as one byte space (meta, then data) in chunks that each carry a CRC-32 of
their bytes; the first chunk's header carries the CRC-32 of the whole. Both ends read the
bytes once: the whole checksum is folded from the chunk CRCs (`crc32_combine`), so the
sender's one pass computes both and the receiver's one pass checks both.

Memory stays bounded on both sides. The sender yields chunks lazily from the caller's
buffer (one chunk copied at a time), and gRPC consumes the generator only as HTTP/2 flow
control admits: a slow receiver stalls the sender. The receiver writes each chunk straight
into a buffer preallocated from the header's sizes.

`ReplicaStore` keeps, per (job, source worker), the newest complete replica and at most one
in transit: a newer replica replaces the older one only once complete and verified (the
design's double buffering). Everything held or reserved counts against a budget; a push
that does not fit is refused up front with an error naming the flag to raise. Every
refusal leaves the store as it was.
"""

from __future__ import annotations

import functools
import logging
import mmap
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, NamedTuple, NoReturn

import grpc
from google.protobuf.message import DecodeError

from splice.proto import peer_pb2 as pb
from splice.proto import peer_pb2_grpc as pb_grpc

log = logging.getLogger("splice.agent")

MiB = 1024 * 1024
DEFAULT_CHUNK_BYTES = MiB
MAX_CHUNK_BYTES = 16 * MiB
MAX_META_BYTES = MiB
# A chunk message is its bytes plus a few dozen of framing; the first also has a header.
_MESSAGE_LIMIT = MAX_CHUNK_BYTES + 64 * 1024
GRPC_OPTIONS = [("grpc.max_receive_message_length", _MESSAGE_LIMIT),
                ("grpc.max_send_message_length", _MESSAGE_LIMIT)]
# The server pings an idle stream's client, so a push whose sender vanished without a word
# (host lost, half-open TCP) releases its reserved memory within ~30 s, not at its deadline.
SERVER_OPTIONS = [("grpc.keepalive_time_ms", 20_000), ("grpc.keepalive_timeout_ms", 10_000)]
BUDGET_FLAG = "--replica-budget-mb"

# `data` may be anything exposing bytes (memoryview, bytearray, mmap) or a uint8 1-D CPU
# torch.Tensor; torch stays out of the agent's imports (tests/test_layers.py).
Buffer = Any
Provider = Callable[[str, str, int], "tuple[int, bytes | memoryview, Buffer] | None"]


# ---- errors ---------------------------------------------------------------------------------

class ReplicationError(Exception):
    """A push or fetch was refused; `code` is the gRPC status it travels as."""

    code = grpc.StatusCode.UNKNOWN


class ReplicaBudgetExceeded(ReplicationError):
    """Accepting the replica would take replica memory past the budget: raise the budget."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class SnapshotCorrupt(ReplicationError):
    """Bytes failed a chunk CRC or the whole snapshot's checksum: fetch from another holder."""

    code = grpc.StatusCode.DATA_LOSS


class MalformedStream(ReplicationError):
    """The chunks do not form the announced snapshot (missing header, gap, overlap, size)."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class UnknownJob(ReplicationError):
    """The push or fetch names another job than the one this agent serves."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class StaleReplica(ReplicationError):
    """The store already holds this worker's snapshot at this or a newer (epoch, step)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class AlreadyHeld(StaleReplica):
    """The very same (epoch, step) is held already: nothing to do."""

    code = grpc.StatusCode.ALREADY_EXISTS


class ReplicaBusy(ReplicationError):
    """Another push of this worker's snapshot is in transit; retry when it has ended."""

    code = grpc.StatusCode.ABORTED


class SnapshotNotHeld(ReplicationError):
    """The peer holds no such snapshot."""

    code = grpc.StatusCode.NOT_FOUND


class FetchFailed(ReplicationError):
    """No holder could supply an intact snapshot; the message names each one and why.
    The caller falls back to the persistent checkpoint."""

    code = grpc.StatusCode.UNAVAILABLE


# ---- checksums ------------------------------------------------------------------------------

def _gf2_times(matrix: Sequence[int], vector: int) -> int:
    out, i = 0, 0
    while vector:
        if vector & 1:
            out ^= matrix[i]
        vector >>= 1
        i += 1
    return out


def _gf2_compose(a: Sequence[int], b: Sequence[int]) -> tuple[int, ...]:
    """The operator `a` after `b`."""
    return tuple(_gf2_times(a, col) for col in b)


@functools.cache
def _zeros_power(k: int) -> tuple[int, ...]:
    """The CRC-32 operator for appending 2**k zero bytes (zlib's crc32_combine matrices)."""
    if k == 0:
        op: tuple[int, ...] = (0xEDB88320, *(1 << n for n in range(31)))  # one zero bit
        for _ in range(3):
            op = _gf2_compose(op, op)
        return op
    half = _zeros_power(k - 1)
    return _gf2_compose(half, half)


@functools.lru_cache(maxsize=128)
def _zeros_operator(length: int) -> tuple[int, ...]:
    op: tuple[int, ...] = tuple(1 << n for n in range(32))
    k = 0
    while length:
        if length & 1:
            op = _gf2_compose(_zeros_power(k), op)
        length >>= 1
        k += 1
    return op


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """CRC-32 of A ++ B from CRC-32(A), CRC-32(B) and len(B), as zlib's crc32_combine.
    A few microseconds once the operator for len2 is cached (chunks share a few lengths)."""
    return _gf2_times(_zeros_operator(len2), crc1) ^ crc2 if len2 else crc1


def _byte_view(data: Buffer) -> memoryview:
    """A flat byte view of `data`, without copying."""
    if hasattr(data, "data_ptr"):  # a torch tensor; torch is loaded by whoever made it
        import torch
        if not (data.dtype == torch.uint8 and data.dim() == 1 and data.device.type == "cpu"
                and data.is_contiguous()):
            raise ValueError(f"snapshot data must be a uint8 1-D contiguous CPU tensor, got "
                             f"{data.dtype} {tuple(data.shape)} on {data.device}")
        return memoryview(data.numpy())
    view = memoryview(data)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def _size(num_bytes: int) -> str:
    return f"{num_bytes / MiB:.1f} MiB" if num_bytes >= MiB // 10 else f"{num_bytes} bytes"


def _allocate(size_bytes: int) -> memoryview:
    """A zeroed writable buffer of anonymous memory, returned to the system when the last
    view goes. Its pages are faulted in up front (MAP_POPULATE: in one go, ~25 % faster
    than page by page as chunks land), so RSS matches what the budget accounts."""
    if not size_bytes:
        return memoryview(bytearray())
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)
    return memoryview(mmap.mmap(-1, size_bytes, flags=flags))


# ---- chunks out -----------------------------------------------------------------------------

def _slices(meta: memoryview, data: memoryview, chunk_bytes: int) -> list[memoryview]:
    if not 0 < chunk_bytes <= MAX_CHUNK_BYTES:
        raise ValueError(f"chunk_bytes must be in (0, {MAX_CHUNK_BYTES}], got {chunk_bytes}")
    return ([meta[i:i + chunk_bytes] for i in range(0, len(meta), chunk_bytes)]
            + [data[i:i + chunk_bytes] for i in range(0, len(data), chunk_bytes)])


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def encode_chunk(offset: int, part: memoryview | bytes, crc: int,
                 header: pb.SnapshotHeader | None = None) -> bytes:
    """A SnapshotChunk's wire bytes, as `SerializeToString` makes them, with one copy of
    `part` (building the message and serialising it would copy it three times)."""
    head = bytearray()
    if header is not None:
        raw = header.SerializeToString()
        head += b"\x0a" + _varint(len(raw)) + raw
    if offset:
        head += b"\x10" + _varint(offset)
    if len(part):
        head += b"\x1a" + _varint(len(part))
    return b"".join((head, part, b"\x20" + _varint(crc) if crc else b""))


def snapshot_chunks(header: pb.SnapshotHeader, meta: bytes | memoryview, data: Buffer,
                    chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[bytes]:
    """The encoded SnapshotChunk messages of one snapshot, made lazily: one chunk's bytes
    copied at a time.

    The sizes and `checksum` of `header` are filled in here. The chunk CRCs are all taken
    before the first chunk leaves (one pass, folded into the whole checksum), so bytes that
    change while streaming fail the receiver's check instead of arriving torn."""
    meta_view, data_view = memoryview(meta).cast("B"), _byte_view(data)
    if len(meta_view) > MAX_META_BYTES:
        raise ValueError(f"snapshot meta is {len(meta_view)} bytes, over {MAX_META_BYTES}")
    parts = _slices(meta_view, data_view, chunk_bytes)
    crcs = [zlib.crc32(p) for p in parts]
    whole = 0
    for part, crc in zip(parts, crcs, strict=True):
        whole = crc32_combine(whole, crc, len(part))
    first = pb.SnapshotHeader()
    first.CopyFrom(header)
    first.meta_bytes, first.data_bytes, first.checksum = len(meta_view), len(data_view), whole
    yield from _encoded(first, parts, crcs)


def _encoded(header: pb.SnapshotHeader, parts: list[memoryview],
             crcs: Sequence[int] | None) -> Iterator[bytes]:
    """Chunks of `parts`, the first with the header; CRCs taken as they go if not given."""
    if not parts:
        yield encode_chunk(0, b"", 0, header)
    offset = 0
    for i, part in enumerate(parts):
        crc = crcs[i] if crcs is not None else zlib.crc32(part)
        yield encode_chunk(offset, part, crc, header if i == 0 else None)
        offset += len(part)


# ---- chunks in ------------------------------------------------------------------------------

class Chunk(NamedTuple):
    """A decoded SnapshotChunk; `data` is a view into the received message's bytes."""
    header: pb.SnapshotHeader | None
    offset: int
    data: memoryview
    crc32: int
    error: str = ""  # not a well-formed SnapshotChunk: why


def _read_varint(raw: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(raw) or shift > 63:
            raise ValueError("truncated or overlong varint")
        byte = raw[pos]
        value |= (byte & 0x7F) << shift
        pos += 1
        shift += 7
        if byte < 0x80:
            return value, pos


def decode_chunk(raw: bytes) -> Chunk:
    """Parse SnapshotChunk wire bytes as protobuf would, but leave `data` in place (the
    generated parser copies it once, and each read of the field once more). Never raises:
    a malformed message comes back with `error` set, refused by whoever reads it."""
    view, pos = memoryview(raw), 0
    header, offset, data, crc = None, 0, view[0:0], 0
    try:
        while pos < len(raw):
            key, pos = _read_varint(raw, pos)
            field, wire = key >> 3, key & 7
            if not 0 < field < 1 << 29:
                raise ValueError(f"field number {field}")
            if wire == 0:
                value, pos = _read_varint(raw, pos)
                if field == 2:
                    offset = value
                elif field == 4:
                    crc = value & 0xFFFFFFFF
            elif wire == 2:
                size, pos = _read_varint(raw, pos)
                if pos + size > len(raw):
                    raise ValueError("length-delimited field past the end")
                if field == 1:
                    header = header or pb.SnapshotHeader()
                    header.MergeFromString(view[pos:pos + size].tobytes())
                elif field == 3:
                    data = view[pos:pos + size]
                pos += size
            elif wire in (1, 5):
                pos += 8 if wire == 1 else 4
            else:
                raise ValueError(f"wire type {wire}")
        if pos != len(raw):
            raise ValueError("truncated fixed-width field")
    except (ValueError, DecodeError) as e:
        return Chunk(None, 0, view[0:0], 0, f"malformed SnapshotChunk ({e})")
    return Chunk(header, offset, data, crc)


class _Assembly:
    """One snapshot's chunks written in order into preallocated buffers, each chunk's CRC
    checked on arrival and folded into the whole checksum."""

    def __init__(self, header: pb.SnapshotHeader, meta: memoryview, data: memoryview) -> None:
        self.header, self.meta, self.data = header, meta, data
        self.received = 0
        self._crc = 0

    @property
    def total(self) -> int:
        return self.header.meta_bytes + self.header.data_bytes

    def write(self, chunk: Chunk) -> None:
        data = chunk.data
        h, n, offset = self.header, len(data), chunk.offset
        name = f"{h.job_id}/{h.worker_id} step {h.step}"
        if offset != self.received:
            kind = "gap" if offset > self.received else "overlap"
            raise MalformedStream(f"snapshot {name}: chunk at offset {offset} after "
                                  f"{self.received} bytes ({kind})")
        end = offset + n
        if end > self.total:
            raise MalformedStream(f"snapshot {name}: chunk ends at byte {end}, past the "
                                  f"announced {self.total}")
        if offset < h.meta_bytes < end:
            raise MalformedStream(f"snapshot {name}: chunk at {offset} spans the end of meta "
                                  f"({h.meta_bytes})")
        crc = zlib.crc32(data)
        if crc != chunk.crc32:
            raise SnapshotCorrupt(f"snapshot {name}: chunk at offset {offset} ({n} bytes) "
                                  f"fails its CRC-32 ({crc:#010x}, sent {chunk.crc32:#010x})")
        if end <= h.meta_bytes:
            self.meta[offset:end] = data
        else:
            self.data[offset - h.meta_bytes:end - h.meta_bytes] = data
        self._crc = crc32_combine(self._crc, crc, n)
        self.received = end

    def finish(self) -> None:
        h = self.header
        name = f"{h.job_id}/{h.worker_id} step {h.step}"
        if self.received != self.total:
            raise MalformedStream(f"snapshot {name}: stream ended after {self.received} of "
                                  f"{self.total} bytes")
        if self._crc != h.checksum:
            raise SnapshotCorrupt(f"snapshot {name}: checksum {self._crc:#010x} of the bytes "
                                  f"received, {h.checksum:#010x} announced")


def _check_header(header: pb.SnapshotHeader) -> None:
    if not header.worker_id:
        raise MalformedStream("snapshot header without a worker id")
    if header.meta_bytes > MAX_META_BYTES:
        raise MalformedStream(f"snapshot {header.job_id}/{header.worker_id}: meta of "
                              f"{header.meta_bytes} bytes, over the {MAX_META_BYTES} limit")


# ---- the store ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Replica:
    job_id: str
    worker_id: str
    step: int
    epoch: int
    checksum: int          # CRC-32 of meta ++ data, verified on arrival
    meta: memoryview
    data: memoryview

    @property
    def size_bytes(self) -> int:
        return len(self.meta) + len(self.data)


class ReplicaStore:
    """Replicas of other nodes' worker snapshots, in host memory, within a budget.

    Per (job, worker): the newest complete replica and at most one in transit. Ordering is
    by (epoch, step): after a recovery a new epoch may restart from an older step, and its
    snapshots supersede the old epoch's. `budget_bytes` 0 means no limit."""

    def __init__(self, budget_bytes: int, *, job_id: str) -> None:
        if budget_bytes < 0:
            raise ValueError(f"{BUDGET_FLAG} must be >= 0, got {budget_bytes / MiB:g}")
        self.budget_bytes = budget_bytes
        self.job_id = job_id
        self._lock = threading.Lock()
        self._held: dict[tuple[str, str], Replica] = {}
        self._transit: dict[tuple[str, str], Transit] = {}

    @property
    def bytes_held(self) -> int:
        with self._lock:
            return sum(r.size_bytes for r in self._held.values())

    @property
    def bytes_in_transit(self) -> int:
        with self._lock:
            return sum(t.size_bytes for t in self._transit.values())

    def begin(self, header: pb.SnapshotHeader) -> Transit:
        """Reserve memory for an incoming replica; refused (nothing changed) if the job is
        not ours, the step is not newer than held, one is already in transit, or the
        budget would be exceeded."""
        _check_header(header)
        key = (header.job_id, header.worker_id)
        name = f"{header.job_id}/{header.worker_id}"
        if header.job_id != self.job_id:
            raise UnknownJob(f"replica of {name} refused: this agent serves job "
                             f"{self.job_id!r}, not {header.job_id!r}")
        size = header.meta_bytes + header.data_bytes
        with self._lock:
            held = self._held.get(key)
            if held is not None:
                new, old = (header.epoch, header.step), (held.epoch, held.step)
                if new == old:
                    raise AlreadyHeld(f"replica of {name} step {header.step} (epoch "
                                      f"{header.epoch}) is held already")
                if new < old:
                    raise StaleReplica(f"replica of {name} step {header.step} (epoch "
                                       f"{header.epoch}) refused: step {held.step} (epoch "
                                       f"{held.epoch}) is held, which is newer")
            if key in self._transit:
                busy = self._transit[key].header
                raise ReplicaBusy(f"replica of {name} step {header.step} refused: step "
                                  f"{busy.step} is in transit")
            held_bytes = sum(r.size_bytes for r in self._held.values())
            transit_bytes = sum(t.size_bytes for t in self._transit.values())
            if self.budget_bytes and held_bytes + transit_bytes + size > self.budget_bytes:
                raise ReplicaBudgetExceeded(
                    f"replica of {name} step {header.step} needs {_size(size)}; the replica "
                    f"budget is {_size(self.budget_bytes)}, with {_size(held_bytes)} held and "
                    f"{_size(transit_bytes)} in transit (a replica needs room for itself "
                    f"beside the one it replaces); raise {BUDGET_FLAG}")
            transit = Transit(self, key, header)
            self._transit[key] = transit
        return transit

    def get(self, job_id: str, worker_id: str, step: int = 0) -> Replica | None:
        """The complete replica of that worker at `step` (0: the newest held)."""
        with self._lock:
            replica = self._held.get((job_id, worker_id))
        return replica if replica is not None and step in (0, replica.step) else None

    def holdings(self) -> list[Replica]:
        with self._lock:
            return sorted(self._held.values(), key=lambda r: (r.job_id, r.worker_id))

    def drop(self, job_id: str, worker_id: str) -> None:
        """Forget a worker's replica (it left the job), freeing its memory."""
        with self._lock:
            self._held.pop((job_id, worker_id), None)

    def _end(self, transit: Transit, replica: Replica | None) -> None:
        with self._lock:
            if self._transit.get(transit.key) is transit:
                del self._transit[transit.key]
                if replica is not None:
                    self._held[transit.key] = replica


class Transit:
    """A replica being received: its memory is reserved; `commit` swaps it in once whole
    and verified, `abort` releases it. The held replica is untouched until `commit`."""

    def __init__(self, store: ReplicaStore, key: tuple[str, str],
                 header: pb.SnapshotHeader) -> None:
        self.store, self.key, self.header = store, key, header
        self.size_bytes = header.meta_bytes + header.data_bytes
        self._assembly: _Assembly | None = None  # buffers allocated on the first write

    def write(self, chunk: Chunk) -> None:
        if self._assembly is None:
            self._assembly = _Assembly(self.header, memoryview(bytearray(
                self.header.meta_bytes)), _allocate(self.header.data_bytes))
        self._assembly.write(chunk)

    def commit(self) -> Replica:
        if self._assembly is None:  # header-only push of an empty snapshot
            self._assembly = _Assembly(self.header, memoryview(bytearray()), _allocate(0))
        try:
            self._assembly.finish()
        except ReplicationError:
            self.abort()
            raise
        h = self.header
        replica = Replica(h.job_id, h.worker_id, h.step, h.epoch, h.checksum,
                          self._assembly.meta, self._assembly.data)
        self.store._end(self, replica)
        return replica

    def abort(self) -> None:
        self._assembly = None
        self.store._end(self, None)


# ---- the service ----------------------------------------------------------------------------

class SnapshotPeerServicer(pb_grpc.SnapshotPeerServicer):
    """Receives replicas into `store`; serves the node's own workers' snapshots (from
    `provider`, looked at first) and the replicas held."""

    def __init__(self, store: ReplicaStore, provider: Provider | None = None) -> None:
        self.store, self.provider = store, provider

    def Push(self, request_iterator: Iterator[Chunk],
             context: grpc.ServicerContext) -> pb.PushAck:
        transit: Transit | None = None
        try:
            for chunk in request_iterator:
                if chunk.error:
                    raise MalformedStream(f"push refused: {chunk.error}")
                if transit is None:
                    if chunk.header is None:
                        raise MalformedStream("push refused: the first chunk has no header")
                    transit = self.store.begin(chunk.header)
                elif chunk.header is not None:
                    raise MalformedStream("push refused: a header after the first chunk")
                transit.write(chunk)
            if transit is None:
                raise MalformedStream("push refused: no chunks")
            replica, transit = transit.commit(), None
            return pb.PushAck(bytes_received=replica.size_bytes,
                              bytes_held=self.store.bytes_held)
        except ReplicationError as e:
            log.warning("%s", e)
            _abort(context, e)
        finally:
            if transit is not None:  # refused, or the sender went away mid-stream
                transit.abort()

    def Fetch(self, request: pb.FetchRequest,
              context: grpc.ServicerContext) -> Iterator[bytes]:
        chunk_bytes = request.chunk_bytes or DEFAULT_CHUNK_BYTES
        name = f"{request.job_id}/{request.worker_id} step {request.step or 'newest'}"
        if request.job_id != self.store.job_id:
            _abort(context, UnknownJob(f"fetch of {name}: this agent serves job "
                                       f"{self.store.job_id!r}"))
        if not 0 < chunk_bytes <= MAX_CHUNK_BYTES:
            _abort(context, MalformedStream(f"fetch of {name}: chunk_bytes {chunk_bytes} "
                                            f"not in (0, {MAX_CHUNK_BYTES}]"))
        own = (self.provider(request.job_id, request.worker_id, request.step)
               if self.provider is not None else None)
        if own is not None:
            step, meta, data = own
            header = pb.SnapshotHeader(job_id=request.job_id, worker_id=request.worker_id,
                                       step=step)
            yield from snapshot_chunks(header, meta, data, chunk_bytes)
            return
        replica = self.store.get(request.job_id, request.worker_id, request.step)
        if replica is None:
            held = self.store.get(request.job_id, request.worker_id)
            _abort(context, SnapshotNotHeld(f"fetch of {name}: not held here" + (
                f" (replica of step {held.step} is)" if held is not None else "")))
            return
        yield from _replica_chunks(replica, chunk_bytes)

    def List(self, request: pb.ListRequest, context: grpc.ServicerContext) -> pb.Holdings:
        out = pb.Holdings(bytes_held=self.store.bytes_held,
                          bytes_in_transit=self.store.bytes_in_transit,
                          budget_bytes=self.store.budget_bytes)
        for r in self.store.holdings():
            if request.job_id in ("", r.job_id):
                out.holdings.add(job_id=r.job_id, worker_id=r.worker_id, step=r.step,
                                 epoch=r.epoch, bytes=r.size_bytes, replica=True)
        return out


_KIND_KEY = "splice-refusal"  # trailing metadata: the ReplicationError subclass's name


def _abort(context: grpc.ServicerContext, e: ReplicationError) -> NoReturn:
    context.set_trailing_metadata(((_KIND_KEY, type(e).__name__),))
    context.abort(e.code, str(e))
    raise AssertionError("context.abort returned")


def _replica_chunks(replica: Replica, chunk_bytes: int) -> Iterator[bytes]:
    """A held replica's chunks with its recorded checksum (not a fresh one), so damage at
    rest shows at the fetcher."""
    header = pb.SnapshotHeader(job_id=replica.job_id, worker_id=replica.worker_id,
                               step=replica.step, epoch=replica.epoch,
                               meta_bytes=len(replica.meta), data_bytes=len(replica.data),
                               checksum=replica.checksum)
    yield from _encoded(header, _slices(replica.meta, replica.data, chunk_bytes), None)


def add_to_server(servicer: SnapshotPeerServicer, server: grpc.Server) -> None:
    """Register `servicer`; Fetch's chunks go out as the bytes `snapshot_chunks` encodes."""
    handlers = {
        "Push": grpc.stream_unary_rpc_method_handler(
            servicer.Push, request_deserializer=decode_chunk,
            response_serializer=pb.PushAck.SerializeToString),
        "Fetch": grpc.unary_stream_rpc_method_handler(
            servicer.Fetch, request_deserializer=pb.FetchRequest.FromString),
        "List": grpc.unary_unary_rpc_method_handler(
            servicer.List, request_deserializer=pb.ListRequest.FromString,
            response_serializer=pb.Holdings.SerializeToString),
    }
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("splice.v1.SnapshotPeer", handlers),))


@dataclass
class PeerServer:
    server: grpc.Server
    port: int

    @property
    def address(self) -> str:
        return f"localhost:{self.port}"

    def stop(self, grace_s: float | None = None) -> None:
        self.server.stop(grace_s).wait()


def serve(store: ReplicaStore, address: str, provider: Provider | None = None, *,
          max_workers: int = 8,
          options: Sequence[tuple[str, int | str]] = ()) -> PeerServer:
    """Start the SnapshotPeer service on `address` ("host:0" picks a free port). Each
    stream holds one server thread while it runs. `options`: extra gRPC server options."""
    server = grpc.server(ThreadPoolExecutor(max_workers=max_workers,
                                            thread_name_prefix="splice-peer"),
                         options=[*GRPC_OPTIONS, *SERVER_OPTIONS, *options])
    add_to_server(SnapshotPeerServicer(store, provider), server)
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot listen on {address} for snapshot peers")
    server.start()
    return PeerServer(server, port)


# ---- the client -----------------------------------------------------------------------------

def channel_to(address: str) -> grpc.Channel:
    return grpc.insecure_channel(address, options=GRPC_OPTIONS)


def _error(e: grpc.RpcError) -> str:
    return f"{e.code().name}: {e.details()}"  # type: ignore[attr-defined]


def push(target: str | grpc.Channel, job_id: str, worker_id: str, step: int, epoch: int,
         meta: bytes | memoryview, data: Buffer, chunk_bytes: int = DEFAULT_CHUNK_BYTES, *,
         timeout_s: float = 300.0) -> pb.PushAck:
    """Stream one snapshot to a peer, chunk by chunk as flow control admits (a slow peer
    stalls this call; memory stays at a few chunks). Raises the ReplicationError subclass
    of the peer's refusal (ReplicaBudgetExceeded, AlreadyHeld, ...), or a plain
    ReplicationError with the gRPC code (UNAVAILABLE, DEADLINE_EXCEEDED) otherwise."""
    channel = channel_to(target) if isinstance(target, str) else target
    header = pb.SnapshotHeader(job_id=job_id, worker_id=worker_id, step=step, epoch=epoch)
    try:
        return push_chunks(channel, snapshot_chunks(header, meta, data, chunk_bytes),
                           timeout_s=timeout_s)
    finally:
        if isinstance(target, str):
            channel.close()


def push_chunks(channel: grpc.Channel, chunks: Iterator[bytes], *,
                timeout_s: float = 300.0) -> pb.PushAck:
    """The Push call over already encoded chunks (`snapshot_chunks`); gRPC pulls the next
    one only when flow control lets it send."""
    call = channel.stream_unary("/splice.v1.SnapshotPeer/Push",
                                response_deserializer=pb.PushAck.FromString)
    try:
        return call(chunks, timeout=timeout_s)
    except grpc.RpcError as e:
        raise _refusal(e) from None


_REFUSALS: dict[str, type[ReplicationError]] = {
    cls.__name__: cls for cls in (ReplicaBudgetExceeded, SnapshotCorrupt, MalformedStream,
                                  UnknownJob, StaleReplica, AlreadyHeld, ReplicaBusy,
                                  SnapshotNotHeld)}


def _refusal(e: grpc.RpcError) -> ReplicationError:
    """The peer's refusal as the matching ReplicationError subclass."""
    trailers = dict(e.trailing_metadata() or ())  # type: ignore[attr-defined]
    cls = _REFUSALS.get(trailers.get(_KIND_KEY, ""), ReplicationError)
    err = cls(e.details() or _error(e))  # type: ignore[attr-defined]
    err.code = e.code()  # type: ignore[attr-defined]
    return err


class Fetched(NamedTuple):
    step: int
    meta: bytes
    data: Any  # torch.Tensor, uint8, 1-D


def _receive(stream: Iterator[Chunk], job_id: str, worker_id: str,
             step: int) -> Fetched:
    """One holder's stream into a fresh tensor, every chunk and the whole checked."""
    import torch  # the fetched buffer is handed to the worker as a tensor

    assembly: _Assembly | None = None
    tensor = None
    for chunk in stream:
        if chunk.error:
            raise MalformedStream(chunk.error)
        if assembly is None:
            if chunk.header is None:
                raise MalformedStream("first chunk without a header")
            h = chunk.header
            _check_header(h)
            if (h.job_id, h.worker_id) != (job_id, worker_id) or step not in (0, h.step):
                raise MalformedStream(f"sent {h.job_id}/{h.worker_id} step {h.step}")
            tensor = torch.empty(h.data_bytes, dtype=torch.uint8)
            assembly = _Assembly(h, memoryview(bytearray(h.meta_bytes)),
                                 tensor.numpy().data)
        assembly.write(chunk)
    if assembly is None:
        raise MalformedStream("empty stream")
    assembly.finish()
    return Fetched(assembly.header.step, bytes(assembly.meta), tensor)


def fetch(addresses: Sequence[str], job_id: str, worker_id: str, step: int = 0, *,
          timeout_s: float = 300.0, connect_timeout_s: float = 2.0,
          chunk_bytes: int = 0) -> Fetched:
    """A worker's snapshot from the first holder that supplies it intact, trying
    `addresses` in order. A holder that lacks it, cannot be reached within
    `connect_timeout_s`, fails or breaks the stream, or sends bytes that fail a chunk CRC
    or the whole checksum is logged and skipped; FetchFailed names every holder tried."""
    reasons: list[str] = []
    request = pb.FetchRequest(job_id=job_id, worker_id=worker_id, step=step,
                              chunk_bytes=chunk_bytes)
    for address in addresses:
        channel = channel_to(address)
        stub = pb_grpc.SnapshotPeerStub(channel)
        connected = False
        try:
            # A cheap call first, so an unreachable holder costs at most connect_timeout_s
            # (a refused connection fails at once), not the transfer's timeout.
            # (channel_ready_future would do, but polls: ~0.2 s even when reachable.)
            stub.List(pb.ListRequest(job_id="\0"), timeout=connect_timeout_s)
            connected = True
            call = channel.unary_stream("/splice.v1.SnapshotPeer/Fetch",
                                        request_serializer=pb.FetchRequest.SerializeToString,
                                        response_deserializer=decode_chunk)
            fetched = _receive(call(request, timeout=timeout_s), job_id, worker_id, step)
            log.info("fetched %s/%s step %d (%d bytes of data) from %s", job_id, worker_id,
                     fetched.step, len(fetched.data), address)
            return fetched
        except grpc.RpcError as e:
            reason = _error(e) if connected else \
                f"unreachable within {connect_timeout_s:g} s ({_error(e)})"
        except ReplicationError as e:
            reason = f"{type(e).__name__}: {e}"
        finally:
            channel.close()
        log.warning("fetch of %s/%s step %s from %s failed (%s); trying the next holder",
                    job_id, worker_id, step or "newest", address, reason)
        reasons.append(f"{address}: {reason}")
    raise FetchFailed(f"no intact snapshot of {job_id}/{worker_id} step {step or 'newest'} "
                      f"from any holder: " + ("; ".join(reasons) or "no holders given"))


# ---- pushing the node's snapshots -----------------------------------------------------------

LocalSnapshot = tuple[str, int, int, "bytes | memoryview", Buffer]  # worker, step, epoch, meta, data
PushFn = Callable[[str, str, int, int, "bytes | memoryview", Buffer], None]


@dataclass(frozen=True)
class ReplicatorStats:
    bytes_pushed: int
    pushes_ok: int
    pushes_failed: int
    last_push_s: float       # duration of the last successful push
    lag_steps: int           # max over workers and peers: newest local step - step pushed
    in_flight: int


class Replicator:
    """Pushes each local worker's newest snapshot to the node's peers, on its own thread.

    Each round reads `snapshots()` (the newest committed snapshot of each local worker)
    and `peers()`; a worker whose snapshot is newer than what a peer holds from us gets one
    push task, unless one is in flight already: steps committed meanwhile are skipped, the
    next round sends the newest. Rounds run every `interval_s` and on `poke()`."""

    def __init__(self, job_id: str, snapshots: Callable[[], list[LocalSnapshot]],
                 peers: Callable[[], list[str]], *, interval_s: float = 0.5,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES, timeout_s: float = 300.0,
                 max_concurrent_pushes: int = 2, push_fn: PushFn | None = None) -> None:
        self.job_id, self.interval_s = job_id, interval_s
        self._snapshots, self._peers = snapshots, peers
        self._chunk_bytes, self._timeout_s = chunk_bytes, timeout_s
        self._push_fn = push_fn or self._push_grpc
        self._pool = ThreadPoolExecutor(max_concurrent_pushes, thread_name_prefix="splice-repl")
        self._cond = threading.Condition()
        self._channels: dict[str, grpc.Channel] = {}
        self._pushed: dict[tuple[str, str], tuple[int, int]] = {}  # (worker, peer) -> (epoch, step)
        self._newest: dict[str, tuple[int, int]] = {}  # worker -> (epoch, step) committed
        self._peers_seen: list[str] = []
        self._in_flight: set[str] = set()
        self._bytes = self._ok = self._failed = 0
        self._last_s = 0.0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="splice-replicator", daemon=True)

    def start(self) -> Replicator:
        self._thread.start()
        return self

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def poke(self) -> None:
        """A snapshot was committed: run a round now rather than at the next interval."""
        self._wake.set()

    def maybe_push(self) -> list[Future[None]]:
        """One round: start the pushes due; returns their futures."""
        peers = self._peers()
        with self._cond:
            self._peers_seen = list(peers)
        started = []
        for worker, step, epoch, meta, data in self._snapshots():
            with self._cond:
                self._newest[worker] = (epoch, step)
                if worker in self._in_flight or self._stop.is_set():
                    continue
                due = [p for p in peers if self._pushed.get((worker, p), (-1, -1)) < (epoch, step)]
                if not due:
                    continue
                self._in_flight.add(worker)
            started.append(self._pool.submit(self._push_one, worker, step, epoch, meta, data,
                                             due))
        return started

    def _push_one(self, worker: str, step: int, epoch: int, meta: bytes | memoryview,
                  data: Buffer, peers: list[str]) -> None:
        size = len(meta) + len(_byte_view(data))
        try:
            for peer in peers:
                t0 = time.perf_counter()
                try:
                    self._push_fn(peer, worker, step, epoch, meta, data)
                except AlreadyHeld:
                    pass
                except (ReplicationError, grpc.RpcError, OSError) as e:
                    log.warning("replica of %s step %d to %s failed: %s", worker, step, peer, e)
                    with self._cond:
                        self._failed += 1
                    continue
                with self._cond:
                    self._pushed[(worker, peer)] = (epoch, step)
                    self._ok += 1
                    self._bytes += size
                    self._last_s = time.perf_counter() - t0
                    self._cond.notify_all()
        finally:
            with self._cond:
                self._in_flight.discard(worker)
                self._cond.notify_all()
            self._wake.set()  # a newer step may have been committed meanwhile

    def _push_grpc(self, peer: str, worker: str, step: int, epoch: int,
                   meta: bytes | memoryview, data: Buffer) -> None:
        with self._cond:
            channel = self._channels.get(peer)
            if channel is None:
                channel = self._channels[peer] = channel_to(peer)
        push(channel, self.job_id, worker, step, epoch, meta, data, self._chunk_bytes,
             timeout_s=self._timeout_s)

    def stats(self) -> ReplicatorStats:
        with self._cond:
            lag = 0
            for worker, (epoch, newest) in self._newest.items():
                for peer in self._peers_seen:
                    held_epoch, held = self._pushed.get((worker, peer), (epoch, 0))
                    lag = max(lag, newest - (held if held_epoch == epoch else 0))
            return ReplicatorStats(self._bytes, self._ok, self._failed, self._last_s, lag,
                                   len(self._in_flight))

    def wait_pushed(self, worker_id: str, step: int, peer: str, timeout_s: float) -> bool:
        """Block until `peer` holds `worker_id`'s `step` (or newer) from us, up to timeout_s."""
        with self._cond:
            return self._cond.wait_for(
                lambda: self._pushed.get((worker_id, peer), (0, -1))[1] >= step, timeout_s)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.maybe_push()
            except Exception:
                log.exception("replication round failed")
            self._wake.wait(self.interval_s)
            self._wake.clear()

    def close(self) -> None:
        """Stop: no new pushes; those in flight are cancelled (their channels closed)."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join()
        with self._cond:
            channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            channel.close()
        self._pool.shutdown(wait=True)


# ---- placement ------------------------------------------------------------------------------

def place_replicas(nodes: Sequence[str], k: int,
                   domain_of: Mapping[str, str] | Callable[[str], str] | None = None,
                   ) -> dict[str, list[str]]:
    """Each node's k peers to hold its workers' replicas. Pure.

    A node's peers are on other nodes and, whenever k nodes outside its failure domain
    (`domain_of`: rack, zone; default: each node its own) exist, outside its domain.
    Nodes are ordered round-robin over the domains (largest first) and each takes as peers
    the nodes 1, 2, 3, ... places after it, skipping its own domain (a second pass takes
    those only where too few others exist). Every shift is a bijection, so nodes that
    accept the same shifts receive exactly k replicas each: always without domains, and
    with domains of equal size; with unequal ones, about k. With fewer than k other
    nodes, each gets all the others."""
    if k < 0:
        raise ValueError(f"replica count k must be >= 0, got {k}")
    if len(set(nodes)) != len(nodes):
        raise ValueError(f"duplicate node ids in {list(nodes)}")
    if domain_of is None:
        domain: Callable[[str], str] = lambda n: n  # noqa: E731
    else:
        domain = domain_of.__getitem__ if isinstance(domain_of, Mapping) else domain_of
    by_domain: dict[str, list[str]] = {}
    for node in sorted(nodes):
        by_domain.setdefault(domain(node), []).append(node)
    groups = sorted(by_domain.values(), key=lambda g: (-len(g), g[0]))
    order = [g[i] for i in range(len(groups[0]) if groups else 0) for g in groups if i < len(g)]
    n, want = len(order), min(k, len(order) - 1)
    placement: dict[str, list[str]] = {node: [] for node in order}
    for same_domain in (False, True):
        for shift in range(1, n):
            if all(len(peers) == want for peers in placement.values()):
                break
            for i, node in enumerate(order):
                peers, target = placement[node], order[(i + shift) % n]
                if len(peers) < want and (domain(target) == domain(node)) == same_domain:
                    peers.append(target)
    return placement
