"""Fuzzing the three places that parse what another process sends: the worker channel's
frames, the controller's handling of agent messages, and the agent's LocalServer.

Property for all three: arbitrary input is either accepted or refused through the
documented path (FrameError, a Refusal, a closed connection); nothing raises anything
else, and refused input changes no state. The controller is checked against a naive
reference of what it must refuse.
"""

from __future__ import annotations

import queue
import socket
import string
import struct
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from splice.agent.framing import MAX_FRAME_BYTES, FrameError, encode, read_frame
from splice.agent.local_server import LocalServer
from splice.controller.job import JobSpec
from splice.controller.membership import parse_worker_id
from splice.controller.service import (
    PROTOCOL_VERSION,
    AgentSession,
    Controller,
    ControllerConfig,
)
from splice.controller.store import InMemoryStateStore
from splice.proto import controller_pb2 as pb
from splice.proto import local_pb2 as lpb

TIMEOUT_S = 10.0
JOB = "j"
K = pb.WorkerEvent.Kind
Code = pb.Refusal.Code
# Hypothesis' per-example deadline is off: a loaded CI machine may stall one socket round
# trip for longer than the default 200 ms, which says nothing about the code.
FUZZ = settings(max_examples=200, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])

u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
i32 = st.integers(-(2**31), 2**31 - 1)
floats = st.floats(allow_nan=True, allow_infinity=True)
# Enum fields are open in proto3: any int32 may arrive, not only the named values.
event_kinds = st.one_of(st.sampled_from(list(K.values())), i32)


# ---- (a) frames ---------------------------------------------------------------------------

def frame_stream() -> st.SearchStrategy[bytes]:
    """Raw bytes, well-formed frames, frames with lying headers, and mixes of them."""
    header = st.integers(0, 2**32 - 1).map(lambda n: struct.pack(">I", n))
    small_header = st.integers(0, 64).map(lambda n: struct.pack(">I", n))
    valid = st.builds(lambda w, p: encode(lpb.WorkerToAgent(hello=lpb.WorkerHello(
        worker_id=w, pid=p))), st.text(max_size=20), i32)
    piece = st.one_of(st.binary(max_size=64), valid, header, small_header,
                      st.tuples(small_header, st.binary(max_size=64)).map(b"".join))
    return st.one_of(st.binary(max_size=512), st.lists(piece, max_size=6).map(b"".join))


@FUZZ
@given(data=frame_stream())
def test_any_byte_stream_yields_messages_then_none_or_a_frame_error(data: bytes) -> None:
    a, b = socket.socketpair()
    with a, b:
        b.settimeout(TIMEOUT_S)  # the writer is closed below: a hang is a bug, not a wait
        a.sendall(data)
        a.shutdown(socket.SHUT_WR)
        for _ in range(len(data) // 4 + 2):  # every frame consumes at least its header
            try:
                msg = read_frame(b, lpb.WorkerToAgent)
            except FrameError as e:
                assert str(e).strip()
                return
            if msg is None:
                return
            assert msg.WhichOneof("kind") is not None
            assert len(msg.SerializeToString()) <= MAX_FRAME_BYTES
        raise AssertionError("read_frame neither ended nor failed on a finite stream")


# ---- (b) the controller -------------------------------------------------------------------

@dataclass
class Fuzzed:
    controller: Controller
    store: InMemoryStateStore
    barrier_session: AgentSession
    sessions: int = 0

    def open(self, node_id: str = "") -> AgentSession:
        """A new session, as node `node_id` (default: a node never seen before)."""
        self.sessions += 1
        opened = self.controller.open_session(pb.AgentHello(
            protocol_version=PROTOCOL_VERSION, job_id=JOB, node_id=node_id or f"n{self.sessions}",
            num_workers=2, hostname="fuzz"))
        assert isinstance(opened, AgentSession), opened
        return opened

    def barrier(self) -> None:
        """Return once the loop has applied every event queued before this call.

        The loop applies events in order; a recovery-ready for an epoch the job cannot be
        at is refused there, so its refusal on the barrier session's outbox comes after
        every earlier event of every session was applied.
        """
        s = self.barrier_session
        self.controller.on_agent_message(s, pb.AgentMessage(recovery_ready=pb.RecoveryReady(
            worker_id=f"{s.node_id}/0", epoch=2**63)))
        try:
            out = s.outbox.get(timeout=TIMEOUT_S)
        except queue.Empty:
            raise AssertionError(f"the controller loop did not answer in {TIMEOUT_S} s") \
                from None
        assert out is not None and out.refusal.code == Code.STALE_EPOCH, out

    def snapshot(self) -> tuple[bytes, str | None]:
        """Everything a refused message must leave untouched (bytes: NaN == NaN there)."""
        status = self.controller.job_status(JOB).SerializeToString(deterministic=True)
        epoch = self.store.load_epoch(JOB)
        return status, None if epoch is None else epoch.to_json()


@pytest.fixture(scope="module")
def fuzzed() -> Iterator[Fuzzed]:
    store = InMemoryStateStore()
    # The liveness timeout is far above the module's runtime: no session is lost to it.
    config = ControllerConfig(listen="127.0.0.1:0", node_timeout_s=600.0,
                              jobs=(JobSpec(job_id=JOB, world_size=2),))
    controller = Controller(config, store)
    controller.start()
    barrier_session = controller.open_session(pb.AgentHello(
        protocol_version=PROTOCOL_VERSION, job_id=JOB, node_id="barrier", num_workers=1))
    assert isinstance(barrier_session, AgentSession)
    try:
        yield Fuzzed(controller, store, barrier_session)
    finally:
        controller.stop(grace_s=0.5)


# Worker ids: "{self}/N" becomes the sending session's own worker; the rest are foreign or
# malformed.
worker_ids = st.one_of(
    st.sampled_from(["{self}/0", "{self}/1", "{self}/7", "barrier/0", "other/0", "", "/0",
                     "{self}/", "{self}/01", "{self}/-1", "{self}/x", "{self}/\u0661"]),
    st.text(alphabet=string.printable, max_size=12))
epochs = st.one_of(st.sampled_from(["current", "next"]), u64)


@dataclass(frozen=True)
class Draft:
    """A message before the session and the job's epoch are known."""

    kind: str
    fields: dict

    def build(self, node_id: str, current_epoch: int) -> pb.AgentMessage:
        f = dict(self.fields)
        if "worker_id" in f:
            f["worker_id"] = f["worker_id"].replace("{self}", node_id)
        if f.get("epoch") == "current":
            f["epoch"] = current_epoch
        elif f.get("epoch") == "next":
            f["epoch"] = current_epoch + 1
        cls = {"hello": pb.AgentHello, "heartbeat": pb.Heartbeat, "worker_event": pb.WorkerEvent,
               "step_report": pb.StepReport, "recovery_ready": pb.RecoveryReady}.get(self.kind)
        if cls is None:
            return pb.AgentMessage()
        return pb.AgentMessage(**{self.kind: cls(**f)})


def draft(message_kind: str, **fields: st.SearchStrategy) -> st.SearchStrategy[Draft]:
    return st.fixed_dictionaries(fields).map(lambda f: Draft(message_kind, f))


drafts = st.one_of(
    st.just(Draft("none", {})),
    draft("hello", protocol_version=st.sampled_from([0, 1, 2]), job_id=st.just(JOB),
          node_id=st.text(max_size=5), num_workers=u32),
    draft("heartbeat", epoch=epochs, sent_at_s=floats),
    draft("worker_event", worker_id=worker_ids, kind=event_kinds, pid=i32, exit_code=i32,
          signal=i32, at_s=floats),
    draft("step_report", worker_id=worker_ids, epoch=epochs, step=u64, loss=floats,
          step_time_s=floats, completed_at_s=floats, num_samples=u32),
    draft("recovery_ready", worker_id=worker_ids, epoch=epochs,
          snapshot_steps=st.lists(u64, max_size=4)),
)


def must_refuse(msg: pb.AgentMessage, session: AgentSession, status: pb.JobStatus) -> bool:
    """A naive reference: what the controller must refuse, whatever the job's state."""
    kind = msg.WhichOneof("kind")
    if kind == "heartbeat":
        return False
    if kind in (None, "hello"):
        return True
    body = getattr(msg, kind)
    try:
        node, _ = parse_worker_id(body.worker_id)
    except ValueError:
        return True
    if node != session.node_id:
        return True
    if kind == "worker_event":
        return body.kind not in (K.STARTED, K.READY, K.EXITED, K.FINISHED)
    if kind == "step_report":
        return body.epoch != status.epoch
    # recovery_ready
    return body.epoch != status.epoch or body.worker_id not in status.members


def check_one(f: Fuzzed, session: AgentSession, msg: pb.AgentMessage) -> None:
    status = f.controller.job_status(JOB)
    before = f.snapshot()
    f.controller.on_agent_message(session, msg)  # must not raise
    f.barrier()
    out: list[pb.ControllerMessage] = []
    while not session.outbox.empty():
        item = session.outbox.get_nowait()
        assert item is not None, "the session was closed by one message"
        out.append(item)
    refusals = [m.refusal for m in out if m.WhichOneof("kind") == "refusal"]
    for r in refusals:
        assert r.code != Code.CODE_UNSPECIFIED and r.message, r
    if refusals:
        assert f.snapshot() == before, f"refused {msg} but the state changed: {refusals}"
    if must_refuse(msg, session, status):
        assert refusals, f"accepted {msg} from {session.node_id} at epoch {status.epoch}"
    if msg.WhichOneof("kind") == "heartbeat":
        assert not out and f.snapshot() == before


def close(f: Fuzzed, session: AgentSession) -> None:
    f.controller.close_session(session, "fuzz example over")
    f.barrier()  # its NodeLost is applied before the next example takes its snapshot


@FUZZ
@given(batch=st.lists(drafts, min_size=1, max_size=6))
def test_structured_agent_messages_are_applied_or_refused_without_change(
        fuzzed: Fuzzed, batch: list[Draft]) -> None:
    session = fuzzed.open()
    try:
        for d in batch:
            epoch = fuzzed.controller.job_status(JOB).epoch
            check_one(fuzzed, session, d.build(session.node_id, epoch))
    finally:
        close(fuzzed, session)


# The node the byte-level test's sessions speak as: the mutated messages are built for it,
# so that a mutation may as well keep a message valid as break it.
BYTES_NODE = "fz"


@st.composite
def mutated_messages(draw: st.DrawFn) -> bytes:
    """A valid message's bytes with a few bytes overwritten, inserted or cut: closer to
    the parser's edge cases (and to messages it accepts) than uniform noise."""
    data = bytearray(draw(drafts).build(BYTES_NODE, draw(st.integers(0, 3)))
                     .SerializeToString())
    for _ in range(draw(st.integers(0, 2))):
        at = draw(st.integers(0, len(data)))
        op = draw(st.sampled_from(["set", "set", "insert", "cut"]))
        if op == "set" and at < len(data):
            data[at] = draw(st.integers(0, 255))
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=4))
        elif op == "cut":
            del data[at:at + draw(st.integers(1, 4))]
    return bytes(data)


@FUZZ
@given(data=st.one_of(st.binary(max_size=200), mutated_messages()))
def test_random_bytes_as_agent_messages(fuzzed: Fuzzed, data: bytes) -> None:
    msg = pb.AgentMessage()
    try:
        msg.ParseFromString(data)
    except DecodeError:
        return  # the refusal path: gRPC fails the stream before the controller sees it
    session = fuzzed.open(BYTES_NODE)
    try:
        check_one(fuzzed, session, msg)
    finally:
        close(fuzzed, session)


# Hellos, including a re-attaching agent's resync of its workers (after a failover).
resync_workers = st.lists(st.fixed_dictionaries({
    "worker_id": worker_ids, "pid": i32, "exit_code": i32, "signal": i32,
    "state": st.one_of(st.sampled_from(list(pb.WorkerResync.State.values())), i32)}),
    max_size=4)
hellos = st.fixed_dictionaries({
    "protocol_version": st.one_of(st.just(PROTOCOL_VERSION), i32),
    "job_id": st.sampled_from([JOB, "nope", ""]),
    "node_id": st.one_of(st.just("h"), st.sampled_from(["", "a/b", "barrier"]),
                         st.text(max_size=6)),
    "num_workers": u32, "hostname": st.text(max_size=4), "epoch": u64,
    "workers": resync_workers,
})


def hello_must_be_refused(h: pb.AgentHello) -> bool:
    """A naive reference: what open_session must refuse (the barrier's node is taken)."""
    if h.protocol_version != PROTOCOL_VERSION or h.job_id != JOB:
        return True
    if not h.node_id or "/" in h.node_id or h.node_id == "barrier":
        return True
    for w in h.workers:
        try:
            node, _ = parse_worker_id(w.worker_id)
        except ValueError:
            return True
        if node != h.node_id:
            return True
    return False


@FUZZ
@given(fields=hellos)
def test_hellos_attach_or_are_refused_without_change(fuzzed: Fuzzed, fields: dict) -> None:
    workers = [pb.WorkerResync(**{**w, "worker_id": w["worker_id"].replace(
        "{self}", fields["node_id"])}) for w in fields["workers"]]
    hello = pb.AgentHello(**{**fields, "workers": workers})
    before = fuzzed.snapshot()
    opened = fuzzed.controller.open_session(hello)  # must not raise
    fuzzed.barrier()
    if isinstance(opened, AgentSession):
        assert not hello_must_be_refused(hello), f"attached with {hello}"
        close(fuzzed, opened)
        return
    assert opened.WhichOneof("kind") == "refusal", opened
    assert opened.refusal.code != Code.CODE_UNSPECIFIED and opened.refusal.message
    assert fuzzed.snapshot() == before, f"refused {hello} but the state changed"
    if hello.node_id and "/" not in hello.node_id and hello.node_id != "barrier":
        # The refused hello did not take the node: a plain one attaches under its id.
        session = fuzzed.open(hello.node_id)
        close(fuzzed, session)


def test_the_controller_still_forms_a_job_after_the_fuzzing(fuzzed: Fuzzed) -> None:
    """The loop survived: a fresh pair of workers is still registered and answered."""
    session = fuzzed.open()
    try:
        before = fuzzed.controller.job_status(JOB)
        for i in range(2):
            fuzzed.controller.on_agent_message(session, pb.AgentMessage(
                worker_event=pb.WorkerEvent(worker_id=f"{session.node_id}/{i}", kind=K.READY,
                                            pid=100 + i)))
        fuzzed.barrier()
        after = fuzzed.controller.job_status(JOB)
        states = {w.worker_id: w.state for w in after.workers}
        assert states[f"{session.node_id}/0"] in ("ready", "member"), states
        assert states[f"{session.node_id}/1"] in ("ready", "member"), states
        if before.phase == "forming":
            assert after.phase == "running" and after.epoch == before.epoch + 1
    finally:
        close(fuzzed, session)


# ---- (c) the agent's LocalServer ----------------------------------------------------------

# The same recorder of LocalServer callbacks the local-channel tests use.
from tests.test_local_channel import EXPECTED, Recorder  # noqa: E402


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalServer, Recorder]]:
    rec = Recorder()
    server = LocalServer(str(tmp_path_factory.mktemp("local") / "agent.sock"), set(EXPECTED),
                         rec.on_message, rec.on_disconnect)
    yield server, rec
    server.close()


def connect(server: LocalServer) -> socket.socket:
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.settimeout(TIMEOUT_S)
    c.connect(server.path)
    return c


def wait_closed_by_server(c: socket.socket) -> None:
    """Read until the server closes its end (EOF or, with unread input, a reset)."""
    try:
        while c.recv(4096):
            pass
    except ConnectionResetError:
        pass


texts = st.one_of(st.sampled_from(sorted(EXPECTED) + ["b/0", ""]), st.text(max_size=8))
worker_frames = st.one_of(
    st.builds(lambda w, p: lpb.WorkerToAgent(hello=lpb.WorkerHello(worker_id=w, pid=p)),
              texts, i32),
    st.builds(lambda w, e, s, loss: lpb.WorkerToAgent(step_report=pb.StepReport(
        worker_id=w, epoch=e, step=s, loss=loss)), texts, u64, u64, floats),
    st.builds(lambda w, e, steps: lpb.WorkerToAgent(recovery_ready=pb.RecoveryReady(
        worker_id=w, epoch=e, snapshot_steps=steps)), texts, u64, st.lists(u64, max_size=3)),
    st.builds(lambda w, s: lpb.WorkerToAgent(finished=lpb.WorkerFinished(worker_id=w, step=s)),
              texts, u64),
)


def reference_deliveries(frames: list[lpb.WorkerToAgent]) -> list[lpb.WorkerToAgent]:
    """What LocalServer must deliver for these frames: a hello from an expected worker,
    then every frame up to (not including) a second hello."""
    if not frames or frames[0].WhichOneof("kind") != "hello" \
            or frames[0].hello.worker_id not in EXPECTED:
        return []
    out = [frames[0]]
    for f in frames[1:]:
        if f.WhichOneof("kind") == "hello":
            break
        out.append(f)
    return out


@FUZZ
@given(frames=st.lists(worker_frames, max_size=6), tail=st.binary(max_size=32))
def test_local_server_survives_any_worker_input(local: tuple[LocalServer, Recorder],
                                                frames: list[lpb.WorkerToAgent],
                                                tail: bytes) -> None:
    server, rec = local
    c = connect(server)
    with c:
        c.sendall(b"".join(encode(f) for f in frames) + tail)
        c.shutdown(socket.SHUT_WR)
        wait_closed_by_server(c)
    expected = reference_deliveries(frames)
    if expected:
        wid = expected[0].hello.worker_id
        delivered = []
        while (event := rec.next())[0] == "message":
            assert event[1] == wid
            delivered.append(event[2])
        assert event == ("disconnect", wid, None)  # the id is free again from here on
        # Bytes after the frames may decode into more frames: only the prefix is known.
        # Compared serialised: a NaN loss is not equal to itself.
        got = [m.SerializeToString() for m in delivered if m is not None]
        want = [m.SerializeToString() for m in expected]
        assert got[:len(want)] == want
        if not tail:
            assert got == want
    # A valid worker still attaches, is heard, and leaves.
    good = connect(server)
    with good:
        good.sendall(encode(lpb.WorkerToAgent(hello=lpb.WorkerHello(worker_id="a/1", pid=1))))
        event = rec.next()
        assert event[:2] == ("message", "a/1") and event[2] is not None
        assert event[2].hello.worker_id == "a/1"
    assert rec.next() == ("disconnect", "a/1", None)
    assert rec.events.empty(), rec.events.get_nowait()


def test_local_server_rejects_raw_garbage_and_serves_on(
        local: tuple[LocalServer, Recorder]) -> None:
    server, rec = local
    for junk in (b"\xff" * 8, struct.pack(">I", MAX_FRAME_BYTES + 1), b"\x00\x00\x00\x02\x0a"):
        c = connect(server)
        with c:
            c.sendall(junk)
            c.shutdown(socket.SHUT_WR)
            wait_closed_by_server(c)
    assert rec.events.empty()
    ok = connect(server)
    with ok:
        ok.sendall(encode(lpb.WorkerToAgent(hello=lpb.WorkerHello(worker_id="a/0", pid=2))))
        assert rec.next()[:2] == ("message", "a/0")
    assert rec.next() == ("disconnect", "a/0", None)
