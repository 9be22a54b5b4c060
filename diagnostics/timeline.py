"""Readable renderings of a job's status and timeline, for `splice status` and the demo."""

from __future__ import annotations

from splice.proto import controller_pb2 as pb


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


def format_status(status: pb.JobStatus) -> str:
    lines = [f"job {status.job_id}: {status.phase}, epoch {status.epoch}, "
             f"world {len(status.members)}, recoveries {status.recoveries}"]
    if status.message:
        lines.append(f"  {status.message}")
    lines.append(f"  {'worker':<14} {'rank':>4} {'state':<9} {'pid':>7} {'step':>6} "
                 f"{'loss':>9} {'step ms':>8}")
    for w in sorted(status.workers, key=lambda w: (w.rank < 0, w.rank, w.worker_id)):
        rank = str(w.rank) if w.rank >= 0 else "-"
        lines.append(f"  {w.worker_id:<14} {rank:>4} {w.state:<9} {w.pid:>7} {w.last_step:>6} "
                     f"{w.last_loss:>9.5f} {1e3 * w.last_step_time_s:>8.1f}")
    lines.append("timeline:")
    lines.append(format_timeline(status))
    return "\n".join(lines)
