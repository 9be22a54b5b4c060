"""The simulated side of the scale bench: the scenario and the fake agents that enact it.

`Scenario` says how big the job is, how fast it steps and when the straggler and the hang
are injected. The load generator process runs one asyncio loop with one grpc.aio Attach
stream per fake agent: each says hello, reports its workers ready, waits for the
membership, then once per simulated step sends one pre-serialized Telemetry message
(bench/scale_encoding.py) describing the step that just ended and the progress so far.
bench/scale.py starts it next to the controller it measures.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import os
import time
from typing import Any

from bench.scale_encoding import ColumnTelemetryEncoder, TelemetryEncoder, _varint

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
