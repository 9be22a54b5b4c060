"""A sharded optimizer's lost shards, from the replicas agents pushed ahead of the fault.

With ZeRO-1 each rank's snapshot holds its own shard of the AdamW moments (plus, in step,
a replica of one other rank's). When a rank and the holder of that in-step replica are
lost together (two nodes at once), the shard is gone from every member's memory, but an
agent running with `--replicas K` may hold a replica of the lost worker's whole snapshot
(agent/snapshots.py). These helpers find which steps of which workers the members' agents
hold (the SnapshotPeer List call) and read one replica's optimizer shard.
"""

from __future__ import annotations

import logging
import os
import shutil
import ssl
import tempfile
from collections.abc import Iterable, Sequence
from typing import Any

import grpc

from splice.agent import replication
from splice.proto import peer_pb2 as ppb
from splice.proto import peer_pb2_grpc as ppb_grpc

log = logging.getLogger("splice.worker")


def replica_steps(addresses: Iterable[str], job_id: str, workers: Sequence[str], *,
                  credentials: grpc.ChannelCredentials | None = None,
                  timeout_s: float = 5.0) -> dict[str, dict[int, list[str]]]:
    """For each of `workers`, the steps of its replicas the agents at `addresses` hold, and
    which agents hold each. An agent that cannot be asked counts as holding nothing."""
    out: dict[str, dict[int, list[str]]] = {w: {} for w in workers}
    for address in addresses:
        channel = replication.channel_to(address, credentials)
        try:
            held = ppb_grpc.SnapshotPeerStub(channel).List(ppb.ListRequest(job_id=job_id),
                                                          timeout=timeout_s)
        except grpc.RpcError as e:
            log.warning("cannot list the replicas of the agent at %s: %s", address,
                        e.code().name)  # type: ignore[attr-defined]
            continue
        finally:
            channel.close()
        for h in held.holdings:
            if h.replica and h.job_id == job_id and h.worker_id in out:
                out[h.worker_id].setdefault(h.step, []).append(address)
    return out


def fetch_shard(addresses: Sequence[str], job_id: str, worker: str, step: int, *,
                credentials: grpc.ChannelCredentials | None = None,
                bulk_tls: ssl.SSLContext | None = None,
                timeout_s: float = 120.0) -> dict[str, Any]:
    """The optimizer shard ({start, stop, step, exp_avg, exp_avg_sq}) in `worker`'s
    snapshot of `step`, from the first agent at `addresses` that serves an intact replica
    of it (checked in transit and against the snapshot's own checksums). Raises
    replication.FetchFailed, or ValueError if the snapshot holds no optimizer shard."""
    from splice.checkpoint import slotmeta
    from splice.checkpoint.snapshot import SnapshotCorrupt, SnapshotRing

    reasons = []
    for address in addresses:
        directory = tempfile.mkdtemp(prefix="splice-shard-")
        try:
            got = replication.fetch([address], job_id, worker, step, timeout_s=timeout_s,
                                    connect_timeout_s=5.0, credentials=credentials,
                                    bulk_tls=bulk_tls)
            rec = slotmeta.parse(None, got.meta)
            if rec is None or rec.step != step:
                raise slotmeta.SlotUnreadable(f"it holds step {rec and rec.step}")
            with open(os.path.join(directory, f"slot{rec.index}.meta"), "wb") as f:
                f.write(got.meta)
            with open(os.path.join(directory, rec.data_name), "wb") as f:
                f.write(got.data.numpy().data)
            ring = SnapshotRing(directory=directory, owner=worker)
            try:
                if step not in ring.adopt():
                    raise slotmeta.SlotUnreadable("its snapshot does not adopt")
                tree = ring.restore(step)  # a private, checked copy
            finally:
                ring.close()
        except (replication.ReplicationError, slotmeta.SlotUnreadable, SnapshotCorrupt,
                OSError) as e:
            log.warning("replica of %s step %d at %s is not usable: %s", worker, step,
                        address, e)
            reasons.append(f"{address}: {e}")
            continue
        finally:
            shutil.rmtree(directory, ignore_errors=True)
        shard = tree.get("optimizer") if isinstance(tree, dict) else None
        if not isinstance(shard, dict) or "exp_avg" not in shard:
            raise ValueError(f"the replica of {worker} step {step} holds no optimizer shard")
        return shard
    raise replication.FetchFailed(f"no agent served an intact replica of {worker} step "
                                  f"{step}: " + "; ".join(reasons or ["none held it"]))
