"""A process group whose in-flight collectives can be aborted on the controller's word.

gloo cannot abort a rank blocked in a recv (abort(), shutdown() and destroying the group
all leave it waiting until the group's timeout). So every collective is issued
asynchronously and waited on through its future *or* an abort event, whichever fires
first. An aborted epoch's gloo group is parked, never joined or destroyed on the hot path:
its threads run out on their own timeout. Each epoch gets a fresh gloo group that meets
in the controller's store under an epoch-specific prefix.
"""

from __future__ import annotations

import datetime
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from splice.agent.progress import ProgressWriter

log = logging.getLogger("splice.worker")


class CollectiveAborted(Exception):
    """A collective of this epoch will never complete; recover into the next epoch."""


@dataclass(frozen=True, kw_only=True)
class EpochSpec:
    epoch: int
    rank: int
    world_size: int
    store_host: str
    store_port: int
    store_prefix: str


class GroupBuild:
    """Builds one epoch's gloo group on a thread, so that building can be abandoned."""

    def __init__(self, spec: EpochSpec, gloo_host: str, timeout_s: float,
                 on_done: Callable[[], None] = lambda: None) -> None:
        self.spec = spec
        self._on_done = on_done
        self.done = threading.Event()
        self.pg: Any = None
        self.error: BaseException | None = None
        self._gloo_host = gloo_host
        self._timeout_s = timeout_s
        if spec.world_size == 1:
            self.done.set()
            on_done()
        else:
            threading.Thread(target=self._run, daemon=True,
                             name=f"splice-build-e{spec.epoch}").start()

    def _run(self) -> None:
        s = self.spec
        try:
            timeout = datetime.timedelta(seconds=self._timeout_s)
            # A store client per epoch and per thread: clients are not shared across threads.
            store = dist.TCPStore(s.store_host, s.store_port, is_master=False, timeout=timeout,
                                  use_libuv=True)
            opts = dist.ProcessGroupGloo._Options()
            opts._timeout = timeout
            opts._devices = [dist.ProcessGroupGloo.create_device(hostname=self._gloo_host)]
            self.pg = dist.ProcessGroupGloo(dist.PrefixStore(s.store_prefix, store),
                                            s.rank, s.world_size, opts)
        except BaseException as e:  # reported to the waiter, which decides what next
            self.error = e
        finally:
            self.done.set()
            self._on_done()


_settle_lock = threading.Lock()


def _settle(fut: torch.futures.Future[Any], *, result: Any = None,
            error: BaseException | None = None) -> None:
    """Complete `fut` once; the second of completion and abort is a no-op."""
    with _settle_lock:
        if fut.done():
            return
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(result)


class ResilientGroup:
    """All-reduce and broadcast over the current epoch's members, abortable at any time."""

    def __init__(self, *, gloo_host: str = "127.0.0.1", timeout_s: float = 300.0) -> None:
        self._gloo_host = gloo_host
        self._timeout_s = timeout_s
        self._lock = threading.Lock()
        self._pg: Any = None
        self._waiters: set[threading.Event] = set()
        self._pending: set[torch.futures.Future[Any]] = set()
        self._abort_reason: str | None = None
        # Set when a collective of this epoch failed on its own (a peer's connection reset
        # before the controller's word arrived): the epoch is as good as aborted.
        self._failure: str | None = None
        self._parked: list[Any] = []
        self._local: Any = None
        # Telemetry: shared-memory progress counters (when run under an agent) and the
        # time spent in collectives.
        self.progress: ProgressWriter | None = None
        self._wait_s = 0.0
        self._bytes = 0
        self.epoch = 0
        self.rank = 0
        self.world_size = 1

    # ---- membership ---------------------------------------------------------------------
    def begin_build(self, spec: EpochSpec, on_done: Callable[[], None] = lambda: None
                    ) -> GroupBuild:
        return GroupBuild(spec, self._gloo_host, self._timeout_s, on_done)

    def adopt(self, build: GroupBuild) -> None:
        """Switch to a built group. The previous one is parked, not destroyed."""
        assert build.done.is_set() and build.error is None
        with self._lock:
            if self._pg is not None:
                self._parked.append(self._pg)
            self._pg = build.pg
            self.epoch = build.spec.epoch
            self.rank = build.spec.rank
            self.world_size = build.spec.world_size
            self._abort_reason = None
            self._failure = None
            if self.progress is not None:
                self.progress.begin_epoch(self.epoch, 0)

    def abort(self, reason: str, *, below_epoch: int) -> None:
        """Fail every collective of epochs older than `below_epoch`, now and from now on.

        Thread-safe; called from the agent channel's reader thread.
        """
        with self._lock:
            if self.epoch >= below_epoch:
                return
            self._abort_reason = reason
            waiters = list(self._waiters)
            pending = list(self._pending)
            self._pending.clear()
        for w in waiters:
            w.set()
        for f in pending:
            _settle(f, error=CollectiveAborted(reason))

    @property
    def aborted(self) -> str | None:
        """Why this epoch can no longer make progress, or None while it can."""
        return self._abort_reason or self._failure

    def _record_failure(self, error: BaseException, epoch: int | None = None) -> str:
        """The failure of a collective of `epoch` (None: the current one) fails the current
        epoch only if it is that epoch: an aborted epoch's parked work fails late (when the
        dead peer's sockets close) and must not fail the epoch that replaced it."""
        reason = f"collective failed: {error}"
        with self._lock:
            if self._failure is None and (epoch is None or epoch == self.epoch):
                self._failure = reason
        return reason

    def check(self) -> None:
        reason = self.aborted
        if reason is not None:
            raise CollectiveAborted(reason)

    # ---- collectives --------------------------------------------------------------------
    def _issue(self, start: Any, op: str, num_bytes: int) -> torch.futures.Future[Any] | None:
        with self._lock:
            if self._abort_reason is not None:
                raise CollectiveAborted(self._abort_reason)
            if self.world_size == 1:
                return None
            if self.progress is not None:
                self.progress.enter(op, num_bytes)
            t0 = time.perf_counter()
            epoch = self.epoch
            fut = start(self._pg).get_future()
        fut.add_done_callback(lambda _f: self._exited(t0, num_bytes, epoch))
        return fut

    def _exited(self, t0: float, num_bytes: int, epoch: int) -> None:
        """A collective of `epoch` completed (or failed): count it for telemetry. One of
        an aborted epoch, failing late, counts for nothing in the epoch that replaced it."""
        elapsed = time.perf_counter() - t0
        with self._lock:  # `adopt` begins the next epoch's counters under it too
            if epoch != self.epoch:
                return
            self._wait_s += elapsed
            self._bytes += num_bytes
            if self.progress is not None:
                self.progress.exit()

    def take_stats(self) -> tuple[float, int]:
        """Seconds spent in collectives and bytes reduced since the last call."""
        with self._lock:
            stats = (self._wait_s, self._bytes)
            self._wait_s, self._bytes = 0.0, 0
        return stats

    def wait(self, fut: torch.futures.Future[Any] | None) -> None:
        """Block until `fut` completes or this epoch is aborted."""
        if fut is None:
            return
        done = threading.Event()
        with self._lock:
            if self._abort_reason is not None:
                raise CollectiveAborted(self._abort_reason)
            self._waiters.add(done)
        try:
            fut.add_done_callback(lambda _f: done.set())
            if not done.wait(self._timeout_s):
                raise CollectiveAborted(f"collective timed out after {self._timeout_s:.0f} s")
            self.check()
            try:
                fut.wait()
            except Exception as e:  # a peer's connection reset: its loss is being handled
                raise CollectiveAborted(self._record_failure(e)) from e
        finally:
            with self._lock:
                self._waiters.discard(done)

    def all_reduce_async(self, tensor: torch.Tensor) -> torch.futures.Future[Any] | None:
        """Start a SUM all-reduce in place; None when there is nobody to reduce with."""
        opts = dist.AllreduceOptions()
        opts.reduceOp = dist.ReduceOp.SUM
        return self._issue(lambda pg: pg.allreduce([tensor], opts), "all_reduce",
                           tensor.numel() * tensor.element_size())

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """SUM all-reduce in place, abortable. Returns `tensor`.

        Reduces a private copy: an aborted epoch's parked gloo work may still write into
        its buffer later, and that must never be the caller's tensor.
        """
        work = tensor.detach().clone()
        self.wait(self.all_reduce_async(work))
        with torch.no_grad():
            tensor.copy_(work)
        return tensor

    def all_reduce_future(self, tensor: torch.Tensor) -> torch.futures.Future[Any]:
        """SUM all-reduce of a private copy of `tensor`, as a future that resolves to the
        reduced copy, or fails with CollectiveAborted when the epoch is aborted. Never
        raises: wrappers such as DDP's reducer wait on it from C++."""
        out: torch.futures.Future[Any] = torch.futures.Future()
        work = tensor.detach().clone()
        # Epochs are installed by the thread that runs the step (and its backward pass),
        # so the collective issued next is of this epoch.
        epoch = self.epoch
        try:
            fut = self.all_reduce_async(work)
        except CollectiveAborted as e:
            out.set_exception(e)
            return out
        if fut is None:
            out.set_result(work)
            return out
        with self._lock:
            self._pending.add(out)

        def done(f: torch.futures.Future[Any]) -> None:
            with self._lock:
                self._pending.discard(out)
            try:
                f.wait()
            except Exception as e:
                _settle(out, error=CollectiveAborted(self._record_failure(e, epoch)))
                return
            _settle(out, result=work)

        fut.add_done_callback(done)
        return out

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        opts = dist.BroadcastOptions()
        opts.rootRank = src
        opts.rootTensor = 0
        self.wait(self._issue(lambda pg: pg.broadcast([tensor], opts), "broadcast",
                              tensor.numel() * tensor.element_size()))
        return tensor

    def broadcast_tensors(self, tensors: Sequence[torch.Tensor], src: int = 0) -> None:
        """Broadcast several tensors through one flat buffer (one collective)."""
        if self.world_size == 1 or not tensors:
            self.check()
            return
        flat = torch._utils._flatten_dense_tensors([t.detach() for t in tensors])
        self.broadcast(flat, src)
        for t, new in zip(tensors, torch._utils._unflatten_dense_tensors(flat, list(tensors)),
                          strict=True):
            with torch.no_grad():
                t.copy_(new)

    # ---- point to point: a snapshot for a joining member -------------------------------
    def _issue_p2p(self, start: Any, num_bytes: int) -> torch.futures.Future[Any]:
        """Start a send or recv. Gloo's point-to-point work has no future, so a thread
        waits on it and completes one; on abort the thread is left with the parked group.
        Not counted as a collective in the progress counters: only two ranks take part,
        and the hang detector compares all ranks' counters."""
        with self._lock:
            reason = self._abort_reason or self._failure
            if reason is not None:
                raise CollectiveAborted(reason)
            t0 = time.perf_counter()
            epoch = self.epoch
            work = start(self._pg)
        fut: torch.futures.Future[Any] = torch.futures.Future()

        def finish() -> None:
            try:
                work.wait()
            except Exception as e:
                _settle(fut, error=e)
                return
            _settle(fut, result=None)

        threading.Thread(target=finish, daemon=True, name="splice-p2p").start()
        fut.add_done_callback(lambda _f: self._exited_p2p(t0, num_bytes, epoch))
        return fut

    def _exited_p2p(self, t0: float, num_bytes: int, epoch: int) -> None:
        with self._lock:
            if epoch != self.epoch:  # a parked epoch's transfer, ending late
                return
            self._wait_s += time.perf_counter() - t0
            self._bytes += num_bytes

    def send_buffer(self, flat: torch.Tensor, dst: int, tag: int = 0) -> None:
        """Send a flat uint8 tensor to rank `dst` (which calls `recv_buffer`), abortable."""
        assert flat.dtype == torch.uint8 and flat.dim() == 1, (flat.dtype, flat.shape)
        header = torch.tensor([flat.numel()], dtype=torch.int64)
        self.wait(self._issue_p2p(lambda pg: pg.send([header], dst, 2 * tag), 8))
        if flat.numel():
            self.wait(self._issue_p2p(lambda pg: pg.send([flat], dst, 2 * tag + 1),
                                      flat.numel()))

    def recv_buffer(self, src: int, tag: int = 0, *, max_bytes: int = 1 << 40) -> torch.Tensor:
        """Receive what rank `src` sends with `send_buffer`, abortable."""
        header = torch.zeros(1, dtype=torch.int64)
        self.wait(self._issue_p2p(lambda pg: pg.recv([header], src, 2 * tag), 8))
        n = int(header[0])
        if not 0 <= n <= max_bytes:
            raise CollectiveAborted(f"rank {src} announced {n} bytes (limit {max_bytes})")
        flat = torch.empty(n, dtype=torch.uint8)
        if n:
            self.wait(self._issue_p2p(lambda pg: pg.recv([flat], src, 2 * tag + 1), n))
        return flat

    def exchange(self, send: torch.Tensor, dst: int, recv: torch.Tensor, src: int,
                 tag: int) -> None:
        """Send `send` to `dst` while receiving `recv` from `src` (both posted before either
        is waited on, so a ring of ranks doing this cannot deadlock). Empty tensors are
        skipped: both ends know the sizes."""
        futs = []
        if send.numel():
            futs.append(self._issue_p2p(lambda pg: pg.send([send], dst, tag),
                                        send.numel() * send.element_size()))
        if recv.numel():
            futs.append(self._issue_p2p(lambda pg: pg.recv([recv], src, tag),
                                        recv.numel() * recv.element_size()))
        for fut in futs:
            self.wait(fut)

    def send_bytes(self, blob: bytes, dst: int, tag: int = 0) -> None:
        self.send_buffer(torch.frombuffer(bytearray(blob), dtype=torch.uint8), dst, tag)

    def recv_bytes(self, src: int, tag: int = 0, *, max_bytes: int = 1 << 40) -> bytes:
        return self.recv_buffer(src, tag, max_bytes=max_bytes).numpy().tobytes()

    def close(self) -> None:
        """Release the current epoch's group (its collectives are all complete).

        Parked groups of aborted epochs are deliberately kept alive: destroying one joins
        threads that stay blocked until the group's own timeout.
        """
        with self._lock:
            pg, self._pg = self._pg, None
            local, self._local = self._local, None
        for group in (pg, local):
            if group is not None and hasattr(group, "shutdown"):
                group.shutdown()

    def local_group(self) -> Any:
        """A one-rank process group for wrappers (DDP) that need a ProcessGroup object of
        their own: their internal collectives become local no-ops and can never block,
        while the real reduction goes through this group via a communication hook."""
        if self._local is None:
            store = dist.HashStore()
            backend = dist.ProcessGroupGloo(store, 0, 1,
                                            datetime.timedelta(seconds=self._timeout_s))
            pg = dist.ProcessGroup(store, 0, 1)
            pg._set_default_backend(dist.ProcessGroup.BackendType.GLOO)
            pg._register_backend(torch.device("cpu"), dist.ProcessGroup.BackendType.GLOO,
                                 backend)
            if torch.cuda.is_available():  # gloo handles CUDA tensors too, as in torch's
                pg._register_backend(torch.device("cuda"),  # own gloo groups
                                     dist.ProcessGroup.BackendType.GLOO, backend)
            self._local = pg
        return self._local
