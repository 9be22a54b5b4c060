"""The node agent: launches and supervises workers, relays between them and the controller.

`splice agent --controller HOST:PORT --nproc N -- python train.py ...` starts N workers,
each told (through the environment) its worker id and the agent's Unix socket. Worker exits
are reported to the controller the moment they happen; controller messages (memberships,
resume decisions) are relayed to the workers at once. Survivors are never killed.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc

from splice.agent.local_server import LocalServer
from splice.agent.supervisor import Exit, Supervisor
from splice.controller.membership import worker_id
from splice.proto import controller_pb2 as pb
from splice.proto import controller_pb2_grpc as pb_grpc
from splice.proto import local_pb2 as lpb

log = logging.getLogger("splice.agent")


class AgentRefused(Exception):
    """The controller refused this agent (unknown job, duplicate node, protocol); fix the
    command line rather than retrying."""


@dataclass(frozen=True, kw_only=True)
class AgentConfig:
    controller: str                 # HOST:PORT of the controller
    command: tuple[str, ...]        # the worker command line
    nproc: int = 1                  # workers on this node
    job_id: str = "default"
    node_id: str = field(default_factory=socket.gethostname)
    # Address this node's workers bind their gloo connections to (reachable by peers).
    gloo_host: str = "127.0.0.1"
    # How long to keep retrying the first connection to the controller.
    connect_timeout_s: float = 30.0
    max_message_bytes: int = 4 * 1024 * 1024

    def __post_init__(self) -> None:
        if self.nproc < 1:
            raise ValueError(f"--nproc must be >= 1, got {self.nproc}")
        if not self.command:
            raise ValueError("no worker command given (put it after --)")
        if not self.node_id or "/" in self.node_id:
            raise ValueError(f"node id must be non-empty without '/': {self.node_id!r}")
        host, sep, port = self.controller.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"--controller must be HOST:PORT, got {self.controller!r}")


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self._up: queue.SimpleQueue[pb.AgentMessage | None] = queue.SimpleQueue()
        self._workers = [worker_id(config.node_id, i) for i in range(config.nproc)]
        self._dir = tempfile.mkdtemp(prefix="splice-agent-")
        self._local = LocalServer(os.path.join(self._dir, "agent.sock"), set(self._workers),
                                  self._on_worker_message, self._on_worker_disconnect)
        self._supervisor = Supervisor(self._on_exit)
        self._finished: set[str] = set()
        self._latest: dict[str, lpb.AgentToWorker] = {}
        self._lock = threading.Lock()
        self._epoch = 0

    # ---- upstream -----------------------------------------------------------------------
    def _send_up(self, msg: pb.AgentMessage) -> None:
        self._up.put(msg)

    def _requests(self) -> Iterator[pb.AgentMessage]:
        while True:
            msg = self._up.get()
            if msg is None:
                return
            yield msg

    def _attach(self) -> Iterator[pb.ControllerMessage]:
        opts = [("grpc.max_receive_message_length", self.config.max_message_bytes),
                ("grpc.max_send_message_length", self.config.max_message_bytes)]
        channel = grpc.insecure_channel(self.config.controller, options=opts)
        try:
            grpc.channel_ready_future(channel).result(timeout=self.config.connect_timeout_s)
        except grpc.FutureTimeoutError:
            raise ConnectionError(f"controller {self.config.controller} unreachable for "
                                  f"{self.config.connect_timeout_s:.0f} s") from None
        self._channel = channel
        stub = pb_grpc.ControllerStub(channel)
        self._send_up(pb.AgentMessage(hello=pb.AgentHello(
            protocol_version=pb.PROTOCOL_VERSION_1, job_id=self.config.job_id,
            node_id=self.config.node_id, num_workers=self.config.nproc,
            hostname=socket.gethostname())))
        responses: Iterator[pb.ControllerMessage] = stub.Attach(self._requests())
        first = next(responses)
        if first.WhichOneof("kind") == "refusal":
            raise AgentRefused(first.refusal.message)
        assert first.WhichOneof("kind") == "welcome", first
        self._heartbeat_s = first.welcome.heartbeat_interval_s
        log.info("agent %s attached to %s (job %s)", self.config.node_id,
                 self.config.controller, self.config.job_id)
        return responses

    def _relay_down(self, responses: Iterator[pb.ControllerMessage]) -> None:
        try:
            for msg in responses:
                kind = msg.WhichOneof("kind")
                if kind == "refusal":
                    log.info("controller refused: %s: %s",
                             pb.Refusal.Code.Name(msg.refusal.code), msg.refusal.message)
                    continue
                if kind == "membership":
                    self._epoch = max(self._epoch, msg.membership.epoch)
                    down = lpb.AgentToWorker(membership=msg.membership)
                elif kind == "resume":
                    down = lpb.AgentToWorker(resume=msg.resume)
                elif kind == "shutdown":
                    down = lpb.AgentToWorker(shutdown=msg.shutdown)
                else:
                    continue
                with self._lock:
                    self._latest[kind] = down
                self._local.broadcast(down)
        except grpc.RpcError as e:
            if not self._stopping:
                log.warning("lost the controller stream (%s); workers keep training",
                            e.code().name)

    def _heartbeats(self) -> None:
        while not self._stopping:
            time.sleep(self._heartbeat_s)  # a period, not synchronisation
            self._send_up(pb.AgentMessage(heartbeat=pb.Heartbeat(
                epoch=self._epoch, sent_at_s=time.time())))

    # ---- workers ------------------------------------------------------------------------
    def _on_exit(self, ex: Exit) -> None:
        how = f"signal {ex.signal}" if ex.signal else f"code {ex.exit_code}"
        level = logging.INFO if (ex.exit_code == 0 and not ex.signal) else logging.WARNING
        log.log(level, "worker %s (pid %d) exited: %s", ex.worker_id, ex.pid, how)
        self._send_up(pb.AgentMessage(worker_event=pb.WorkerEvent(
            worker_id=ex.worker_id, kind=pb.WorkerEvent.EXITED, pid=ex.pid,
            exit_code=ex.exit_code, signal=ex.signal, at_s=time.time())))

    def _on_worker_message(self, wid: str, msg: lpb.WorkerToAgent) -> None:
        kind = msg.WhichOneof("kind")
        if kind == "hello":
            self._send_up(pb.AgentMessage(worker_event=pb.WorkerEvent(
                worker_id=wid, kind=pb.WorkerEvent.READY, pid=msg.hello.pid, at_s=time.time())))
            with self._lock:
                latest = [self._latest[k] for k in ("membership", "resume") if k in self._latest]
            for down in latest:
                self._local.send(wid, down)
        elif kind == "step_report":
            if msg.step_report.worker_id == wid:
                self._send_up(pb.AgentMessage(step_report=msg.step_report))
        elif kind == "recovery_ready":
            if msg.recovery_ready.worker_id == wid:
                self._send_up(pb.AgentMessage(recovery_ready=msg.recovery_ready))
        elif kind == "finished":
            with self._lock:
                self._finished.add(wid)
            self._send_up(pb.AgentMessage(worker_event=pb.WorkerEvent(
                worker_id=wid, kind=pb.WorkerEvent.FINISHED, at_s=time.time())))

    def _on_worker_disconnect(self, wid: str) -> None:
        log.debug("worker %s closed its channel", wid)

    # ---- main ---------------------------------------------------------------------------
    def run(self) -> int:
        """Run until every worker has ended. Returns 0 if any worker finished training."""
        self._stopping = False
        try:
            responses = self._attach()
        except (AgentRefused, ConnectionError) as e:
            log.error("agent %s: %s", self.config.node_id, e)
            self._local.close()
            return 2
        threading.Thread(target=self._relay_down, args=(responses,), daemon=True,
                         name="splice-agent-down").start()
        threading.Thread(target=self._heartbeats, daemon=True, name="splice-heartbeat").start()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda s, _f: self._supervisor.signal_all(s))
        for local_rank, wid in enumerate(self._workers):
            env = dict(os.environ)
            env.update({
                "SPLICE_AGENT_SOCKET": self._local.path, "SPLICE_WORKER_ID": wid,
                "SPLICE_JOB_ID": self.config.job_id, "SPLICE_NODE_ID": self.config.node_id,
                "SPLICE_LOCAL_RANK": str(local_rank), "SPLICE_GLOO_HOST": self.config.gloo_host,
            })
            pid = self._supervisor.launch(wid, self.config.command, env)
            self._send_up(pb.AgentMessage(worker_event=pb.WorkerEvent(
                worker_id=wid, kind=pb.WorkerEvent.STARTED, pid=pid, at_s=time.time())))
        while not self._supervisor.wait_all(timeout_s=1.0):
            pass
        self._stopping = True
        self._up.put(None)
        self._local.close()
        with self._lock:
            finished = len(self._finished)
        log.info("agent %s: all workers ended (%d finished training)", self.config.node_id,
                 finished)
        return 0 if finished else 1


def run_agent(config: AgentConfig) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return Agent(config).run()
