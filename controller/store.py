"""Where the controller keeps what must survive it: job spec, epochs, snapshot inventory
and the decision log.

An epoch is written with compare-and-swap on the previous epoch before it is announced, so
two controllers can never both announce the same epoch (the epoch is the fencing token).
With several controller replicas the write is also conditional on the writer still holding
the leadership it was elected with (its `Fence`), so a deposed leader can persist nothing
and therefore announce nothing. In-memory (one controller) and etcd implementations sit
behind the same interface and pass the same conformance suite.
"""

from __future__ import annotations

import json
import threading
from dataclasses import asdict, dataclass
from typing import Any, Protocol


class EpochConflict(Exception):
    """The stored epoch is not the one the writer expected: another writer got there first.

    The writer's view is stale; it must reload the job's state and must not announce.
    """


class NotLeader(Exception):
    """The writer's fence no longer matches the elected leader: it was deposed. It must
    stop acting as leader at once and must not announce what it tried to write."""


class StoreUnavailable(Exception):
    """The store could not be reached; nothing was written. Retry after `retry_after_s`."""

    def __init__(self, message: str, retry_after_s: float = 0.5) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class Fence:
    """Proof of leadership: the leader key, the leader's identity written there, and the
    revision at which that leadership was created. Writes check all three."""

    key: str
    identity: str
    revision: int


@dataclass(frozen=True, kw_only=True)
class EpochRecord:
    job_id: str
    epoch: int
    members: tuple[str, ...]
    shares: tuple[float, ...]
    reason: str
    decided_at_s: float

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @staticmethod
    def from_json(text: str) -> EpochRecord:
        raw = json.loads(text)
        raw["members"] = tuple(raw["members"])
        raw["shares"] = tuple(raw["shares"])
        return EpochRecord(**raw)


class StateStore(Protocol):
    def load_epoch(self, job_id: str) -> EpochRecord | None:
        """The newest persisted epoch of the job, or None if it never had one."""
        ...

    def commit_epoch(self, record: EpochRecord, *, expected_epoch: int,
                     fence: Fence | None = None) -> None:
        """Persist `record` if the stored epoch is `expected_epoch` (0: none yet) and, with a
        fence, the fence still names the elected leader — in one atomic step.

        Raises EpochConflict or NotLeader otherwise (ValueError if the record does not
        advance the epoch), StoreUnavailable if the store cannot be reached; in every
        failure the store is unchanged.
        """
        ...

    def commit_resume(self, job_id: str, epoch: int, step: int,
                      fence: Fence | None = None) -> None:
        """Persist the resume step decided for `epoch`, if the stored epoch is `epoch` (and
        the fence holds). Raises EpochConflict / NotLeader / StoreUnavailable otherwise."""
        ...

    def load_resume(self, job_id: str) -> tuple[int, int] | None:
        """(epoch, step) of the newest persisted resume decision, or None."""
        ...

    def save_job_spec(self, job_id: str, spec: dict[str, Any]) -> None:
        """Record the job's spec (JSON-compatible) so a standby controller can adopt it."""
        ...

    def load_job_spec(self, job_id: str) -> dict[str, Any] | None: ...

    def put_snapshot_inventory(self, job_id: str, worker_id: str, steps: list[int]) -> None:
        """Which snapshot steps `worker_id` holds (overwrites its previous entry)."""
        ...

    def snapshot_inventory(self, job_id: str) -> dict[str, list[int]]: ...

    def append_decision(self, job_id: str, text: str) -> None:
        """Append a line to the job's decision log (an audit trail; never read for control)."""
        ...

    def decisions(self, job_id: str) -> list[str]: ...


class InMemoryStateStore:
    """The default store: correct for one controller; lost when the controller exits.

    Fences are accepted and ignored: with one controller there is no election to lose.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._epochs: dict[str, str] = {}
        self._decisions: dict[str, list[str]] = {}
        self._specs: dict[str, str] = {}
        self._inventory: dict[str, dict[str, list[int]]] = {}
        self._resumes: dict[str, tuple[int, int]] = {}

    def commit_resume(self, job_id: str, epoch: int, step: int,
                      fence: Fence | None = None) -> None:
        del fence
        with self._lock:
            text = self._epochs.get(job_id)
            stored = 0 if text is None else EpochRecord.from_json(text).epoch
            if stored != epoch:
                raise EpochConflict(f"job {job_id!r}: resume for epoch {epoch}, stored epoch "
                                    f"is {stored}")
            self._resumes[job_id] = (epoch, step)

    def load_resume(self, job_id: str) -> tuple[int, int] | None:
        with self._lock:
            return self._resumes.get(job_id)

    def save_job_spec(self, job_id: str, spec: dict[str, Any]) -> None:
        text = json.dumps(spec, sort_keys=True)
        with self._lock:
            self._specs[job_id] = text

    def load_job_spec(self, job_id: str) -> dict[str, Any] | None:
        with self._lock:
            text = self._specs.get(job_id)
        return None if text is None else dict(json.loads(text))

    def put_snapshot_inventory(self, job_id: str, worker_id: str, steps: list[int]) -> None:
        with self._lock:
            self._inventory.setdefault(job_id, {})[worker_id] = sorted(int(s) for s in steps)

    def snapshot_inventory(self, job_id: str) -> dict[str, list[int]]:
        with self._lock:
            return {w: list(s) for w, s in self._inventory.get(job_id, {}).items()}

    def load_epoch(self, job_id: str) -> EpochRecord | None:
        with self._lock:
            text = self._epochs.get(job_id)
        return None if text is None else EpochRecord.from_json(text)

    def commit_epoch(self, record: EpochRecord, *, expected_epoch: int,
                     fence: Fence | None = None) -> None:
        del fence  # one controller: nobody to be deposed by
        if record.epoch <= expected_epoch:
            raise ValueError(f"epoch {record.epoch} does not advance past {expected_epoch}")
        with self._lock:
            text = self._epochs.get(record.job_id)
            stored = 0 if text is None else EpochRecord.from_json(text).epoch
            if stored != expected_epoch:
                raise EpochConflict(
                    f"job {record.job_id!r}: expected stored epoch {expected_epoch}, "
                    f"found {stored}"
                )
            self._epochs[record.job_id] = record.to_json()

    def append_decision(self, job_id: str, text: str) -> None:
        with self._lock:
            self._decisions.setdefault(job_id, []).append(text)

    def decisions(self, job_id: str) -> list[str]:
        with self._lock:
            return list(self._decisions.get(job_id, []))
