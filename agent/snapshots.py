"""The node's snapshots, as its agent keeps and moves them.

Each worker's snapshot slots are files in the agent's shared memory (checkpoint/shm.py),
one directory per worker. From there the agent
  - serves them to joining workers on other nodes (the SnapshotPeer server,
    agent/replication.py, mutual TLS when the agent has certificates);
  - hands a dead worker's directory to its replacement on this node (one rename);
  - with `--replicas K`, pushes each local worker's newest committed snapshot to K peer
    agents (`place_replicas`: other nodes, other failure domains first), and holds peers'
    replicas within `--replica-budget-mb`, serving them like its own workers' snapshots.
"""

from __future__ import annotations

import glob
import logging
import os
import shutil
import ssl
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

import grpc

from splice.agent import replication
from splice.agent.replicator import LocalSnapshot, Replicator, place_replicas
from splice.proto import controller_pb2 as pb

if TYPE_CHECKING:
    from splice.agent.agent import AgentConfig
    from splice.agent.metrics import AgentMetrics

log = logging.getLogger("splice.agent")

# The local workers whose snapshots are pushed: the members connected now.
Members = Callable[[], "list[str]"]


class NodeSnapshots:
    def __init__(self, config: AgentConfig, shm_dir: str, metrics: AgentMetrics | None,
                 members: Members) -> None:
        self.config = config
        self._root = os.path.join(shm_dir, "snapshots")
        self._metrics = metrics
        self._members = members
        self.server: replication.PeerServer | None = None
        self.address = ""
        self.replicas = replication.ReplicaStore(int(config.replica_budget_mb * 1e6),
                                                 job_id=config.job_id)
        try:
            self.server = replication.serve(
                self.replicas, f"{config.gloo_host}:0",
                self.serve if metrics is None else metrics.counting_served(self.serve),
                credentials=self._server_credentials(), bulk_tls=self._bulk_tls())
            self.address = f"{config.gloo_host}:{self.server.port}"
        except OSError as e:  # joining workers then receive state over the group
            log.warning("agent %s: cannot serve snapshots on %s: %s", config.node_id,
                        config.gloo_host, e)
        # Pushing replicas to peer agents (the peers' addresses come with each membership).
        self.peers: list[tuple[str, str, str]] = []  # node id, snapshot address, domain
        self._lock = threading.Lock()  # the peers, the memberships seen, the channels
        self._members_of: dict[int, frozenset[str]] = {}  # epoch -> its members
        self._settled_epoch = 0  # the newest epoch a local worker trained a step in
        self.replicator: Replicator | None = None
        self._channels: dict[str, grpc.Channel] = {}
        if config.replicas and self.server is not None:
            self.replicator = Replicator(config.job_id, self.local_snapshots, self.targets,
                                         interval_s=min(0.25, config.replicate_interval_s),
                                         min_gap_s=config.replicate_interval_s,
                                         push_fn=self.push)
        if metrics is not None:
            metrics.watch_snapshot_shm(self._root)
            metrics.watch_replicas(lambda: self.replicas.bytes_held)

    def start(self) -> None:
        if self.replicator is not None:
            self.replicator.start()

    def close(self) -> None:
        with self._lock:
            channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            channel.close()  # cancels a push in flight, so the replicator stops at once
        if self.replicator is not None:
            self.replicator.close()
        if self.server is not None:
            self.server.stop(grace_s=0)

    # ---- this node's workers' snapshots --------------------------------------------------
    def directory(self, wid: str) -> str:
        """The worker's snapshot directory in the agent's shared memory (checkpoint/shm.py):
        node-0/1 -> <shm>/snapshots/node-0_1."""
        return os.path.join(self._root, wid.replace("/", "_"))

    def serve(self, job_id: str, wid: str, step: int) -> tuple[int, bytes, memoryview] | None:
        """A local worker's committed snapshot of `step` (0: its newest), straight from
        shared memory, for a peer's Fetch: (step, meta, data). The worker does not touch
        that slot while the joining worker fetches it (the members wait for it in the
        resume step, and a slot is rewritten two steps later at the earliest)."""
        from splice.checkpoint import slotmeta

        if job_id != self.config.job_id or "/" not in wid:
            return None
        return slotmeta.open_committed(self.directory(wid), step)

    def discard_staging(self, wid: str) -> None:
        """What an exited worker was still fetching (<dir>.incoming, <dir>.prefetch-N,
        agent/worker/peer_fetch.py): never its snapshot, so never handed over."""
        for path in glob.glob(glob.escape(self.directory(wid)) + ".*"):
            shutil.rmtree(path, ignore_errors=True)

    def hand_over(self, lost: str, to: str, *, tainted: bool) -> None:
        """The snapshots `lost` left in shared memory become `to`'s (one rename): the
        newcomer adopts them instead of receiving a peer's over the network. A `tainted`
        worker's (killed for corrupted state) are removed instead: the newcomer gets a
        healthy member's."""
        src, dst = self.directory(lost), self.directory(to)
        if tainted:
            log.warning("agent %s: not handing %s's snapshots to %s (killed for corrupted "
                        "state)", self.config.node_id, lost, to)
            shutil.rmtree(src, ignore_errors=True)
            return
        if not os.path.isdir(src):
            return
        shutil.rmtree(dst, ignore_errors=True)  # a spare has written nothing there yet
        os.rename(src, dst)
        if self._metrics is not None:
            self._metrics.snapshot_handed_over()

    # ---- replicas ahead of a fault -------------------------------------------------------
    def on_membership(self, m: pb.Membership) -> None:
        """A new membership: its agents are the peers now. Replicas of workers that are in
        neither it nor the last membership that trained a step are dropped (a worker lost
        since keeps its replica: the snapshots being resharded are of that layout), and
        channels to former peers closed."""
        with self._lock:
            self.peers = [(a.node_id, a.snapshot_address, a.failure_domain or a.node_id)
                          for a in m.agents]
            self._members_of = {e: w for e, w in self._members_of.items()
                                if e >= self._settled_epoch}
            self._members_of[m.epoch] = frozenset(m.members)
            self._drop_departed()
            current = {a for _, a, _ in self.peers}
            gone = [self._channels.pop(a) for a in list(self._channels) if a not in current]
        for channel in gone:
            channel.close()

    def trained(self, epoch: int) -> None:
        """A local worker completed a step in `epoch`: its layout is the settled one."""
        with self._lock:
            if epoch > self._settled_epoch and epoch in self._members_of:
                self._settled_epoch = epoch
                self._drop_departed()

    def _drop_departed(self) -> None:
        """(Under the lock.)"""
        newest = max(self._members_of, default=0)
        keep = (self._members_of.get(newest, frozenset())
                | self._members_of.get(self._settled_epoch, frozenset()))
        for r in self.replicas.holdings():
            if r.job_id == self.config.job_id and r.worker_id not in keep:
                log.info("agent %s: dropping the replica of %s (step %d): no longer in the "
                         "job", self.config.node_id, r.worker_id, r.step)
                self.replicas.drop(r.job_id, r.worker_id)

    def targets(self) -> list[str]:
        """The snapshot servers of this node's `replicas` peers (place_replicas over the
        members' nodes: other nodes, other failure domains first)."""
        with self._lock:
            peers = list(self.peers)
        address = {n: a for n, a, _ in peers if a}
        domain = {n: d for n, _, d in peers}
        domain.setdefault(self.config.node_id, self.config.failure_domain or self.config.node_id)
        nodes = sorted(set(address) | {self.config.node_id})
        mine = place_replicas(nodes, self.config.replicas,
                              lambda n: domain.get(n, n)).get(self.config.node_id, [])
        return [address[n] for n in mine if n in address]

    def local_snapshots(self) -> list[LocalSnapshot]:
        """Each local member's newest committed snapshot, mapped from shared memory."""
        from splice.checkpoint import slotmeta

        workers = self._members()
        out: list[LocalSnapshot] = []
        for wid in workers:
            found = slotmeta.open_committed(self.directory(wid), 0)
            if found is None:
                continue
            step, meta, data = found
            try:
                rec = slotmeta.parse(None, meta)
            except slotmeta.SlotUnreadable:
                continue
            # Ordered by the epoch it was taken in: after a rollback the older step of the
            # newer epoch supersedes what peers hold, and an unchanged snapshot is not
            # pushed again because a new epoch began.
            epoch = rec.info.get("epoch", 0) if rec is not None else 0
            out.append((wid, step, epoch if isinstance(epoch, int) else 0, meta, data))
        return out

    def push(self, peer: str, worker: str, step: int, epoch: int, meta: bytes | memoryview,
             data: replication.Buffer) -> None:
        """One replica to one peer. The worker keeps training meanwhile and rewrites this
        slot two steps later: the push is abandoned if the slot's commit record changed
        while its bytes were read (chunk CRCs catch a change while they are sent)."""
        from splice.checkpoint import slotmeta

        directory, raw = self.directory(worker), bytes(meta)

        def intact() -> bool:
            rec = slotmeta.parse(None, raw)
            try:
                now = rec and slotmeta.read(directory, rec.index)
            except slotmeta.SlotUnreadable:
                return False
            return bool(now) and now.meta == raw  # type: ignore[union-attr]

        with self._lock:
            channel = self._channels.get(peer)
            if channel is None:
                channel = self._channels[peer] = replication.channel_to(
                    peer, self._client_credentials())
        size = len(raw) + len(memoryview(data).cast("B"))
        try:
            replication.push(channel, self.config.job_id, worker, step, epoch, raw, data,
                             timeout_s=60.0, still_valid=intact)
        except Exception:
            if self._metrics is not None:
                self._metrics.replica_pushed(False)
            raise
        if self._metrics is not None:
            self._metrics.replica_pushed(True, size)

    # ---- mutual TLS ----------------------------------------------------------------------
    def _client_credentials(self) -> grpc.ChannelCredentials | None:
        if self.config.tls is None:
            return None
        from splice.security import channel_credentials

        return channel_credentials(self.config.tls)

    def _bulk_tls(self) -> ssl.SSLContext | None:
        """The same mutual TLS for the bulk snapshot port (agent/bulk.py); None without
        certificates (a plaintext port then) or when they do not load (no bulk port then:
        `serve` never opens a plaintext one beside a TLS service)."""
        if self.config.tls is None:
            return None
        from splice.security import ssl_server_context

        try:
            return ssl_server_context(self.config.tls)
        except (ValueError, OSError) as e:
            log.warning("agent %s: no bulk snapshot port (%s); fetches use gRPC",
                        self.config.node_id, e)
            return None

    def _server_credentials(self) -> grpc.ServerCredentials | None:
        """Mutual TLS for the snapshot server when the agent has certificates; OSError if
        its certificate cannot serve snapshots (then no snapshot server runs: a plaintext
        one would hand the model to anyone who asks)."""
        from splice.security import server_credentials, server_problem

        tls = self.config.tls
        if tls is None:
            return None
        try:
            problem = server_problem(tls)
            credentials = server_credentials(tls)
        except ValueError as e:
            problem = str(e)
        if problem:
            raise OSError(f"mutual TLS is on but {problem} (joining workers receive state "
                          "over the group instead)")
        return credentials
