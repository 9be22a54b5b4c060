"""Telemetry batches as columns: one numpy array per field over a batch's records.

At 100,000 ranks and one step per second the controller reads 200,000 telemetry records a
second (a progress record and a step report per rank). One Python object per record (a
protobuf message, then each of its fields) costs more than a core at that rate, so agents
send packed columns (proto: `ProgressColumns`, `StepColumns`) naming workers by their index
in a worker table sent once per stream, and `decode` turns every column into a numpy array
in one call. Batches of older agents, one message per record, decode into the same arrays
(one record at a time, as before), so everything downstream has a single path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from operator import attrgetter
from typing import Any

import numpy as np

from splice.proto import controller_pb2 as pb

__all__ = ["Batch", "MalformedTelemetry", "Progress", "Steps", "decode", "encode_progress",
           "encode_steps"]


class MalformedTelemetry(ValueError):
    """The batch contradicts itself (columns of different lengths, an index outside its
    table): refuse it whole."""


_U64, _F64, _I64 = np.uint64, np.float64, np.int64


@dataclass(frozen=True, eq=False)
class Progress:
    """WorkerProgress records as parallel arrays (entry i of each is record i)."""
    worker: np.ndarray                  # index into Batch.worker_ids
    epoch: np.ndarray
    step: np.ndarray
    seq_entered: np.ndarray
    seq_exited: np.ndarray
    in_collective_since_s: np.ndarray
    last_progress_s: np.ndarray
    op: np.ndarray                      # index into `ops`
    op_bytes: np.ndarray
    heartbeat_s: np.ndarray
    ops: tuple[str, ...]                # never empty ("" when the batch named none)

    def __len__(self) -> int:
        return len(self.worker)


@dataclass(frozen=True, eq=False)
class Steps:
    """StepReport records as parallel arrays (entry i of each is record i)."""
    worker: np.ndarray                  # index into Batch.worker_ids
    epoch: np.ndarray
    step: np.ndarray
    loss: np.ndarray
    step_time_s: np.ndarray
    completed_at_s: np.ndarray
    num_samples: np.ndarray
    compute_s: np.ndarray
    wait_s: np.ndarray
    collective_bytes: np.ndarray
    snapshot_bytes: np.ndarray
    snapshot_at_s: np.ndarray

    def __len__(self) -> int:
        return len(self.worker)

    def report(self, i: int, worker_id: str) -> pb.StepReport:
        """Record i as the message an older agent would have sent (for the status view)."""
        return pb.StepReport(
            worker_id=worker_id, epoch=int(self.epoch[i]), step=int(self.step[i]),
            loss=float(self.loss[i]), step_time_s=float(self.step_time_s[i]),
            completed_at_s=float(self.completed_at_s[i]),
            num_samples=int(self.num_samples[i]), compute_s=float(self.compute_s[i]),
            wait_s=float(self.wait_s[i]), collective_bytes=int(self.collective_bytes[i]),
            snapshot_bytes=int(self.snapshot_bytes[i]),
            snapshot_at_s=float(self.snapshot_at_s[i]))


# Column name -> dtype, in proto field order (the worker index comes first in both).
_PROGRESS = {"worker": _I64, "epoch": _U64, "step": _U64, "seq_entered": _U64,
             "seq_exited": _U64, "in_collective_since_s": _F64, "last_progress_s": _F64,
             "op": _I64, "op_bytes": _U64, "heartbeat_s": _F64}
_STEPS = {"worker": _I64, "epoch": _U64, "step": _U64, "loss": _F64, "step_time_s": _F64,
          "completed_at_s": _F64, "num_samples": _U64, "compute_s": _F64, "wait_s": _F64,
          "collective_bytes": _U64, "snapshot_bytes": _U64, "snapshot_at_s": _F64}
assert list(_PROGRESS) == [f.name for f in fields(Progress) if f.name != "ops"]
assert list(_STEPS) == [f.name for f in fields(Steps)]


@dataclass(frozen=True, eq=False)
class Batch:
    """One agent's telemetry batch, decoded."""
    worker_ids: tuple[str, ...]   # the table the `worker` columns index
    progress: Progress
    steps: Steps
    sent_at_s: float
    dropped: int

    @property
    def num_records(self) -> int:
        return len(self.progress) + len(self.steps)


def decode(batch: pb.Telemetry, table: tuple[str, ...]) -> Batch:
    """The batch's records (per-record ones first, then columns) as arrays.

    `table`: the worker table in force on this stream (the batch's own `workers` if it has
    one). Worker ids are not checked here: the caller checks the table and the per-record
    ids once. Raises MalformedTelemetry.
    """
    progress = _progress_columns(batch.progress_columns, len(table))
    steps = _step_columns(batch.step_columns, len(table))
    if batch.progress or batch.steps:
        # An older agent's records (or a new agent's few per-record ones): give their
        # workers indices after the table's and put them first. (Lists: each pass over a
        # repeated message field makes a new Python object per record.)
        old_progress, old_steps = list(batch.progress), list(batch.steps)
        extra = dict.fromkeys([p.worker_id for p in old_progress]
                              + [s.worker_id for s in old_steps])
        index = {w: len(table) + i for i, w in enumerate(extra)}
        table = table + tuple(extra)
        progress = _concat_progress(_progress_records(old_progress, index), progress)
        steps = _concat(Steps, _step_records(old_steps, index), steps)
    return Batch(worker_ids=table, progress=progress, steps=steps,
                 sent_at_s=batch.sent_at_s, dropped=batch.dropped)


def _columns(msg: Any, spec: dict[str, Any], what: str) -> dict[str, np.ndarray]:
    """Every column of `msg` as an array; an empty column means every entry is 0."""
    n = len(msg.worker)
    out = {}
    for name, dtype in spec.items():
        col = getattr(msg, name)
        if len(col) == n:
            out[name] = np.array(col, dtype=dtype)
        elif len(col) == 0:
            out[name] = np.zeros(n, dtype=dtype)
        else:
            raise MalformedTelemetry(f"{what} column {name!r} has {len(col)} entries for "
                                     f"{n} records")
    return out


def _check_index(col: np.ndarray, size: int, what: str) -> None:
    if len(col) and int(col.max()) >= size:
        raise MalformedTelemetry(f"{what} refers to entry {int(col.max())} of a table of "
                                 f"{size}" + ("" if size else " (no worker table was sent "
                                              "on this stream)"))


def _progress_columns(msg: pb.ProgressColumns, table_size: int) -> Progress:
    cols = _columns(msg, _PROGRESS, "progress")
    _check_index(cols["worker"], table_size, "a progress record's worker")
    ops = tuple(msg.ops) or ("",)
    _check_index(cols["op"], len(ops), "a progress record's op")
    return Progress(**cols, ops=ops)


def _step_columns(msg: pb.StepColumns, table_size: int) -> Steps:
    cols = _columns(msg, _STEPS, "step")
    _check_index(cols["worker"], table_size, "a step record's worker")
    return Steps(**cols)


def _records(records: Sequence[Any], index: dict[str, int], spec: dict[str, Any],
             skip: tuple[str, ...]) -> dict[str, np.ndarray]:
    n = len(records)
    out = {"worker": np.fromiter([index[r.worker_id] for r in records], dtype=_I64, count=n)}
    for name, dtype in spec.items():
        if name not in out and name not in skip:
            out[name] = np.fromiter(map(attrgetter(name), records), dtype=dtype, count=n)
    return out


def _progress_records(records: Sequence[pb.WorkerProgress], index: dict[str, int]
                      ) -> Progress:
    cols = _records(records, index, _PROGRESS, ("op",))
    op_of: dict[str, int] = {}
    cols["op"] = np.fromiter([op_of.setdefault(r.op, len(op_of)) for r in records],
                             dtype=_I64, count=len(records))
    return Progress(**cols, ops=tuple(op_of) or ("",))


def _step_records(records: Sequence[pb.StepReport], index: dict[str, int]) -> Steps:
    return Steps(**_records(records, index, _STEPS, ()))


def _concat(cls: Any, a: Any, b: Any) -> Any:
    if not len(a):
        return b
    if not len(b):
        return a
    return cls(**{f.name: np.concatenate([getattr(a, f.name), getattr(b, f.name)])
                  for f in fields(cls)})


def _concat_progress(a: Progress, b: Progress) -> Progress:
    if not len(a) or not len(b):
        return b if not len(a) else a
    cols = {name: np.concatenate([getattr(a, name), getattr(b, name)]) for name in _PROGRESS}
    cols["op"] = np.concatenate([a.op, b.op + len(a.ops)])
    return Progress(**cols, ops=a.ops + b.ops)


# ---- the agent's side ---------------------------------------------------------------------

def encode_progress(out: pb.ProgressColumns, records: Sequence[tuple[int, Any]]) -> None:
    """Append (worker index, progress) pairs to `out`; `progress` has WorkerProgress's
    fields (agent/progress.py's Progress does)."""
    op_of = {op: i for i, op in enumerate(out.ops)}
    out.worker.extend([w for w, _ in records])
    for name in _PROGRESS:
        if name not in ("worker", "op"):
            getattr(out, name).extend([getattr(p, name) for _, p in records])
    out.op.extend([op_of.setdefault(p.op, len(op_of)) for _, p in records])
    out.ops.extend(list(op_of)[len(out.ops):])


def encode_steps(out: pb.StepColumns, records: Sequence[tuple[int, pb.StepReport]]) -> None:
    """Append (worker index, step report) pairs to `out`."""
    out.worker.extend([w for w, _ in records])
    for name in _STEPS:
        if name != "worker":
            getattr(out, name).extend([getattr(r, name) for _, r in records])
