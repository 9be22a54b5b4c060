"""The StateStore on etcd, so that a standby controller can adopt a job its dead leader was
running: the job spec, the epoch chain, snapshot inventory and decision log outlive any one
controller process.

Layout, under `{prefix}/jobs/{job_id}/` (job and worker ids percent-encoded, so an id with a
'/' can never reach into another job's keys):

    epoch                  the newest EpochRecord (JSON); what `load_epoch` reads
    epoch_number           the same record's epoch as a decimal; what commits compare on
    spec                   the job spec (JSON)
    inventory/{worker_id}  sorted snapshot steps (JSON list)
    decisions/{seq:016d}   one decision line each; `decisions_seq`'s version is the count

Why `epoch_number`: a commit must be one transaction that needs no read first, and etcd
compares whole values, so the CAS compares a key holding only the number. Comparing the
number is enough under any concurrency because stored epochs only ever increase (a commit
must advance), so "the value is still `expected`" cannot be fooled by an A-B-A sequence.

Every etcd failure to answer becomes `StoreUnavailable`. One caveat the interface cannot
hide: a write whose reply timed out (`DEADLINE_EXCEEDED`) may have been applied. The message
says so; a caller that retries `commit_epoch` then gets `EpochConflict` and, reloading,
finds its own record.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import quote, unquote

import grpc
import pyetcd
from pyetcd import exceptions as etcd_exceptions

from splice.controller.store import EpochConflict, EpochRecord, Fence, NotLeader, StoreUnavailable

T = TypeVar("T")

# Codes that mean "etcd did not answer (in time)": the caller should retry later. Anything
# else (INVALID_ARGUMENT, PERMISSION_DENIED, ...) is a bug or misconfiguration and propagates.
_UNAVAILABLE_CODES = frozenset({
    grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED,
    grpc.StatusCode.UNKNOWN, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INTERNAL,
})
_UNAVAILABLE_ERRORS = (
    etcd_exceptions.ConnectionFailedError, etcd_exceptions.ConnectionTimeoutError,
    etcd_exceptions.InternalServerError, etcd_exceptions.NoServerAvailableError,
    etcd_exceptions.WatchTimedOut,
)


def parse_endpoints(endpoints: str) -> list[tuple[str, int]]:
    """'host:port[,host:port...]' -> [(host, port), ...]; ValueError on anything else."""
    parsed = []
    for item in endpoints.split(","):
        host, sep, port = item.strip().rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"etcd endpoint {item!r} is not host:port (in {endpoints!r})")
        parsed.append((host, int(port)))
    return parsed


class EtcdConnection:
    """Clients for a list of etcd endpoints, used one at a time: the first until it fails to
    answer, then the next. A call is never retried on another endpoint (a write that timed
    out may have been applied); it raises StoreUnavailable and the caller's retry goes to
    the next endpoint.
    """

    def __init__(self, endpoints: str, timeout_s: float) -> None:
        self.endpoints = endpoints
        self.timeout_s = timeout_s
        self._addresses = parse_endpoints(endpoints)
        self._lock = threading.Lock()
        self._index = 0
        self._client: pyetcd.MultiEndpointEtcd3Client | None = None

    def client(self) -> pyetcd.MultiEndpointEtcd3Client:
        with self._lock:
            if self._client is None:
                host, port = self._addresses[self._index]
                # time_retry=0: pyetcd would otherwise refuse to use an endpoint for 300 s
                # after one failed call; we do our own rotation.
                endpoint = pyetcd.Endpoint(host, port, secure=False, time_retry=0)
                self._client = pyetcd.MultiEndpointEtcd3Client(
                    endpoints=[endpoint], timeout=self.timeout_s)
            return self._client

    def call(self, what: str, op: Callable[[pyetcd.MultiEndpointEtcd3Client], T]) -> T:
        """Run `op` with the current endpoint's client; etcd failing to answer becomes
        StoreUnavailable and moves on to the next endpoint."""
        client = self.client()
        try:
            return op(client)
        except (grpc.RpcError, *_UNAVAILABLE_ERRORS) as exc:
            if isinstance(exc, grpc.RpcError) and exc.code() not in _UNAVAILABLE_CODES:
                raise
            raise self._unavailable(client, what, exc) from exc

    def _unavailable(self, client: pyetcd.MultiEndpointEtcd3Client, what: str,
                     exc: BaseException) -> StoreUnavailable:
        with self._lock:
            host, port = self._addresses[self._index]
            address = f"{host}:{port}"
            if self._client is client:
                # A fresh channel next time: gRPC's reconnect backoff would otherwise fail
                # calls fast for up to seconds after etcd is back.
                self._client = None
                self._index = (self._index + 1) % len(self._addresses)
        client.close()
        ambiguous = isinstance(exc, etcd_exceptions.ConnectionTimeoutError) or (
            isinstance(exc, grpc.RpcError) and exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED)
        hint = (" (timed out: a write may have been applied; reload before retrying)"
                if ambiguous else "")
        # With another endpoint to try, retry at once; otherwise give etcd a moment.
        retry_after_s = 0.0 if len(self._addresses) > 1 else min(0.5, self.timeout_s)
        return StoreUnavailable(f"etcd at {address} did not answer {what}: {exc}{hint}",
                                retry_after_s=retry_after_s)

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()


def _raise_refused(responses: list[Any], fence: Fence | None, what: str, *,
                   expected: int) -> None:
    """Say why a fenced epoch transaction was refused, from what its failure branch read
    in the same revision (stored epoch first, then the leader key): NotLeader before
    EpochConflict, since a deposed leader's view of the epoch is irrelevant."""
    if fence is not None:
        holder = responses[1]
        if not holder:
            raise NotLeader(
                f"leader key {fence.key!r} is gone (lease expired or revoked); this "
                f"controller ({fence.identity}, elected at revision {fence.revision}) "
                "was deposed: stop acting as leader and campaign again")
        value, meta = holder[0]
        if value.decode() != fence.identity or meta.create_revision != fence.revision:
            raise NotLeader(
                f"leader key {fence.key!r} names {value.decode()!r} elected at revision "
                f"{meta.create_revision}, not this controller ({fence.identity} at "
                f"revision {fence.revision}): stop acting as leader")
    stored = responses[0]
    found = int(stored[0][0]) if stored else 0
    raise EpochConflict(f"{what}: expected stored epoch {expected}, found {found}")


class EtcdStateStore:
    """StateStore on etcd. Fences are checked in the same transaction as the epoch."""

    def __init__(self, endpoints: str = "127.0.0.1:2379", prefix: str = "/splice",
                 timeout_s: float = 2.0) -> None:
        self.prefix = prefix.rstrip("/")
        self.connection = EtcdConnection(endpoints, timeout_s)

    @property
    def endpoints(self) -> str:
        return self.connection.endpoints

    def close(self) -> None:
        self.connection.close()

    def _job(self, job_id: str) -> str:
        return f"{self.prefix}/jobs/{quote(job_id, safe='')}"

    def _get(self, key: str, what: str) -> tuple[bytes | None, Any]:
        return self.connection.call(what, lambda c: c.get(key))

    # ---- job spec -------------------------------------------------------------------------

    def save_job_spec(self, job_id: str, spec: dict[str, Any]) -> None:
        text = json.dumps(spec, sort_keys=True)
        self.connection.call(f"save_job_spec({job_id!r})",
                             lambda c: c.put(f"{self._job(job_id)}/spec", text))

    def load_job_spec(self, job_id: str) -> dict[str, Any] | None:
        value, _ = self._get(f"{self._job(job_id)}/spec", f"load_job_spec({job_id!r})")
        return None if value is None else dict(json.loads(value))

    # ---- resume decisions -----------------------------------------------------------------

    def commit_resume(self, job_id: str, epoch: int, step: int,
                      fence: Fence | None = None) -> None:
        job = self._job(job_id)
        number_key = f"{job}/epoch_number"

        def txn(c: pyetcd.MultiEndpointEtcd3Client) -> tuple[bool, list[Any]]:
            t = c.transactions
            compare = [t.value(number_key) == str(epoch)]
            failure = [t.get(number_key)]
            if fence is not None:
                compare += [t.value(fence.key) == fence.identity,
                            t.create(fence.key) == fence.revision]
                failure.append(t.get(fence.key))
            return c.transaction(
                compare=compare,
                success=[t.put(f"{job}/resume", json.dumps({"epoch": epoch, "step": step}))],
                failure=failure)

        succeeded, responses = self.connection.call(
            f"commit_resume({job_id!r}, epoch {epoch}, step {step})", txn)
        if not succeeded:
            _raise_refused(responses, fence, f"job {job_id!r}: resume for epoch {epoch}",
                           expected=epoch)

    def load_resume(self, job_id: str) -> tuple[int, int] | None:
        value, _ = self._get(f"{self._job(job_id)}/resume", f"load_resume({job_id!r})")
        if value is None:
            return None
        raw = json.loads(value.decode())
        return int(raw["epoch"]), int(raw["step"])

    # ---- snapshot inventory ---------------------------------------------------------------

    def put_snapshot_inventory(self, job_id: str, worker_id: str, steps: list[int]) -> None:
        key = f"{self._job(job_id)}/inventory/{quote(worker_id, safe='')}"
        text = json.dumps(sorted(int(s) for s in steps))
        self.connection.call(f"put_snapshot_inventory({job_id!r}, {worker_id!r})",
                             lambda c: c.put(key, text))

    def snapshot_inventory(self, job_id: str) -> dict[str, list[int]]:
        prefix = f"{self._job(job_id)}/inventory/"
        items = self.connection.call(f"snapshot_inventory({job_id!r})",
                                     lambda c: list(c.get_prefix(prefix)))
        return {unquote(meta.key.decode()[len(prefix):]): list(json.loads(value))
                for value, meta in items}

    # ---- epochs ---------------------------------------------------------------------------

    def load_epoch(self, job_id: str) -> EpochRecord | None:
        value, _ = self._get(f"{self._job(job_id)}/epoch", f"load_epoch({job_id!r})")
        return None if value is None else EpochRecord.from_json(value.decode())

    def commit_epoch(self, record: EpochRecord, *, expected_epoch: int,
                     fence: Fence | None = None) -> None:
        if record.epoch <= expected_epoch:
            raise ValueError(f"epoch {record.epoch} does not advance past {expected_epoch}")
        job = self._job(record.job_id)
        number_key = f"{job}/epoch_number"

        def txn(c: pyetcd.MultiEndpointEtcd3Client) -> tuple[bool, list[Any]]:
            t = c.transactions
            compare = [t.version(number_key) == 0 if expected_epoch == 0
                       else t.value(number_key) == str(expected_epoch)]
            failure = [t.get(number_key)]
            if fence is not None:
                compare += [t.value(fence.key) == fence.identity,
                            t.create(fence.key) == fence.revision]
                failure.append(t.get(fence.key))
            # The failure branch reads what the comparisons saw, in the same revision, so
            # the diagnosis below cannot race with another writer.
            return c.transaction(
                compare=compare,
                success=[t.put(f"{job}/epoch", record.to_json()),
                         t.put(number_key, str(record.epoch))],
                failure=failure)

        succeeded, responses = self.connection.call(
            f"commit_epoch({record.job_id!r}, epoch {record.epoch})", txn)
        if not succeeded:
            _raise_refused(responses, fence, f"job {record.job_id!r}",
                           expected=expected_epoch)

    # ---- decision log ---------------------------------------------------------------------

    def append_decision(self, job_id: str, text: str) -> None:
        job = self._job(job_id)
        seq_key = f"{job}/decisions_seq"

        def append(c: pyetcd.MultiEndpointEtcd3Client) -> bool:
            _, meta = c.get(seq_key)
            count = 0 if meta is None else meta.version
            t = c.transactions
            succeeded, _ = c.transaction(
                compare=[t.version(seq_key) == count],
                success=[t.put(seq_key, str(count + 1)),
                         t.put(f"{job}/decisions/{count + 1:016d}", text)],
                failure=[])
            return bool(succeeded)

        # Another appender took the same sequence number: read the new count and try again.
        while not self.connection.call(f"append_decision({job_id!r})", append):
            pass

    def decisions(self, job_id: str) -> list[str]:
        prefix = f"{self._job(job_id)}/decisions/"
        items = self.connection.call(f"decisions({job_id!r})",
                                     lambda c: list(c.get_prefix(prefix, sort_order="ascend")))
        return [value.decode() for value, _ in items]
