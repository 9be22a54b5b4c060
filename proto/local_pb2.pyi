from splice.proto import controller_pb2 as _controller_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class WorkerToAgent(_message.Message):
    __slots__ = ("hello", "step_report", "recovery_ready", "finished", "corruption")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    STEP_REPORT_FIELD_NUMBER: _ClassVar[int]
    RECOVERY_READY_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    CORRUPTION_FIELD_NUMBER: _ClassVar[int]
    hello: WorkerHello
    step_report: _controller_pb2.StepReport
    recovery_ready: _controller_pb2.RecoveryReady
    finished: WorkerFinished
    corruption: _controller_pb2.CorruptionReport
    def __init__(self, hello: _Optional[_Union[WorkerHello, _Mapping]] = ..., step_report: _Optional[_Union[_controller_pb2.StepReport, _Mapping]] = ..., recovery_ready: _Optional[_Union[_controller_pb2.RecoveryReady, _Mapping]] = ..., finished: _Optional[_Union[WorkerFinished, _Mapping]] = ..., corruption: _Optional[_Union[_controller_pb2.CorruptionReport, _Mapping]] = ...) -> None: ...

class WorkerHello(_message.Message):
    __slots__ = ("worker_id", "pid")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    pid: int
    def __init__(self, worker_id: _Optional[str] = ..., pid: _Optional[int] = ...) -> None: ...

class WorkerFinished(_message.Message):
    __slots__ = ("worker_id", "step")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    step: int
    def __init__(self, worker_id: _Optional[str] = ..., step: _Optional[int] = ...) -> None: ...

class AgentToWorker(_message.Message):
    __slots__ = ("membership", "resume", "refusal", "shutdown", "check_replicas")
    MEMBERSHIP_FIELD_NUMBER: _ClassVar[int]
    RESUME_FIELD_NUMBER: _ClassVar[int]
    REFUSAL_FIELD_NUMBER: _ClassVar[int]
    SHUTDOWN_FIELD_NUMBER: _ClassVar[int]
    CHECK_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    membership: _controller_pb2.Membership
    resume: _controller_pb2.Resume
    refusal: _controller_pb2.Refusal
    shutdown: _controller_pb2.Shutdown
    check_replicas: _controller_pb2.CheckReplicas
    def __init__(self, membership: _Optional[_Union[_controller_pb2.Membership, _Mapping]] = ..., resume: _Optional[_Union[_controller_pb2.Resume, _Mapping]] = ..., refusal: _Optional[_Union[_controller_pb2.Refusal, _Mapping]] = ..., shutdown: _Optional[_Union[_controller_pb2.Shutdown, _Mapping]] = ..., check_replicas: _Optional[_Union[_controller_pb2.CheckReplicas, _Mapping]] = ...) -> None: ...
