"""What the controller shows about a job: per-worker progress and a timeline of events.

Kept beside the state machine rather than in it: step reports arrive every step from every
rank and only feed this view, never a decision.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from splice.controller.telemetry_columns import Steps
from splice.proto import controller_pb2 as pb


@dataclass
class _Progress:
    node_id: str
    pid: int = 0
    # The worker's newest step report of the job's epoch (read when the status is asked
    # for): keeping a reference costs one assignment per report on the telemetry path;
    # from a columnar batch, (its step columns, the report's row, the worker id).
    last: pb.StepReport | tuple[Steps, int, str] | None = None


class JobView:
    """Thread-safe record of progress and timeline; bounded in memory."""

    def __init__(self, max_timeline: int = 1000) -> None:
        self._lock = threading.Lock()
        self._timeline: deque[pb.TimelineEvent] = deque(maxlen=max_timeline)
        self._progress: dict[str, _Progress] = {}
        self._first_step_seen: set[int] = set()
        self._verdicts: deque[pb.Verdict] = deque(maxlen=200)

    def add_verdict(self, verdict: pb.Verdict) -> None:
        with self._lock:
            self._verdicts.append(verdict)

    def add_event(self, at_s: float, kind: str, epoch: int, text: str) -> None:
        with self._lock:
            self._timeline.append(pb.TimelineEvent(at_s=at_s, kind=kind, epoch=epoch, text=text))

    def worker_seen(self, worker_id: str, node_id: str, pid: int) -> None:
        with self._lock:
            p = self._progress.setdefault(worker_id, _Progress(node_id=node_id))
            p.pid = pid

    def step_reported(self, report: pb.StepReport, current_epoch: int) -> None:
        self.steps_reported((report,), current_epoch)

    def steps_reported(self, reports: Sequence[pb.StepReport], current_epoch: int) -> None:
        """Step reports of the job's current epoch (the caller drops the others)."""
        if not reports:
            return
        with self._lock:
            progress = self._progress
            for report in reports:
                p = progress.get(report.worker_id)
                if p is not None:
                    p.last = report
            report = reports[0]
            if report.epoch == current_epoch and report.epoch not in self._first_step_seen:
                self._first_step_seen.add(report.epoch)
                self._timeline.append(pb.TimelineEvent(
                    at_s=report.completed_at_s, kind="first_step", epoch=report.epoch,
                    text=f"epoch {report.epoch}: first step completed (step {report.step}, "
                         f"loss {report.loss:.5f}, by {report.worker_id})"))

    def step_columns_reported(self, worker_ids: Sequence[str], steps: Steps,
                              current_epoch: int) -> None:
        """`steps_reported` for a decoded batch (telemetry_columns.py): the rows of the
        job's current epoch."""
        rows = np.flatnonzero(steps.epoch == current_epoch)
        if not len(rows):
            return
        with self._lock:
            progress = self._progress
            for i, w in zip(rows.tolist(), steps.worker[rows].tolist(), strict=True):
                wid = worker_ids[w]
                p = progress.get(wid)
                if p is not None:
                    p.last = (steps, i, wid)
            first = int(rows[0])
            if current_epoch not in self._first_step_seen:
                report = steps.report(first, worker_ids[int(steps.worker[first])])
                self._first_step_seen.add(current_epoch)
                self._timeline.append(pb.TimelineEvent(
                    at_s=report.completed_at_s, kind="first_step", epoch=report.epoch,
                    text=f"epoch {report.epoch}: first step completed (step {report.step}, "
                         f"loss {report.loss:.5f}, by {report.worker_id})"))

    def fill(self, status: pb.JobStatus) -> None:
        with self._lock:
            status.timeline.extend(self._timeline)
            status.verdicts.extend(self._verdicts)
            for wid, p in sorted(self._progress.items()):
                r = p.last
                if isinstance(r, tuple):
                    r = r[0].report(r[1], r[2])
                if r is None:
                    status.workers.append(pb.WorkerStatus(
                        worker_id=wid, node_id=p.node_id, pid=p.pid, rank=-1))
                else:
                    status.workers.append(pb.WorkerStatus(
                        worker_id=wid, node_id=p.node_id, pid=p.pid, last_step=r.step,
                        last_loss=r.loss, last_step_time_s=r.step_time_s, rank=-1,
                        last_compute_s=r.compute_s, last_wait_s=r.wait_s))
