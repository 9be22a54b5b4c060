"""Columnar telemetry (controller/telemetry_columns.py): the same records as the
per-record form, decoded in bulk; malformed batches refused whole.

Unit level: what the agent encodes decodes to exactly what an older agent's messages
decode to, and the hub's per-rank arrays give the hang detector exactly what the
per-record conversion gave. Controller level (a real controller over gRPC, driven by
hand as in test_bad_input.py): the status view shows a columnar batch's values, and a
batch whose columns contradict themselves or name no known table changes nothing.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from splice.controller import telemetry_columns as tc
from splice.controller.job import JobSpec
from splice.controller.service import Controller, ControllerConfig
from splice.controller.store import InMemoryStateStore
from splice.controller.telemetry_hub import ProgressArrays, to_rank_progress
from splice.proto import controller_pb2 as pb
from splice.proto import controller_pb2_grpc as pb_grpc
from tests.test_bad_input import JOB, Code, Harness

U64 = st.integers(0, 2**64 - 1)
SMALL = st.integers(0, 300)
F64 = st.floats(allow_nan=True, allow_infinity=True)
OPS = st.sampled_from(["", "all_reduce", "broadcast", "all_gather"])

progress_records = st.lists(st.builds(
    pb.WorkerProgress, worker_id=st.sampled_from([f"n/{i}" for i in range(6)]),
    epoch=SMALL, step=U64, seq_entered=SMALL, seq_exited=SMALL, in_collective_since_s=F64,
    last_progress_s=F64, op=OPS, op_bytes=U64, heartbeat_s=F64), max_size=12)
step_records = st.lists(st.builds(
    pb.StepReport, worker_id=st.sampled_from([f"n/{i}" for i in range(6)]),
    epoch=SMALL, step=U64, loss=F64, step_time_s=F64, completed_at_s=F64,
    num_samples=st.integers(0, 2**32 - 1), compute_s=F64, wait_s=F64,
    collective_bytes=U64, snapshot_bytes=U64, snapshot_at_s=F64), max_size=12)


def columnar(progress: list[pb.WorkerProgress], steps: list[pb.StepReport],
             table: tuple[str, ...]) -> pb.Telemetry:
    """The batch as agent.py sends it (the encoders it uses)."""
    index = {w: i for i, w in enumerate(table)}
    batch = pb.Telemetry(sent_at_s=5.0, dropped=2)
    tc.encode_progress(batch.progress_columns, [(index[p.worker_id], p) for p in progress])
    tc.encode_steps(batch.step_columns, [(index[s.worker_id], s) for s in steps])
    return batch


def as_rows(b: tc.Batch) -> tuple[list[tuple], list[tuple]]:
    """The decoded records with worker ids and op names resolved (indices differ between
    the forms); NaN replaced by a marker so that rows compare equal."""
    def norm(v: object) -> object:
        return "nan" if isinstance(v, float) and math.isnan(v) else v

    p, s = b.progress, b.steps
    prog = [tuple(norm(getattr(p, f.name)[i].item()) for f in dataclasses.fields(p)
                  if f.name not in ("worker", "op", "ops"))
            + (b.worker_ids[p.worker[i]], p.ops[p.op[i]]) for i in range(len(p))]
    steps = [tuple(norm(getattr(s, f.name)[i].item()) for f in dataclasses.fields(s)
                   if f.name != "worker") + (b.worker_ids[s.worker[i]],)
             for i in range(len(s))]
    return prog, steps


@settings(max_examples=60, deadline=None)
@given(progress=progress_records, steps=step_records)
def test_columns_decode_to_what_the_records_decode_to(progress: list, steps: list) -> None:
    table = tuple(f"n/{i}" for i in range(6))
    old = tc.decode(pb.Telemetry(progress=progress, steps=steps, sent_at_s=5.0, dropped=2), ())
    new = tc.decode(columnar(progress, steps, table), table)
    assert as_rows(new) == as_rows(old)
    assert (new.sent_at_s, new.dropped, new.num_records) == (5.0, 2, len(progress) + len(steps))
    # A step record comes back as the message it was (bit for bit: NaNs too).
    for i, rec in enumerate(steps):
        back = new.steps.report(i, new.worker_ids[new.steps.worker[i]])
        assert back.SerializeToString() == rec.SerializeToString()


def test_a_batch_may_mix_records_and_columns_records_first() -> None:
    table = ("n/0", "n/1")
    batch = columnar([], [pb.StepReport(worker_id="n/1", epoch=1, step=7, loss=0.5)], table)
    batch.steps.add(worker_id="n/2", epoch=1, step=6, loss=0.25)
    b = tc.decode(batch, table)
    assert [b.worker_ids[w] for w in b.steps.worker] == ["n/2", "n/1"]
    assert b.steps.step.tolist() == [6, 7] and b.steps.loss.tolist() == [0.25, 0.5]


def test_an_empty_column_means_every_entry_is_zero() -> None:
    batch = pb.Telemetry()
    batch.step_columns.worker.extend([1, 0])
    batch.step_columns.step.extend([4, 5])
    batch.progress_columns.worker.append(1)
    b = tc.decode(batch, ("n/0", "n/1"))
    assert b.steps.compute_s.tolist() == [0.0, 0.0] and b.steps.step.tolist() == [4, 5]
    assert b.progress.ops == ("",) and b.progress.op.tolist() == [0]


def _bad(kind: str) -> pb.Telemetry:
    batch = pb.Telemetry()
    c = batch.step_columns
    c.worker.extend([0, 1])
    if kind == "short column":
        c.compute_s.append(1.0)
    elif kind == "worker outside the table":
        c.worker.append(2)
    elif kind == "op outside ops":
        batch.progress_columns.worker.append(0)
        batch.progress_columns.op.append(1)
        batch.progress_columns.ops.append("all_reduce")
    return batch


@pytest.mark.parametrize("kind", ["short column", "worker outside the table", "op outside ops"])
def test_a_self_contradicting_batch_is_malformed(kind: str) -> None:
    with pytest.raises(tc.MalformedTelemetry):
        tc.decode(_bad(kind), ("n/0", "n/1"))


def test_columns_without_a_table_are_malformed() -> None:
    batch = pb.Telemetry()
    batch.step_columns.worker.append(0)
    with pytest.raises(tc.MalformedTelemetry, match="no worker table"):
        tc.decode(batch, ())


@settings(max_examples=60, deadline=None)
@given(progress=st.lists(st.builds(
    pb.WorkerProgress, epoch=st.integers(1, 3), step=SMALL, seq_entered=SMALL,
    seq_exited=SMALL, in_collective_since_s=st.sampled_from([0.0, -0.0, 3.5, math.inf]),
    last_progress_s=st.floats(0, 1e9), op=OPS, op_bytes=U64,
    heartbeat_s=st.sampled_from([0.0, 2.5])), min_size=1, max_size=8))
def test_hang_detector_input_from_arrays_matches_the_per_record_conversion(
        progress: list[pb.WorkerProgress]) -> None:
    n = len(progress)
    table = tuple(f"n/{r}" for r in range(n))
    for r, p in enumerate(progress):
        p.worker_id = table[r]
    b = tc.decode(columnar(progress, [], table), table)
    arrays = ProgressArrays(n)
    # In two halves, ranks in reverse order: where a record lands must not matter.
    half = n // 2
    arrays.update(np.arange(n)[::-1][:half], b.progress, np.arange(n)[::-1][:half])
    arrays.update(np.arange(n)[::-1][half:], b.progress, np.arange(n)[::-1][half:])
    assert arrays.of_epoch(progress[0].epoch).tolist() == [
        p.epoch == progress[0].epoch for p in progress]
    got = arrays.rank_arrays()
    assert [got.progress(r) for r in range(n)] == [to_rank_progress(r, p)
                                                   for r, p in enumerate(progress)]


# ---- against a real controller ---------------------------------------------------------------

@pytest.fixture
def h() -> Iterator[Harness]:
    """test_bad_input.py's harness: a two-rank job, streams driven by hand."""
    store = InMemoryStateStore()
    config = ControllerConfig(listen="127.0.0.1:0", node_timeout_s=120.0,
                              jobs=(JobSpec(job_id=JOB, world_size=2),))
    controller = Controller(config, store)
    controller.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{controller.port}")
    harness = Harness(controller, store, pb_grpc.ControllerStub(channel), [])
    try:
        yield harness
    finally:
        for a in harness.agents:
            a.close()
        channel.close()
        controller.stop(grace_s=0.5)


def _status_of(h: Harness, wid: str) -> tuple:
    w = next(w for w in h.controller.job_status(JOB).workers if w.worker_id == wid)
    return (w.last_step, w.last_loss, w.last_step_time_s, w.last_compute_s, w.last_wait_s)


def _send(stream, batch: pb.Telemetry) -> None:  # type: ignore[no-untyped-def]
    stream.send(pb.AgentMessage(telemetry=batch))


def test_the_status_shows_a_columnar_batch_and_the_table_lasts_the_stream(h: Harness) -> None:
    a, b = h.agent(), h.agent()
    h.form(a, b)
    report = pb.StepReport(worker_id="b/0", epoch=1, step=3, loss=0.5, step_time_s=0.1,
                           compute_s=0.07, wait_s=0.03)
    first = columnar([], [report], ("b/0",))
    first.workers.worker_ids.append("b/0")
    _send(b, first)
    b.barrier("b")
    assert _status_of(h, "b/0") == (3, 0.5, 0.1, 0.07, 0.03)
    timeline = [e.text for e in h.controller.job_status(JOB).timeline if e.kind == "first_step"]
    assert timeline == ["epoch 1: first step completed (step 3, loss 0.50000, by b/0)"]
    # No table this time: the one sent earlier on the stream still names the workers.
    report.step, report.loss = 4, 0.25
    _send(b, columnar([], [report], ("b/0",)))
    b.barrier("b")
    assert _status_of(h, "b/0") == (4, 0.25, 0.1, 0.07, 0.03)


@pytest.mark.parametrize("kind", ["no table", "another node's worker", "short column"])
def test_a_malformed_columnar_batch_is_refused_and_changes_nothing(h: Harness, kind: str
                                                                   ) -> None:
    a, b = h.agent(), h.agent()
    h.form(a, b)
    report = pb.StepReport(worker_id="b/0", epoch=1, step=3, loss=0.5)
    batch = columnar([], [report], ("b/0",))
    if kind == "another node's worker":
        batch.workers.worker_ids.extend(["b/0", "a/0"])
    elif kind == "short column":
        batch.workers.worker_ids.append("b/0")
        batch.step_columns.compute_s.extend([1.0, 2.0])
    before = h.snapshot(), _status_of(h, "b/0")
    _send(b, batch)
    r = b.expect_refusal(Code.MALFORMED)
    assert {"no table": "no worker table", "another node's worker": "a/0",
            "short column": "compute_s"}[kind] in r.message
    b.barrier("b")
    assert (h.snapshot(), _status_of(h, "b/0")) == before
    if kind == "another node's worker":
        # The refused table was not taken: columns still have none to refer to.
        _send(b, columnar([], [report], ("b/0",)))
        b.expect_refusal(Code.MALFORMED)
        b.barrier("b")
        assert _status_of(h, "b/0") == before[1]
