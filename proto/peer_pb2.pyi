from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SnapshotHeader(_message.Message):
    __slots__ = ("job_id", "worker_id", "step", "epoch", "meta_bytes", "data_bytes", "checksum")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    META_BYTES_FIELD_NUMBER: _ClassVar[int]
    DATA_BYTES_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    worker_id: str
    step: int
    epoch: int
    meta_bytes: int
    data_bytes: int
    checksum: int
    def __init__(self, job_id: _Optional[str] = ..., worker_id: _Optional[str] = ..., step: _Optional[int] = ..., epoch: _Optional[int] = ..., meta_bytes: _Optional[int] = ..., data_bytes: _Optional[int] = ..., checksum: _Optional[int] = ...) -> None: ...

class SnapshotChunk(_message.Message):
    __slots__ = ("header", "offset", "data", "crc32")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    CRC32_FIELD_NUMBER: _ClassVar[int]
    header: SnapshotHeader
    offset: int
    data: bytes
    crc32: int
    def __init__(self, header: _Optional[_Union[SnapshotHeader, _Mapping]] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ..., crc32: _Optional[int] = ...) -> None: ...

class PushAck(_message.Message):
    __slots__ = ("bytes_received", "bytes_held")
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    BYTES_HELD_FIELD_NUMBER: _ClassVar[int]
    bytes_received: int
    bytes_held: int
    def __init__(self, bytes_received: _Optional[int] = ..., bytes_held: _Optional[int] = ...) -> None: ...

class FetchRequest(_message.Message):
    __slots__ = ("job_id", "worker_id", "step", "chunk_bytes", "checked_by_fetcher")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    CHECKED_BY_FETCHER_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    worker_id: str
    step: int
    chunk_bytes: int
    checked_by_fetcher: bool
    def __init__(self, job_id: _Optional[str] = ..., worker_id: _Optional[str] = ..., step: _Optional[int] = ..., chunk_bytes: _Optional[int] = ..., checked_by_fetcher: _Optional[bool] = ...) -> None: ...

class ListRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class Holding(_message.Message):
    __slots__ = ("job_id", "worker_id", "step", "epoch", "bytes", "replica")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    worker_id: str
    step: int
    epoch: int
    bytes: int
    replica: bool
    def __init__(self, job_id: _Optional[str] = ..., worker_id: _Optional[str] = ..., step: _Optional[int] = ..., epoch: _Optional[int] = ..., bytes: _Optional[int] = ..., replica: _Optional[bool] = ...) -> None: ...

class Holdings(_message.Message):
    __slots__ = ("holdings", "bytes_held", "bytes_in_transit", "budget_bytes", "bulk_port")
    HOLDINGS_FIELD_NUMBER: _ClassVar[int]
    BYTES_HELD_FIELD_NUMBER: _ClassVar[int]
    BYTES_IN_TRANSIT_FIELD_NUMBER: _ClassVar[int]
    BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    BULK_PORT_FIELD_NUMBER: _ClassVar[int]
    holdings: _containers.RepeatedCompositeFieldContainer[Holding]
    bytes_held: int
    bytes_in_transit: int
    budget_bytes: int
    bulk_port: int
    def __init__(self, holdings: _Optional[_Iterable[_Union[Holding, _Mapping]]] = ..., bytes_held: _Optional[int] = ..., bytes_in_transit: _Optional[int] = ..., budget_bytes: _Optional[int] = ..., bulk_port: _Optional[int] = ...) -> None: ...

class BulkReply(_message.Message):
    __slots__ = ("header", "refusal", "error")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    REFUSAL_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    header: SnapshotHeader
    refusal: str
    error: str
    def __init__(self, header: _Optional[_Union[SnapshotHeader, _Mapping]] = ..., refusal: _Optional[str] = ..., error: _Optional[str] = ...) -> None: ...
