"""Shared-memory progress counters: what the hook writes is what the agent reads, and a
reader never sees a half-written record."""

from __future__ import annotations

import threading
from pathlib import Path

from splice.agent import progress
from splice.agent.progress import ProgressReader, ProgressWriter


def test_counters_round_trip(tmp_path: Path) -> None:
    path = str(tmp_path / "p")
    progress.create(path)
    reader = ProgressReader(path)
    assert reader.read().pid == 0  # nothing written yet: the agent skips such workers
    w = ProgressWriter(path)
    w.begin_epoch(3, 7)
    w.enter("all_reduce", 4096)
    p = reader.read()
    assert (p.epoch, p.step, p.seq_entered, p.seq_exited) == (3, 7, 1, 0)
    assert p.op == "all_reduce" and p.op_bytes == 4096 and p.in_collective_since_s > 0
    w.exit()
    w.step(8)
    p = reader.read()
    assert (p.step, p.seq_entered, p.seq_exited, p.in_collective_since_s) == (8, 1, 1, 0.0)
    assert p.last_progress_s >= p.in_collective_since_s
    w.begin_epoch(4, 8)  # a new epoch restarts the sequence numbers
    assert (reader.read().epoch, reader.read().seq_entered) == (4, 0)
    w.close()
    reader.close()


def test_reader_never_sees_a_torn_record(tmp_path: Path) -> None:
    """Entered and exited move together in this writer; a torn read would show a gap > 1."""
    path = str(tmp_path / "p")
    progress.create(path)
    w = ProgressWriter(path)
    reader = ProgressReader(path)
    done = threading.Event()

    def write() -> None:
        for _ in range(20_000):
            w.enter("all_reduce", 8)
            w.exit()
        done.set()

    t = threading.Thread(target=write)
    t.start()
    reads = 0
    while not done.is_set():
        p = reader.read()
        if p is not None:
            reads += 1
            assert 0 <= p.seq_entered - p.seq_exited <= 1
            assert (p.in_collective_since_s > 0) == (p.seq_entered > p.seq_exited)
    t.join()
    assert reads > 0
    w.close()
    reader.close()
