"""Where a joining worker's state comes from when a member holds it: that member's agent,
which serves the snapshot out of shared memory over its bulk port (agent/bulk.py; gRPC
when that cannot be reached), or another agent's replica of it. A worker with no state of
its own begins fetching as soon as its membership is announced (`_Prefetch`), while the
controller still decides the resume step.

A mixin of `Session` (agent/worker/session.py), split out by concept; it uses the
session's config, link and snapshots.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Sequence
from typing import Any

from splice.agent.worker.state_sources import RecoveryFailed

log = logging.getLogger("splice.worker")


class _Prefetch:
    """The snapshot of `want` (0: the newest) of the first of `candidates` ((worker, agent
    address), in order) whose agent serves one, fetched on a thread into the slot files of
    `directory` (slotmeta.IncomingSlot), a directory of its own. Cancelling ends the
    transfer under way; the thread removes what it fetched when it ends."""

    def __init__(self, session: Any, candidates: list[tuple[str, str]],
                 directory: str, want: int = 0) -> None:
        self._session, self._candidates, self._want = session, candidates, want
        self.directory = directory
        self._got: tuple[str, str, Any, float] | None = None
        self._lock = threading.Lock()
        self._cancelled = threading.Event()
        self._known = threading.Event()  # set once its step is known, or it has ended
        self.step: int | None = None  # of the snapshot being received
        self.worker = ""  # whose it is
        self._ended = False
        self._thread = threading.Thread(target=self._run, name="splice-prefetch",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        got = None
        try:
            got = self._fetch()
        except Exception as e:  # whatever happens, the thread ends tidily
            log.warning("prefetching a snapshot failed: %s", e)
        finally:
            with self._lock:
                self._ended = True
                if self._cancelled.is_set():
                    shutil.rmtree(self.directory, ignore_errors=True)
                else:
                    self._got = got
            self._known.set()

    def _fetch(self) -> tuple[str, str, Any, float] | None:
        from splice.agent import replication
        from splice.checkpoint import slotmeta

        s = self._session
        t0 = time.perf_counter()
        credentials, bulk_tls = s._peer_credentials(), s._peer_bulk_tls()
        for worker, address in self._candidates:
            if self._cancelled.is_set():
                return None
            incoming = slotmeta.IncomingSlot(self.directory)

            def into(data_bytes: int, meta: bytes, incoming: Any = incoming,
                     worker: str = worker) -> memoryview:
                view = incoming.into(data_bytes, meta)
                self.step, self.worker = incoming.record.step, worker
                self._known.set()
                return view

            try:
                fetched = replication.fetch([address], s.config.job_id, worker, self._want,
                                            timeout_s=s.config.recovery_timeout_s,
                                            connect_timeout_s=2.0,
                                            credentials=credentials,
                                            bulk_tls=bulk_tls, into=into,
                                            cancelled=self._cancelled,
                                            # verified in _fetch_state before any use
                                            checked_by_fetcher=True)
                incoming.finish()
            except (replication.ReplicationError, slotmeta.SlotUnreadable, OSError,
                    RecoveryFailed):
                incoming.close()
                continue  # a newcomer's agent holds nothing for it yet: the next one
            return (worker, address, fetched, time.perf_counter() - t0)
        return None

    def wait(self, timeout_s: float) -> bool:
        """Whether it has ended, waiting up to `timeout_s`."""
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    def result(self, step: int, timeout_s: float) -> tuple[str, str, Any, float] | None:
        """What it fetched, if that is the snapshot of `step`: waits for the transfer when
        it is of `step` (or of a step not known yet), not when it is of another."""
        self._known.wait(timeout_s)
        if self.step is not None and self.step != step:
            return None
        self._thread.join(timeout_s)
        with self._lock:
            got = self._got if self._ended and not self._cancelled.is_set() else None
        return got if got is not None and got[2].step == step else None

    def cancel(self) -> None:
        """Drop it: the transfer under way ends; its files are removed now if it has
        ended, else when it ends."""
        with self._lock:
            self._cancelled.set()
            self._got = None
            if self._ended:
                shutil.rmtree(self.directory, ignore_errors=True)


def _drop(ring: Any) -> None:
    """Nothing: the thread that runs it holds the last reference to `ring`, so the ring's
    memory is unmapped there when it ends."""


class PeerFetch:
    # ---- state from a member's memory ------------------------------------------------
    def _start_prefetch(self, m: Any, want: int = 0) -> None:
        """A joining worker starts fetching a member's snapshot of `want` (0: its newest) as
        soon as its membership is announced, while the survivors are still interrupted and
        the controller decides the resume step (a few tenths of a second on a node loss).
        A worker with no state of its own wants the newest: the resume step is almost
        always that; a replacement that adopted its predecessor's snapshots wants the step
        after them, which the members hold when the predecessor died taking it (then the
        resume step). Any member's snapshot does (their states are equal at a step), so
        `_fetch_state` takes it when its step is the one decided, and fetches as planned
        otherwise."""
        from splice.controller.membership import node_of

        members = list(m.members)
        agents = {a.node_id: a.snapshot_address for a in m.agents if a.snapshot_address}
        # Other nodes' members first (this node's may be joining as well), starting at the
        # one this worker's place among its node's members picks: a new node's workers
        # spread over the holders, as the controller's round robin spreads them.
        mine = node_of(self.worker_id)
        here = [w for w in members if node_of(w) == mine]
        others = [w for w in members if node_of(w) != mine]
        start = here.index(self.worker_id) % len(others) if others else 0
        order = others[start:] + others[:start] + [w for w in here if w != self.worker_id]
        candidates = [(w, agents[node_of(w)]) for w in order if node_of(w) in agents]
        self._drop_prefetch()
        if candidates:
            self._prefetch = _Prefetch(self, candidates,
                                       f"{self._fetch_dir()}.prefetch-{m.epoch}", want)

    def _drop_prefetch(self) -> None:
        """The state comes another way, or a newer epoch is being joined: what the
        prefetch got (or gets) is removed, without waiting for it."""
        pre, self._prefetch = self._prefetch, None
        if pre is not None:
            pre.cancel()

    def _prefetched(self, step: int) -> tuple[str, str, Any, float] | None:
        """The prefetch's (worker, address, fetched, seconds) if it got the snapshot of
        `step`, waiting for it to end; None otherwise."""
        pre, self._prefetch = self._prefetch, None
        if pre is None:
            return None
        got = pre.result(step, self.config.recovery_timeout_s)
        if got is None:
            pre.cancel()
            log.info("worker %s: the prefetched snapshot (%s) is not of step %d; fetching "
                     "it", self.worker_id, "none" if pre.step is None else
                     f"step {pre.step} of {pre.worker}", step)
        return got

    def _fetch_state(self, step: int, holders: Sequence[Any]) -> None:
        """Fetch the snapshot of `step` from the holders' agents, which serve it from
        their shared memory, trying each in turn (one unreachable, or whose bytes fail a
        check in transit or against the snapshot's own checksums, is skipped), then the
        other agents' replicas of it; the prefetched one first if it is of `step`. It
        becomes this worker's own snapshot, adopted like a predecessor's. RecoveryFailed
        when no holder could provide it."""
        from types import SimpleNamespace

        from splice.agent import replication
        from splice.checkpoint import slotmeta
        from splice.checkpoint.snapshot import SnapshotCorrupt, SnapshotRing

        directory = self._fetch_dir()
        credentials, bulk_tls = self._peer_credentials(), self._peer_bulk_tls()
        tried = []
        incoming = slotmeta.IncomingSlot(directory + ".incoming")
        attempts: list[tuple[Any, Any]] = []
        pending = self._prefetch
        pre = self._prefetched(step)
        if pre is not None:
            worker, address, fetched, took = pre
            attempts.append((SimpleNamespace(worker_id=worker, address=address, took=took,
                                             staged=pending.directory), lambda: fetched))
        for h in self._with_replicas(holders):
            attempts.append((h, lambda h=h: replication.fetch(
                [h.address], self.config.job_id, h.worker_id, step,
                timeout_s=self.config.recovery_timeout_s, connect_timeout_s=5.0,
                credentials=credentials, bulk_tls=bulk_tls, into=incoming.into,
                checked_by_fetcher=True)))  # verified below, before any use
        for h, get in attempts:
            t0 = time.perf_counter()
            ring = None
            try:
                got = get()
                staged = getattr(h, "staged", None)
                if staged is None:
                    incoming.finish()
                    staged = incoming.directory
                rec = slotmeta.parse(None, got.meta)
                if rec is None or rec.step != step:
                    raise slotmeta.SlotUnreadable(f"it sent step {rec and rec.step}")
                shutil.rmtree(directory, ignore_errors=True)
                os.rename(staged, directory)
                ring = SnapshotRing(directory=directory, owner=self.worker_id)
                if step not in ring.adopt():
                    raise slotmeta.SlotUnreadable("its snapshot does not adopt")
                ring.verify(step)
            except (replication.ReplicationError, slotmeta.SlotUnreadable,
                    SnapshotCorrupt, OSError) as e:
                incoming.close()
                if ring is not None:  # renamed in, and refused: nothing of it is kept
                    ring.close()
                    shutil.rmtree(directory, ignore_errors=True)
                if getattr(h, "staged", None):  # the prefetched one: not renamed in
                    shutil.rmtree(h.staged, ignore_errors=True)
                log.warning("worker %s: fetching the step-%d snapshot of %s from %s failed "
                            "(%s); trying the next holder", self.worker_id, step,
                            h.worker_id, h.address, e)
                tried.append(f"{h.worker_id} at {h.address}: {e}")
                continue
            old, self._snapshots = self._snapshots, ring
            old.close()
            # Unmapping its slots (a predecessor's, ~50 ms for 200 MB on busy cores) is
            # left to a thread of its own, beside the load that follows.
            retire = threading.Thread(target=_drop, args=(old,), name="splice-retire-ring",
                                      daemon=True)
            del old  # before the start: the thread must hold the last reference
            retire.start()
            replica = getattr(h, "replica", False)
            self._state_source = (f"{h.worker_id}'s replica at {h.address}" if replica
                                  else f"{h.worker_id} memory")
            where = (f"a replica of {h.worker_id}'s on the agent at {h.address}" if replica
                     else f"{h.worker_id}'s agent ({h.address})")
            took = getattr(h, "took", None)
            log.info("worker %s: fetched %.1f MB of step-%d state from %s in %.3f s%s",
                     self.worker_id, len(got.data) / 1e6, step, where,
                     time.perf_counter() - t0 + (took or 0.0),
                     " (prefetched while the resume step was decided)" if took else "")
            return
        raise RecoveryFailed(f"no holder could provide the snapshot of step {step}: "
                             + "; ".join(tried))

    def _fetch_dir(self) -> str:
        """Where a fetched snapshot becomes this worker's own: its snapshot directory in
        the agent's shared memory (a private temporary one without an agent)."""
        if not self.config.snapshot_dir and not getattr(self, "_tmp_fetch_dir", ""):
            self._tmp_fetch_dir = tempfile.mkdtemp(prefix="splice-fetched-")
        return self.config.snapshot_dir or self._tmp_fetch_dir

    def _with_replicas(self, holders: Sequence[Any]) -> list[Any]:
        """The holders' agents, then every other member agent, which may hold a replica of
        a holder's snapshot (agent --replicas): asked for the same worker and step."""
        from types import SimpleNamespace

        m = self._link.latest_membership() if self._link is not None else None
        own = {h.address for h in holders}
        others = [a.snapshot_address for a in (m.agents if m is not None else ())
                  if a.snapshot_address and a.snapshot_address not in own]
        return list(holders) + [SimpleNamespace(worker_id=h.worker_id, address=a, replica=True)
                                for h in holders for a in others]

    def _peer_tls(self) -> Any:
        """The agent's certificates, for mutual TLS to other nodes' agents; None without."""
        if not self.config.tls_ca:
            return None
        from splice.security import TLSConfig

        return TLSConfig(ca_file=self.config.tls_ca, cert_file=self.config.tls_cert,
                         key_file=self.config.tls_key)

    def _peer_credentials(self) -> Any:
        """gRPC credentials to other nodes' agents' snapshot services; None without TLS."""
        from splice.security import channel_credentials

        tls = self._peer_tls()
        try:
            return None if tls is None else channel_credentials(tls)
        except ValueError as e:
            raise RecoveryFailed(f"cannot reach other nodes' agents: {e}") from e

    def _peer_bulk_tls(self) -> Any:
        """The same for other agents' bulk snapshot ports (agent/bulk.py)."""
        from splice.security import ssl_client_context

        tls = self._peer_tls()
        try:
            return None if tls is None else ssl_client_context(tls)
        except (ValueError, OSError) as e:
            raise RecoveryFailed(f"cannot reach other nodes' agents: {e}") from e

