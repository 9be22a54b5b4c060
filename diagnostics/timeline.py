"""Readable renderings of a job's status and timeline, for `splice status` and the demo."""

from __future__ import annotations

from splice.proto import controller_pb2 as pb

RECENT_VERDICTS = 5  # under the timeline in `splice status`; `splice diagnose` lists all


def format_timeline(status: pb.JobStatus, origin_s: float | None = None,
                    extra: list[tuple[float, str, str]] | None = None) -> str:
    """One line per event, times relative to `origin_s` (default: the first event)."""
    events = [(e.at_s, e.kind, e.text) for e in status.timeline]
    events += extra or []
    events.sort(key=lambda e: e[0])  # stable: same-time events keep their causal order
    if not events:
        return "(no events yet)"
    t0 = events[0][0] if origin_s is None else origin_s
    width = max(len(k) for _, k, _ in events)
    return "\n".join(f"  {1e3 * (t - t0):+10.1f} ms  {k:<{width}}  {text}" for t, k, text in events)


def timeline_origin(status: pb.JobStatus) -> float | None:
    """The first event's wall-clock time: the zero of every relative time shown."""
    return min((e.at_s for e in status.timeline), default=None)


def format_verdict(v: pb.Verdict, origin_s: float | None) -> str:
    when = f"{1e3 * (v.at_s - origin_s):+10.1f} ms" if origin_s is not None else f"{v.at_s:.3f}"
    who = f"rank {v.rank} ({v.worker_id})" if v.rank >= 0 else "no rank"
    return (f"  {when}  {v.detector}/{v.kind}  {who}  score {v.score:.2f}  -> {v.action}: "
            f"{v.reason}")


def format_verdicts(status: pb.JobStatus, last: int | None = None) -> str:
    """The detectors' verdicts, oldest first; only the `last` few if given."""
    verdicts = list(status.verdicts)[-last:] if last else list(status.verdicts)
    if not verdicts:
        return "  (none)"
    origin = timeline_origin(status)
    return "\n".join(format_verdict(v, origin) for v in verdicts)


def ordered_workers(status: pb.JobStatus) -> list[pb.WorkerStatus]:
    """Members by rank, then the others by id."""
    return sorted(status.workers, key=lambda w: (w.rank < 0, w.rank, w.worker_id))


def format_workers(status: pb.JobStatus) -> str:
    """The per-worker table. Epoch is the job's: a member trains in the current one."""
    lines = [f"  {'rank':>4} {'worker':<14} {'node':<10} {'state':<9} {'step':>6} "
             f"{'epoch':>5} {'step ms':>8} {'comp ms':>8} {'wait ms':>8} {'score':>6} "
             f"{'loss':>9}"]
    for w in ordered_workers(status):
        rank = str(w.rank) if w.rank >= 0 else "-"
        epoch = str(status.epoch) if w.rank >= 0 else "-"
        score = f"{w.straggler_score:.2f}" if w.straggler_score > 0 else "-"
        lines.append(f"  {rank:>4} {w.worker_id:<14} {w.node_id:<10} {w.state:<9} "
                     f"{w.last_step:>6} {epoch:>5} {1e3 * w.last_step_time_s:>8.1f} "
                     f"{1e3 * w.last_compute_s:>8.1f} {1e3 * w.last_wait_s:>8.1f} {score:>6} "
                     f"{w.last_loss:>9.5f}")
    return "\n".join(lines)


def format_status(status: pb.JobStatus) -> str:
    lines = [f"job {status.job_id}: {status.phase}, epoch {status.epoch}, "
             f"world {len(status.members)}, recoveries {status.recoveries}"]
    if status.message:
        lines.append(f"  {status.message}")
    lines.append(format_workers(status))
    lines.append("timeline:")
    lines.append(format_timeline(status))
    lines.append(f"recent verdicts (last {RECENT_VERDICTS} of {len(status.verdicts)}):")
    lines.append(format_verdicts(status, RECENT_VERDICTS))
    return "\n".join(lines)
