"""The job controller's view of a job, fetched over gRPC for the operator to mirror.

Behind the `ControllerStatusSource` interface so the reconcile stays pure and tests use a
fake: the operator only needs "what does the controller say about this job, if anything".
"""

from __future__ import annotations

import logging
import threading
from typing import Protocol

from splice.kube.status import ControllerView

log = logging.getLogger("splice.kube")


class ControllerStatusSource(Protocol):
    def get(self, address: str, job: str) -> ControllerView | None:
        """The controller's view of `job`, or None when it cannot be reached (yet)."""


def view_from_proto(status: object) -> ControllerView:
    """JobStatus (proto) -> ControllerView. The last snapshot is the lowest last step over
    the members: every member holds the snapshot taken before that step."""
    members = set(status.members)  # type: ignore[attr-defined]
    steps = [w.last_step for w in status.workers  # type: ignore[attr-defined]
             if w.worker_id in members and w.last_step > 0]
    return ControllerView(phase=status.phase, epoch=status.epoch,  # type: ignore[attr-defined]
                          world_size=len(members),
                          recoveries=status.recoveries,  # type: ignore[attr-defined]
                          message=status.message,  # type: ignore[attr-defined]
                          last_snapshot_step=min(steps) if steps else None)


class GrpcControllerStatus:
    """Calls `splice.v1.Controller/GetJobStatus`; one cached channel per address."""

    def __init__(self, timeout_s: float = 2.0) -> None:
        self._timeout_s = timeout_s
        self._lock = threading.Lock()
        self._channels: dict[str, object] = {}

    def get(self, address: str, job: str) -> ControllerView | None:
        import grpc

        from splice.proto import controller_pb2 as pb
        from splice.proto import controller_pb2_grpc as pb_grpc

        with self._lock:
            channel = self._channels.get(address)
            if channel is None:
                channel = self._channels[address] = grpc.insecure_channel(address)
        stub = pb_grpc.ControllerStub(channel)
        try:
            return view_from_proto(stub.GetJobStatus(pb.JobStatusRequest(job_id=job),
                                                     timeout=self._timeout_s))
        except grpc.RpcError as e:
            log.debug("controller %s for job %s: %s", address, job, e.code().name)
            return None

    def close(self) -> None:
        with self._lock:
            for channel in self._channels.values():
                channel.close()  # type: ignore[attr-defined]
            self._channels.clear()


class FakeControllerStatus:
    """Fixed answers per job name, for tests and dry runs."""

    def __init__(self) -> None:
        self.views: dict[str, ControllerView] = {}
        self.asked: list[tuple[str, str]] = []

    def get(self, address: str, job: str) -> ControllerView | None:
        self.asked.append((address, job))
        return self.views.get(job)
