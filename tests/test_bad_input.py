"""Bad input against a real in-process controller over a real gRPC channel.

Project rule: bad input (malformed message, stale epoch, unknown job, a peer sending
garbage) gets a clear error and changes no state. Each test drives the Attach stream one
message at a time and waits on the controller's responses (never on time); after each
refusal the job's status and the state store's epoch must be exactly what they were.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest

from splice.controller.job import JobSpec
from splice.controller.service import PROTOCOL_VERSION, Controller, ControllerConfig
from splice.controller.store import InMemoryStateStore
from splice.proto import controller_pb2 as pb
from splice.proto import controller_pb2_grpc as pb_grpc

TIMEOUT_S = 10.0
JOB = "j"
K = pb.WorkerEvent.Kind
Code = pb.Refusal.Code


@dataclass(frozen=True)
class _End:
    """The response stream ended: `error` is the RpcError, or None for a clean end."""

    error: grpc.RpcError | None


class AgentStream:
    """One Attach stream driven by hand: requests from a queue, responses read on a thread."""

    def __init__(self, stub: pb_grpc.ControllerStub) -> None:
        self._requests: queue.Queue[pb.AgentMessage | None] = queue.Queue()
        self._responses: queue.Queue[pb.ControllerMessage | _End] = queue.Queue()
        self.call = stub.Attach(self._generate())
        self._reader = threading.Thread(target=self._read, name="test-agent-reader",
                                        daemon=True)
        self._reader.start()

    def _generate(self) -> Iterator[pb.AgentMessage]:
        while True:
            msg = self._requests.get()
            if msg is None:
                return
            yield msg

    def _read(self) -> None:
        try:
            for msg in self.call:
                self._responses.put(msg)
        except grpc.RpcError as e:
            self._responses.put(_End(e))
            return
        self._responses.put(_End(None))

    def send(self, msg: pb.AgentMessage) -> None:
        self._requests.put(msg)

    def recv(self) -> pb.ControllerMessage:
        try:
            item = self._responses.get(timeout=TIMEOUT_S)
        except queue.Empty:
            raise AssertionError(f"no response from the controller in {TIMEOUT_S} s") from None
        if isinstance(item, _End):
            raise AssertionError(f"the stream ended instead of responding: {item.error!r}")
        return item

    def expect(self, kind: str) -> pb.ControllerMessage:
        msg = self.recv()
        assert msg.WhichOneof("kind") == kind, f"expected {kind}, got {msg}"
        return getattr(msg, kind)

    def expect_refusal(self, code: int) -> pb.Refusal:
        r = self.expect("refusal")
        assert r.code == code, f"expected {Code.Name(code)}, got {Code.Name(r.code)}: {r.message}"
        assert r.message, "a refusal must say why"
        return r

    def expect_end(self) -> grpc.RpcError | None:
        """Wait for the response stream to end; no response may arrive before."""
        try:
            item = self._responses.get(timeout=TIMEOUT_S)
        except queue.Empty:
            raise AssertionError(f"the stream did not end in {TIMEOUT_S} s") from None
        assert isinstance(item, _End), f"expected the stream to end, got {item}"
        return item.error

    # ---- message builders ----------------------------------------------------------------
    def hello(self, node_id: str, *, job_id: str = JOB, num_workers: int = 1,
              version: int = PROTOCOL_VERSION) -> None:
        self.send(pb.AgentMessage(hello=pb.AgentHello(
            protocol_version=version, job_id=job_id, node_id=node_id,
            num_workers=num_workers, hostname="test")))

    def attach(self, node_id: str, num_workers: int = 1) -> pb.Welcome:
        self.hello(node_id, num_workers=num_workers)
        welcome = self.expect("welcome")
        assert (welcome.job_id, welcome.node_id) == (JOB, node_id)
        return welcome

    def event(self, worker_id: str, kind: int, *, pid: int = 100, exit_code: int = 0,
              signal: int = 0) -> None:
        self.send(pb.AgentMessage(worker_event=pb.WorkerEvent(
            worker_id=worker_id, kind=kind, pid=pid, exit_code=exit_code, signal=signal)))

    def recovery_ready(self, worker_id: str, epoch: int, steps: list[int]) -> None:
        self.send(pb.AgentMessage(recovery_ready=pb.RecoveryReady(
            worker_id=worker_id, epoch=epoch, snapshot_steps=steps)))

    def step_report(self, worker_id: str, epoch: int, step: int) -> None:
        self.send(pb.AgentMessage(step_report=pb.StepReport(
            worker_id=worker_id, epoch=epoch, step=step, loss=1.25, step_time_s=0.1)))

    def barrier(self, node_id: str) -> None:
        """Wait until the controller's loop has applied everything this stream sent.

        A recovery-ready for an epoch the job cannot be at goes through the loop (events
        are applied in order) and is refused there: once its refusal arrives, every
        earlier message of this stream has had its effect.
        """
        self.barrier_request(node_id)
        self.expect_refusal(Code.STALE_EPOCH)

    def barrier_request(self, node_id: str) -> None:
        """Send the barrier's message only; its STALE_EPOCH refusal follows any earlier
        response of this stream."""
        self.recovery_ready(f"{node_id}/0", 10**9, [])

    def close(self) -> None:
        self._requests.put(None)
        self.call.cancel()
        self._reader.join(TIMEOUT_S)
        assert not self._reader.is_alive(), "the response reader did not stop"


@dataclass
class Harness:
    controller: Controller
    store: InMemoryStateStore
    stub: pb_grpc.ControllerStub
    agents: list[AgentStream]

    def agent(self) -> AgentStream:
        a = AgentStream(self.stub)
        self.agents.append(a)
        return a

    def snapshot(self) -> tuple:
        """Everything a refusal must leave untouched."""
        st = self.controller.job_status(JOB)
        workers = sorted((w.worker_id, w.node_id, w.pid, w.state, w.rank) for w in st.workers)
        return (st.phase, st.epoch, list(st.members), st.recoveries, st.message, workers,
                self.store.load_epoch(JOB))

    def form(self, a: AgentStream, b: AgentStream | None = None) -> pb.Membership:
        """Epoch 1 from a/0 (on `a`) and b/0 (on `b`), or a/0 and a/1 when `b` is None."""
        if b is None:
            a.attach("a", 2)
            a.event("a/0", K.READY, pid=10)
            a.event("a/1", K.READY, pid=11)
            m = a.expect("membership")
            assert list(m.members) == ["a/0", "a/1"]
        else:
            a.attach("a")
            b.attach("b")
            a.event("a/0", K.READY, pid=10)
            a.barrier("a")  # a/0 is ready before b/0: the job forms on b's event
            b.event("b/0", K.READY, pid=20)
            m = a.expect("membership")
            assert b.expect("membership") == m
            assert list(m.members) == ["a/0", "b/0"]
        assert m.epoch == 1 and m.initial
        st = self.controller.job_status(JOB)
        assert (st.phase, st.epoch) == ("running", 1)
        assert self.store.load_epoch(JOB).epoch == 1
        return m


@pytest.fixture
def h() -> Iterator[Harness]:
    store = InMemoryStateStore()
    # The liveness timeout is far above any test's runtime: no test may lose a node to it.
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


# ---- attaching ----------------------------------------------------------------------------

def test_unknown_job_is_refused_by_name(h: Harness) -> None:
    before = h.snapshot()
    a = h.agent()
    a.hello("a", job_id="nope")
    r = a.expect_refusal(Code.UNKNOWN_JOB)
    assert "'nope'" in r.message
    assert a.expect_end() is None
    assert h.snapshot() == before


def test_status_of_unknown_job_is_not_found(h: Harness) -> None:
    with pytest.raises(grpc.RpcError) as e:
        h.stub.GetJobStatus(pb.JobStatusRequest(job_id="nope"), timeout=TIMEOUT_S)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    assert "nope" in e.value.details()
    status = h.stub.GetJobStatus(pb.JobStatusRequest(job_id=JOB), timeout=TIMEOUT_S)
    assert (status.job_id, status.phase, status.epoch) == (JOB, "forming", 0)


@pytest.mark.parametrize("first", [
    pb.AgentMessage(heartbeat=pb.Heartbeat(epoch=0)),
    pb.AgentMessage(worker_event=pb.WorkerEvent(worker_id="a/0", kind=K.READY, pid=1)),
    pb.AgentMessage(),
], ids=["heartbeat", "worker_event", "empty"])
def test_first_message_must_be_a_hello(h: Harness, first: pb.AgentMessage) -> None:
    before = h.snapshot()
    a = h.agent()
    a.send(first)
    a.expect_refusal(Code.NOT_ATTACHED)
    assert a.expect_end() is None
    assert h.snapshot() == before
    # Nothing was attached: the node id is still free.
    h.agent().attach("a")


@pytest.mark.parametrize("version", [pb.PROTOCOL_VERSION_UNSPECIFIED, 2])
def test_wrong_protocol_version_is_refused(h: Harness, version: int) -> None:
    before = h.snapshot()
    a = h.agent()
    a.hello("a", version=version)
    r = a.expect_refusal(Code.PROTOCOL_MISMATCH)
    assert str(version) in r.message
    assert a.expect_end() is None
    assert h.snapshot() == before
    h.agent().attach("a")


@pytest.mark.parametrize("node_id", ["", "a/b", "/"])
def test_malformed_node_id_is_refused(h: Harness, node_id: str) -> None:
    before = h.snapshot()
    a = h.agent()
    a.hello(node_id)
    a.expect_refusal(Code.MALFORMED)
    assert a.expect_end() is None
    assert h.snapshot() == before


def test_second_agent_with_an_attached_node_id_is_refused(h: Harness) -> None:
    first = h.agent()
    first.attach("a", 2)
    first.event("a/0", K.READY, pid=10)
    first.barrier("a")
    before = h.snapshot()
    second = h.agent()
    second.hello("a", num_workers=2)
    r = second.expect_refusal(Code.MALFORMED)
    assert "already attached" in r.message
    assert second.expect_end() is None
    assert h.snapshot() == before
    # The first session is untouched and still drives the job.
    first.event("a/1", K.READY, pid=11)
    m = first.expect("membership")
    assert (m.epoch, list(m.members)) == (1, ["a/0", "a/1"])


# ---- worker ids ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind", [K.READY, K.EXITED, K.STARTED, K.FINISHED])
def test_worker_event_for_another_nodes_worker_is_refused(h: Harness, kind: int) -> None:
    a = h.agent()
    b = h.agent()
    h.form(a, b)
    before = h.snapshot()
    a.event("b/0", kind, pid=999, exit_code=1)
    r = a.expect_refusal(Code.MALFORMED)
    assert "b/0" in r.message
    a.barrier("a")
    assert h.snapshot() == before


@pytest.mark.parametrize("wid", ["", "a", "a/", "/0", "a/x", "a/01", "a/-1", "a/0 ", "a/\u0661"])
def test_malformed_worker_id_is_refused(h: Harness, wid: str) -> None:
    a = h.agent()
    a.attach("a", 2)
    a.event("a/0", K.READY, pid=10)
    a.barrier("a")
    before = h.snapshot()
    a.event(wid, K.READY, pid=11)
    a.expect_refusal(Code.MALFORMED)
    a.recovery_ready(wid, 0, [1])
    a.expect_refusal(Code.MALFORMED)
    a.barrier("a")
    assert h.snapshot() == before


def test_recovery_ready_for_another_nodes_worker_is_refused(h: Harness) -> None:
    a = h.agent()
    b = h.agent()
    h.form(a, b)
    b.event("b/0", K.EXITED, exit_code=1)
    assert a.expect("membership").epoch == 2
    before = h.snapshot()
    b.recovery_ready("a/0", 2, [5])
    b.expect_refusal(Code.MALFORMED)
    b.barrier("b")
    assert h.snapshot() == before


def test_event_without_a_kind_is_refused(h: Harness) -> None:
    a = h.agent()
    a.attach("a")
    before = h.snapshot()
    a.event("a/0", K.KIND_UNSPECIFIED)
    a.expect_refusal(Code.MALFORMED)
    a.send(pb.AgentMessage())  # no kind at all
    a.expect_refusal(Code.MALFORMED)
    a.hello("a")  # a second hello
    a.expect_refusal(Code.MALFORMED)
    a.barrier("a")
    assert h.snapshot() == before


def test_duplicate_ready_is_refused_without_changing_the_worker(h: Harness) -> None:
    a = h.agent()
    h.form(a)
    before = h.snapshot()
    a.event("a/0", K.READY, pid=4242)
    r = a.expect_refusal(Code.MALFORMED)
    assert "already registered" in r.message
    assert h.snapshot() == before


@pytest.mark.parametrize("wid", ["a/0", "zzz"], ids=["other_node", "malformed"])
def test_step_report_for_a_worker_not_of_the_sender_is_refused(h: Harness, wid: str) -> None:
    a = h.agent()
    b = h.agent()
    h.form(a, b)
    before = h.snapshot()
    timeline = list(h.controller.job_status(JOB).timeline)
    progress = {w.worker_id: w.last_step for w in h.controller.job_status(JOB).workers}
    b.step_report(wid, 1, 77)
    b.barrier_request("b")  # answered after the report was handled, refused or not
    first = b.recv()
    assert {w.worker_id: w.last_step
            for w in h.controller.job_status(JOB).workers} == progress
    assert h.snapshot() == before
    assert list(h.controller.job_status(JOB).timeline) == timeline  # no first_step entry
    assert first.WhichOneof("kind") == "refusal" and first.refusal.code == Code.MALFORMED
    b.expect_refusal(Code.STALE_EPOCH)


# ---- stale epochs -------------------------------------------------------------------------

@pytest.mark.parametrize("two_agents", [False, True], ids=["one_agent", "two_agents"])
def test_stale_epochs_are_refused(h: Harness, two_agents: bool) -> None:
    a = h.agent()
    h.form(a, h.agent() if two_agents else None)
    before = h.snapshot()
    timeline = list(h.controller.job_status(JOB).timeline)
    for epoch in (0, 7):
        a.recovery_ready("a/0", epoch, [3, 4])
        r = a.expect_refusal(Code.STALE_EPOCH)
        assert f"epoch {epoch}" in r.message
        assert h.snapshot() == before
    for epoch in (0, 2):
        a.step_report("a/0", epoch, 5)
        r = a.expect_refusal(Code.STALE_EPOCH)
        assert f"epoch {epoch}" in r.message
        assert h.snapshot() == before
    status = h.controller.job_status(JOB)
    assert list(status.timeline) == timeline  # no first_step from a stale report
    assert all(w.last_step == 0 for w in status.workers)
    # A report for the current epoch is taken (proves the refusals above were about epochs).
    a.step_report("a/0", 1, 5)
    a.barrier("a")
    assert {w.worker_id: w.last_step for w in h.controller.job_status(JOB).workers}["a/0"] == 5


# ---- oversized messages -------------------------------------------------------------------

def test_oversized_message_fails_the_stream_and_the_controller_serves_on(h: Harness) -> None:
    assert h.controller.config.max_message_bytes < 5 * 1024 * 1024
    big = h.agent()
    big.attach("a", 2)
    big.event("a/0", K.READY, pid=10)
    big.barrier("a")
    big.step_report("x" * (5 * 1024 * 1024), 0, 1)
    error = big.expect_end()
    assert error is not None and error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert h.store.load_epoch(JOB) is None
    # A fresh agent attaches and forms the job: the controller still serves.
    fresh = h.agent()
    fresh.attach("b", 2)
    fresh.event("b/0", K.READY, pid=20)
    fresh.event("b/1", K.READY, pid=21)
    m = fresh.expect("membership")
    assert (m.epoch, list(m.members)) == (1, ["b/0", "b/1"])
    assert h.store.load_epoch(JOB).members == ("b/0", "b/1")


# ---- failures at the protocol level -------------------------------------------------------

def test_worker_crash_story(h: Harness) -> None:
    a = h.agent()
    b = h.agent()
    h.form(a, b)
    b.event("b/0", K.EXITED, exit_code=0, signal=9)
    m = a.expect("membership")
    assert (m.epoch, list(m.members), m.initial) == (2, ["a/0"], False)
    assert m.store_prefix.endswith("epoch-2")
    assert "b/0" in h.controller.job_status(JOB).timeline[-2].text
    stored = h.store.load_epoch(JOB)
    assert (stored.epoch, stored.members) == (2, ("a/0",))
    assert h.controller.job_status(JOB).phase == "recovering"

    a.recovery_ready("a/0", 2, [3, 4])
    resume = a.expect("resume")
    assert (resume.epoch, resume.step) == (2, 4)
    status = h.controller.job_status(JOB)
    assert (status.phase, status.epoch, list(status.members), status.recoveries) == (
        "running", 2, ["a/0"], 1)
    # b has no member in epoch 2: it got neither the membership nor the resume.
    b.barrier("b")


def test_closed_stream_is_a_lost_node(h: Harness) -> None:
    a = h.agent()
    b = h.agent()
    h.form(a, b)
    b.close()
    m = a.expect("membership")
    assert (m.epoch, list(m.members)) == (2, ["a/0"])
    assert "lost b/0" in m.reason
    stored = h.store.load_epoch(JOB)
    assert (stored.epoch, stored.members) == (2, ("a/0",))
    workers = {w.worker_id: w.state for w in h.controller.job_status(JOB).workers}
    assert workers == {"a/0": "member", "b/0": "exited"}
    # The node id is free again once its session is gone.
    again = h.agent()
    again.attach("b")


def test_telemetry_for_another_nodes_worker_is_refused_after_accepted_batches(
        h: Harness) -> None:
    """Worker ids accepted once are remembered per node (the telemetry fast path): a later
    batch naming another node's worker is still refused whole."""
    a = h.agent()
    b = h.agent()
    h.form(a, b)

    def batch(*wids: str, step: int) -> pb.AgentMessage:
        t = pb.Telemetry(sent_at_s=1.0)
        for w in wids:
            t.steps.add(worker_id=w, epoch=1, step=step, loss=0.5, step_time_s=0.1)
            t.progress.add(worker_id=w, epoch=1, step=step)
        return pb.AgentMessage(telemetry=t)

    b.send(batch("b/0", step=3))
    b.barrier("b")
    steps = {w.worker_id: w.last_step for w in h.controller.job_status(JOB).workers}
    assert steps["b/0"] == 3
    b.send(batch("b/0", "a/0", step=4))
    b.barrier_request("b")
    first = b.recv()
    assert first.WhichOneof("kind") == "refusal" and first.refusal.code == Code.MALFORMED
    b.expect_refusal(Code.STALE_EPOCH)
    assert {w.worker_id: w.last_step for w in h.controller.job_status(JOB).workers} == steps


# ---- peers' snapshot servers ----------------------------------------------------------------

def test_memberships_name_each_member_nodes_snapshot_server_and_domain(h: Harness) -> None:
    a, b = h.agent(), h.agent()
    for stream, node, domain in ((a, "a", "rack-1"), (b, "b", "")):
        stream.send(pb.AgentMessage(hello=pb.AgentHello(
            protocol_version=PROTOCOL_VERSION, job_id=JOB, node_id=node, num_workers=1,
            hostname="test", snapshot_address=f"10.0.0.{len(node)}:7{len(domain)}",
            failure_domain=domain)))
        stream.expect("welcome")
    a.event("a/0", K.READY, pid=10)
    a.barrier("a")
    b.event("b/0", K.READY, pid=20)
    m = a.expect("membership")
    assert [(p.node_id, p.snapshot_address, p.failure_domain) for p in m.agents] == [
        ("a", "10.0.0.1:76", "rack-1"), ("b", "10.0.0.1:70", "")]


@pytest.mark.parametrize("domain", ["x" * 254, "rack\n1", "\x00"])
def test_a_malformed_failure_domain_is_refused(h: Harness, domain: str) -> None:
    before = h.snapshot()
    a = h.agent()
    a.send(pb.AgentMessage(hello=pb.AgentHello(
        protocol_version=PROTOCOL_VERSION, job_id=JOB, node_id="a", num_workers=1,
        hostname="test", failure_domain=domain)))
    r = a.expect_refusal(Code.MALFORMED)
    assert "failure domain" in r.message
    assert a.expect_end() is None
    assert h.snapshot() == before
