"""Controller scale: many fake agents stream telemetry to one real controller on one core.

The design target is 100,000 ranks at one step per second on one controller core. This
bench starts a real in-process `Controller` (gRPC server, event loop, telemetry hub,
detectors) in its own process pinned to CPU 0, and a load generator in another process
pinned to CPU 1: one asyncio loop with one grpc.aio Attach stream per fake agent. Each
agent says hello, reports its workers ready, waits for the membership, then once per
simulated second sends ONE Telemetry message: a step report per worker for the step that
just ended (compute ~0.6 s with 5 % lognormal jitter, wait filling the 1 s step,
completed_at_s) and a progress record per worker (one all_reduce per step; the counters
as the agent would read them at that instant). Agents are spread evenly over the second.
By default the records go as columns, as agent.py sends them (`ColumnTelemetryEncoder`:
packed columns indexing a worker table sent with the first batch); `--encoding records`
sends one StepReport and one WorkerProgress message per rank, as older agents did
(`TelemetryEncoder`). Either is written pre-serialized (the bytes the protobuf setters
would produce, from numpy arrays) so that one core can feed 100,000 ranks; one HTTP/2
connection carries 8 streams.

Per scale N it injects one straggler (a rank's compute x1.5 from some step) and then a
hang (one rank stops mid-compute; every other rank waits in that step's all_reduce
forever) and reads the verdicts the controller records.

Measured per N: step records processed per second by the controller (counted where the
telemetry hub consumes them), the controller process's CPU % (psutil; 100 % = one core),
the processing lag (controller time when a batch was consumed minus its sent_at_s), the
generator's own lag (so that a slow generator is not blamed on the controller), and the
detection latency of both faults. `keeps_up`: >= 95 % of N records/s, lag p99 < 1 s.

Forming a world goes through the controller's real path (N WorkerReady events) up to
--real-forming-max-n ranks. Forming is quadratic in N in the job state machine (every
WorkerReady copies the worker map and re-sorts the ready list), so above that the bench
seeds the job with N-1 ready workers and sends only the last READY over gRPC: the job
still reaches RUNNING with N members through `Controller._apply`, in one event.

The controller's gRPC server runs each Attach stream on one of 256 executor threads, so at
most ~250 agents can be attached at once; ranks per agent K is raised (K = N / agents)
when N / 8 agents would exceed --max-agents, and reported.

    python -m bench.scale [--ranks 1000,3000,10000,30000,100000] [--profile]

Prints one JSON object per N and a summary, each with the machine, the date and the command.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import datetime
import json
import math
import multiprocessing as mp
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

JOB = "scale"
COMPUTE_FRACTION = 0.6   # median compute per step; the rest of the step is the all_reduce
TRANSFER_FRACTION = 0.05
JITTER_SIGMA = 0.05     # lognormal jitter on compute time
STRAGGLER_FACTOR = 1.5


@dataclasses.dataclass(frozen=True, kw_only=True)
class Scenario:
    num_ranks: int
    ranks_per_agent: int
    preform: bool
    period_s: float = 1.0          # one step per second (the smoke test goes faster)
    straggler_step: int = 4        # the straggler's compute is x1.5 from this step on
    hang_step: int = 18            # the hang happens 0.1 s into this step
    hang_wait_s: float = 10.0      # telemetry keeps flowing this long after the hang
    measure_steps: tuple[int, int] = (2, 17)   # steady window for throughput
    encoding: str = "columns"      # or "records" (older agents' one message per record)

    @property
    def num_agents(self) -> int:
        return self.num_ranks // self.ranks_per_agent

    @property
    def straggler_rank(self) -> int:
        return self.num_ranks // 2 + 3

    @property
    def hang_rank(self) -> int:
        return self.num_ranks // 4 + 1


def node_id(agent: int) -> str:
    return f"n{agent:05d}"   # zero-padded: rank order (node, local rank) = agent order


def worker(agent: int, local: int) -> str:
    return f"{node_id(agent)}/{local}"


def pin(cpu: int) -> bool:
    try:
        os.sched_setaffinity(0, {cpu})
        return True
    except (AttributeError, OSError):
        return False


# ---- the controller process ---------------------------------------------------------------

def controller_main(conn: Any, sc: Scenario, cpu: int) -> None:
    pinned = pin(cpu)      # before grpc starts its threads: they inherit the affinity
    import logging
    from types import MappingProxyType

    from splice.controller import job as jobs
    from splice.controller.hang import HangConfig
    from splice.controller.service import Controller, ControllerConfig
    from splice.controller.store import InMemoryStateStore
    from splice.controller.telemetry_hub import DetectionConfig

    config = ControllerConfig(listen="127.0.0.1:0", node_timeout_s=600,
                              jobs=(jobs.JobSpec(job_id=JOB, world_size=sc.num_ranks),))
    # Telemetry comes once per second here (agents send every 0.1 s by default), so a
    # heartbeat is up to ~1 s old when read: the "stopped" test must allow for that.
    detection = DetectionConfig(hang=HangConfig(heartbeat_timeout_s=2.5 * sc.period_s))
    c = Controller(config, InMemoryStateStore(), detection=detection)
    # Verdicts are read through record_verdict below; a hang's reason names every rank
    # waiting (O(N) characters), which would flood the bench's output.
    logging.getLogger("splice").setLevel(logging.ERROR)
    c.start()
    if sc.preform:
        # N-1 workers ready (the state the real path would reach, without its quadratic
        # cost); the last agent's last READY forms the job through the real event path.
        records = {}
        rt = c._jobs[JOB]
        for a in range(sc.num_agents):
            for w in range(sc.ranks_per_agent):
                wid = worker(a, w)
                records[wid] = jobs.WorkerRecord(pid=1000 + w, state=jobs.WorkerState.READY)
                rt.view.worker_seen(wid, node_id(a), 1000 + w)
        del records[worker(sc.num_agents - 1, sc.ranks_per_agent - 1)]
        rt.state = dataclasses.replace(rt.state, workers=MappingProxyType(records))

    lock = threading.Lock()
    counts = {"records": 0, "batches": 0, "progress": 0}
    lags: list[float] = []
    verdicts: list[dict[str, Any]] = []
    hub = c.telemetry
    assert hub is not None
    observe = hub.observe

    def counted_observe(job_id: str, node: str, batch: Any, epoch: int) -> None:
        observe(job_id, node, batch, epoch)
        now = time.time()
        with lock:
            counts["records"] += len(batch.steps)
            counts["progress"] += len(batch.progress)
            counts["batches"] += 1
            lags.append(now - batch.sent_at_s)

    hub.observe = counted_observe  # type: ignore[method-assign]
    record_verdict = c.record_verdict

    def noted_verdict(job_id: str, verdict: Any, fault: str = "") -> None:
        with lock:
            verdicts.append({"seen_at_s": time.time(), "at_s": verdict.at_s,
                             "detector": verdict.detector, "kind": verdict.kind,
                             "worker_id": verdict.worker_id, "action": verdict.action,
                             "reason": verdict.reason})
        record_verdict(job_id, verdict, fault)

    c.record_verdict = noted_verdict  # type: ignore[method-assign]
    conn.send({"port": c.port, "pid": os.getpid(), "pinned": pinned})
    while True:
        cmd = conn.recv()
        if cmd == "stop":
            break
        if cmd == "stats":
            with lock:
                conn.send({**counts, "lags": list(lags), "verdicts": list(verdicts)})
                lags.clear()
        elif cmd == "status":
            t0 = time.perf_counter()
            status = c.job_status(JOB)
            took = time.perf_counter() - t0
            steps = collections.Counter(w.last_step for w in status.workers)
            faults = [(e.at_s, e.text[:100]) for e in status.timeline
                      if e.kind in ("fault", "epoch")]
            conn.send({"job_status_s": took, "workers": len(status.workers),
                       "phase": status.phase, "epoch": status.epoch, "faults": faults[:4],
                       "last_steps": dict(steps.most_common(3)),
                       "verdicts": [(v.detector, v.worker_id, v.at_s) for v in status.verdicts]})
    c.stop(grace_s=0.5)
    conn.send("stopped")


# ---- the generator's encoder -----------------------------------------------------------------

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


# ---- the load generator process ------------------------------------------------------------

def generator_main(conn: Any, sc: Scenario, port: int, cpu: int, t_form_deadline: float
                   ) -> None:
    pinned = pin(cpu)
    result = asyncio.run(_generate(conn, sc, port, t_form_deadline, pinned))
    if not result.get("formed"):
        conn.send(result)


async def _generate(conn: Any, sc: Scenario, port: int, form_deadline_s: float,
                    pinned: bool) -> dict[str, Any]:
    import grpc
    import numpy as np

    from splice.controller.service import PROTOCOL_VERSION
    from splice.proto import controller_pb2 as pb

    K, A, P = sc.ranks_per_agent, sc.num_agents, sc.period_s
    # Several connections: one HTTP/2 connection per 8 streams (flow control is per
    # connection too: with 500 ranks an agent's message is ~100 KB).
    channels = [grpc.aio.insecure_channel(
        f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1),
                                      ("grpc.max_send_message_length", 64 << 20)])
        for _ in range(math.ceil(A / 8))]
    # The Attach method with a serializer that passes pre-encoded messages through.
    stubs = [ch.stream_stream(
        "/splice.v1.Controller/Attach",
        request_serializer=lambda m: m if isinstance(m, bytes) else m.SerializeToString(),
        response_deserializer=pb.ControllerMessage.FromString) for ch in channels]
    formed = asyncio.Event()
    kills: list[tuple[float, str]] = []
    t_form0 = time.time()
    t_formed = [0.0]
    member_msgs = [0]

    async def read(call: Any) -> None:
        try:
            while True:
                msg = await call.read()
                if msg is grpc.aio.EOF:
                    return
                kind = msg.WhichOneof("kind")
                if kind == "membership":
                    member_msgs[0] += 1
                    if len(msg.membership.members) == sc.num_ranks and not formed.is_set():
                        t_formed[0] = time.time()
                        formed.set()
                elif kind == "kill":
                    kills.append((time.time(), msg.kill.worker_id))
        except grpc.aio.AioRpcError:
            pass

    calls = []
    readers = []
    for a in range(A):
        call = stubs[a % len(stubs)]()
        await call.write(pb.AgentMessage(hello=pb.AgentHello(
            protocol_version=PROTOCOL_VERSION, job_id=JOB, node_id=node_id(a),
            num_workers=K, hostname=node_id(a))))
        first = await call.read()
        assert first.WhichOneof("kind") == "welcome", first
        calls.append(call)
        readers.append(asyncio.ensure_future(read(call)))
    t_attached = time.time()
    for a, call in enumerate(calls):
        locals_ = range(K)
        if sc.preform:
            locals_ = range(K - 1, K) if a == A - 1 else range(0)
        for w in locals_:
            await call.write(pb.AgentMessage(worker_event=pb.WorkerEvent(
                worker_id=worker(a, w), kind=pb.WorkerEvent.Kind.READY, pid=1000 + w)))
    try:
        await asyncio.wait_for(formed.wait(), timeout=form_deadline_s)
    except asyncio.TimeoutError:
        return {"formed": False, "attach_s": t_attached - t_form0,
                "forming_s": None}
    result: dict[str, Any] = {"formed": True, "generator_pinned": pinned,
                              "attach_s": round(t_attached - t_form0, 2),
                              "forming_s": round(t_formed[0] - t_attached, 2)}

    # Step s runs in [t0 + s, t0 + s + 1); agent a sends at t0 + s + 1 + offset(a).
    t0 = math.ceil(time.time()) + 1.0
    conn.send({"t0": t0})
    gen_lag: list[float] = []
    s_rank, h_rank = sc.straggler_rank, sc.hang_rank
    end_step = sc.hang_step + int(sc.hang_wait_s / P) + 1
    # Compute time of every rank at every step, drawn up front (step hang_step never ends).
    rng = np.random.default_rng(7)
    comp = COMPUTE_FRACTION * P * rng.lognormal(0.0, JITTER_SIGMA, size=(sc.hang_step + 1, sc.num_ranks))
    comp[sc.straggler_step:, s_rank] *= STRAGGLER_FACTOR
    slowest_of = comp.max(axis=1).tolist()

    async def agent(a: int) -> None:
        call = calls[a]
        offset = (a + 0.5) / A * P * 0.9
        encoder = ColumnTelemetryEncoder if sc.encoding == "columns" else TelemetryEncoder
        enc = encoder([worker(a, w) for w in range(K)], epoch=1, num_samples=32,
                      collective_bytes=1 << 26, op="all_reduce", op_bytes=1 << 26)
        head = _varint(6 << 3 | 2)   # AgentMessage.telemetry
        local_hang = h_rank - a * K if a * K <= h_rank < (a + 1) * K else None
        for done in range(0, end_step):          # `done`: the step that just ended
            at = t0 + (done + 1) * P + offset
            delay = at - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
            now = time.time()
            gen_lag.append(now - at)
            cur = done + 1                       # the step in flight at `now`
            into = now - (t0 + cur * P)
            hung = done >= sc.hang_step          # step `hang_step` never completes
            lo, hi = a * K, (a + 1) * K
            step_c = comp[min(done, sc.hang_step), lo:hi]
            cur_c = comp[min(cur, sc.hang_step), lo:hi]
            slowest = slowest_of[min(done, sc.hang_step)]
            v: dict[str, Any] = {}
            if not hung:
                step_time = slowest + TRANSFER_FRACTION * P
                v.update(s_step=done, s_compute_s=step_c,
                         s_wait_s=slowest - step_c + TRANSFER_FRACTION * P,
                         s_step_time_s=step_time, s_completed_at_s=t0 + done * P + step_time,
                         s_loss=2.0 / (1 + done))
            if cur >= sc.hang_step:              # the hang: nobody gets past hang_step
                h0 = t0 + sc.hang_step * P
                entered = h0 + cur_c
                inside = now >= entered          # waits in the all_reduce forever
                seq_in = np.where(inside, sc.hang_step + 1, sc.hang_step)
                since = np.where(inside, entered, 0.0)
                last = np.where(inside, entered, h0)
                beat = np.full(K, now)
                if local_hang is not None:       # stopped 0.1 s into its compute
                    seq_in[local_hang], since[local_hang] = sc.hang_step, 0.0
                    last[local_hang], beat[local_hang] = h0, h0 + 0.1 * P
                v.update(p_step=sc.hang_step, p_seq_entered=seq_in,
                         p_seq_exited=sc.hang_step, p_in_collective_since_s=since,
                         p_last_progress_s=last, p_heartbeat_s=beat)
            else:
                computing = into < cur_c
                start = t0 + cur * P
                v.update(p_step=cur, p_seq_entered=np.where(computing, cur, cur + 1),
                         p_seq_exited=cur,
                         p_in_collective_since_s=np.where(computing, 0.0, start + cur_c),
                         p_last_progress_s=np.where(computing, start, start + cur_c),
                         p_heartbeat_s=now)
            v["sent_at_s"] = time.time()
            body = enc.encode(not hung, v)
            await call.write(head + _varint(len(body)) + body)

    injected = {"straggler": t0 + sc.straggler_step * P, "hang": t0 + (sc.hang_step + 0.1) * P}
    result.update(t0=t0, injected=injected)
    await asyncio.gather(*(agent(a) for a in range(A)))
    gen_lag.sort()
    result.update(generator_lag_p50_s=round(gen_lag[len(gen_lag) // 2], 3),
                  generator_lag_p99_s=round(gen_lag[int(len(gen_lag) * 0.99)], 3),
                  kills=kills[:3], membership_messages=member_msgs[0])
    # Keep the streams open (a closed stream is a lost node) until the orchestrator has
    # read the verdicts and the status.
    conn.send(result)
    await asyncio.get_running_loop().run_in_executor(None, conn.recv)
    for call in calls:
        await call.done_writing()
    for ch in channels:
        await ch.close(grace=None)
    for r in readers:
        r.cancel()
    return result


# ---- the orchestrator ---------------------------------------------------------------------

def plan_agents(num_ranks: int, ranks_per_agent: int, max_agents: int) -> int:
    """Ranks per agent: the requested K unless that needs more than max_agents streams."""
    k = ranks_per_agent
    while num_ranks // k > max_agents or num_ranks % k:
        k += 1
    return k


def percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(len(xs) * q))], 3)


def run_scale(sc: Scenario, *, form_timeout_s: float = 120.0, verdict_wait_s: float = 20.0,
              status_max_n: int = 10000, profile_on: bool = False) -> dict[str, Any]:
    """Run one scale in two fresh processes; one result row (see the module docstring)."""
    import psutil

    ctx = mp.get_context("spawn")
    c_conn, c_child = ctx.Pipe()
    cp = ctx.Process(target=controller_main, args=(c_child, sc, 0), daemon=True)
    cp.start()
    hello = c_conn.recv()
    proc = psutil.Process(hello["pid"])
    g_conn, g_child = ctx.Pipe()
    gp = ctx.Process(target=generator_main,
                     args=(g_child, sc, hello["port"], 1, form_timeout_s), daemon=True)
    t_start = time.time()
    gp.start()

    def stats() -> dict[str, Any]:
        c_conn.send("stats")
        s: dict[str, Any] = c_conn.recv()
        return s

    # The generator says when step 0 starts once the job formed (or ends if it did not).
    t0 = None
    gen: dict[str, Any] = {}
    if g_conn.poll(form_timeout_s + 300):
        first = g_conn.recv()
        if "t0" in first:
            t0 = first["t0"]
        else:
            gen = first
    # Other work on the machine competes with both processes: say how busy it was.
    row: dict[str, Any] = {"num_ranks": sc.num_ranks, "ranks_per_agent": sc.ranks_per_agent,
                           "loadavg_1m_at_start": round(os.getloadavg()[0], 2),
                           "num_agents": sc.num_agents, "encoding": sc.encoding,
                           "forming": "seeded N-1 ready" if sc.preform else "real",
                           "controller_pinned_cpu0": hello["pinned"]}
    profile: dict[str, Any] | None = None
    if t0 is not None:
        a, b = sc.measure_steps
        _sleep_until(t0 + (a + 1.95) * sc.period_s)
        base = stats()
        proc.cpu_percent(None)
        cpu0 = proc.cpu_times()
        w0 = time.time()
        spy = _start_py_spy(hello["pid"], (b - a) * sc.period_s) if profile_on else None
        _sleep_until(t0 + (b + 1.95) * sc.period_s)
        cpu_pct = proc.cpu_percent(None)
        cpu1 = proc.cpu_times()
        w1 = time.time()
        mid = stats()
        if spy is not None:
            profile = _finish_py_spy(*spy)
        rate = (mid["records"] - base["records"]) / (w1 - w0)
        lag = mid["lags"]
        row.update(
            step_records_per_s=round(rate, 1),
            progress_records_per_s=round((mid["progress"] - base["progress"]) / (w1 - w0), 1),
            controller_cpu_pct=round(cpu_pct, 1),
            controller_cpu_user_sys_s_per_s=round(
                (cpu1.user + cpu1.system - cpu0.user - cpu0.system) / (w1 - w0), 3),
            lag_p50_s=percentile(lag, 0.5), lag_p99_s=percentile(lag, 0.99),
            lag_max_s=percentile(lag, 1.0))
        row["keeps_up"] = bool(rate >= 0.95 * sc.num_ranks / sc.period_s
                               and (row["lag_p99_s"] or 9) < 1.0)
    if t0 is not None and g_conn.poll(sc.hang_step * sc.period_s + sc.hang_wait_s + 120):
        gen = g_conn.recv()
    row.update(forming_s=gen.get("forming_s"), attach_s=gen.get("attach_s"),
               generator_lag_p50_s=gen.get("generator_lag_p50_s"),
               generator_lag_p99_s=gen.get("generator_lag_p99_s"),
               generator_pinned_cpu1=gen.get("generator_pinned"))
    if gen.get("formed"):
        deadline = time.time() + verdict_wait_s
        verdicts: list[dict[str, Any]] = []
        while time.time() < deadline:
            verdicts = stats()["verdicts"]
            if {"hang", "straggler"} <= {v["detector"] for v in verdicts}:
                break
            time.sleep(0.5)
        row.update(_detections(sc, gen, verdicts))
        if sc.num_ranks <= status_max_n:
            c_conn.send("status")
            st = c_conn.recv()
            row["job_status_s"] = round(st["job_status_s"], 3)
            row["job_status_verdicts"] = len(st["verdicts"])
            row.update(final_phase=st["phase"], final_epoch=st["epoch"],
                       timeline=[(round(at - t0, 1), text) for at, text in st["faults"]])
        else:
            row["job_status_s"] = f"skipped above --status-max-n {status_max_n}"
    elif gen:
        row["error"] = f"job did not form within {form_timeout_s} s"
    if profile is not None:
        row["profile"] = profile
    if t0 is not None:
        g_conn.send("close")
    c_conn.send("stop")
    if c_conn.poll(15):
        c_conn.recv()
    for p in (cp, gp):
        p.join(timeout=5)
        if p.is_alive():
            p.kill()
    row["wall_s"] = round(time.time() - t_start, 1)
    row["loadavg_1m_at_end"] = round(os.getloadavg()[0], 2)
    return row


def _detections(sc: Scenario, gen: dict[str, Any], verdicts: list[dict[str, Any]]
                ) -> dict[str, Any]:
    out: dict[str, Any] = {}
    want = {"straggler": worker(sc.straggler_rank // sc.ranks_per_agent,
                                sc.straggler_rank % sc.ranks_per_agent),
            "hang": worker(sc.hang_rank // sc.ranks_per_agent, sc.hang_rank % sc.ranks_per_agent)}
    for kind in ("straggler", "hang"):
        vs = [v for v in verdicts if v["detector"] == kind and v["action"] != "cleared"]
        at = gen["injected"][kind]
        # Verdicts before the fault was injected are false alarms (a lagging controller
        # reads stale progress as a stall).
        out[f"{kind}_false_verdicts"] = sum(v["at_s"] < at for v in vs)
        hits = [v for v in vs if v["at_s"] >= at]
        if not hits:
            out[f"{kind}_detect_s"] = None
            continue
        v = hits[0]
        out[f"{kind}_detect_s"] = round(v["at_s"] - at, 2)
        out[f"{kind}_culprit_correct"] = v["worker_id"] == want[kind]
        m = re.search(r"at step (\d+)", v["reason"])
        if kind == "straggler" and m:
            out["straggler_detect_steps"] = int(m.group(1)) - sc.straggler_step + 1
    return out


def _sleep_until(t: float) -> None:
    time.sleep(max(0.0, t - time.time()))


def _start_py_spy(pid: int, duration_s: float) -> tuple[subprocess.Popen[bytes], str] | None:
    exe = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    if not os.path.exists(exe):
        return None
    out = os.path.join(tempfile.mkdtemp(prefix="splice-scale-"), "profile.txt")
    cmd = [exe, "record", "--pid", str(pid), "--format", "raw", "--rate", "50",
           "--nonblocking", "--duration", str(int(duration_s)), "--output", out]
    with open(out + ".log", "wb") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), out


def _finish_py_spy(p: subprocess.Popen[bytes], path: str) -> dict[str, Any]:
    """Top functions by samples (self and inclusive), from py-spy's collapsed stacks."""
    try:
        p.wait(timeout=60)
    except subprocess.TimeoutExpired:   # py-spy could not keep up: keep what it wrote
        p.kill()
        p.wait()
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    try:
        with open(path) as f:
            for line in f:
                stack, _, n = line.rstrip().rpartition(" ")
                frames = [fr.split(" (")[0] + "@" + fr.split("/")[-1].rstrip(")")
                          for fr in stack.split(";")]
                if frames[-1].split("@")[0].endswith(("wait", "get", "_wait_once", "select")):
                    continue   # an idle thread blocked in a queue or a poll
                total += int(n)
                own[frames[-1]] += int(n)
                for fr in set(frames):
                    inclusive[fr] += int(n)
    except OSError as e:
        try:
            with open(path + ".log") as f:
                said = f.read()[-500:]
        except OSError:
            said = ""
        return {"error": f"py-spy wrote no profile: {e}; it said: {said}"}
    return {"busy_samples": total,
            "top_self": [(f, round(n / max(total, 1), 3)) for f, n in own.most_common(12)],
            "top_inclusive": [(f, round(n / max(total, 1), 3))
                              for f, n in inclusive.most_common(25)]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", default="1000,3000,10000,30000,100000",
                   help="comma-separated world sizes")
    p.add_argument("--ranks-per-agent", type=int, default=8)
    p.add_argument("--max-agents", type=int, default=240,
                   help="the controller serves at most ~256 Attach streams (executor size)")
    p.add_argument("--real-forming-max-n", type=int, default=2000,
                   help="above this, seed N-1 ready workers (forming is quadratic)")
    p.add_argument("--form-timeout-s", type=float, default=120.0)
    p.add_argument("--verdict-wait-s", type=float, default=20.0)
    p.add_argument("--status-max-n", type=int, default=10000,
                   help="call job_status() only up to this N (it is slow at scale)")
    p.add_argument("--profile", action="store_true", help="py-spy the controller")
    p.add_argument("--encoding", choices=("columns", "records"), default="columns",
                   help="telemetry as columns (agent.py) or one message per record (older "
                        "agents)")
    args = p.parse_args(argv)
    command = "python -m bench.scale " + " ".join(argv if argv is not None else sys.argv[1:])
    meta = {"command": command.strip(),
            "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus "
                       f"python {platform.python_version()}",
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    if (os.cpu_count() or 1) < 2:
        print(json.dumps({"warning": "fewer than 2 CPUs: controller and generator share"}))
    rows = []
    for n in (int(x) for x in args.ranks.split(",")):
        k = plan_agents(n, args.ranks_per_agent, args.max_agents)
        sc = Scenario(num_ranks=n, ranks_per_agent=k, preform=n > args.real_forming_max_n,
                      encoding=args.encoding)
        row = run_scale(sc, form_timeout_s=args.form_timeout_s,
                        verdict_wait_s=args.verdict_wait_s, status_max_n=args.status_max_n,
                        profile_on=args.profile)
        row.update(meta)
        rows.append(row)
        print(json.dumps(row), flush=True)
    kept = [r["num_ranks"] for r in rows if r.get("keeps_up")]
    summary = {"summary": "controller scale", **meta,
               "ranks_sustained_1_step_per_s_one_core": max(kept) if kept else 0,
               "target": 100000,
               "by_n": {r["num_ranks"]: {k: r.get(k) for k in (
                   "keeps_up", "step_records_per_s", "controller_cpu_pct", "lag_p99_s",
                   "straggler_detect_s", "hang_detect_s")} for r in rows}}
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
