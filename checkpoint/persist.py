"""Persistent checkpoints: the snapshot that survives when every in-memory copy is gone.

In-memory snapshots (snapshot.py) and their peer replicas cover the usual fault. This store
covers the rest: losing every copy of a shard, and resuming a job after a cold start. Every
M steps the worker hands a private copy of its snapshot tree to `save_async`, which returns
at once; one background thread encodes it (codec.py: a CRC-32-checked blob) and writes

    root/<job_id>/step-<step:012d>.ckpt    the encoded snapshot, verified on load
    root/<job_id>/step-<step:012d>.json    manifest: step, num_bytes, crc32, saved_at_s, job_id

each first to `<name>.tmp-<pid>`, fsynced, then renamed into place; the directory is fsynced
last. The manifest is renamed after the data file, so it is the commit record: `list()`
shows only steps whose manifest exists, and a crash at any point leaves either the previous
set of checkpoints or the previous set plus the new one, never a half-written file under a
final name. Pruning to the newest `keep` runs only after a save committed, so the newest
complete checkpoint is never deleted before its successor exists.

At most one save is in flight. A request that arrives while one runs replaces any request
still queued (newest wins), so a slow disk costs checkpoint frequency, never unbounded
memory. Background failures are logged on "splice.persist" and kept in `last_error`.

One store writes a given `root/<job_id>` at a time; ranks that persist their own shards use
distinct job ids (e.g. "run7.rank3").
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from splice.checkpoint.codec import CorruptState, checksum_of, decode_state, encode_state

log = logging.getLogger("splice.persist")

_MAX_STEP = 10**12 - 1  # the file name holds 12 digits
_CKPT = re.compile(r"^step-(\d{12})\.ckpt$")
_MANIFEST = re.compile(r"^step-(\d{12})\.json$")
_TMP = re.compile(r"\.tmp-(\d+)$")


class PersistError(Exception):
    """A checkpoint could not be written or read; the message names the path and why."""


class CheckpointCorrupt(PersistError):
    """A checkpoint file exists but is not intact (truncated, flipped bytes, not a snapshot).
    Fall back to an older checkpoint: `load_latest` does so by itself."""


@dataclass(frozen=True)
class CheckpointInfo:
    step: int
    path: str  # the .ckpt file
    num_bytes: int
    crc32: int  # CRC-32 of the codec payload, as its header declares
    saved_at_s: float  # wall-clock time (time.time()) the data file was in place
    job_id: str


def _validate_job_id(job_id: str) -> None:
    if not isinstance(job_id, str) or not job_id or job_id == ".":
        raise ValueError(f"job_id must be a non-empty name, got {job_id!r}")
    for bad in ("/", "\\", "\0", ".."):
        if bad in job_id:
            raise ValueError(f"job_id {job_id!r} must not contain {bad!r}: it names a "
                             f"directory directly under the checkpoint root")


def _validate_step(step: int) -> None:
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= _MAX_STEP:
        raise ValueError(f"step must be an int in [0, {_MAX_STEP}], got {step!r}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomically(path: Path, data: bytes | memoryview) -> None:
    """Write `data` to `path` via a fsynced `<path>.tmp-<pid>` and a rename; the caller
    fsyncs the directory. On failure the temporary file is removed and the error raised."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class PersistentStore:
    """Checkpoints of one job under `root/<job_id>/`, the newest `keep` of them kept."""

    def __init__(self, root: str | os.PathLike[str], *, job_id: str = "default",
                 keep: int = 2, writer: bool = True,
                 retain: Callable[[], int | None] | None = None) -> None:
        """`writer=False` opens another process's directory to read: nothing is created or
        removed there (its temporary files may belong to a writer on another host), and
        saving is refused. `retain()`, asked at each prune, names a step from which on
        nothing is pruned besides the newest `keep` (a sharded checkpoint's newest step
        every rank committed: sharded.py); an error there skips that prune."""
        _validate_job_id(job_id)
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ValueError(f"keep must be an int >= 1 (how many checkpoints to retain), "
                             f"got {keep!r}")
        self.job_id = job_id
        self.keep = keep
        self._retain = retain
        self.root = Path(root)
        self.dir = self.root / job_id
        self.writer = writer
        if writer:
            try:
                self.dir.mkdir(parents=True, exist_ok=True)
                _fsync_dir(self.root)
            except OSError as e:
                raise PersistError(f"cannot create checkpoint directory {self.dir}: "
                                   f"{e}") from e
            self._remove_stale_tmp()

        self.skipped_corrupt = 0  # corrupt checkpoints load_latest skipped
        self.coalesced_saves = 0  # queued requests replaced by a newer one before starting
        self.failed_saves = 0  # background saves that raised
        self._last_error: PersistError | None = None
        self._last_saved: CheckpointInfo | None = None

        self._cond = threading.Condition()
        self._pending: tuple[int, Mapping[str, Any]] | None = None
        self._busy = False
        self._closed = False
        self._thread: threading.Thread | None = None
        self._write_lock = threading.Lock()  # one writer of this directory: async or sync

    # -- paths ---------------------------------------------------------------------------

    def _ckpt_path(self, step: int) -> Path:
        return self.dir / f"step-{step:012d}.ckpt"

    def _manifest_path(self, step: int) -> Path:
        return self.dir / f"step-{step:012d}.json"

    def _remove_stale_tmp(self) -> None:
        # A temporary file is stale when its writer is gone. Our own pid counts as gone: in a
        # container a restarted job often gets the pid its crashed predecessor had.
        for entry in list(self.dir.iterdir()):
            m = _TMP.search(entry.name)
            if m is None:
                continue
            pid = int(m.group(1))
            if pid == os.getpid() or not _pid_alive(pid):
                log.warning("removing %s, left by a writer (pid %d) that did not finish",
                            entry, pid)
                entry.unlink(missing_ok=True)

    # -- writing -------------------------------------------------------------------------

    @property
    def last_error(self) -> PersistError | None:
        """Why the most recent background save failed; None once a later one succeeds."""
        return self._last_error

    @property
    def last_saved(self) -> CheckpointInfo | None:
        """The most recent checkpoint this store committed (async or sync)."""
        return self._last_saved

    def save_async(self, step: int, tree: Mapping[str, Any]) -> None:
        """Queue `tree` (a private copy the caller will not mutate) as the checkpoint of
        `step` and return; a queued, not yet started request is replaced."""
        _validate_step(step)
        if not self.writer:
            raise PersistError(f"checkpoint store {self.dir} was opened to read; cannot save "
                               f"step {step}")
        with self._cond:
            if self._closed:
                raise PersistError(f"checkpoint store {self.dir} is closed; cannot save "
                                   f"step {step}")
            if self._pending is not None:
                self.coalesced_saves += 1
                log.info("checkpoint of step %d superseded by step %d before it started "
                         "(the disk is slower than the save interval)",
                         self._pending[0], step)
            self._pending = (step, tree)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, daemon=True,
                                                name=f"splice-persist-{self.job_id}")
                self._thread.start()
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._pending is None and not self._closed:
                    self._cond.wait()
                if self._pending is None:
                    return  # closed and drained
                step, tree = self._pending
                self._pending = None
                self._busy = True
            try:
                self.save(step, tree)
            except Exception as e:  # the thread must outlive any one failed save
                err = e if isinstance(e, PersistError) else PersistError(
                    f"checkpoint of step {step} in {self.dir} failed: "
                    f"{type(e).__name__}: {e}")
                self.failed_saves += 1
                self._last_error = err
                log.error("background checkpoint save failed: %s", err)
            else:
                self._last_error = None
            finally:
                del tree
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def save(self, step: int, tree: Mapping[str, Any]) -> CheckpointInfo:
        """Encode and durably write the checkpoint of `step` now, then prune."""
        _validate_step(step)
        if not self.writer:
            raise PersistError(f"checkpoint store {self.dir} was opened to read; cannot save "
                               f"step {step}")
        path = self._ckpt_path(step)
        with self._write_lock:
            try:
                blob = encode_state(tree)
            except Exception as e:
                raise PersistError(f"cannot encode the checkpoint of step {step} for "
                                   f"{path}: {type(e).__name__}: {e}") from e
            num_bytes, crc32 = len(blob), checksum_of(blob)
            try:
                _write_atomically(path, blob)
                del blob
                info = CheckpointInfo(step=step, path=str(path), num_bytes=num_bytes,
                                      crc32=crc32, saved_at_s=time.time(), job_id=self.job_id)
                manifest = {k: v for k, v in asdict(info).items() if k != "path"}
                _write_atomically(self._manifest_path(step),
                                  json.dumps(manifest, sort_keys=True).encode())
                _fsync_dir(self.dir)
            except OSError as e:
                raise PersistError(f"cannot write checkpoint {path}: {e}") from e
            self._last_saved = info
            log.info("checkpoint of step %d committed: %s (%d bytes)", step, path,
                     info.num_bytes)
            try:
                self._prune()
            except OSError as e:  # the save committed; the next prune retries
                log.warning("cannot prune old checkpoints in %s: %s", self.dir, e)
        return info

    def _prune(self) -> None:
        listed = [i.step for i in self.list()]
        kept = set(listed[-self.keep:])
        if self._retain is not None:
            try:
                floor = self._retain()
            except Exception as e:  # keep everything rather than guess
                log.warning("not pruning %s this time: cannot tell which steps to retain: "
                            "%s", self.dir, e)
                return
            if floor is not None:
                kept |= {step for step in listed if step >= floor}
        steps = set()
        for name in os.listdir(self.dir):
            m = _CKPT.match(name) or _MANIFEST.match(name)
            if m is not None:
                steps.add(int(m.group(1)))
        for step in sorted(steps - kept):
            # Manifest first: a crash in between leaves an unlisted data file (removed on
            # the next prune), never a manifest naming a missing file.
            for path in (self._manifest_path(step), self._ckpt_path(step)):
                try:
                    path.unlink(missing_ok=True)
                except OSError as e:  # the save itself succeeded; the next prune retries
                    log.warning("cannot remove old checkpoint file %s: %s", path, e)

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until no save is running or queued; False if `timeout_s` ran out first.
        Whether the saves succeeded is `last_error`'s to say."""
        with self._cond:
            return self._cond.wait_for(lambda: self._pending is None and not self._busy,
                                       timeout_s)

    def close(self) -> None:
        """Finish the running and queued saves, then stop the background thread."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join()

    # -- reading -------------------------------------------------------------------------

    def list(self) -> list[CheckpointInfo]:
        """Committed checkpoints (a manifest beside a data file), oldest first. Whether the
        data is intact is checked by `load`."""
        out = []
        try:
            entries = list(self.dir.iterdir())
        except FileNotFoundError:
            return []
        except OSError as e:
            raise PersistError(f"cannot list checkpoint directory {self.dir}: {e}") from e
        for entry in entries:
            m = _MANIFEST.match(entry.name)
            if m is None:
                continue
            step = int(m.group(1))
            ckpt = self._ckpt_path(step)
            try:
                raw = json.loads(entry.read_bytes())
                info = CheckpointInfo(step=int(raw["step"]), path=str(ckpt),
                                      num_bytes=int(raw["num_bytes"]),
                                      crc32=int(raw["crc32"]),
                                      saved_at_s=float(raw["saved_at_s"]),
                                      job_id=str(raw["job_id"]))
            except FileNotFoundError:
                continue  # pruned meanwhile
            except (OSError, ValueError, KeyError, TypeError) as e:
                log.error("ignoring checkpoint manifest %s: unreadable (%s)", entry, e)
                continue
            if info.step != step:
                log.error("ignoring checkpoint manifest %s: it names step %d", entry,
                          info.step)
                continue
            if ckpt.exists():
                out.append(info)
        return sorted(out, key=lambda i: i.step)

    def load(self, step: int) -> dict[str, Any]:
        """The snapshot tree of `step`, verified against its checksum."""
        _validate_step(step)
        path = self._ckpt_path(step)
        try:
            blob = path.read_bytes()
        except FileNotFoundError:
            have = [i.step for i in self.list()]
            raise PersistError(f"no checkpoint of step {step}: {path} does not exist "
                               f"(steps held for job {self.job_id!r}: {have})") from None
        except OSError as e:
            raise PersistError(f"cannot read checkpoint {path}: {e}") from e
        try:
            return decode_state(blob)
        except CorruptState as e:
            raise CheckpointCorrupt(f"checkpoint {path} is corrupt: {e}") from e

    def load_latest(self) -> tuple[int, dict[str, Any]] | None:
        """The newest intact checkpoint as (step, tree); a corrupt newer one is skipped,
        loudly. None when there is no intact checkpoint at all."""
        for info in reversed(self.list()):
            try:
                return info.step, self.load(info.step)
            except CheckpointCorrupt as e:
                self.skipped_corrupt += 1
                log.error("skipping checkpoint of step %d: %s; falling back to an older "
                          "one", info.step, e)
            except PersistError as e:
                log.error("skipping checkpoint of step %d: %s", info.step, e)
        return None
