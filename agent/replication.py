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

Here: the store, the service and the client. The chunks' wire form and the errors are in
agent/replication_wire.py, the pushing `Replicator` and `place_replicas` in
agent/replicator.py.
"""

from __future__ import annotations

import itertools
import logging
import ssl
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, NamedTuple, NoReturn

import grpc

from splice.agent import bulk
from splice.agent.replication_wire import (  # noqa: F401 (the errors are this module's API too)
    DEFAULT_CHUNK_BYTES,
    MAX_CHUNK_BYTES,
    MAX_META_BYTES,
    AlreadyHeld,
    Buffer,
    Chunk,
    FetchFailed,
    MalformedStream,
    MiB,
    ReplicaBudgetExceeded,
    ReplicaBusy,
    ReplicationError,
    SnapshotChanged,
    SnapshotCorrupt,
    SnapshotNotHeld,
    StaleReplica,
    UnknownJob,
    _allocate,
    _Assembly,
    _check_header,
    _encoded,
    _size,
    _slices,
    crc32_combine,
    decode_chunk,
    encode_chunk,
    refusal,
    snapshot_chunks,
)
from splice.proto import peer_pb2 as pb
from splice.proto import peer_pb2_grpc as pb_grpc

log = logging.getLogger("splice.agent")

# A chunk message is its bytes plus a few dozen of framing; the first also has a header.
_MESSAGE_LIMIT = MAX_CHUNK_BYTES + 64 * 1024
GRPC_OPTIONS = [("grpc.max_receive_message_length", _MESSAGE_LIMIT),
                ("grpc.max_send_message_length", _MESSAGE_LIMIT)]
# The server pings an idle stream's client, so a push whose sender vanished without a word
# (host lost, half-open TCP) releases its reserved memory within ~30 s, not at its deadline.
SERVER_OPTIONS = [("grpc.keepalive_time_ms", 20_000), ("grpc.keepalive_timeout_ms", 10_000)]
BUDGET_FLAG = "--replica-budget-mb"

Provider = Callable[[str, str, int], "tuple[int, bytes | memoryview, Buffer] | None"]


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
        self.bulk_port = 0  # advertised in List once a BulkServer serves `source`

    def Push(self, request_iterator: Iterator[Chunk],
             context: grpc.ServicerContext) -> pb.PushAck:
        transit: Transit | None = None
        ended: list[Transit | None] = [None]  # the transit still to free when the call ends
        try:
            for chunk in request_iterator:
                if chunk.error:
                    raise MalformedStream(f"push refused: {chunk.error}")
                if transit is None:
                    if chunk.header is None:
                        raise MalformedStream("push refused: the first chunk has no header")
                    transit = self.store.begin(chunk.header)
                    # If the sender goes away, the reservation is freed when the call
                    # ends, even while this thread still waits for the next chunk.
                    context.add_callback(lambda t=transit: t.abort() if t is ended[0]
                                         else None)
                    ended[0] = transit
                elif chunk.header is not None:
                    raise MalformedStream("push refused: a header after the first chunk")
                transit.write(chunk)
            if transit is None:
                raise MalformedStream("push refused: no chunks")
            ended[0] = None
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
        try:
            if not 0 < chunk_bytes <= MAX_CHUNK_BYTES:
                raise MalformedStream(f"fetch of {_name(request)}: chunk_bytes {chunk_bytes} "
                                      f"not in (0, {MAX_CHUNK_BYTES}]")
            source = self.source(request)
        except ReplicationError as e:
            _abort(context, e)
        if source.checksum is None:  # the node's own snapshot: CRCs taken as it goes out
            yield from snapshot_chunks(source.header, source.meta, source.data, chunk_bytes)
            return
        h = source.header
        yield from _encoded(h, _slices(source.meta, source.data, chunk_bytes), None)

    def source(self, request: pb.FetchRequest) -> bulk.Source:
        """What a fetch of `request` sends: a local worker's snapshot (from `provider`,
        looked at first; its checksum taken as it goes), else the replica held (with the
        checksum recorded on arrival, so damage at rest shows at the fetcher). Raises
        UnknownJob or SnapshotNotHeld."""
        name = _name(request)
        if request.job_id != self.store.job_id:
            raise UnknownJob(f"fetch of {name}: this agent serves job {self.store.job_id!r}")
        own = (self.provider(request.job_id, request.worker_id, request.step)
               if self.provider is not None else None)
        if own is not None:
            step, meta, data = own
            return bulk.Source(pb.SnapshotHeader(job_id=request.job_id,
                                                 worker_id=request.worker_id, step=step),
                               meta, data, None)
        replica = self.store.get(request.job_id, request.worker_id, request.step)
        if replica is None:
            held = self.store.get(request.job_id, request.worker_id)
            raise SnapshotNotHeld(f"fetch of {name}: not held here" + (
                f" (replica of step {held.step} is)" if held is not None else ""))
        header = pb.SnapshotHeader(job_id=replica.job_id, worker_id=replica.worker_id,
                                   step=replica.step, epoch=replica.epoch,
                                   meta_bytes=len(replica.meta), data_bytes=len(replica.data),
                                   checksum=replica.checksum)
        return bulk.Source(header, replica.meta, replica.data, replica.checksum)

    def List(self, request: pb.ListRequest, context: grpc.ServicerContext) -> pb.Holdings:
        out = pb.Holdings(bytes_held=self.store.bytes_held,
                          bytes_in_transit=self.store.bytes_in_transit,
                          budget_bytes=self.store.budget_bytes, bulk_port=self.bulk_port)
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


def _name(request: pb.FetchRequest) -> str:
    return f"{request.job_id}/{request.worker_id} step {request.step or 'newest'}"


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
    bulk: bulk.BulkServer | None = None

    @property
    def address(self) -> str:
        return f"localhost:{self.port}"

    def stop(self, grace_s: float | None = None) -> None:
        if self.bulk is not None:
            self.bulk.close()
        self.server.stop(grace_s).wait()


def serve(store: ReplicaStore, address: str, provider: Provider | None = None, *,
          max_workers: int = 8, options: Sequence[tuple[str, int | str]] = (),
          credentials: grpc.ServerCredentials | None = None,
          bulk_tls: ssl.SSLContext | None = None, with_bulk: bool = True) -> PeerServer:
    """Start the SnapshotPeer service on `address` ("host:0" picks a free port). Each
    stream holds one server thread while it runs. `options`: extra gRPC server options;
    `credentials`: serve mutual TLS (security.server_credentials), plaintext without.

    With `with_bulk`, fetches are also served on a bulk port of the same host
    (agent/bulk.py), advertised in List: plaintext when `credentials` is None, else only
    with `bulk_tls` (security.ssl_server_context), never plaintext beside a TLS service."""
    server = grpc.server(ThreadPoolExecutor(max_workers=max_workers,
                                            thread_name_prefix="splice-peer"),
                         options=[*GRPC_OPTIONS, *SERVER_OPTIONS, *options])
    servicer = SnapshotPeerServicer(store, provider)
    add_to_server(servicer, server)
    port = (server.add_insecure_port(address) if credentials is None
            else server.add_secure_port(address, credentials))
    if port == 0:
        raise OSError(f"cannot listen on {address} for snapshot peers")
    fast = None
    if with_bulk and (credentials is None or bulk_tls is not None):
        host = split_address(address)[0]
        try:
            fast = bulk.BulkServer(servicer.source, host, tls=bulk_tls,
                                   max_transfers=max_workers)
            servicer.bulk_port = fast.port
        except OSError as e:  # fetches then all go over gRPC
            log.warning("no bulk snapshot port on %s (%s): fetches use gRPC", host, e)
    server.start()
    return PeerServer(server, port, fast)


def split_address(address: str) -> tuple[str, int]:
    """("host", port) of "host:port" or "[v6]:port"."""
    if address.startswith("["):
        host, _, port = address[1:].partition("]:")
    else:
        host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"not a host:port address: {address!r}")
    return host, int(port)


# ---- the client -----------------------------------------------------------------------------

def channel_to(address: str, credentials: grpc.ChannelCredentials | None = None
               ) -> grpc.Channel:
    """A channel to a peer's SnapshotPeer service: mutual TLS with `credentials`
    (security.channel_credentials; the peer's certificate must name AGENT_SERVER_NAME),
    plaintext without."""
    if credentials is None:
        return grpc.insecure_channel(address, options=GRPC_OPTIONS)
    from splice.security import peer_channel_options

    return grpc.secure_channel(address, credentials,
                               options=[*GRPC_OPTIONS, *peer_channel_options(credentials)])


def _error(e: grpc.RpcError) -> str:
    return f"{e.code().name}: {e.details()}"  # type: ignore[attr-defined]


def push(target: str | grpc.Channel, job_id: str, worker_id: str, step: int, epoch: int,
         meta: bytes | memoryview, data: Buffer, chunk_bytes: int = DEFAULT_CHUNK_BYTES, *,
         timeout_s: float = 300.0,
         credentials: grpc.ChannelCredentials | None = None,
         still_valid: Callable[[], bool] | None = None) -> pb.PushAck:
    """Stream one snapshot to a peer, chunk by chunk as flow control admits (a slow peer
    stalls this call; memory stays at a few chunks). Raises the ReplicationError subclass
    of the peer's refusal (ReplicaBudgetExceeded, AlreadyHeld, ...), or a plain
    ReplicationError with the gRPC code (UNAVAILABLE, DEADLINE_EXCEEDED) otherwise.
    `still_valid()`, asked once every chunk's CRC is taken, says whether the bytes read
    are still the snapshot's (SnapshotChanged if not, nothing sent)."""
    channel = channel_to(target, credentials) if isinstance(target, str) else target
    header = pb.SnapshotHeader(job_id=job_id, worker_id=worker_id, step=step, epoch=epoch)
    try:
        chunks = snapshot_chunks(header, meta, data, chunk_bytes)
        first = next(chunks)  # every chunk's CRC is taken by now
        if still_valid is not None and not still_valid():
            raise SnapshotChanged(f"the snapshot of {worker_id} step {step} changed while "
                                  "it was read (its slot is being rewritten); not pushed")
        return push_chunks(channel, itertools.chain([first], chunks), timeout_s=timeout_s)
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


def _refusal(e: grpc.RpcError) -> ReplicationError:
    """The peer's refusal as the matching ReplicationError subclass."""
    trailers = dict(e.trailing_metadata() or ())  # type: ignore[attr-defined]
    err = refusal(trailers.get(_KIND_KEY, ""), e.details() or _error(e))  # type: ignore[attr-defined]
    err.code = e.code()  # type: ignore[attr-defined]
    return err


class Fetched(NamedTuple):
    step: int
    meta: bytes
    data: Any  # torch.Tensor, uint8, 1-D; the buffer `into` gave when given


def _receive(stream: Iterator[Chunk], job_id: str, worker_id: str,
             step: int) -> Fetched:
    """One holder's stream into a fresh tensor, every chunk and the whole checked."""
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
            tensor = bulk.data_tensor(h.data_bytes, f"{h.job_id}/{h.worker_id} step {h.step}")
            assembly = _Assembly(h, memoryview(bytearray(h.meta_bytes)),
                                 tensor.numpy().data)
        assembly.write(chunk)
    if assembly is None:
        raise MalformedStream("empty stream")
    assembly.finish()
    return Fetched(assembly.header.step, bytes(assembly.meta), tensor)


def fetch(addresses: Sequence[str], job_id: str, worker_id: str, step: int = 0, *,
          timeout_s: float = 300.0, connect_timeout_s: float = 2.0,
          chunk_bytes: int = 0, credentials: grpc.ChannelCredentials | None = None,
          bulk_tls: ssl.SSLContext | None = None, into: bulk.Into | None = None,
          cancelled: threading.Event | None = None,
          checked_by_fetcher: bool = False) -> Fetched:
    """A worker's snapshot from the first holder that supplies it intact, trying
    `addresses` in order. A holder that lacks it, cannot be reached within
    `connect_timeout_s`, fails or breaks the stream, or sends bytes that fail a chunk CRC
    or the whole checksum is logged and skipped; FetchFailed names every holder tried.

    A holder advertising a bulk port (agent/bulk.py) is fetched from there, the fastest
    way; over gRPC's Fetch when it advertises none or that port cannot be reached. With
    `credentials` (mutual TLS) the bulk port is used only with `bulk_tls`
    (security.ssl_client_context). With `into`, the data lands in the buffer it gives
    (straight from the socket over the bulk port; copied there after a gRPC fetch). Once
    `cancelled` is set, the transfer under way ends with bulk.FetchCancelled. With
    `checked_by_fetcher` (the caller checks the snapshot's own checksums once it is in),
    the bulk port's whole-stream CRC-32 is skipped on both sides."""
    reasons: list[str] = []
    request = pb.FetchRequest(job_id=job_id, worker_id=worker_id, step=step,
                              chunk_bytes=chunk_bytes, checked_by_fetcher=checked_by_fetcher)
    for address in addresses:
        channel = channel_to(address, credentials)
        stub = pb_grpc.SnapshotPeerStub(channel)
        connected = False
        try:
            # A cheap call first, so an unreachable holder costs at most connect_timeout_s
            # (a refused connection fails at once), not the transfer's timeout. It also
            # says where the holder's bulk port is.
            # (channel_ready_future would do, but polls: ~0.2 s even when reachable.)
            holdings = stub.List(pb.ListRequest(job_id="\0"), timeout=connect_timeout_s)
            connected = True
            fetched, how = None, "over gRPC"
            if holdings.bulk_port and (credentials is None or bulk_tls is not None):
                fetched = _fetch_bulk(address, holdings.bulk_port, request, bulk_tls,
                                      timeout_s, connect_timeout_s, into, cancelled)
                how = "over its bulk port"
            if fetched is None:
                call = channel.unary_stream("/splice.v1.SnapshotPeer/Fetch",
                                            request_serializer=pb.FetchRequest.SerializeToString,
                                            response_deserializer=decode_chunk)
                stream = call(request, timeout=timeout_s)
                fetched = _receive(_until(cancelled, stream), job_id, worker_id, step)
                how = "over gRPC"
                if into is not None:
                    view = into(len(fetched.data), fetched.meta)
                    view[:] = fetched.data.numpy().data
                    fetched = fetched._replace(data=view)
            log.info("fetched %s/%s step %d (%d bytes of data) from %s %s", job_id, worker_id,
                     fetched.step, len(fetched.data), address, how)
            return fetched
        except grpc.RpcError as e:
            reason = _error(e) if connected else \
                f"unreachable within {connect_timeout_s:g} s ({_error(e)})"
        except bulk.FetchCancelled:
            raise  # the caller gave it up: no other holder is asked
        except ReplicationError as e:
            reason = f"{type(e).__name__}: {e}"
        finally:
            channel.close()
        log.warning("fetch of %s/%s step %s from %s failed (%s); trying the next holder",
                    job_id, worker_id, step or "newest", address, reason)
        reasons.append(f"{address}: {reason}")
    raise FetchFailed(f"no intact snapshot of {job_id}/{worker_id} step {step or 'newest'} "
                      f"from any holder: " + ("; ".join(reasons) or "no holders given"))


def _until(cancelled: threading.Event | None, stream: Any) -> Iterator[Chunk]:
    """The stream's chunks until `cancelled` is set (then the call is cancelled)."""
    for chunk in stream:
        if cancelled is not None and cancelled.is_set():
            stream.cancel()
            raise bulk.FetchCancelled("cancelled")
        yield chunk


def _fetch_bulk(address: str, port: int, request: pb.FetchRequest,
                tls: ssl.SSLContext | None, timeout_s: float,
                connect_timeout_s: float, into: bulk.Into | None,
                cancelled: threading.Event | None) -> Fetched | None:
    """The fetch over the holder's bulk port; None (gRPC then, which queues rather than
    refuses) if it cannot be reached or has no transfer slot free."""
    from splice.security import AGENT_SERVER_NAME

    host = split_address(address)[0]
    try:
        got = bulk.fetch(host, port, request, tls=tls, server_name=AGENT_SERVER_NAME,
                         timeout_s=timeout_s, connect_timeout_s=connect_timeout_s,
                         into=into, cancelled=cancelled)
    except (bulk.BulkUnreachable, ReplicaBusy) as e:
        log.warning("%s; fetching over gRPC instead", e)
        return None
    return Fetched(got.header.step, got.meta, got.data)
