from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ProtocolVersion(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PROTOCOL_VERSION_UNSPECIFIED: _ClassVar[ProtocolVersion]
    PROTOCOL_VERSION_1: _ClassVar[ProtocolVersion]
PROTOCOL_VERSION_UNSPECIFIED: ProtocolVersion
PROTOCOL_VERSION_1: ProtocolVersion

class AgentMessage(_message.Message):
    __slots__ = ("hello", "heartbeat", "worker_event", "step_report", "recovery_ready", "telemetry", "corruption", "link_probes")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    WORKER_EVENT_FIELD_NUMBER: _ClassVar[int]
    STEP_REPORT_FIELD_NUMBER: _ClassVar[int]
    RECOVERY_READY_FIELD_NUMBER: _ClassVar[int]
    TELEMETRY_FIELD_NUMBER: _ClassVar[int]
    CORRUPTION_FIELD_NUMBER: _ClassVar[int]
    LINK_PROBES_FIELD_NUMBER: _ClassVar[int]
    hello: AgentHello
    heartbeat: Heartbeat
    worker_event: WorkerEvent
    step_report: StepReport
    recovery_ready: RecoveryReady
    telemetry: Telemetry
    corruption: CorruptionReport
    link_probes: LinkProbeReport
    def __init__(self, hello: _Optional[_Union[AgentHello, _Mapping]] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ..., worker_event: _Optional[_Union[WorkerEvent, _Mapping]] = ..., step_report: _Optional[_Union[StepReport, _Mapping]] = ..., recovery_ready: _Optional[_Union[RecoveryReady, _Mapping]] = ..., telemetry: _Optional[_Union[Telemetry, _Mapping]] = ..., corruption: _Optional[_Union[CorruptionReport, _Mapping]] = ..., link_probes: _Optional[_Union[LinkProbeReport, _Mapping]] = ...) -> None: ...

class LinkProbeReport(_message.Message):
    __slots__ = ("round", "results")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    round: int
    results: _containers.RepeatedCompositeFieldContainer[LinkProbeResult]
    def __init__(self, round: _Optional[int] = ..., results: _Optional[_Iterable[_Union[LinkProbeResult, _Mapping]]] = ...) -> None: ...

class LinkProbeResult(_message.Message):
    __slots__ = ("from_node", "to_node", "rtt_s", "bandwidth_bytes_per_s", "at_s", "error")
    FROM_NODE_FIELD_NUMBER: _ClassVar[int]
    TO_NODE_FIELD_NUMBER: _ClassVar[int]
    RTT_S_FIELD_NUMBER: _ClassVar[int]
    BANDWIDTH_BYTES_PER_S_FIELD_NUMBER: _ClassVar[int]
    AT_S_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    from_node: str
    to_node: str
    rtt_s: float
    bandwidth_bytes_per_s: float
    at_s: float
    error: str
    def __init__(self, from_node: _Optional[str] = ..., to_node: _Optional[str] = ..., rtt_s: _Optional[float] = ..., bandwidth_bytes_per_s: _Optional[float] = ..., at_s: _Optional[float] = ..., error: _Optional[str] = ...) -> None: ...

class CorruptionReport(_message.Message):
    __slots__ = ("worker_id", "epoch", "step", "culprits", "fingerprints", "reason")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    CULPRITS_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINTS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    epoch: int
    step: int
    culprits: _containers.RepeatedScalarFieldContainer[str]
    fingerprints: _containers.RepeatedScalarFieldContainer[int]
    reason: str
    def __init__(self, worker_id: _Optional[str] = ..., epoch: _Optional[int] = ..., step: _Optional[int] = ..., culprits: _Optional[_Iterable[str]] = ..., fingerprints: _Optional[_Iterable[int]] = ..., reason: _Optional[str] = ...) -> None: ...

class Telemetry(_message.Message):
    __slots__ = ("progress", "steps", "sent_at_s", "dropped", "health", "replacements_ready", "workers", "progress_columns", "step_columns")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    SENT_AT_S_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    HEALTH_FIELD_NUMBER: _ClassVar[int]
    REPLACEMENTS_READY_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_COLUMNS_FIELD_NUMBER: _ClassVar[int]
    STEP_COLUMNS_FIELD_NUMBER: _ClassVar[int]
    progress: _containers.RepeatedCompositeFieldContainer[WorkerProgress]
    steps: _containers.RepeatedCompositeFieldContainer[StepReport]
    sent_at_s: float
    dropped: int
    health: NodeHealth
    replacements_ready: int
    workers: WorkerTable
    progress_columns: ProgressColumns
    step_columns: StepColumns
    def __init__(self, progress: _Optional[_Iterable[_Union[WorkerProgress, _Mapping]]] = ..., steps: _Optional[_Iterable[_Union[StepReport, _Mapping]]] = ..., sent_at_s: _Optional[float] = ..., dropped: _Optional[int] = ..., health: _Optional[_Union[NodeHealth, _Mapping]] = ..., replacements_ready: _Optional[int] = ..., workers: _Optional[_Union[WorkerTable, _Mapping]] = ..., progress_columns: _Optional[_Union[ProgressColumns, _Mapping]] = ..., step_columns: _Optional[_Union[StepColumns, _Mapping]] = ...) -> None: ...

class WorkerTable(_message.Message):
    __slots__ = ("worker_ids",)
    WORKER_IDS_FIELD_NUMBER: _ClassVar[int]
    worker_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, worker_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class ProgressColumns(_message.Message):
    __slots__ = ("worker", "epoch", "step", "seq_entered", "seq_exited", "in_collective_since_s", "last_progress_s", "op", "op_bytes", "heartbeat_s", "ops")
    WORKER_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    SEQ_ENTERED_FIELD_NUMBER: _ClassVar[int]
    SEQ_EXITED_FIELD_NUMBER: _ClassVar[int]
    IN_COLLECTIVE_SINCE_S_FIELD_NUMBER: _ClassVar[int]
    LAST_PROGRESS_S_FIELD_NUMBER: _ClassVar[int]
    OP_FIELD_NUMBER: _ClassVar[int]
    OP_BYTES_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_S_FIELD_NUMBER: _ClassVar[int]
    OPS_FIELD_NUMBER: _ClassVar[int]
    worker: _containers.RepeatedScalarFieldContainer[int]
    epoch: _containers.RepeatedScalarFieldContainer[int]
    step: _containers.RepeatedScalarFieldContainer[int]
    seq_entered: _containers.RepeatedScalarFieldContainer[int]
    seq_exited: _containers.RepeatedScalarFieldContainer[int]
    in_collective_since_s: _containers.RepeatedScalarFieldContainer[float]
    last_progress_s: _containers.RepeatedScalarFieldContainer[float]
    op: _containers.RepeatedScalarFieldContainer[int]
    op_bytes: _containers.RepeatedScalarFieldContainer[int]
    heartbeat_s: _containers.RepeatedScalarFieldContainer[float]
    ops: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, worker: _Optional[_Iterable[int]] = ..., epoch: _Optional[_Iterable[int]] = ..., step: _Optional[_Iterable[int]] = ..., seq_entered: _Optional[_Iterable[int]] = ..., seq_exited: _Optional[_Iterable[int]] = ..., in_collective_since_s: _Optional[_Iterable[float]] = ..., last_progress_s: _Optional[_Iterable[float]] = ..., op: _Optional[_Iterable[int]] = ..., op_bytes: _Optional[_Iterable[int]] = ..., heartbeat_s: _Optional[_Iterable[float]] = ..., ops: _Optional[_Iterable[str]] = ...) -> None: ...

class StepColumns(_message.Message):
    __slots__ = ("worker", "epoch", "step", "loss", "step_time_s", "completed_at_s", "num_samples", "compute_s", "wait_s", "collective_bytes", "snapshot_bytes", "snapshot_at_s")
    WORKER_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    STEP_TIME_S_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_AT_S_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_S_FIELD_NUMBER: _ClassVar[int]
    WAIT_S_FIELD_NUMBER: _ClassVar[int]
    COLLECTIVE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_BYTES_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_AT_S_FIELD_NUMBER: _ClassVar[int]
    worker: _containers.RepeatedScalarFieldContainer[int]
    epoch: _containers.RepeatedScalarFieldContainer[int]
    step: _containers.RepeatedScalarFieldContainer[int]
    loss: _containers.RepeatedScalarFieldContainer[float]
    step_time_s: _containers.RepeatedScalarFieldContainer[float]
    completed_at_s: _containers.RepeatedScalarFieldContainer[float]
    num_samples: _containers.RepeatedScalarFieldContainer[int]
    compute_s: _containers.RepeatedScalarFieldContainer[float]
    wait_s: _containers.RepeatedScalarFieldContainer[float]
    collective_bytes: _containers.RepeatedScalarFieldContainer[int]
    snapshot_bytes: _containers.RepeatedScalarFieldContainer[int]
    snapshot_at_s: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, worker: _Optional[_Iterable[int]] = ..., epoch: _Optional[_Iterable[int]] = ..., step: _Optional[_Iterable[int]] = ..., loss: _Optional[_Iterable[float]] = ..., step_time_s: _Optional[_Iterable[float]] = ..., completed_at_s: _Optional[_Iterable[float]] = ..., num_samples: _Optional[_Iterable[int]] = ..., compute_s: _Optional[_Iterable[float]] = ..., wait_s: _Optional[_Iterable[float]] = ..., collective_bytes: _Optional[_Iterable[int]] = ..., snapshot_bytes: _Optional[_Iterable[int]] = ..., snapshot_at_s: _Optional[_Iterable[float]] = ...) -> None: ...

class WorkerProgress(_message.Message):
    __slots__ = ("worker_id", "epoch", "step", "seq_entered", "seq_exited", "in_collective_since_s", "last_progress_s", "op", "op_bytes", "heartbeat_s")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    SEQ_ENTERED_FIELD_NUMBER: _ClassVar[int]
    SEQ_EXITED_FIELD_NUMBER: _ClassVar[int]
    IN_COLLECTIVE_SINCE_S_FIELD_NUMBER: _ClassVar[int]
    LAST_PROGRESS_S_FIELD_NUMBER: _ClassVar[int]
    OP_FIELD_NUMBER: _ClassVar[int]
    OP_BYTES_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_S_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    epoch: int
    step: int
    seq_entered: int
    seq_exited: int
    in_collective_since_s: float
    last_progress_s: float
    op: str
    op_bytes: int
    heartbeat_s: float
    def __init__(self, worker_id: _Optional[str] = ..., epoch: _Optional[int] = ..., step: _Optional[int] = ..., seq_entered: _Optional[int] = ..., seq_exited: _Optional[int] = ..., in_collective_since_s: _Optional[float] = ..., last_progress_s: _Optional[float] = ..., op: _Optional[str] = ..., op_bytes: _Optional[int] = ..., heartbeat_s: _Optional[float] = ...) -> None: ...

class NodeHealth(_message.Message):
    __slots__ = ("memory_used_ratio", "cpu_throttled_ratio", "gpus", "notes")
    MEMORY_USED_RATIO_FIELD_NUMBER: _ClassVar[int]
    CPU_THROTTLED_RATIO_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    NOTES_FIELD_NUMBER: _ClassVar[int]
    memory_used_ratio: float
    cpu_throttled_ratio: float
    gpus: int
    notes: str
    def __init__(self, memory_used_ratio: _Optional[float] = ..., cpu_throttled_ratio: _Optional[float] = ..., gpus: _Optional[int] = ..., notes: _Optional[str] = ...) -> None: ...

class AgentHello(_message.Message):
    __slots__ = ("protocol_version", "job_id", "node_id", "num_workers", "hostname", "epoch", "workers", "probe_address", "snapshot_address", "failure_domain")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_WORKERS_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    PROBE_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    FAILURE_DOMAIN_FIELD_NUMBER: _ClassVar[int]
    protocol_version: ProtocolVersion
    job_id: str
    node_id: str
    num_workers: int
    hostname: str
    epoch: int
    workers: _containers.RepeatedCompositeFieldContainer[WorkerResync]
    probe_address: str
    snapshot_address: str
    failure_domain: str
    def __init__(self, protocol_version: _Optional[_Union[ProtocolVersion, str]] = ..., job_id: _Optional[str] = ..., node_id: _Optional[str] = ..., num_workers: _Optional[int] = ..., hostname: _Optional[str] = ..., epoch: _Optional[int] = ..., workers: _Optional[_Iterable[_Union[WorkerResync, _Mapping]]] = ..., probe_address: _Optional[str] = ..., snapshot_address: _Optional[str] = ..., failure_domain: _Optional[str] = ...) -> None: ...

class WorkerResync(_message.Message):
    __slots__ = ("worker_id", "state", "pid", "exit_code", "signal")
    class State(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATE_UNSPECIFIED: _ClassVar[WorkerResync.State]
        STARTING: _ClassVar[WorkerResync.State]
        CONNECTED: _ClassVar[WorkerResync.State]
        EXITED: _ClassVar[WorkerResync.State]
        FINISHED: _ClassVar[WorkerResync.State]
    STATE_UNSPECIFIED: WorkerResync.State
    STARTING: WorkerResync.State
    CONNECTED: WorkerResync.State
    EXITED: WorkerResync.State
    FINISHED: WorkerResync.State
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    SIGNAL_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    state: WorkerResync.State
    pid: int
    exit_code: int
    signal: int
    def __init__(self, worker_id: _Optional[str] = ..., state: _Optional[_Union[WorkerResync.State, str]] = ..., pid: _Optional[int] = ..., exit_code: _Optional[int] = ..., signal: _Optional[int] = ...) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ("epoch", "sent_at_s")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    SENT_AT_S_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    sent_at_s: float
    def __init__(self, epoch: _Optional[int] = ..., sent_at_s: _Optional[float] = ...) -> None: ...

class WorkerEvent(_message.Message):
    __slots__ = ("worker_id", "kind", "pid", "exit_code", "signal", "at_s")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[WorkerEvent.Kind]
        STARTED: _ClassVar[WorkerEvent.Kind]
        READY: _ClassVar[WorkerEvent.Kind]
        EXITED: _ClassVar[WorkerEvent.Kind]
        FINISHED: _ClassVar[WorkerEvent.Kind]
    KIND_UNSPECIFIED: WorkerEvent.Kind
    STARTED: WorkerEvent.Kind
    READY: WorkerEvent.Kind
    EXITED: WorkerEvent.Kind
    FINISHED: WorkerEvent.Kind
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    SIGNAL_FIELD_NUMBER: _ClassVar[int]
    AT_S_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    kind: WorkerEvent.Kind
    pid: int
    exit_code: int
    signal: int
    at_s: float
    def __init__(self, worker_id: _Optional[str] = ..., kind: _Optional[_Union[WorkerEvent.Kind, str]] = ..., pid: _Optional[int] = ..., exit_code: _Optional[int] = ..., signal: _Optional[int] = ..., at_s: _Optional[float] = ...) -> None: ...

class StepReport(_message.Message):
    __slots__ = ("worker_id", "epoch", "step", "loss", "step_time_s", "completed_at_s", "num_samples", "compute_s", "wait_s", "collective_bytes", "snapshot_bytes", "snapshot_at_s")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    STEP_TIME_S_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_AT_S_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_S_FIELD_NUMBER: _ClassVar[int]
    WAIT_S_FIELD_NUMBER: _ClassVar[int]
    COLLECTIVE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_BYTES_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_AT_S_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    epoch: int
    step: int
    loss: float
    step_time_s: float
    completed_at_s: float
    num_samples: int
    compute_s: float
    wait_s: float
    collective_bytes: int
    snapshot_bytes: int
    snapshot_at_s: float
    def __init__(self, worker_id: _Optional[str] = ..., epoch: _Optional[int] = ..., step: _Optional[int] = ..., loss: _Optional[float] = ..., step_time_s: _Optional[float] = ..., completed_at_s: _Optional[float] = ..., num_samples: _Optional[int] = ..., compute_s: _Optional[float] = ..., wait_s: _Optional[float] = ..., collective_bytes: _Optional[int] = ..., snapshot_bytes: _Optional[int] = ..., snapshot_at_s: _Optional[float] = ...) -> None: ...

class RecoveryReady(_message.Message):
    __slots__ = ("worker_id", "epoch", "snapshot_steps", "has_persisted", "persisted_step")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_STEPS_FIELD_NUMBER: _ClassVar[int]
    HAS_PERSISTED_FIELD_NUMBER: _ClassVar[int]
    PERSISTED_STEP_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    epoch: int
    snapshot_steps: _containers.RepeatedScalarFieldContainer[int]
    has_persisted: bool
    persisted_step: int
    def __init__(self, worker_id: _Optional[str] = ..., epoch: _Optional[int] = ..., snapshot_steps: _Optional[_Iterable[int]] = ..., has_persisted: _Optional[bool] = ..., persisted_step: _Optional[int] = ...) -> None: ...

class ControllerMessage(_message.Message):
    __slots__ = ("welcome", "membership", "resume", "refusal", "shutdown", "kill", "check_replicas", "probe_links")
    WELCOME_FIELD_NUMBER: _ClassVar[int]
    MEMBERSHIP_FIELD_NUMBER: _ClassVar[int]
    RESUME_FIELD_NUMBER: _ClassVar[int]
    REFUSAL_FIELD_NUMBER: _ClassVar[int]
    SHUTDOWN_FIELD_NUMBER: _ClassVar[int]
    KILL_FIELD_NUMBER: _ClassVar[int]
    CHECK_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    PROBE_LINKS_FIELD_NUMBER: _ClassVar[int]
    welcome: Welcome
    membership: Membership
    resume: Resume
    refusal: Refusal
    shutdown: Shutdown
    kill: KillWorker
    check_replicas: CheckReplicas
    probe_links: ProbeLinks
    def __init__(self, welcome: _Optional[_Union[Welcome, _Mapping]] = ..., membership: _Optional[_Union[Membership, _Mapping]] = ..., resume: _Optional[_Union[Resume, _Mapping]] = ..., refusal: _Optional[_Union[Refusal, _Mapping]] = ..., shutdown: _Optional[_Union[Shutdown, _Mapping]] = ..., kill: _Optional[_Union[KillWorker, _Mapping]] = ..., check_replicas: _Optional[_Union[CheckReplicas, _Mapping]] = ..., probe_links: _Optional[_Union[ProbeLinks, _Mapping]] = ...) -> None: ...

class ProbeLinks(_message.Message):
    __slots__ = ("round", "targets", "payload_bytes", "timeout_s")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    round: int
    targets: _containers.RepeatedCompositeFieldContainer[ProbeTarget]
    payload_bytes: int
    timeout_s: float
    def __init__(self, round: _Optional[int] = ..., targets: _Optional[_Iterable[_Union[ProbeTarget, _Mapping]]] = ..., payload_bytes: _Optional[int] = ..., timeout_s: _Optional[float] = ...) -> None: ...

class ProbeTarget(_message.Message):
    __slots__ = ("node_id", "address")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    address: str
    def __init__(self, node_id: _Optional[str] = ..., address: _Optional[str] = ...) -> None: ...

class KillWorker(_message.Message):
    __slots__ = ("worker_id", "epoch", "reason", "discard_snapshots")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    DISCARD_SNAPSHOTS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    epoch: int
    reason: str
    discard_snapshots: bool
    def __init__(self, worker_id: _Optional[str] = ..., epoch: _Optional[int] = ..., reason: _Optional[str] = ..., discard_snapshots: _Optional[bool] = ...) -> None: ...

class Welcome(_message.Message):
    __slots__ = ("job_id", "node_id", "heartbeat_interval_s", "epoch")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    node_id: str
    heartbeat_interval_s: float
    epoch: int
    def __init__(self, job_id: _Optional[str] = ..., node_id: _Optional[str] = ..., heartbeat_interval_s: _Optional[float] = ..., epoch: _Optional[int] = ...) -> None: ...

class Membership(_message.Message):
    __slots__ = ("epoch", "members", "shares", "store_host", "store_port", "store_prefix", "reason", "initial", "agents")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    SHARES_FIELD_NUMBER: _ClassVar[int]
    STORE_HOST_FIELD_NUMBER: _ClassVar[int]
    STORE_PORT_FIELD_NUMBER: _ClassVar[int]
    STORE_PREFIX_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    INITIAL_FIELD_NUMBER: _ClassVar[int]
    AGENTS_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    members: _containers.RepeatedScalarFieldContainer[str]
    shares: _containers.RepeatedScalarFieldContainer[float]
    store_host: str
    store_port: int
    store_prefix: str
    reason: str
    initial: bool
    agents: _containers.RepeatedCompositeFieldContainer[PeerAgent]
    def __init__(self, epoch: _Optional[int] = ..., members: _Optional[_Iterable[str]] = ..., shares: _Optional[_Iterable[float]] = ..., store_host: _Optional[str] = ..., store_port: _Optional[int] = ..., store_prefix: _Optional[str] = ..., reason: _Optional[str] = ..., initial: _Optional[bool] = ..., agents: _Optional[_Iterable[_Union[PeerAgent, _Mapping]]] = ...) -> None: ...

class PeerAgent(_message.Message):
    __slots__ = ("node_id", "snapshot_address", "failure_domain")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    FAILURE_DOMAIN_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    snapshot_address: str
    failure_domain: str
    def __init__(self, node_id: _Optional[str] = ..., snapshot_address: _Optional[str] = ..., failure_domain: _Optional[str] = ...) -> None: ...

class Resume(_message.Message):
    __slots__ = ("epoch", "step", "reason", "transfers", "from_disk")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    TRANSFERS_FIELD_NUMBER: _ClassVar[int]
    FROM_DISK_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    step: int
    reason: str
    transfers: _containers.RepeatedCompositeFieldContainer[StateTransfer]
    from_disk: bool
    def __init__(self, epoch: _Optional[int] = ..., step: _Optional[int] = ..., reason: _Optional[str] = ..., transfers: _Optional[_Iterable[_Union[StateTransfer, _Mapping]]] = ..., from_disk: _Optional[bool] = ...) -> None: ...

class StateTransfer(_message.Message):
    __slots__ = ("to_worker", "from_worker", "holders")
    TO_WORKER_FIELD_NUMBER: _ClassVar[int]
    FROM_WORKER_FIELD_NUMBER: _ClassVar[int]
    HOLDERS_FIELD_NUMBER: _ClassVar[int]
    to_worker: str
    from_worker: str
    holders: _containers.RepeatedCompositeFieldContainer[SnapshotHolder]
    def __init__(self, to_worker: _Optional[str] = ..., from_worker: _Optional[str] = ..., holders: _Optional[_Iterable[_Union[SnapshotHolder, _Mapping]]] = ...) -> None: ...

class SnapshotHolder(_message.Message):
    __slots__ = ("worker_id", "address")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    address: str
    def __init__(self, worker_id: _Optional[str] = ..., address: _Optional[str] = ...) -> None: ...

class Refusal(_message.Message):
    __slots__ = ("code", "message", "leader")
    class Code(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        CODE_UNSPECIFIED: _ClassVar[Refusal.Code]
        MALFORMED: _ClassVar[Refusal.Code]
        UNKNOWN_JOB: _ClassVar[Refusal.Code]
        STALE_EPOCH: _ClassVar[Refusal.Code]
        UNKNOWN_WORKER: _ClassVar[Refusal.Code]
        PROTOCOL_MISMATCH: _ClassVar[Refusal.Code]
        NOT_ATTACHED: _ClassVar[Refusal.Code]
        NOT_LEADER: _ClassVar[Refusal.Code]
        PERMISSION_DENIED: _ClassVar[Refusal.Code]
        UNAVAILABLE: _ClassVar[Refusal.Code]
    CODE_UNSPECIFIED: Refusal.Code
    MALFORMED: Refusal.Code
    UNKNOWN_JOB: Refusal.Code
    STALE_EPOCH: Refusal.Code
    UNKNOWN_WORKER: Refusal.Code
    PROTOCOL_MISMATCH: Refusal.Code
    NOT_ATTACHED: Refusal.Code
    NOT_LEADER: Refusal.Code
    PERMISSION_DENIED: Refusal.Code
    UNAVAILABLE: Refusal.Code
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    LEADER_FIELD_NUMBER: _ClassVar[int]
    code: Refusal.Code
    message: str
    leader: str
    def __init__(self, code: _Optional[_Union[Refusal.Code, str]] = ..., message: _Optional[str] = ..., leader: _Optional[str] = ...) -> None: ...

class Shutdown(_message.Message):
    __slots__ = ("reason", "complete")
    REASON_FIELD_NUMBER: _ClassVar[int]
    COMPLETE_FIELD_NUMBER: _ClassVar[int]
    reason: str
    complete: bool
    def __init__(self, reason: _Optional[str] = ..., complete: _Optional[bool] = ...) -> None: ...

class JobStatusRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class CheckReplicasRequest(_message.Message):
    __slots__ = ("job_id", "reason")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    reason: str
    def __init__(self, job_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class CheckReplicas(_message.Message):
    __slots__ = ("epoch", "reason")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    reason: str
    def __init__(self, epoch: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class StopJobRequest(_message.Message):
    __slots__ = ("job_id", "reason")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    reason: str
    def __init__(self, job_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class WorkerStatus(_message.Message):
    __slots__ = ("worker_id", "node_id", "pid", "state", "rank", "last_step", "last_loss", "last_step_time_s", "straggler_score", "last_compute_s", "last_wait_s")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    LAST_STEP_FIELD_NUMBER: _ClassVar[int]
    LAST_LOSS_FIELD_NUMBER: _ClassVar[int]
    LAST_STEP_TIME_S_FIELD_NUMBER: _ClassVar[int]
    STRAGGLER_SCORE_FIELD_NUMBER: _ClassVar[int]
    LAST_COMPUTE_S_FIELD_NUMBER: _ClassVar[int]
    LAST_WAIT_S_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    node_id: str
    pid: int
    state: str
    rank: int
    last_step: int
    last_loss: float
    last_step_time_s: float
    straggler_score: float
    last_compute_s: float
    last_wait_s: float
    def __init__(self, worker_id: _Optional[str] = ..., node_id: _Optional[str] = ..., pid: _Optional[int] = ..., state: _Optional[str] = ..., rank: _Optional[int] = ..., last_step: _Optional[int] = ..., last_loss: _Optional[float] = ..., last_step_time_s: _Optional[float] = ..., straggler_score: _Optional[float] = ..., last_compute_s: _Optional[float] = ..., last_wait_s: _Optional[float] = ...) -> None: ...

class Verdict(_message.Message):
    __slots__ = ("at_s", "detector", "kind", "rank", "worker_id", "score", "action", "reason")
    AT_S_FIELD_NUMBER: _ClassVar[int]
    DETECTOR_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    at_s: float
    detector: str
    kind: str
    rank: int
    worker_id: str
    score: float
    action: str
    reason: str
    def __init__(self, at_s: _Optional[float] = ..., detector: _Optional[str] = ..., kind: _Optional[str] = ..., rank: _Optional[int] = ..., worker_id: _Optional[str] = ..., score: _Optional[float] = ..., action: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class TimelineEvent(_message.Message):
    __slots__ = ("at_s", "kind", "epoch", "text")
    AT_S_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    at_s: float
    kind: str
    epoch: int
    text: str
    def __init__(self, at_s: _Optional[float] = ..., kind: _Optional[str] = ..., epoch: _Optional[int] = ..., text: _Optional[str] = ...) -> None: ...

class JobStatus(_message.Message):
    __slots__ = ("job_id", "phase", "epoch", "members", "workers", "timeline", "recoveries", "message", "controller", "leader", "leader_since_s", "verdicts", "metrics")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    TIMELINE_FIELD_NUMBER: _ClassVar[int]
    RECOVERIES_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    CONTROLLER_FIELD_NUMBER: _ClassVar[int]
    LEADER_FIELD_NUMBER: _ClassVar[int]
    LEADER_SINCE_S_FIELD_NUMBER: _ClassVar[int]
    VERDICTS_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    phase: str
    epoch: int
    members: _containers.RepeatedScalarFieldContainer[str]
    workers: _containers.RepeatedCompositeFieldContainer[WorkerStatus]
    timeline: _containers.RepeatedCompositeFieldContainer[TimelineEvent]
    recoveries: int
    message: str
    controller: str
    leader: bool
    leader_since_s: float
    verdicts: _containers.RepeatedCompositeFieldContainer[Verdict]
    metrics: str
    def __init__(self, job_id: _Optional[str] = ..., phase: _Optional[str] = ..., epoch: _Optional[int] = ..., members: _Optional[_Iterable[str]] = ..., workers: _Optional[_Iterable[_Union[WorkerStatus, _Mapping]]] = ..., timeline: _Optional[_Iterable[_Union[TimelineEvent, _Mapping]]] = ..., recoveries: _Optional[int] = ..., message: _Optional[str] = ..., controller: _Optional[str] = ..., leader: _Optional[bool] = ..., leader_since_s: _Optional[float] = ..., verdicts: _Optional[_Iterable[_Union[Verdict, _Mapping]]] = ..., metrics: _Optional[str] = ...) -> None: ...
