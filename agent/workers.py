"""The agent's side of its worker processes: launching them (and warm spares), putting a
replacement in a crashed worker's place, reporting exits, handling what workers send on
the local channel, and waiting for them all to end.

A mixin of `Agent` (agent/agent.py), split out by concept; it uses the agent's config,
lock, worker states, supervisor, local server and snapshots, and sends up through the
controller stream (agent/controller_stream.py).
"""

from __future__ import annotations

import collections
import logging
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from splice.agent import progress
from splice.agent.local_server import LocalServer
from splice.agent.metrics import AgentMetrics
from splice.agent.progress import ProgressReader
from splice.agent.snapshots import NodeSnapshots
from splice.agent.supervisor import Exit, Supervisor
from splice.controller.membership import worker_id
from splice.proto import controller_pb2 as pb
from splice.proto import local_pb2 as lpb

if TYPE_CHECKING:
    from splice.agent.agent import AgentConfig

log = logging.getLogger("splice.agent")

SPARE_REFILL_DELAY_S = 5.0


@dataclass
class _Worker:
    pid: int = 0
    state: int = pb.WorkerResync.STARTING
    exit_code: int = 0
    signal: int = 0


class LocalWorkers:
    # Provided by Agent.
    config: AgentConfig
    metrics: AgentMetrics | None
    snapshots: NodeSnapshots
    _lock: threading.Lock
    _state: dict[str, _Worker]
    _spares: dict[str, int]
    _tainted: set[str]
    _replacements: int
    _done_training: bool
    _next_local: int
    _expected: set[str]
    _shm_dir: str
    _readers: dict[str, ProgressReader]
    _latest: dict[str, lpb.AgentToWorker]
    _pending_ready: dict[str, pb.RecoveryReady]
    _steps: collections.deque[pb.StepReport]
    _dropped: int
    _stopping: threading.Event
    _local: LocalServer
    _supervisor: Supervisor
    # Provided by ControllerStream (agent/controller_stream.py).
    _send_up: Callable[[pb.AgentMessage], None]

    # ---- workers ------------------------------------------------------------------------
    def _on_exit(self, ex: Exit) -> None:
        how = f"signal {ex.signal}" if ex.signal else f"code {ex.exit_code}"
        clean = ex.exit_code == 0 and not ex.signal
        with self._lock:
            was_spare = self._spares.pop(ex.worker_id, None) is not None
        if was_spare:
            log.log(logging.INFO if self._stopping.is_set() else logging.WARNING,
                    "spare %s (pid %d) exited: %s", ex.worker_id, ex.pid, how)
            return
        with self._lock:
            known = self._state.get(ex.worker_id)
            replaceable = (known is not None and known.state != pb.WorkerResync.FINISHED
                           and not self._done_training)
        self.snapshots.discard_staging(ex.worker_id)
        if not clean and replaceable and self.config.replace and not self._stopping.is_set():
            # The replacement is announced before the exit, so the controller can put it
            # in the lost worker's place in the same epoch.
            self._replace(ex.worker_id)
        else:  # nobody takes its place here: its snapshots' memory goes back
            shutil.rmtree(self.snapshots.directory(ex.worker_id), ignore_errors=True)
        log.log(logging.INFO if clean else logging.WARNING,
                "worker %s (pid %d) exited: %s", ex.worker_id, ex.pid, how)
        if self.metrics is not None:
            self.metrics.worker_exit("clean" if clean else "killed" if ex.signal else "crash")
        with self._lock:
            w = self._state[ex.worker_id]
            if not (clean and w.state == pb.WorkerResync.FINISHED):
                w.state, w.exit_code, w.signal = pb.WorkerResync.EXITED, ex.exit_code, ex.signal
            self._pending_ready.pop(ex.worker_id, None)
        self._send_up(pb.AgentMessage(worker_event=pb.WorkerEvent(
            worker_id=ex.worker_id, kind=pb.WorkerEvent.EXITED, pid=ex.pid,
            exit_code=ex.exit_code, signal=ex.signal, at_s=time.time())))

    # ---- spares and replacements --------------------------------------------------------
    def _launch(self, wid: str, local_rank: int, *, spare: bool) -> int:
        progress_path = os.path.join(self._shm_dir, f"progress-{local_rank}")
        progress.create(progress_path)
        self._readers[wid] = ProgressReader(progress_path)
        env = dict(os.environ)
        env.update({
            "SPLICE_AGENT_SOCKET": self._local.path, "SPLICE_WORKER_ID": wid,
            "SPLICE_JOB_ID": self.config.job_id, "SPLICE_NODE_ID": self.config.node_id,
            "SPLICE_LOCAL_RANK": str(local_rank), "SPLICE_GLOO_HOST": self.config.gloo_host,
            "SPLICE_PROGRESS_PATH": progress_path, "SPLICE_SPARE": "1" if spare else "0",
            "SPLICE_SNAPSHOT_DIR": self.snapshots.directory(wid),
        })
        if self.config.snapshot_budget_mb:
            env["SPLICE_SNAPSHOT_BUDGET_MB"] = str(self.config.snapshot_budget_mb)
        if self.config.persist_dir:
            env["SPLICE_PERSIST_DIR"] = self.config.persist_dir
            env["SPLICE_PERSIST_EVERY"] = str(self.config.persist_every)
        if self.config.tls is not None:
            env["SPLICE_TLS_CA"] = self.config.tls.ca_file
            env["SPLICE_TLS_CERT"] = self.config.tls.cert_file
            env["SPLICE_TLS_KEY"] = self.config.tls.key_file
        env.setdefault("OMP_NUM_THREADS", "1")
        with self._lock:
            self._expected.add(wid)
            if spare:
                self._spares[wid] = 0
        pid = self._supervisor.launch(wid, self.config.command, env)
        if not spare:
            self._announce(wid, pid)
        return pid

    def _hand_over_snapshots(self, lost: str, to: str) -> None:
        with self._lock:
            tainted = lost in self._tainted
        self.snapshots.hand_over(lost, to, tainted=tainted)

    def _announce(self, wid: str, pid: int) -> None:
        with self._lock:
            self._state[wid] = _Worker(pid=pid)
        self._send_up(pb.AgentMessage(worker_event=pb.WorkerEvent(
            worker_id=wid, kind=pb.WorkerEvent.STARTED, pid=pid, at_s=time.time())))

    def _new_local_rank(self) -> tuple[str, int]:
        with self._lock:
            local = self._next_local
            self._next_local += 1
        return worker_id(self.config.node_id, local), local

    def _launch_spare(self) -> None:
        if self._stopping.is_set():
            return
        wid, local = self._new_local_rank()
        pid = self._launch(wid, local, spare=True)
        log.info("agent %s: warm spare %s started (pid %d)", self.config.node_id, wid, pid)

    def _replace(self, lost: str) -> None:
        """Put a worker in the place of `lost`: the warmest spare, else a fresh process."""
        with self._lock:
            ready = [w for w, pid in self._spares.items() if pid]
            waiting = [w for w, pid in self._spares.items() if not pid]
            wid = (ready or waiting or [None])[0]
            pid = self._spares.pop(wid) if wid is not None else 0
            self._replacements += 1
        if wid is None:
            wid, local = self._new_local_rank()
            self._hand_over_snapshots(lost, wid)
            pid = self._launch(wid, local, spare=False)
            log.warning("agent %s: no warm spare; started %s (pid %d) to replace %s",
                        self.config.node_id, wid, pid, lost)
            return
        self._hand_over_snapshots(lost, wid)
        log.warning("agent %s: spare %s takes the place of %s", self.config.node_id, wid,
                    lost)
        self._announce(wid, pid or self._supervisor.pids().get(wid, 0))
        if pid:  # already connected: it is ready now
            with self._lock:
                self._state[wid].state = pb.WorkerResync.CONNECTED
            self._send_up(pb.AgentMessage(worker_event=pb.WorkerEvent(
                worker_id=wid, kind=pb.WorkerEvent.READY, pid=pid, at_s=time.time())))
        # Refill the spare once the replacement has joined: a process importing torch
        # now would compete for the CPU with the recovery it is meant to speed up.
        refill = threading.Timer(SPARE_REFILL_DELAY_S, self._launch_spare)
        refill.daemon = True
        refill.start()

    def _release_standbys(self, why: str) -> None:
        """The job is over: stop every process that is not a finished member (spares,
        standbys that were never admitted). Finished workers exit on their own."""
        with self._lock:
            self._done_training = True
            finished = {w for w, st in self._state.items()
                        if st.state in (pb.WorkerResync.FINISHED, pb.WorkerResync.EXITED)}
        alive = set(self._supervisor.pids())
        for wid in sorted(alive - finished):
            if self._supervisor.signal(wid, signal.SIGTERM):
                log.info("agent %s: stopping %s: %s", self.config.node_id, wid, why)

    def _wait_workers(self) -> None:
        """Until every worker the controller knows has ended; then the spares go."""
        def ended(alive: set[str]) -> bool:
            with self._lock:
                return not (alive & set(self._state))
        self._supervisor.wait_until(ended)
        with self._lock:
            spares = list(self._spares)
        for wid in spares:
            self._supervisor.signal(wid, signal.SIGTERM)
        if not self._supervisor.wait_all(10.0):
            self._supervisor.kill_all()
            self._supervisor.wait_all()

    def _on_worker_message(self, wid: str, msg: lpb.WorkerToAgent) -> None:
        kind = msg.WhichOneof("kind")
        if kind == "hello":
            with self._lock:
                if wid in self._spares:  # a spare is warm; it stays unannounced
                    self._spares[wid] = msg.hello.pid
                    log.info("agent %s: spare %s is warm", self.config.node_id, wid)
                    return
                self._state[wid].state = pb.WorkerResync.CONNECTED
                self._state[wid].pid = msg.hello.pid
                latest = [self._latest[k] for k in ("membership", "resume") if k in self._latest]
            self._send_up(pb.AgentMessage(worker_event=pb.WorkerEvent(
                worker_id=wid, kind=pb.WorkerEvent.READY, pid=msg.hello.pid, at_s=time.time())))
            for down in latest:
                self._local.send(wid, down)
        elif kind == "step_report":  # batched into the next telemetry message
            if msg.step_report.worker_id == wid:
                r = msg.step_report
                self.snapshots.trained(r.epoch)
                if self.metrics is not None:
                    self.metrics.step(r.step_time_s, r.compute_s, r.wait_s, r.collective_bytes)
                    if r.snapshot_at_s:
                        self.metrics.snapshot(r.snapshot_bytes,
                                              max(0.0, time.time() - r.snapshot_at_s))
                with self._lock:
                    if len(self._steps) >= self.config.max_buffered_steps:
                        self._steps.popleft()
                        self._dropped += 1
                    self._steps.append(msg.step_report)
        elif kind == "recovery_ready":
            if msg.recovery_ready.worker_id == wid:
                with self._lock:
                    self._pending_ready[wid] = msg.recovery_ready
                self._send_up(pb.AgentMessage(recovery_ready=msg.recovery_ready))
        elif kind == "corruption":
            if msg.corruption.worker_id == wid:
                self._send_up(pb.AgentMessage(corruption=msg.corruption))
        elif kind == "finished":
            with self._lock:
                self._state[wid].state = pb.WorkerResync.FINISHED
                # Its last steps go up before the news that it finished.
                steps = list(self._steps)
                self._steps.clear()
            if steps:
                self._send_up(pb.AgentMessage(telemetry=pb.Telemetry(
                    sent_at_s=time.time(), steps=steps)))
            self._send_up(pb.AgentMessage(worker_event=pb.WorkerEvent(
                worker_id=wid, kind=pb.WorkerEvent.FINISHED, at_s=time.time())))

    def _on_worker_disconnect(self, wid: str) -> None:
        log.debug("worker %s closed its channel", wid)
