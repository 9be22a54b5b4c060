"""Link probes: the probe server and client on loopback, the controller's probe rounds, and
a real three-node job in which the links to node-2 are slow.

Story: "node-2's inbound link is slow (SPLICE_PROBE_DELAY_S=0.05 on its probe server); a
probe round over all node pairs names the pair through node-2 in a link verdict".
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from splice.agent import linkprobe
from splice.agent.linkprobe import ProbeError, ProbeServer, probe
from splice.controller.job import JobSpec
from splice.controller.links import check_report, plan_pairs
from splice.controller.service import PROTOCOL_VERSION, AgentSession, Controller, ControllerConfig
from splice.controller.store import InMemoryStateStore
from splice.localjob import LocalJob, LocalJobConfig, worker_argv
from splice.proto import controller_pb2 as pb

MIB = 1024 * 1024
HEADER = struct.Struct("!cI")


def probe_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("splice-probe")]


@pytest.fixture
def server() -> Iterator[ProbeServer]:
    s = ProbeServer()
    yield s
    s.close()


# ---- client and server ----------------------------------------------------------------------

def test_probe_on_loopback_measures_rtt_and_bandwidth(server: ProbeServer) -> None:
    rtt_s, bandwidth = probe(server.address, 4 * MIB, timeout_s=5.0)
    assert 0 < rtt_s < 0.5
    assert bandwidth > 10e6   # loopback moves far more than 10 MB/s, even on a busy box


def test_a_delayed_server_is_measured_slower(server: ProbeServer) -> None:
    delay_s = 0.02
    slow = ProbeServer(delay_s=delay_s)
    try:
        fast_rtt, fast_bw = probe(server.address, 2 * MIB, timeout_s=5.0)
        slow_rtt, slow_bw = probe(slow.address, 2 * MIB, timeout_s=5.0)
    finally:
        slow.close()
    # Every ping waits delay_s; the bulk transfer waits delay_s per MiB received.
    assert slow_rtt >= delay_s > fast_rtt
    assert slow_bw <= 2 * MIB / (2 * delay_s) < fast_bw


def _closed_by_server(address: str, data: bytes) -> bool:
    host, _, port = address.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=5.0) as s:
        s.sendall(data)
        try:
            return s.recv(64) == b""   # EOF: the server hung up without answering
        except ConnectionResetError:   # hung up with our bytes unread
            return True


@pytest.mark.parametrize("data", [
    b"garbage that is no header at all",
    HEADER.pack(b"P", linkprobe.MAX_PING_BYTES + 1),        # oversized ping
    HEADER.pack(b"B", linkprobe.MAX_BULK_BYTES + 1),        # oversized bulk
    HEADER.pack(b"B", 0),                                    # empty bulk
    HEADER.pack(b"A", 8),                                    # a kind only servers send
], ids=["garbage", "big-ping", "big-bulk", "empty-bulk", "ack"])
def test_bad_input_is_closed_and_the_server_serves_on(server: ProbeServer, data: bytes
                                                      ) -> None:
    assert _closed_by_server(server.address, data)
    rtt_s, bandwidth = probe(server.address, MIB, timeout_s=5.0)
    assert rtt_s > 0 and bandwidth > 0


def test_a_peer_closing_mid_transfer_leaves_the_server_serving(server: ProbeServer) -> None:
    host, _, port = server.address.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=5.0) as s:
        s.sendall(HEADER.pack(b"B", MIB) + bytes(1000))   # then hang up
    assert probe(server.address, MIB, timeout_s=5.0)[1] > 0


def _eof(conn: socket.socket) -> bool:
    try:
        return conn.recv(1) == b""
    except ConnectionResetError:
        return True


def test_close_ends_idle_connections_and_joins_every_thread() -> None:
    before = len(probe_threads())
    s = ProbeServer(max_connections=2)
    host, _, port = s.address.rpartition(":")
    idle = [socket.create_connection((host, int(port)), timeout=5.0) for _ in range(2)]
    try:
        # Over the bound: turned away at once.
        assert _closed_by_server(s.address, HEADER.pack(b"P", 0))
        s.close(timeout_s=5.0)
        assert all(_eof(c) for c in idle)
    finally:
        for c in idle:
            c.close()
    assert s.connections == 0
    assert len(probe_threads()) == before


def test_unreachable_or_silent_peers_raise_probe_error() -> None:
    with socket.socket() as listener:   # accepts into its backlog, never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        address = f"127.0.0.1:{listener.getsockname()[1]}"
        t0 = time.monotonic()
        with pytest.raises(ProbeError, match="took over|timed out"):
            probe(address, MIB, timeout_s=0.3)
        assert time.monotonic() - t0 < 3.0
    with pytest.raises(ProbeError):
        probe(address, MIB, timeout_s=1.0)   # nobody listens there now
    with pytest.raises(ValueError):
        probe("no-port", MIB)
    with pytest.raises(ValueError):
        probe(address, linkprobe.MAX_BULK_BYTES + 1)


def test_delay_from_env() -> None:
    assert linkprobe.delay_from_env(None) == 0.0
    assert linkprobe.delay_from_env("0.05") == 0.05
    for bad in ("-1", "11", "slow"):
        with pytest.raises(ValueError):
            linkprobe.delay_from_env(bad)


# ---- planning and checking (pure) -------------------------------------------------------------

@pytest.mark.parametrize("n", [2, 3, 4, 7, 16])
def test_every_pair_is_probed_once_and_the_work_is_spread(n: int) -> None:
    nodes = [f"node-{i}" for i in range(n)]
    pairs = plan_pairs(list(reversed(nodes)))
    assert sorted(tuple(sorted(p)) for p in pairs) == sorted(
        tuple(sorted((a, b))) for i, a in enumerate(nodes) for b in nodes[i + 1:])
    per_prober = [sum(1 for src, _ in pairs if src == node) for node in nodes]
    assert max(per_prober) <= n // 2 + 1


def test_malformed_reports_are_named() -> None:
    def report(**fields: object) -> pb.LinkProbeReport:
        base: dict[str, object] = dict(from_node="a", to_node="b", rtt_s=0.001,
                                       bandwidth_bytes_per_s=1e9, at_s=1.0)
        return pb.LinkProbeReport(round=1, results=[pb.LinkProbeResult(**{**base, **fields})])

    assert check_report("a", report()) == ""
    assert check_report("a", report(error="refused", bandwidth_bytes_per_s=0)) == ""
    assert "cannot report" in check_report("a", report(from_node="c"))
    assert "bad probed node" in check_report("a", report(to_node="a"))
    assert "bad link probe" in check_report("a", report(bandwidth_bytes_per_s=0))
    assert "bad link probe" in check_report("a", report(rtt_s=float("nan")))


# ---- the controller's probe rounds --------------------------------------------------------------

JOB = "j"


@pytest.fixture
def controller() -> Iterator[Controller]:
    c = Controller(ControllerConfig(listen="127.0.0.1:0",
                                    jobs=(JobSpec(job_id=JOB, world_size=3),)),
                   InMemoryStateStore())
    c.start()
    yield c
    c.stop(grace_s=0.1)


def _attach(c: Controller, node: str, probe_address: str) -> AgentSession:
    opened = c.open_session(pb.AgentHello(protocol_version=PROTOCOL_VERSION, job_id=JOB,
                                          node_id=node, num_workers=1,
                                          probe_address=probe_address))
    assert isinstance(opened, AgentSession), opened
    return opened


def _next(session: AgentSession, kind: str) -> pb.ControllerMessage:
    while True:
        msg = session.outbox.get(timeout=5.0)
        assert msg is not None
        if msg.WhichOneof("kind") == kind:
            return msg


def _wait(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.01)   # polling a status view, not synchronising processes


def test_a_probe_round_names_the_slow_pair(controller: Controller) -> None:
    servers = [ProbeServer(), ProbeServer(), ProbeServer(delay_s=0.02)]
    try:
        sessions = [_attach(controller, f"node-{i}", s.address) for i, s in enumerate(servers)]
        assert controller.probe_links(JOB) == 3
        # Each of the three agents is asked to probe one peer (the pairs spread evenly).
        for session in sessions:
            req = _next(session, "probe_links").probe_links
            assert len(req.targets) == 1 and req.payload_bytes > 0
            results = []
            for t in req.targets:
                rtt_s, bw = probe(t.address, MIB, timeout_s=5.0)
                results.append(pb.LinkProbeResult(
                    from_node=session.node_id, to_node=t.node_id, rtt_s=rtt_s,
                    bandwidth_bytes_per_s=bw, at_s=time.time()))
            controller.on_agent_message(session, pb.AgentMessage(
                link_probes=pb.LinkProbeReport(round=req.round, results=results)))

        def link_verdicts() -> list[pb.Verdict]:
            return [v for v in controller.job_status(JOB).verdicts if v.detector == "link"]

        _wait(lambda: bool(link_verdicts()), 5.0, "the link verdict")
        (v,) = link_verdicts()
        assert (v.kind, v.action) == ("slow-link", "alert")
        assert "node-2" in v.reason and v.score >= 1.5, v.reason
    finally:
        for s in servers:
            s.close()


def test_detector_asks_are_rate_limited(controller: Controller) -> None:
    for i in range(3):
        _attach(controller, f"node-{i}", f"127.0.0.1:{1000 + i}")
    assert controller.maybe_probe_links(JOB, "link straggler") == 3
    assert controller.maybe_probe_links(JOB, "link straggler again") == 0   # cool-down
    assert controller.probe_links(JOB) == 3                                  # on request


def test_bad_probe_input_is_refused(controller: Controller) -> None:
    opened = controller.open_session(pb.AgentHello(
        protocol_version=PROTOCOL_VERSION, job_id=JOB, node_id="node-0", num_workers=1,
        probe_address="no port"))
    assert isinstance(opened, pb.ControllerMessage)
    assert opened.refusal.code == pb.Refusal.MALFORMED
    session = _attach(controller, "node-0", "127.0.0.1:1")
    controller.on_agent_message(session, pb.AgentMessage(link_probes=pb.LinkProbeReport(
        round=1, results=[pb.LinkProbeResult(from_node="node-1", to_node="node-0",
                                             rtt_s=0.001, bandwidth_bytes_per_s=1.0)])))
    refusal = _next(session, "refusal").refusal
    assert refusal.code == pb.Refusal.MALFORMED and "cannot report" in refusal.message
    assert not [v for v in controller.job_status(JOB).verdicts if v.detector == "link"]


# ---- a real job ------------------------------------------------------------------------------

def test_a_slow_link_to_one_node_is_localised_in_a_real_job(tmp_path) -> None:
    cfg = LocalJobConfig(
        worker_command=worker_argv("splice.examples.train_mlp", [
            "--steps", "100000", "--log-every", "1000000", "--step-sleep-s", "0.02",
            "--hidden", "16"]),
        nodes=3, nproc=1, job_id="links", log_dir=str(tmp_path),
        node_env=((2, "SPLICE_PROBE_DELAY_S", "0.05"),))
    with LocalJob(cfg) as job:
        assert job.controller is not None
        job.wait_until(lambda s: s.phase == "running", 60, "the job to run")
        assert job.controller.probe_links("links") == 3
        status = job.wait_until(lambda s: any(v.detector == "link" for v in s.verdicts), 30,
                                "a link verdict")
        (v,) = [v for v in status.verdicts if v.detector == "link"]
        assert (v.kind, v.action) == ("slow-link", "alert")
        # Only node-2's server is slowed: the pair in which node-2 is probed is named.
        assert "node-2" in v.reason, v.reason
        assert "node-0<->node-2" in v.reason, v.reason

