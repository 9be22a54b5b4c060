"""Link probe rounds: ask the agents to measure every node pair, then name the slow link.

A link straggler verdict says some rank spends too long in its own transfers, not which
link is to blame. A probe round asks the job's agents to measure every pair of nodes
once (agent/linkprobe.py), and when all of the round's results are in, the pure
`localise_slow_link` compares the pairs; a slow one becomes a "link" verdict (alert only).
Rounds started by the detector are rate-limited per job; results of an old round are
ignored.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from splice.controller.stragglers import LinkConfig, LinkVerdict, localise_slow_link
from splice.controller.telemetry import LinkProbe
from splice.proto import controller_pb2 as pb

if TYPE_CHECKING:
    from splice.controller.service import Controller

log = logging.getLogger("splice.controller")


@dataclass(frozen=True, kw_only=True)
class LinkProbeConfig:
    # A detector asks for a probe round at most this often per job: a flagged link keeps
    # producing verdicts, and each round moves payload_bytes over every pair.
    cooldown_s: float = 30.0
    # Bulk transfer per pair: big enough to leave TCP slow start (~1 ms on a 10 Gb/s link),
    # small enough not to disturb training.
    payload_bytes: int = 4 * 1024 * 1024
    # Per pair, as the agent enforces it; a pair that times out is unmeasured.
    timeout_s: float = 10.0
    link: LinkConfig = field(default_factory=LinkConfig)

    def __post_init__(self) -> None:
        if self.cooldown_s < 0 or self.payload_bytes <= 0 or self.timeout_s <= 0:
            raise ValueError("cooldown_s must be >= 0, payload_bytes and timeout_s > 0")


def plan_pairs(nodes: Sequence[str]) -> list[tuple[str, str]]:
    """(prober, probed) for every pair of `nodes`, each pair once, the probing spread
    evenly: of nodes i < j (sorted), i probes j when i + j is even, else j probes i, so
    each agent runs about half of its n - 1 probes and a round takes ~n/2 probe times."""
    ordered = sorted(set(nodes))
    out = []
    for i, a in enumerate(ordered):
        for j in range(i + 1, len(ordered)):
            b = ordered[j]
            out.append((a, b) if (i + j) % 2 == 0 else (b, a))
    return out


def check_report(node_id: str, report: pb.LinkProbeReport) -> str:
    """Why an agent's probe report is malformed ("" if it is not)."""
    for r in report.results:
        if r.from_node != node_id:
            return f"agent {node_id} cannot report probes from node {r.from_node!r}"
        if not r.to_node or "/" in r.to_node or r.to_node == node_id:
            return f"bad probed node {r.to_node!r} in a probe report of {node_id}"
        if r.error:
            continue
        if not (math.isfinite(r.rtt_s) and r.rtt_s >= 0
                and math.isfinite(r.bandwidth_bytes_per_s) and r.bandwidth_bytes_per_s > 0):
            return (f"bad link probe {node_id}->{r.to_node}: rtt {r.rtt_s} s, "
                    f"bandwidth {r.bandwidth_bytes_per_s} B/s")
    return ""


@dataclass
class _Round:
    number: int
    expected: set[tuple[str, str]]
    done: set[tuple[str, str]] = field(default_factory=set)
    evaluated: bool = False


@dataclass
class _JobLinks:
    rounds: int = 0
    current: _Round | None = None
    last_started_s: float | None = None
    latest: dict[tuple[str, str], LinkProbe] = field(default_factory=dict)  # per pair


class LinkProber:
    def __init__(self, controller: Controller, config: LinkProbeConfig | None,
                 clock: Callable[[], float]) -> None:
        self._c = controller
        self.config = config or LinkProbeConfig()
        self._clock = clock
        self._lock = threading.Lock()
        self._jobs: dict[str, _JobLinks] = {}

    def start_round(self, job_id: str, reason: str, *, respect_cooldown: bool) -> int:
        """Ask the job's agents to probe every pair of them; the number of pairs asked for
        (0 when fewer than two agents have a probe server, or within the cool-down)."""
        now = self._clock()
        targets = self._c.probe_targets(job_id)   # node -> (probe address, send)
        pairs = plan_pairs([n for n, (address, _) in targets.items() if address])
        with self._lock:
            j = self._jobs.setdefault(job_id, _JobLinks())
            if (respect_cooldown and j.last_started_s is not None
                    and now - j.last_started_s < self.config.cooldown_s):
                return 0
            if not pairs:
                log.info("[%s] no link probe round: fewer than two agents serve probes",
                         job_id)
                return 0
            j.rounds += 1
            j.last_started_s = now
            j.current = _Round(j.rounds, set(pairs))
            number = j.rounds
        by_prober: dict[str, list[str]] = {}
        for src, dst in pairs:
            by_prober.setdefault(src, []).append(dst)
        log.info("[%s] link probe round %d over %d node pairs: %s", job_id, number,
                 len(pairs), reason)
        for src, dsts in sorted(by_prober.items()):
            targets[src][1](pb.ControllerMessage(probe_links=pb.ProbeLinks(
                round=number, payload_bytes=self.config.payload_bytes,
                timeout_s=self.config.timeout_s,
                targets=[pb.ProbeTarget(node_id=d, address=targets[d][0]) for d in dsts])))
        return len(pairs)

    def on_report(self, job_id: str, node_id: str, report: pb.LinkProbeReport) -> None:
        """An agent's results (already checked by `check_report`). When the round is
        complete, the pairs are compared and a slow link is recorded as a verdict."""
        now = self._clock()
        with self._lock:
            j = self._jobs.get(job_id)
            r = j.current if j is not None else None
            if j is None or r is None or report.round != r.number or r.evaluated:
                return  # an old round's answer, or one nobody asked for
            for res in report.results:
                pair = (res.from_node, res.to_node)
                if pair not in r.expected:
                    continue
                r.done.add(pair)
                if res.error:
                    log.warning("[%s] link probe %s->%s failed: %s", job_id, *pair,
                                res.error)
                    continue
                # Stamped with the controller's clock: agents' clocks may be skewed, and
                # what matters is how fresh the measurement is here.
                probe = LinkProbe(src_node=res.from_node, dst_node=res.to_node,
                                  rtt_s=res.rtt_s,
                                  bandwidth_bytes_per_s=res.bandwidth_bytes_per_s, at_s=now)
                j.latest[probe.pair] = probe
            if r.done != r.expected:
                return
            r.evaluated = True
            # Keep only pairs of nodes still attached-and-probed in this round.
            probed = {(min(a, b), max(a, b)) for a, b in r.expected}
            j.latest = {p: v for p, v in j.latest.items() if p in probed}
            probes = list(j.latest.values())
            number = r.number
        verdict = localise_slow_link(probes, now, self.config.link)
        if verdict is None:
            log.info("[%s] link probe round %d: no slow link among %d node pairs", job_id,
                     number, len(probes))
            return
        self._c.submit(job_id, lambda: self._record(job_id, verdict))

    def _record(self, job_id: str, v: LinkVerdict) -> None:
        self._c.record_verdict(job_id, pb.Verdict(
            at_s=self._clock(), detector="link", kind="slow-link", rank=-1,
            score=v.score, action="alert", reason=v.reason))
