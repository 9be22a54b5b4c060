"""The wire form of a snapshot stream between agents (agent/replication.py): chunks of one
byte space (meta, then data), each with a CRC-32 of its bytes, the first with a header that
carries the whole snapshot's CRC-32; and the errors a stream can end with.

The chunk message is encoded and parsed here by hand (a varint-framed protobuf, checked to
match the generated code byte for byte in tests/test_replication.py): the generated code
copied each chunk three times going out and twice coming in. The whole checksum is folded
from the chunk CRCs (`crc32_combine`), so each side reads the bytes once.
"""

from __future__ import annotations

import functools
import mmap
import zlib
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import grpc
from google.protobuf.message import DecodeError

from splice.proto import peer_pb2 as pb

MiB = 1024 * 1024
DEFAULT_CHUNK_BYTES = MiB
MAX_CHUNK_BYTES = 16 * MiB
MAX_META_BYTES = MiB
MAX_DATA_BYTES = 1 << 44  # 16 TiB: one worker's snapshot; a bigger size is a peer's error

# `data` may be anything exposing bytes (memoryview, bytearray, mmap) or a uint8 1-D CPU
# torch.Tensor; torch stays out of the agent's imports (tests/test_layers.py).
Buffer = Any

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


class SnapshotChanged(ReplicationError):
    """The sender's snapshot was rewritten while it was being read: push a newer one."""

    code = grpc.StatusCode.ABORTED


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


def refusal(kind: str, message: str) -> ReplicationError:
    """A peer's refusal, named by its class (`type(e).__name__`), as that ReplicationError
    subclass (a plain ReplicationError for a name not known here)."""
    cls = {c.__name__: c for c in (ReplicaBudgetExceeded, SnapshotCorrupt, MalformedStream,
                                   UnknownJob, StaleReplica, AlreadyHeld, ReplicaBusy,
                                   SnapshotNotHeld)}.get(kind, ReplicationError)
    return cls(message)


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
    if header.data_bytes > MAX_DATA_BYTES:
        raise MalformedStream(f"snapshot {header.job_id}/{header.worker_id}: data of "
                              f"{header.data_bytes} bytes, over the {MAX_DATA_BYTES} limit")
    if header.meta_bytes > MAX_META_BYTES:
        raise MalformedStream(f"snapshot {header.job_id}/{header.worker_id}: meta of "
                              f"{header.meta_bytes} bytes, over the {MAX_META_BYTES} limit")


