"""The controller's gRPC surface: turns RPCs into calls on the Controller.

Attach is the agent's session: the first message must be a hello; a reader thread feeds
everything after it to the controller, and the response stream drains the session's
outbox. The controller itself (service.py) decides; this module only speaks gRPC.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import grpc

from splice.controller.service import refusal
from splice.proto import controller_pb2 as pb
from splice.proto import controller_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from splice.controller.service import Controller

log = logging.getLogger("splice.controller")


class ControllerServicer(pb_grpc.ControllerServicer):
    def __init__(self, controller: Controller) -> None:
        self._c = controller

    def Attach(self, request_iterator: Iterator[pb.AgentMessage],
               context: grpc.ServicerContext) -> Iterator[pb.ControllerMessage]:
        try:
            first = next(request_iterator)
        except (StopIteration, grpc.RpcError):
            return
        if first.WhichOneof("kind") != "hello":
            yield refusal("NOT_ATTACHED", "the first message on a stream must be a hello")
            return
        try:
            self._c._attach_check(context, first.hello.node_id)
        except PermissionError as e:
            yield refusal("PERMISSION_DENIED", str(e))
            return
        opened = self._c.open_session(first.hello)
        if isinstance(opened, pb.ControllerMessage):
            yield opened
            return
        session = opened
        c = self._c

        def read() -> None:
            reason = "agent stream closed"
            try:
                for msg in request_iterator:
                    c.on_agent_message(session, msg)
            except grpc.RpcError as e:
                reason = f"agent stream broke: {e.code().name if hasattr(e, 'code') else e}"
            except Exception as e:  # malformed input must not take the controller down
                log.exception("agent %s sent something unreadable", session.node_id)
                reason = f"agent stream failed: {e}"
            c.close_session(session, reason)

        context.add_callback(lambda: c.close_session(session, "agent stream cancelled"))
        threading.Thread(target=read, name=f"splice-agent-{session.node_id}", daemon=True).start()
        state = c.job_state(session.job_id)
        yield pb.ControllerMessage(welcome=pb.Welcome(
            job_id=session.job_id, node_id=session.node_id,
            heartbeat_interval_s=c.config.heartbeat_interval_s, epoch=state.epoch))
        while True:
            out = session.outbox.get()
            if out is None:
                return
            yield out

    def _admin(self, context: grpc.ServicerContext, job_id: str, action: str,
               run: Callable[[], pb.JobStatus]) -> pb.JobStatus:
        """An administrative call: the caller must be an admin, this replica the leader,
        and the job known."""
        try:
            self._c.check_admin(context, action)
        except PermissionError as e:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, str(e))
        if not self._c.leading:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"not the leader; ask {self._c._leader_hint() or 'the leader'}")
        try:
            return run()
        except KeyError:
            context.abort(grpc.StatusCode.NOT_FOUND, f"unknown job {job_id!r}")
            raise  # unreachable: abort raises

    def StopJob(self, request: pb.StopJobRequest,
                context: grpc.ServicerContext) -> pb.JobStatus:
        return self._admin(context, request.job_id, f"stop job {request.job_id!r}",
                           lambda: self._c.stop_job(request.job_id,
                                                    request.reason or "stopped by an operator"))

    def CheckReplicas(self, request: pb.CheckReplicasRequest,
                      context: grpc.ServicerContext) -> pb.JobStatus:
        return self._admin(context, request.job_id,
                           f"check the replicas of job {request.job_id!r}",
                           lambda: self._c.check_replicas(request.job_id,
                                                          request.reason or "on demand"))

    def GetJobStatus(self, request: pb.JobStatusRequest,
                     context: grpc.ServicerContext) -> pb.JobStatus:
        try:
            return self._c.job_status(request.job_id)
        except KeyError:
            context.abort(grpc.StatusCode.NOT_FOUND, f"unknown job {request.job_id!r}")
            raise  # unreachable: abort raises
