"""`splice status` and `splice diagnose`: the PNG encoder and heatmap colours, the report
built from sampled steps, the watch loop, and both commands against a real local job."""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import zlib
from collections.abc import Sequence
from pathlib import Path

import pytest

from splice.cli import build_parser
from splice.diagnostics.diagnose import (
    DiagnoseConfig,
    StepSample,
    StepSampler,
    build_report,
    collect,
    run_diagnose,
    to_markdown,
    write_report,
)
from splice.diagnostics.heatmap import (
    MISSING,
    VIRIDIS,
    Heatmap,
    colormap,
    decode_png,
    encode_png,
    heatmap_png,
)
from splice.diagnostics.live import CLEAR_SCREEN, watch
from splice.diagnostics.timeline import format_status
from splice.localjob import LocalJob, LocalJobConfig, worker_argv
from splice.proto import controller_pb2 as pb
from tests.conftest import JOB_TIMEOUT_S

WORKERS = ("node-0/0", "node-0/1", "node-1/0", "node-1/1")


def luminance(c: tuple[int, int, int]) -> float:
    return 0.2126 * c[0] + 0.7152 * c[1] + 0.0722 * c[2]


def job_status(*, verdicts: Sequence[pb.Verdict] = (), phase: str = "running",
               last_step: int = 0, step_time_s: float = 0.0) -> pb.JobStatus:
    return pb.JobStatus(
        job_id="j", phase=phase, epoch=1, members=list(WORKERS), verdicts=verdicts,
        timeline=[pb.TimelineEvent(at_s=100.0, kind="epoch", epoch=1, text="epoch 1 formed")],
        workers=[pb.WorkerStatus(worker_id=w, node_id=w.split("/")[0], rank=i, state="member",
                                 last_step=last_step, last_step_time_s=step_time_s,
                                 last_compute_s=step_time_s / 2, last_wait_s=step_time_s / 2,
                                 straggler_score=1.0 + i / 10)
                 for i, w in enumerate(WORKERS)])


# ---- the PNG encoder and the heatmap ------------------------------------------------------

def test_png_encoder_writes_a_valid_png_that_decodes_to_the_same_pixels() -> None:
    width, height = 3, 2
    pixels = bytes(range(3 * width * height))
    data = encode_png(width, height, pixels)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    assert struct.unpack(">IIBB", data[16:26]) == (width, height, 8, 2)
    # Decode by hand: the IDAT payload is zlib data, each row a filter byte then RGB.
    (idat_len,) = struct.unpack(">I", data[33:37])
    assert data[37:41] == b"IDAT"
    raw = zlib.decompress(data[41:41 + idat_len])
    rows = [raw[y * (1 + 3 * width):(y + 1) * (1 + 3 * width)] for y in range(height)]
    assert all(r[0] == 0 for r in rows)
    assert b"".join(r[1:] for r in rows) == pixels
    assert data.endswith(b"IEND\xaeB`\x82")
    assert decode_png(data) == (width, height, pixels)


def test_colormap_runs_dark_to_bright_and_higher_values_get_the_high_end() -> None:
    assert colormap(0.0) == VIRIDIS[0] and colormap(1.0) == VIRIDIS[-1]
    ramp = [luminance(colormap(i / 20)) for i in range(21)]
    assert ramp == sorted(ramp)
    h = Heatmap(title="t", row_labels=("a", "b"), first_step=10,
                values=((1.0, None, 3.0), (2.0, 5.0)))
    colors = h.cell_colors()
    assert colors[0][0] == VIRIDIS[0] and colors[1][1] == VIRIDIS[-1]
    assert colors[0][1] == MISSING and colors[1][2] == MISSING  # not sampled, short row
    order = sorted([(1.0, colors[0][0]), (2.0, colors[1][0]), (3.0, colors[0][2]),
                    (5.0, colors[1][1])])
    assert [luminance(c) for _, c in order] == sorted(luminance(c) for _, c in order)
    # and the drawn image holds exactly those cell colours
    _, _, rgb = decode_png(heatmap_png(h))
    drawn = {tuple(rgb[i:i + 3]) for i in range(0, len(rgb), 3)}
    assert {c for row in colors for c in row} <= drawn


# ---- sampling and the report --------------------------------------------------------------

def synthetic_samples(slow: str, steps: range) -> list[StepSample]:
    """Every rank computes 20 ms except `slow` (30 ms); the others wait for it."""
    out = []
    for step in steps:
        if step % 3 == 1:
            continue  # a step the sampler missed
        for w in WORKERS:
            compute = 0.030 if w == slow else 0.020
            wait = 0.001 if w == slow else 0.011
            out.append(StepSample(w, step, compute + wait, compute, wait))
    return out


def test_build_report_names_the_straggler_and_lists_the_verdicts() -> None:
    verdict = pb.Verdict(at_s=101.5, detector="straggler", kind="compute", rank=2,
                         worker_id="node-1/0", score=1.5, action="alert",
                         reason="rank 2 compute 1.50x the group median for 12 steps")
    report = build_report(synthetic_samples("node-1/0", range(39, 69)),
                          job_status(verdicts=[verdict]), polls=25)
    assert report.straggler is not None and report.straggler.worker_id == "node-1/0"
    assert report.slowest_ratio == pytest.approx(1.5)
    assert [r.rank for r in report.ranks] == [0, 1, 2, 3]
    assert report.ranks[2].median_compute_s == pytest.approx(0.030)
    assert report.num_cells == 4 * 30 and report.num_sampled_cells == 4 * 20
    assert report.step_times.first_step == 39 and report.step_times.num_steps == 30
    assert report.step_times.values[2][0] == pytest.approx(31.0)     # ms
    assert report.wait_times.values[2][1] is None                    # step 40: missed
    md = to_markdown(report)
    assert "rank 2 (`node-1/0` on node-1), 1.50x" in md and "likely straggler" in md
    assert verdict.reason in md and "| straggler | compute | 2 |" in md
    assert "80 of 120 rank x step cells sampled" in md
    assert "![step time per rank and step](step_time.png)" in md


def test_build_report_without_a_straggler_or_samples() -> None:
    even = build_report(synthetic_samples("nobody", range(5)), job_status())
    assert even.straggler is None and "within the normal spread" in to_markdown(even)
    assert "No verdicts" in to_markdown(even)
    empty = build_report([], job_status())
    assert empty.slowest is None and empty.num_cells == 0
    assert decode_png(heatmap_png(empty.step_times))[0] > 0  # still a (blank) image


def test_report_keeps_only_the_last_max_steps_columns(tmp_path: Path) -> None:
    report = build_report(synthetic_samples("node-0/1", range(0, 1000)), job_status(),
                          max_steps=100)
    assert report.step_times.first_step == 900 and report.step_times.num_steps == 100
    paths = write_report(report, tmp_path / "out")
    assert sorted(p.name for p in paths) == ["report.md", "step_time.png", "wait_time.png"]


def test_sampler_records_a_step_when_a_worker_moves_on() -> None:
    sampler = StepSampler()
    assert sampler.observe(job_status()) == 0                        # nothing reported yet
    assert sampler.observe(job_status(last_step=5, step_time_s=0.02)) == 4
    assert sampler.observe(job_status(last_step=5, step_time_s=0.02)) == 0
    assert sampler.observe(job_status(last_step=9, step_time_s=0.04)) == 4
    assert sorted({s for _, s in sampler.samples}) == [5, 9]
    assert sampler.samples[("node-0/0", 9)].compute_s == pytest.approx(0.02)
    assert sampler.polls == 4


def test_collect_polls_until_the_job_ends_and_survives_a_failover() -> None:
    class Unreachable(Exception):
        pass

    answers: list[pb.JobStatus | Exception] = [
        job_status(last_step=1, step_time_s=0.01), Unreachable(),
        job_status(last_step=2, step_time_s=0.01),
        job_status(last_step=3, step_time_s=0.01, phase="complete"),
        job_status(last_step=4, step_time_s=0.01)]
    now = [0.0]

    def fetch() -> pb.JobStatus:
        a = answers.pop(0)
        if isinstance(a, Exception):
            raise a
        return a

    def sleep(s: float) -> None:
        now[0] += s

    sampler, status = collect(fetch, duration_s=60, poll_s=0.2, transient=(Unreachable,),
                              clock=lambda: now[0], sleep=sleep)
    assert status.phase == "complete" and len(answers) == 1
    assert sampler.failed_polls == 1 and len(sampler.samples) == 12
    assert now[0] == pytest.approx(0.6)

    def down() -> pb.JobStatus:
        raise Unreachable()

    with pytest.raises(Unreachable):  # the first poll must succeed: wrong address or job
        collect(down, duration_s=60, poll_s=0.2, transient=(Unreachable,),
                clock=lambda: now[0], sleep=sleep)


def test_diagnose_config_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        DiagnoseConfig(controller="x:1", job_id="j", out_dir="d", poll_s=0)
    with pytest.raises(ValueError):
        DiagnoseConfig(controller="x:1", job_id="j", out_dir="d", max_steps=0)


# ---- splice status ------------------------------------------------------------------------

def test_status_table_shows_every_column_and_the_last_five_verdicts() -> None:
    verdicts = [pb.Verdict(at_s=100.0 + i, detector="straggler", kind="compute", rank=1,
                           worker_id="node-0/1", score=1.3, action="alert", reason=f"v{i}")
                for i in range(7)]
    text = format_status(job_status(verdicts=verdicts, last_step=12, step_time_s=0.05))
    header = text.splitlines()[1].split()
    assert header[:5] == ["rank", "worker", "node", "state", "step"]
    assert {"epoch", "comp", "wait", "score"} <= set(header)
    row = text.splitlines()[4].split()
    assert row[:7] == ["2", "node-1/0", "node-1", "member", "12", "1", "50.0"]
    assert row[7:10] == ["25.0", "25.0", "1.20"]
    assert "recent verdicts (last 5 of 7)" in text
    assert "v1" not in text and all(f"v{i}" in text for i in range(2, 7))
    assert "+2000.0 ms  straggler/compute  rank 1 (node-0/1)" in text


@pytest.mark.parametrize("is_tty", [True, False], ids=["terminal", "pipe"])
def test_watch_redraws_on_a_terminal_appends_otherwise_and_ctrl_c_exits_0(
        is_tty: bool) -> None:
    out, naps = io.StringIO(), []
    frames = iter(["one", "two", "three"])

    def sleep(s: float) -> None:
        naps.append(s)
        if len(naps) == 3:
            raise KeyboardInterrupt

    assert watch(lambda: next(frames), interval_s=0.5, out=out, is_tty=is_tty,
                 clock=lambda: 0.0, sleep=sleep) == 0
    assert naps == [0.5] * 3
    text = out.getvalue()
    assert text.count(CLEAR_SCREEN) == (3 if is_tty else 0)
    assert text.count("--- ") == (0 if is_tty else 3)
    assert text.index("one") < text.index("two") < text.index("three")


def test_cli_accepts_watch_and_diagnose_flags() -> None:
    p = build_parser()
    a = p.parse_args(["status", "--watch", "--interval-s", "0.5"])
    assert a.watch and a.interval_s == 0.5
    a = p.parse_args(["diagnose", "--controller", "h:1", "--job", "j", "--out", "d",
                      "--steps", "50", "--poll-s", "0.1", "--duration-s", "3"])
    assert (a.steps, a.poll_s, a.duration_s, a.out) == (50, 0.1, 3.0, "d")


# ---- both commands against a real job -----------------------------------------------------

@pytest.mark.integration
def test_diagnose_and_status_against_a_training_job(tmp_path: Path) -> None:
    cfg = LocalJobConfig(worker_command=worker_argv(
        "splice.examples.train_mlp", ["--steps", "150", "--step-sleep-s", "0.01"]),
        nodes=2, nproc=2, log_dir=str(tmp_path))
    out = tmp_path / "diagnose"
    with LocalJob(cfg) as job:
        try:
            job.wait_until(lambda s: any(w.last_step >= 1 for w in s.workers), JOB_TIMEOUT_S,
                           "training to start")
            address = job.addresses[0]
            assert run_diagnose(DiagnoseConfig(controller=address, job_id=cfg.job_id,
                                               out_dir=str(out), duration_s=3,
                                               poll_s=0.05)) == 0
            status = subprocess.run(
                [sys.executable, "-m", "splice", "status", "--controller", address,
                 "--job", cfg.job_id], capture_output=True, text=True, timeout=60)
        except BaseException:
            print(job.logs())
            raise
    assert status.returncode == 0, status.stderr
    table = status.stdout.splitlines()
    for rank, wid in enumerate(WORKERS):
        row = next(line.split() for line in table if wid in line.split())
        assert row[:3] == [str(rank), wid, wid.split("/")[0]], status.stdout
    md = (out / "report.md").read_text()
    assert "## Per rank" in md and all(f"`{w}`" in md for w in WORKERS)
    for name in ("step_time.png", "wait_time.png"):
        width, height, rgb = decode_png((out / name).read_bytes())
        assert width > 100 and height > 50 and len(rgb) == 3 * width * height
