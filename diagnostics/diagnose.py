"""`splice diagnose`: a report on where a running job spends its step time.

The controller keeps only each worker's last step in its status, so the tool samples the
status repeatedly and records (worker, step) -> times whenever a worker's last step moves.
Steps completed between two samples are missed; the report says how many cells were
sampled and the heatmaps show the missing ones in grey. Everything between the sampling
loop and the files on disk is a pure function: `build_report(samples, status)`.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from splice.diagnostics.heatmap import Heatmap, heatmap_png
from splice.diagnostics.timeline import format_timeline, ordered_workers, timeline_origin
from splice.proto import controller_pb2 as pb

if TYPE_CHECKING:
    from splice.security import TLSConfig

# A rank whose median compute is this many times the others' is called a likely straggler
# in the report: the ratio the straggler detector is benchmarked to find (bench/detectors.py).
STRAGGLER_RATIO = 1.2
ENDED_PHASES = ("complete", "failed")
STEP_TIME_PNG, WAIT_TIME_PNG, REPORT_MD = "step_time.png", "wait_time.png", "report.md"


@dataclass(frozen=True, kw_only=True)
class DiagnoseConfig:
    controller: str
    job_id: str
    out_dir: str
    duration_s: float = 10.0  # how long to sample; stops earlier when the job ends
    poll_s: float = 0.2       # between status samples: shorter catches more steps
    max_steps: int = 500      # heatmap columns: the last this many sampled steps

    def __post_init__(self) -> None:
        if self.duration_s < 0 or self.poll_s <= 0:
            raise ValueError("--duration-s must be >= 0 and --poll-s > 0")
        if self.max_steps < 1:
            raise ValueError("--steps must be at least 1")


@dataclass(frozen=True)
class StepSample:
    worker_id: str
    step: int
    step_time_s: float
    compute_s: float
    wait_s: float


@dataclass
class StepSampler:
    """Turns successive job statuses into per-(worker, step) samples. A step seen again
    (replayed after a recovery) keeps its newest times."""

    samples: dict[tuple[str, int], StepSample] = field(default_factory=dict)
    polls: int = 0
    failed_polls: int = 0
    _last: dict[str, int] = field(default_factory=dict)

    def observe(self, status: pb.JobStatus) -> int:
        """Record every worker whose last step changed; returns how many were recorded."""
        self.polls += 1
        new = 0
        for w in status.workers:
            if w.last_step_time_s <= 0 or self._last.get(w.worker_id) == w.last_step:
                continue  # no step reported yet, or the same step as last time
            self._last[w.worker_id] = w.last_step
            self.samples[(w.worker_id, w.last_step)] = StepSample(
                w.worker_id, w.last_step, w.last_step_time_s, w.last_compute_s, w.last_wait_s)
            new += 1
        return new


def collect(fetch: Callable[[], pb.JobStatus], *, duration_s: float, poll_s: float,
            transient: tuple[type[Exception], ...] = (),
            clock: Callable[[], float] = time.monotonic,
            sleep: Callable[[float], None] = time.sleep) -> tuple[StepSampler, pb.JobStatus]:
    """Sample `fetch()` every `poll_s` for `duration_s` or until the job ends; returns the
    samples and the last status. A `transient` error (a controller failing over) costs one
    poll, except on the first poll, which must succeed."""
    sampler = StepSampler()
    status: pb.JobStatus | None = None
    deadline = clock() + duration_s
    while True:
        try:
            status = fetch()
            sampler.observe(status)
        except transient:
            sampler.failed_polls += 1
            if status is None:
                raise  # the first poll: a wrong address or job, not a failover
        if status is not None and (status.phase in ENDED_PHASES or clock() >= deadline):
            return sampler, status
        sleep(poll_s)  # the sampling interval: this tool's job, not synchronisation


@dataclass(frozen=True)
class RankSummary:
    worker_id: str
    rank: int
    node_id: str
    state: str
    num_samples: int
    median_step_s: float | None
    median_compute_s: float | None
    median_wait_s: float | None
    straggler_score: float

    @property
    def label(self) -> str:
        return f"r{self.rank} {self.worker_id}" if self.rank >= 0 else f"-  {self.worker_id}"


@dataclass(frozen=True)
class Report:
    status: pb.JobStatus
    ranks: tuple[RankSummary, ...]
    step_times: Heatmap
    wait_times: Heatmap
    num_samples: int
    num_cells: int            # rows x steps in the heatmaps
    num_sampled_cells: int
    polls: int
    failed_polls: int
    slowest: RankSummary | None   # highest median compute
    slowest_ratio: float          # its median compute over the others' median

    @property
    def straggler(self) -> RankSummary | None:
        return self.slowest if self.slowest_ratio >= STRAGGLER_RATIO else None


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def build_report(samples: Iterable[StepSample], status: pb.JobStatus, *,
                 max_steps: int = 500, polls: int = 0, failed_polls: int = 0) -> Report:
    samples = list(samples)
    known = {w.worker_id: w for w in status.workers}
    rows = [w.worker_id for w in ordered_workers(status)]
    rows += sorted({s.worker_id for s in samples} - set(rows))
    by_worker: dict[str, list[StepSample]] = {wid: [] for wid in rows}
    for s in samples:
        by_worker[s.worker_id].append(s)

    ranks = []
    for wid in rows:
        w = known.get(wid)
        mine = by_worker[wid]
        ranks.append(RankSummary(
            worker_id=wid, rank=w.rank if w else -1, node_id=w.node_id if w else "",
            state=w.state if w else "unknown", num_samples=len(mine),
            median_step_s=_median([s.step_time_s for s in mine]),
            median_compute_s=_median([s.compute_s for s in mine]),
            median_wait_s=_median([s.wait_s for s in mine]),
            straggler_score=w.straggler_score if w else 0.0))

    timed = [r for r in ranks if r.median_compute_s is not None]
    slowest, ratio = None, 0.0
    if timed:
        slowest = max(timed, key=lambda r: r.median_compute_s or 0.0)
        others = [r.median_compute_s or 0.0 for r in timed if r is not slowest]
        base = statistics.median(others) if others else 0.0
        ratio = (slowest.median_compute_s or 0.0) / base if base > 0 else 1.0

    steps = sorted({s.step for s in samples})
    last = steps[-1] if steps else 0
    first = max(steps[0], last - max_steps + 1) if steps else 0
    ncols = last - first + 1 if steps else 0
    index = {wid: i for i, wid in enumerate(rows)}
    step_grid: list[list[float | None]] = [[None] * ncols for _ in rows]
    wait_grid: list[list[float | None]] = [[None] * ncols for _ in rows]
    for s in samples:
        if s.step >= first:
            step_grid[index[s.worker_id]][s.step - first] = 1e3 * s.step_time_s
            wait_grid[index[s.worker_id]][s.step - first] = 1e3 * s.wait_s
    sampled = sum(v is not None for row in step_grid for v in row)
    cells = len(rows) * ncols
    coverage = f"{sampled} of {cells} cells sampled"
    labels = tuple(r.label for r in ranks)
    return Report(
        status=status, ranks=tuple(ranks), num_samples=len(samples), num_cells=cells,
        num_sampled_cells=sampled, polls=polls, failed_polls=failed_polls, slowest=slowest,
        slowest_ratio=ratio,
        step_times=Heatmap(title=f"step time (ms), {coverage}", row_labels=labels,
                           first_step=first, values=tuple(map(tuple, step_grid))),
        wait_times=Heatmap(title=f"collective wait (ms), {coverage}", row_labels=labels,
                           first_step=first, values=tuple(map(tuple, wait_grid))))


def _ms(v: float | None) -> str:
    return f"{1e3 * v:.1f}" if v is not None else "-"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def to_markdown(report: Report) -> str:
    st = report.status
    out = [f"# splice diagnose: job `{st.job_id}`", "",
           f"- phase **{st.phase}**, epoch {st.epoch}, world {len(st.members)}, "
           f"recoveries {st.recoveries}"]
    if st.message:
        out.append(f"- {st.message}")
    if st.controller:
        out.append(f"- controller {st.controller} ({'leader' if st.leader else 'standby'})")
    out.append(f"- {report.num_samples} step samples from {report.polls} status polls; "
               f"{report.num_sampled_cells} of {report.num_cells} rank x step cells sampled "
               "(the controller keeps each rank's last step only; the others were missed)")
    if report.failed_polls:
        out.append(f"- {report.failed_polls} status polls failed (controller unreachable)")
    if report.slowest is not None:
        s = report.slowest
        verdict = ("a likely straggler" if report.straggler is not None
                   else f"within the normal spread (a straggler is >= {STRAGGLER_RATIO:g}x)")
        out.append(f"- slowest by median compute: rank {s.rank} (`{s.worker_id}` on "
                   f"{s.node_id or '?'}), {report.slowest_ratio:.2f}x the others' median: "
                   f"{verdict}")

    out += ["", "## Membership", ""]
    out += [f"{i}. `{wid}`" for i, wid in enumerate(st.members)] or ["(no membership)"]

    out += ["", "## Per rank", "",
            "| rank | worker | node | state | samples | median step ms | median compute ms "
            "| median wait ms | straggler score |",
            "|---:|---|---|---|---:|---:|---:|---:|---:|"]
    for r in report.ranks:
        out.append(f"| {r.rank if r.rank >= 0 else '-'} | `{r.worker_id}` | {r.node_id} | "
                   f"{r.state} | {r.num_samples} | {_ms(r.median_step_s)} | "
                   f"{_ms(r.median_compute_s)} | {_ms(r.median_wait_s)} | "
                   f"{r.straggler_score:.2f} |")

    out += ["", "## Detector verdicts", ""]
    if st.verdicts:
        origin = timeline_origin(st)
        out += ["| at | detector | kind | rank | worker | score | action | reason |",
                "|---:|---|---|---:|---|---:|---|---|"]
        for v in st.verdicts:
            at = f"{1e3 * (v.at_s - origin):+.1f} ms" if origin is not None else f"{v.at_s:.3f}"
            out.append(f"| {at} | {v.detector} | {v.kind} | {v.rank} | `{v.worker_id}` | "
                       f"{v.score:.2f} | {v.action} | {_cell(v.reason)} |")
    else:
        out.append("No verdicts: no hang or straggler was detected.")

    out += ["", "## Heatmaps", "",
            "Rows are ranks, columns steps; grey cells were not sampled.", "",
            f"![step time per rank and step]({STEP_TIME_PNG})", "",
            f"![collective wait per rank and step]({WAIT_TIME_PNG})", "",
            "A slow rank shows as a row of long compute; the ranks waiting for it show long "
            "collective waits.", "", "## Timeline", "", "```", format_timeline(st), "```", ""]
    return "\n".join(out)


def write_report(report: Report, out_dir: str | Path) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {REPORT_MD: to_markdown(report).encode(),
             STEP_TIME_PNG: heatmap_png(report.step_times),
             WAIT_TIME_PNG: heatmap_png(report.wait_times)}
    for name, data in files.items():
        (out / name).write_bytes(data)
    return [out / name for name in files]


def run_diagnose(config: DiagnoseConfig, tls: TLSConfig | None = None) -> int:
    """The CLI's entry: sample the controller, write the report; 1 if it cannot be asked."""
    import grpc

    from splice.proto import controller_pb2_grpc as pb_grpc
    from splice.security import open_channel

    with open_channel(config.controller, tls) as channel:
        stub = pb_grpc.ControllerStub(channel)

        def fetch() -> pb.JobStatus:
            return stub.GetJobStatus(pb.JobStatusRequest(job_id=config.job_id), timeout=5)

        try:
            sampler, status = collect(fetch, duration_s=config.duration_s,
                                      poll_s=config.poll_s, transient=(grpc.RpcError,))
        except grpc.RpcError as e:
            print(f"splice diagnose: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    report = build_report(sampler.samples.values(), status, max_steps=config.max_steps,
                          polls=sampler.polls, failed_polls=sampler.failed_polls)
    paths = write_report(report, config.out_dir)
    print(f"splice diagnose: {report.num_samples} step samples from {sampler.polls} polls; "
          f"wrote {', '.join(str(p) for p in paths)}")
    if report.straggler is not None:
        s = report.straggler
        print(f"splice diagnose: rank {s.rank} ({s.worker_id}) computes "
              f"{report.slowest_ratio:.2f}x slower than the others")
    return 0
