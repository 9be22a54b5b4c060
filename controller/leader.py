"""Leader election among controller replicas, on an etcd lease.

The leader is whoever wrote its identity (its gRPC address, "host:port") into the leader
key, attached to a lease it keeps alive. If it dies the lease expires, etcd deletes the key,
and a standby watching the key takes it. Leadership is proven to the store by a `Fence`
(key, identity, the key's create revision): `EtcdStateStore.commit_epoch` refuses a fence
whose key has since been deleted or re-created, so a deposed leader can persist nothing,
however late it learns of its deposition.

It should still learn promptly, to stop announcing: `on_lost(reason)` fires as soon as the
key changes (a watch) or the leader can no longer prove its lease is alive: a refresh sent at
time t and answered proves the lease lives until at least t + TTL on etcd's side, so once
TTL has passed since the last answered refresh, another replica may already lead.

TTL: etcd grants whole seconds, at least 1.5 election timeouts rounded up. With
`--heartbeat-interval 50 --election-timeout 500` a 1 s request is granted 1 s (etcd's
defaults, 100/1000, would make it 2 s). A SIGKILLed leader's lease runs out 0.67-1 s after
its death (it refreshes every TTL/3), etcd's expiry sweep adds up to 500 ms, and the
standby's watch and transaction a few milliseconds: `python -m bench.failover_etcd`
measured p50 1.0 s, max 1.03 s over 7 runs on a 2-core VM.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any

from pyetcd import events as etcd_events

from splice.controller.etcd_store import EtcdConnection, EtcdStateStore
from splice.controller.store import Fence, StoreUnavailable

log = logging.getLogger(__name__)


# ---- pure timing decisions ----------------------------------------------------------------


def lease_ttl_to_request(ttl_s: float) -> int:
    """etcd leases are whole seconds; round up so the lease never outlives less than asked."""
    if ttl_s <= 0:
        raise ValueError(f"lease TTL must be positive, got {ttl_s} s")
    return max(1, math.ceil(ttl_s))


def next_refresh_at(confirmed_s: float, attempted_s: float, ttl_s: float) -> float:
    """When to send the next lease refresh.

    `confirmed_s`: when the last refresh that etcd answered was sent; `attempted_s`: when the
    last refresh (answered or not) was sent. Refreshing a third of the TTL after the last
    confirmed one leaves two more tries before the lease can expire; after a failed try,
    wait a tenth of the TTL rather than spin against an unreachable etcd.
    """
    return max(confirmed_s + ttl_s / 3, attempted_s + ttl_s / 10)


def leadership_lost_reason(now_s: float, confirmed_s: float, ttl_s: float) -> str | None:
    """Why this replica can no longer count itself leader, or None while it still can.

    A refresh sent at `confirmed_s` and answered keeps the lease alive on etcd until at least
    `confirmed_s + ttl_s`; past that, etcd may have expired it and elected someone else.
    """
    if now_s < confirmed_s + ttl_s:  # the same sum the keepalive loop sleeps until
        return None
    return (f"no lease refresh confirmed for {now_s - confirmed_s:.2f} s (lease TTL {ttl_s:g} s): etcd "
            "may have expired the lease and elected another controller")


# ---- the election -------------------------------------------------------------------------


class LeaderElection:
    """Campaign for, hold and give up the leader key `key` as `identity`.

    `on_lost(reason)` is called once, from the keepalive thread, when leadership held since
    `campaign` returned is lost (not after `resign`). The caller must then stop acting as
    leader; it may `campaign` again, from another thread (the callback should not block).
    """

    def __init__(self, store: EtcdStateStore, key: str, identity: str, ttl_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic,
                 on_lost: Callable[[str], None] | None = None) -> None:
        self.key = key
        self.identity = identity
        self.requested_ttl_s = ttl_s
        self.granted_ttl_s: float | None = None  # what etcd granted at the last campaign
        self._ttl_request = lease_ttl_to_request(ttl_s)
        self._clock = clock
        self._on_lost = on_lost or (lambda reason: None)
        self._conn = EtcdConnection(store.endpoints, store.connection.timeout_s)
        # Refreshes must not block past the lease deadline, so they get a short timeout.
        self._refresh_conn = EtcdConnection(store.endpoints, max(0.05, ttl_s / 4))
        self._lock = threading.Lock()
        self.fence: Fence | None = None
        self._lease_id = 0
        self._wake = threading.Event()
        self._resigning = False
        self._changed_reason: str | None = None
        self._watch_broken = False
        self._keepalive: threading.Thread | None = None
        self._own_watch: tuple[Any, int] | None = None

    # -- queries ------------------------------------------------------------------------

    def leader(self) -> str | None:
        """The identity in the leader key now (None if nobody leads); StoreUnavailable if
        etcd cannot be reached."""
        value, _ = self._conn.call(f"leader({self.key!r})", lambda c: c.get(self.key))
        return None if value is None else value.decode()

    # -- campaign -------------------------------------------------------------------------

    def campaign(self, stop: threading.Event) -> Fence | None:
        """Block until this replica is leader (its Fence) or `stop` is set (None)."""
        assert self._keepalive is None, "already leader: resign or lose leadership first"
        while not stop.is_set():
            try:
                won, revision = self._try_acquire()
            except StoreUnavailable as exc:
                log.warning("campaign for %s: %s", self.key, exc)
                stop.wait(max(exc.retry_after_s, 0.05))
                continue
            if won:
                assert self.fence is not None
                return self.fence
            try:
                self._wait_for_vacancy(stop, revision)
            except StoreUnavailable as exc:
                log.warning("campaign for %s: %s", self.key, exc)
                stop.wait(max(exc.retry_after_s, 0.05))
        return None

    def _try_acquire(self) -> tuple[bool, int]:
        """One attempt; (True, revision of our key) or (False, revision the key was seen)."""
        sent_s = self._clock()
        lease = self._conn.call(f"lease grant for {self.key!r}",
                                lambda c: c.lease(self._ttl_request))

        def txn(c: Any) -> tuple[bool, list[Any]]:
            t = c.transactions
            return c.transaction(compare=[t.version(self.key) == 0],
                                 success=[t.put(self.key, self.identity, lease=lease.id)],
                                 failure=[t.get(self.key)])

        won, responses = self._conn.call(f"campaign for {self.key!r}", txn)
        if not won:
            self._maybe_revoke(self._conn, lease.id)
            holder = responses[0]
            # The key was deleted between the compare and the get: impossible in one txn,
            # but a missing holder just means "try again now".
            return False, holder[0][1].response_header.revision if holder else 0
        revision = int(responses[0].response_put.header.revision)
        with self._lock:
            self.fence = Fence(key=self.key, identity=self.identity, revision=revision)
            self._lease_id = lease.id
            self.granted_ttl_s = float(lease.ttl)
            self._wake.clear()
            self._resigning = False
            self._changed_reason = None
            self._watch_broken = False
        self._watch_own_key(revision)
        self._keepalive = threading.Thread(
            target=self._keep_alive, args=(lease.id, sent_s), name=f"lease-keepalive {self.key}",
            daemon=True)
        self._keepalive.start()
        return True, revision

    def _wait_for_vacancy(self, stop: threading.Event, seen_revision: int) -> None:
        """Return when the leader key is deleted after `seen_revision`, the watch breaks,
        `stop` is set, or a TTL passes (a re-check in case a watch went silent)."""
        vacated = threading.Event()

        def on_watch(response: Any) -> None:
            if isinstance(response, Exception) or any(
                    isinstance(e, etcd_events.DeleteEvent) for e in response.events):
                vacated.set()

        client = self._conn.client()
        watch_id = self._conn.call(
            f"watch {self.key!r}",
            lambda c: c.add_watch_callback(self.key, on_watch, start_revision=seen_revision + 1))
        try:
            recheck_at = self._clock() + max(float(self._ttl_request), 1.0)
            while not stop.is_set() and self._clock() < recheck_at:
                if vacated.wait(0.05):
                    return
        finally:
            try:
                client.cancel_watch(watch_id)
            except Exception:  # the channel is gone: so is the watch
                pass

    # -- holding --------------------------------------------------------------------------

    def _watch_own_key(self, revision: int) -> None:
        """Any event on the key after our put means it is no longer ours (revoked, deleted
        or overwritten): wake the keepalive thread to report the loss."""

        def on_watch(response: Any) -> None:
            with self._lock:
                if self.fence is None or self.fence.revision != revision:
                    return  # a watch left over from an earlier term
                if isinstance(response, Exception):
                    self._watch_broken = True
                    return
                if not response.events:
                    return
                event = response.events[0]
                what = ("deleted (lease revoked or expired)"
                        if isinstance(event, etcd_events.DeleteEvent)
                        else f"overwritten with {event.value.decode(errors='replace')!r}")
                self._changed_reason = f"leader key {self.key!r} was {what}"
            self._wake.set()

        try:
            client = self._conn.client()
            watch_id = self._conn.call(f"watch {self.key!r}", lambda c: c.add_watch_callback(
                self.key, on_watch, start_revision=revision + 1))
            with self._lock:
                self._own_watch = (client, watch_id)
        except StoreUnavailable:
            with self._lock:
                self._watch_broken = True  # the keepalive loop sets it up again

    def _keep_alive(self, lease_id: int, confirmed_s: float) -> None:
        attempted_s = confirmed_s
        ttl_s = self.granted_ttl_s or float(self._ttl_request)
        while True:
            with self._lock:
                if self._resigning:
                    return
                changed = self._changed_reason
            now_s = self._clock()
            reason = changed or leadership_lost_reason(now_s, confirmed_s, ttl_s)
            if reason is not None:
                self._lose(reason)
                return
            refresh_s = next_refresh_at(confirmed_s, attempted_s, ttl_s)
            if now_s < refresh_s:
                # Wake for the refresh, the deadline, a resign or a key change; every case is
                # decided at the top of the loop (a pause past the deadline is a loss).
                self._wake.wait(min(refresh_s, confirmed_s + ttl_s) - now_s)
                continue
            attempted_s = now_s
            try:
                answers = self._refresh_conn.call(
                    f"lease refresh for {self.key!r}",
                    lambda c: list(c.refresh_lease(lease_id)))
            except StoreUnavailable as exc:
                log.warning("leader %s: %s", self.identity, exc)
                continue
            if not answers or answers[0].TTL <= 0:
                self._lose(f"etcd says the lease of leader key {self.key!r} has expired")
                return
            confirmed_s = attempted_s
            if self._watch_broken:
                self._rewatch()

    def _rewatch(self) -> None:
        """After a broken watch (etcd restarted): check the key is still ours, watch again."""
        fence = self.fence
        assert fence is not None
        try:
            value, meta = self._conn.call(f"check {self.key!r}", lambda c: c.get(self.key))
        except StoreUnavailable:
            return
        if value is None or value.decode() != fence.identity or \
                meta.create_revision != fence.revision:
            with self._lock:
                self._changed_reason = f"leader key {self.key!r} no longer names this replica"
            self._wake.set()
            return
        with self._lock:
            self._watch_broken = False
        self._watch_own_key(fence.revision)

    def _lose(self, reason: str) -> None:
        with self._lock:
            if self._resigning:
                return  # resign() won the race: leaving was voluntary
        log.warning("leader %s lost leadership: %s", self.identity, reason)
        lease_id = self._finish()
        self._on_lost(reason)  # first: revoking may wait for an unreachable etcd
        self._maybe_revoke(self._refresh_conn, lease_id)  # free the key for a standby now

    def _finish(self) -> int:
        """Forget the term; returns its lease id."""
        with self._lock:
            self.fence = None
            self._keepalive = None
            lease_id, self._lease_id = self._lease_id, 0
            watch, self._own_watch = self._own_watch, None
        if watch is not None:
            client, watch_id = watch
            try:
                client.cancel_watch(watch_id)
            except Exception:  # the channel is gone: so is the watch
                pass
        return lease_id

    # -- resign ---------------------------------------------------------------------------

    def resign(self) -> None:
        """Give up leadership now: stop refreshing and revoke the lease, which deletes the
        key so a standby takes over at once. If etcd cannot be reached the lease simply
        expires within its TTL. Does not call `on_lost`."""
        with self._lock:
            self._resigning = True
            thread = self._keepalive
        self._wake.set()
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        lease_id = self._finish()
        if lease_id:
            self._maybe_revoke(self._conn, lease_id)

    @staticmethod
    def _maybe_revoke(conn: EtcdConnection, lease_id: int) -> None:
        try:
            conn.call("lease revoke", lambda c: c.revoke_lease(lease_id))
        except StoreUnavailable as exc:
            log.warning("could not revoke lease %x (it expires on its own): %s", lease_id, exc)
        except Exception as exc:  # already expired: etcd answers NOT_FOUND
            log.debug("lease %x not revoked: %s", lease_id, exc)

    def close(self) -> None:
        self.resign()
        self._conn.close()
        self._refresh_conn.close()
