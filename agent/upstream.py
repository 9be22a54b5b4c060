"""The agent's connection to the controller: attach, follow the leader, reconnect.

`--controller` may list several controller replicas. A standby refuses the attach with
NOT_LEADER and names the leader; the agent goes there. When the stream breaks (the leader
died, say) the agent reconnects with backoff to whichever replica leads, and its hello
carries a resync: what became of each worker meanwhile. Workers never wait for this: the
steady state needs no controller.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc

from splice.proto import controller_pb2 as pb
from splice.proto import controller_pb2_grpc as pb_grpc

log = logging.getLogger("splice.agent")

# Refusals that a retry cannot cure: the command line is wrong.
PERMANENT = {"UNKNOWN_JOB", "PROTOCOL_MISMATCH", "PERMISSION_DENIED"}


class AgentRefused(Exception):
    """The controller refused this agent for good (unknown job, protocol); fix the command
    line rather than retrying."""


@dataclass(frozen=True)
class Attached:
    address: str
    responses: Iterator[pb.ControllerMessage]
    outbox: queue.SimpleQueue[pb.AgentMessage | None]
    heartbeat_interval_s: float
    channel: grpc.Channel


def _requests(outbox: queue.SimpleQueue[pb.AgentMessage | None]) -> Iterator[pb.AgentMessage]:
    while True:
        msg = outbox.get()
        if msg is None:
            return
        yield msg


class Upstream:
    def __init__(self, addresses: list[str], hello: Callable[[], pb.AgentHello], *,
                 credentials: grpc.ChannelCredentials | None = None,
                 max_message_bytes: int = 4 * 1024 * 1024,
                 attempt_timeout_s: float = 0.5) -> None:
        self._addresses = addresses
        self._hello = hello
        self._credentials = credentials
        self._opts = [("grpc.max_receive_message_length", max_message_bytes),
                      ("grpc.max_send_message_length", max_message_bytes)]
        self._attempt_timeout_s = attempt_timeout_s
        self._last = ""  # the address attached last: tried last after the stream breaks

    def _channel(self, address: str) -> grpc.Channel:
        if self._credentials is not None:
            return grpc.secure_channel(address, self._credentials, options=self._opts)
        return grpc.insecure_channel(address, options=self._opts)

    def _rotation(self) -> list[str]:
        """Every address once, the one that served last at the end: when its stream broke,
        the leader most likely died, and a standby is the better first guess."""
        rest = [a for a in self._addresses if a != self._last]
        return rest + [a for a in self._addresses if a == self._last]

    def try_attach(self, address: str, first_messages: list[pb.AgentMessage]
                   ) -> Attached | pb.Refusal | None:
        """One attach attempt: Attached, the controller's Refusal, or None if unreachable."""
        channel = self._channel(address)
        try:
            grpc.channel_ready_future(channel).result(timeout=self._attempt_timeout_s)
        except grpc.FutureTimeoutError:
            channel.close()
            return None
        outbox: queue.SimpleQueue[pb.AgentMessage | None] = queue.SimpleQueue()
        outbox.put(pb.AgentMessage(hello=self._hello()))
        responses = pb_grpc.ControllerStub(channel).Attach(_requests(outbox))
        try:
            first = next(responses)
        except (grpc.RpcError, StopIteration) as e:
            log.info("attach to %s failed: %s", address, e)
            outbox.put(None)
            channel.close()
            return None
        if first.WhichOneof("kind") == "refusal":
            outbox.put(None)
            channel.close()
            return first.refusal
        assert first.WhichOneof("kind") == "welcome", first
        for m in first_messages:
            outbox.put(m)
        return Attached(address, responses, outbox, first.welcome.heartbeat_interval_s, channel)

    def attach(self, stop: threading.Event, first_messages: Callable[[], list[pb.AgentMessage]],
               *, deadline_s: float | None, first_time: bool) -> Attached | None:
        """Attach to the leader, following NOT_LEADER hints, retrying with backoff until
        `deadline_s` (monotonic; None: forever) or `stop`. Permanent refusals raise
        AgentRefused on the first attach; later they are retried like any other."""
        backoff_s = 0.05
        candidates = self._rotation()
        while not stop.is_set():
            address = candidates.pop(0)
            got = self.try_attach(address, first_messages())
            if isinstance(got, Attached):
                self._last = got.address
                return got
            if isinstance(got, pb.Refusal):
                code = pb.Refusal.Code.Name(got.code)
                if first_time and code in PERMANENT:
                    raise AgentRefused(got.message)
                log.info("%s refused the attach: %s: %s", address, code, got.message)
                if code == "NOT_LEADER" and got.leader and got.leader != address:
                    candidates.insert(0, got.leader)
                    continue
            if not candidates:
                candidates = self._rotation()
                if deadline_s is not None and time.monotonic() > deadline_s:
                    return None
                stop.wait(backoff_s)  # backoff between rounds, not synchronisation
                backoff_s = min(1.0, backoff_s * 2)
        return None
