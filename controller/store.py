"""Where the controller keeps what must survive it: the job's epochs and its decisions.

An epoch is written with compare-and-swap on the previous epoch before it is announced, so
two controllers can never both announce the same epoch (the epoch is the fencing token).
In-memory here; an etcd implementation slots in behind the same interface.
"""

from __future__ import annotations

import json
import threading
from dataclasses import asdict, dataclass
from typing import Protocol


class EpochConflict(Exception):
    """The stored epoch is not the one the writer expected: another writer got there first.

    The writer's view is stale; it must reload the job's state and must not announce.
    """


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

    def commit_epoch(self, record: EpochRecord, *, expected_epoch: int) -> None:
        """Persist `record` if the stored epoch is `expected_epoch` (0: none yet).

        Raises EpochConflict otherwise, leaving the store unchanged.
        """
        ...

    def append_decision(self, job_id: str, text: str) -> None:
        """Append a line to the job's decision log (an audit trail; never read for control)."""
        ...

    def decisions(self, job_id: str) -> list[str]: ...


class InMemoryStateStore:
    """The default store: correct for one controller; lost when the controller exits."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._epochs: dict[str, str] = {}
        self._decisions: dict[str, list[str]] = {}

    def load_epoch(self, job_id: str) -> EpochRecord | None:
        with self._lock:
            text = self._epochs.get(job_id)
        return None if text is None else EpochRecord.from_json(text)

    def commit_epoch(self, record: EpochRecord, *, expected_epoch: int) -> None:
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
