"""The operator's mirror of the job controller: GetJobStatus over real gRPC to a real
in-process controller, and the proto -> ControllerView mapping."""

from __future__ import annotations

from splice.controller.job import JobSpec
from splice.controller.service import Controller, ControllerConfig
from splice.controller.store import InMemoryStateStore
from splice.kube.controller_status import GrpcControllerStatus, view_from_proto
from splice.proto import controller_pb2 as pb


def test_view_from_a_real_controller_over_grpc() -> None:
    controller = Controller(ControllerConfig(listen="127.0.0.1:0",
                                             jobs=(JobSpec(job_id="mlp", world_size=4),)),
                            InMemoryStateStore())
    controller.start()
    source = GrpcControllerStatus(timeout_s=5)
    try:
        view = source.get(f"127.0.0.1:{controller.port}", "mlp")
        assert view is not None and view.phase == "forming" and view.world_size == 0
        assert source.get(f"127.0.0.1:{controller.port}", "nope") is None   # NOT_FOUND
    finally:
        source.close()
        controller.stop()


def test_an_unreachable_controller_gives_none() -> None:
    source = GrpcControllerStatus(timeout_s=0.2)
    assert source.get("127.0.0.1:1", "mlp") is None
    source.close()


def test_mapping_takes_the_lowest_member_step_as_the_last_snapshot() -> None:
    status = pb.JobStatus(job_id="mlp", phase="running", epoch=3, members=["a/0", "b/0"],
                          recoveries=2, message="ok", workers=[
                              pb.WorkerStatus(worker_id="a/0", last_step=41),
                              pb.WorkerStatus(worker_id="b/0", last_step=40),
                              pb.WorkerStatus(worker_id="c/0", last_step=3)])   # not a member
    view = view_from_proto(status)
    assert (view.phase, view.epoch, view.world_size, view.recoveries) == ("running", 3, 2, 2)
    assert view.last_snapshot_step == 40
    assert view_from_proto(pb.JobStatus(phase="forming")).last_snapshot_step is None
