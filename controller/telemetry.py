"""What the detectors read: plain records of collectives, steps, rank progress and links.

The agent builds these from the worker hook's shared-memory counters and timers and from
its own link probes; the detectors (`hang.py`, `stragglers.py`) consume them. They are
frozen values with no torch and no I/O, so a detector test is a list of records.
All times are seconds on the agent's monotonic clock (`*_s`); the controller passes the
same clock's `now` to the detectors.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class CollectiveRecord:
    """One collective as a rank saw it. `seq` counts the rank's collectives in the epoch
    from 1, so the n-th collective of every rank is the same call in a healthy job."""

    rank: int
    epoch: int
    seq: int
    op: str                  # "all_reduce", "broadcast", ...
    num_bytes: int
    enter_s: float
    exit_s: float | None     # None while the rank is still inside

    def __post_init__(self) -> None:
        if self.rank < 0 or self.epoch < 0 or self.seq < 1 or self.num_bytes < 0:
            raise ValueError(f"bad collective record: {self}")
        if self.exit_s is not None and self.exit_s < self.enter_s:
            raise ValueError(f"collective exit before enter: {self}")

    @property
    def duration_s(self) -> float | None:
        return None if self.exit_s is None else self.exit_s - self.enter_s


@dataclass(frozen=True, kw_only=True)
class StepRecord:
    """One training step of one rank: time computing and time waiting in collectives."""

    rank: int
    epoch: int
    step: int
    compute_s: float
    wait_s: float            # time inside collectives (waiting for peers + transfer)
    end_s: float
    # The rank's relative share of the global batch this step (1.0 when even). The
    # straggler detector compares compute time per unit of share, so a rank that was
    # given less work stays recognisably slow instead of flapping after a rebalance.
    share: float = 1.0

    def __post_init__(self) -> None:
        if self.rank < 0 or self.step < 0 or self.compute_s < 0 or self.wait_s < 0:
            raise ValueError(f"bad step record: {self}")
        if self.share <= 0:
            raise ValueError(f"step record share must be > 0: {self}")


@dataclass(frozen=True, kw_only=True)
class RankProgress:
    """A rank's sequence counters as the agent last read them from shared memory.

    The hook bumps the counters from the training thread, so a worker wedged in C++ (or
    stopped by a signal) still shows the last values it wrote: the hang detector works
    from exactly that frozen picture.
    """

    rank: int
    epoch: int
    last_seq_entered: int            # 0 before the first collective of the epoch
    last_seq_exited: int
    in_collective_since_s: float | None  # set while entered > exited
    last_step: int                   # steps completed in this epoch
    last_progress_s: float           # when any counter above last changed
    # When the hook's heartbeat thread last beat (None if the hook does not run one). The
    # thread keeps beating while the training thread computes or sleeps, and stops when
    # the whole process is stopped (SIGSTOP) or wedged holding the GIL: that is how a
    # "stopped" rank is told from one "stuck in compute".
    heartbeat_s: float | None = None
    # What the rank is inside, e.g. "all_reduce#bucket2:4194304" (op, DDP bucket, bytes);
    # None outside a collective or if not reported. Sequence numbers are per rank, so a
    # rank that skipped one collective of a step is inside the "same" seq as the others
    # but a different call: only this tells them apart.
    pending_op: str | None = None

    def __post_init__(self) -> None:
        if self.last_seq_exited > self.last_seq_entered:
            raise ValueError(f"rank {self.rank} exited more collectives than it entered")
        inside = self.last_seq_entered > self.last_seq_exited
        if inside != (self.in_collective_since_s is not None):
            raise ValueError(
                f"rank {self.rank}: in_collective_since_s must be set exactly while "
                f"entered ({self.last_seq_entered}) > exited ({self.last_seq_exited})"
            )

    @property
    def in_collective(self) -> bool:
        return self.in_collective_since_s is not None


@dataclass(frozen=True, kw_only=True)
class LinkProbe:
    """A point-to-point measurement between two nodes (the agents ping and stream a block)."""

    src_node: str
    dst_node: str
    rtt_s: float
    bandwidth_bytes_per_s: float
    at_s: float

    def __post_init__(self) -> None:
        if self.src_node == self.dst_node:
            raise ValueError(f"a link probe needs two nodes, got {self.src_node!r} twice")
        if self.rtt_s < 0 or self.bandwidth_bytes_per_s <= 0:
            raise ValueError(f"bad link probe: {self}")

    @property
    def pair(self) -> tuple[str, str]:
        """The unordered node pair, as a sorted tuple."""
        a, b = sorted((self.src_node, self.dst_node))
        return a, b
