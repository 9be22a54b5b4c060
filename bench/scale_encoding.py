"""The scale bench's wire encoders: one fake agent's Telemetry message written as bytes.

The load generator (bench/scale_agents.py) must feed up to 100,000 ranks from one core,
which protobuf setters cannot do; these encoders write the serialized message straight
from numpy arrays, in the columnar form agent.py sends (`ColumnTelemetryEncoder`) or the
per-record form of older agents (`TelemetryEncoder`). Both parse to the message the
setters would build (tests/test_scale_sim.py).
"""

from __future__ import annotations

import collections
from typing import Any


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


class TelemetryEncoder:
    """One agent's Telemetry message in the per-record form (older agents; `--encoding
    records`), serialized straight into a byte template.

    Building K StepReports and K WorkerProgress with protobuf setters costs the generator
    microseconds per rank, too much for 100,000 ranks on one core; here every field is
    written explicitly with a fixed width (doubles; one-byte varints for steps and
    sequence numbers, so < 128), and each step only overwrites the variable fields, one
    numpy assignment per field over the agent's ranks. It parses to the same message the
    setters would build (test: tests/test_scale_sim.py).
    """

    def __init__(self, wids: list[str], *, epoch: int, num_samples: int, collective_bytes: int,
                 op: str, op_bytes: int) -> None:
        import numpy as np
        self._np = np
        self.k = len(wids)
        self._templates: dict[bool, tuple[Any, dict[str, Any]]] = {}
        for with_steps in (True, False):
            buf = bytearray()
            offs: dict[str, list[int]] = collections.defaultdict(list)

            def sub(field: int, body: bytes, where: dict[str, int], buf: bytearray = buf,
                    offs: dict[str, list[int]] = offs) -> None:
                head = _varint(field << 3 | 2) + _varint(len(body))
                for name, at in where.items():
                    offs[name].append(len(buf) + len(head) + at)
                buf.extend(head + body)

            for w in wids:   # field 1: WorkerProgress
                b, where = self._fields(w, epoch, (
                    ("p_step", 3, "v"), ("p_seq_entered", 4, "v"), ("p_seq_exited", 5, "v"),
                    ("p_in_collective_since_s", 6, "d"), ("p_last_progress_s", 7, "d"),
                    ("op", 8, op), ("op_bytes", 9, op_bytes), ("p_heartbeat_s", 10, "d")))
                sub(1, b, where)
            if with_steps:
                for w in wids:   # field 2: StepReport
                    b, where = self._fields(w, epoch, (
                        ("s_step", 3, "v"), ("s_loss", 4, "d"), ("s_step_time_s", 5, "d"),
                        ("s_completed_at_s", 6, "d"), ("num_samples", 7, num_samples),
                        ("s_compute_s", 8, "d"), ("s_wait_s", 9, "d"),
                        ("collective_bytes", 10, collective_bytes)))
                    sub(2, b, where)
            buf.extend(_varint(3 << 3 | 1))   # sent_at_s
            offs["sent_at_s"].append(len(buf))
            buf.extend(bytes(8))
            arr = np.frombuffer(buf, dtype=np.uint8).copy()
            self._templates[with_steps] = (arr, {n: np.asarray(v, dtype=np.int64)
                                                 for n, v in offs.items()})

    @staticmethod
    def _fields(wid: str, epoch: int, spec: tuple[tuple[str, int, Any], ...]
                ) -> tuple[bytes, dict[str, int]]:
        raw = wid.encode()
        body = bytearray(_varint(1 << 3 | 2) + _varint(len(raw)) + raw)
        body += _varint(2 << 3) + _varint(epoch)
        where = {}
        for name, field, kind in spec:
            if kind == "d":
                body += _varint(field << 3 | 1)
                where[name] = len(body)
                body += bytes(8)
            elif kind == "v":
                body += _varint(field << 3)
                where[name] = len(body)
                body += b"\0"
            elif isinstance(kind, str):
                body += _varint(field << 3 | 2) + _varint(len(kind.encode())) + kind.encode()
            else:
                body += _varint(field << 3) + _varint(kind)
        return bytes(body), where

    def encode(self, with_steps: bool, values: dict[str, Any]) -> bytes:
        """Serialized Telemetry; `values`: field name -> scalar or array over the ranks."""
        np = self._np
        arr, offs = self._templates[with_steps]
        for name, v in values.items():
            at = offs[name]
            if name[2:] in ("step", "seq_entered", "seq_exited"):
                v = np.broadcast_to(np.asarray(v, dtype=np.int64), at.shape)
                assert 0 <= v.min() and v.max() < 128, name
                arr[at] = v.astype(np.uint8)
            else:
                v = np.broadcast_to(np.asarray(v, dtype="<f8"), at.shape)
                arr[at[:, None] + np.arange(8)] = np.ascontiguousarray(v).view(
                    np.uint8).reshape(-1, 8)
        return arr.tobytes()


def _field(number: int, body: bytes) -> bytes:
    """A length-delimited field: a string, a sub-message or a packed column."""
    return _varint(number << 3 | 2) + _varint(len(body)) + body


def _varints(values: Any) -> bytes:
    """Unsigned integers as back-to-back varints (a packed integer column's body)."""
    import numpy as np
    v = np.asarray(values, dtype=np.uint64)
    if not len(v):
        return b""
    groups = []
    rest = v
    while True:
        low = (rest & np.uint64(0x7F)).astype(np.uint8)
        rest = rest >> np.uint64(7)
        more = rest != 0
        groups.append((low | (more.astype(np.uint8) << 7), more))
        if not more.any():
            break
    data = np.stack([g for g, _ in groups], axis=1)
    # Byte j of a value is written if j == 0 or byte j - 1 had its continuation bit.
    used = np.ones(data.shape, dtype=bool)
    for j in range(1, len(groups)):
        used[:, j] = used[:, j - 1] & groups[j - 1][1]
    return data[used].tobytes()


def _doubles(values: Any) -> bytes:
    import numpy as np
    return np.ascontiguousarray(values, dtype="<f8").tobytes()


class ColumnTelemetryEncoder:
    """One agent's Telemetry in the columnar form (what agent.py sends), serialized from
    numpy arrays.

    A packed column is a tag, a length and the values back to back (doubles as 8
    little-endian bytes, integers as varints), so each column is one numpy conversion, not
    one setter call per rank. Columns that do not change (worker index, epoch, op bytes)
    are encoded once; the op column (all 0: `ops` names one collective) is left empty, as
    an all-default column may be. The worker table goes with the agent's first batch. It
    parses to the message the setters build (test: tests/test_scale_sim.py).
    """

    def __init__(self, wids: list[str], *, epoch: int, num_samples: int, collective_bytes: int,
                 op: str, op_bytes: int) -> None:
        import numpy as np
        self._np = np
        self.k = k = len(wids)
        self._table = _field(7, b"".join(_field(1, w.encode()) for w in wids))
        self._table_sent = False
        worker = _field(1, _varints(np.arange(k))) + _field(2, _varints(np.full(k, epoch)))
        self._progress = worker + _field(9, _varints(np.full(k, op_bytes))) + _field(
            11, op.encode())
        self._steps = worker + _field(7, _varints(np.full(k, num_samples))) + _field(
            10, _varints(np.full(k, collective_bytes)))

    def encode(self, with_steps: bool, values: dict[str, Any]) -> bytes:
        """Serialized Telemetry; `values`: field name (p_: progress, s_: step) -> scalar or
        array over the ranks, and sent_at_s."""
        np = self._np

        def col(name: str) -> Any:
            return np.broadcast_to(values[name], (self.k,))

        out = [_varint(3 << 3 | 1), _doubles([values["sent_at_s"]])]
        if not self._table_sent:
            out.append(self._table)
            self._table_sent = True
        out.append(_field(8, b"".join((
            self._progress,
            _field(3, _varints(col("p_step"))), _field(4, _varints(col("p_seq_entered"))),
            _field(5, _varints(col("p_seq_exited"))),
            _field(6, _doubles(col("p_in_collective_since_s"))),
            _field(7, _doubles(col("p_last_progress_s"))),
            _field(10, _doubles(col("p_heartbeat_s")))))))
        if with_steps:
            out.append(_field(9, b"".join((
                self._steps, _field(3, _varints(col("s_step"))),
                _field(4, _doubles(col("s_loss"))), _field(5, _doubles(col("s_step_time_s"))),
                _field(6, _doubles(col("s_completed_at_s"))),
                _field(8, _doubles(col("s_compute_s"))), _field(9, _doubles(col("s_wait_s")))
            ))))
        return b"".join(out)
