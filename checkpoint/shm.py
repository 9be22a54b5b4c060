"""A snapshot ring's slots as files in shared memory, so the snapshots outlive the worker.

The agent gives each worker a directory in /dev/shm (`SPLICE_SNAPSHOT_DIR`), owns it and
removes it. A `SnapshotRing(directory=...)` keeps each slot's flat buffer in a file there,
mapped shared (`torch.from_file`): the per-step copy writes straight into it, at the same
speed as into private memory. When the worker dies, its last two snapshots stay in the
page cache; the agent hands the directory to the worker that takes the dead one's place
(a rename), and that worker adopts them without any transfer (`SlotFiles.load`).

Per slot i of the ring:

    slot{i}-{g}.data   the slot's int64 words, then its per-block checksums (2 x blocks);
                       g counts the layouts the slot has had (a new file when the state's
                       shapes change)
    slot{i}.meta       header (step, payload length, CRC-32 of the payload) + payload

The meta is the commit record. `begin` writes step -1 before the slot's buffer is touched;
`commit` writes the payload (the data file's name, the layout's signature and the
snapshot's skeleton: its structure and non-tensor values, each tensor replaced by its index
in the layout), then its length and CRC, then the step. A worker killed at any point leaves
either a complete snapshot or a slot marked incomplete, never a torn one; a reader that
races a writer sees a CRC or step mismatch and skips the slot.

The payload is a pickle of plain containers and scalars. It is read back by an unpickler
that refuses every global, so it can rebuild dicts, lists, tuples, numbers, strings and
bytes and nothing else: a damaged or forged file cannot run code. The tensors' bytes are
checked by the ring's own checksums (`SnapshotRing.verify`) before anything is restored.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import re
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger(__name__)

_HEADER = struct.Struct("<qQI")  # step (-1: incomplete), payload length, CRC-32 of it
_MAX_META = 64 << 20
_TENSOR = "__splice_slot_tensor__"
_FROZEN = "__splice_frozen__"
_DATA_NAME = re.compile(r"^slot[01]-\d+\.data$")


class SlotUnreadable(Exception):
    """A slot's files do not hold a complete snapshot this reader can use."""


class _NoGlobals(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"a snapshot skeleton may not name {module}.{name}")


@dataclass
class LoadedSlot:
    """A committed slot found on disk: its step, layout signature, skeleton, and buffer."""
    index: int
    step: int
    signature: list[tuple[torch.Size, torch.dtype] | None]
    skeleton: Any
    buffer: torch.Tensor  # int64: the words, then 2 x blocks of checksums
    data_name: str
    owner: str  # the worker that wrote it


def skeleton_of(tree: Any) -> Any:
    """`tree` with each tensor replaced by its walk index (tensors are the slot's views)."""
    from splice.checkpoint.snapshot import Frozen

    counter = [0]

    def walk(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            counter[0] += 1
            return {_TENSOR: counter[0] - 1}
        if isinstance(value, Frozen):
            return {_FROZEN: value.value}
        if type(value) is dict:
            return {k: walk(v) for k, v in value.items()}
        if type(value) is list:
            return [walk(v) for v in value]
        if type(value) is tuple:
            return tuple(walk(v) for v in value)
        return value

    return walk(tree)


def tree_of(skeleton: Any, views: list[torch.Tensor | None]) -> Any:
    """The inverse of `skeleton_of` over a layout's views."""
    from splice.checkpoint.snapshot import Frozen

    def walk(value: Any) -> Any:
        if type(value) is dict:
            if len(value) == 1 and _TENSOR in value:
                i = value[_TENSOR]
                if not (isinstance(i, int) and 0 <= i < len(views)) or views[i] is None:
                    raise SlotUnreadable(f"skeleton names tensor {i!r}, not in the layout")
                return views[i]
            if len(value) == 1 and _FROZEN in value:
                return Frozen(value[_FROZEN])
            return {k: walk(v) for k, v in value.items()}
        if type(value) is list:
            return [walk(v) for v in value]
        if type(value) is tuple:
            return tuple(walk(v) for v in value)
        return value

    return walk(skeleton)


def _encode_signature(signature: list[tuple[torch.Size, torch.dtype] | None]) -> list[Any]:
    return [None if s is None else (tuple(s[0]), str(s[1]).removeprefix("torch."))
            for s in signature]


def _decode_signature(raw: Any) -> list[tuple[torch.Size, torch.dtype] | None]:
    if not isinstance(raw, list):
        raise SlotUnreadable("layout signature is not a list")
    out: list[tuple[torch.Size, torch.dtype] | None] = []
    for s in raw:
        if s is None:
            out.append(None)
            continue
        if not (isinstance(s, tuple) and len(s) == 2 and isinstance(s[1], str)
                and isinstance(s[0], tuple) and all(isinstance(d, int) and d >= 0
                                                    for d in s[0])):
            raise SlotUnreadable(f"bad layout entry {s!r}")
        dtype = getattr(torch, s[1], None)
        if not isinstance(dtype, torch.dtype):
            raise SlotUnreadable(f"unknown dtype {s[1]!r}")
        out.append((torch.Size(s[0]), dtype))
    return out


class SlotFiles:
    """The files of one ring's two slots in `directory` (created on first use)."""

    def __init__(self, directory: str, owner: str = "") -> None:
        self.directory = directory
        self.owner = owner  # the writing worker's id, recorded with every commit
        self._fds: dict[int, int] = {}
        self._gen = [0, 0]
        self._data: list[str | None] = [None, None]

    # ---- writer -------------------------------------------------------------------------
    def allocate(self, index: int, num_words: int) -> torch.Tensor:
        """A fresh shared int64 buffer of `num_words` for slot `index` (a new layout); the
        slot's previous data file is removed (its mapping lives on with its tensors)."""
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        self.begin(index)
        self._gen[index] += 1
        name = f"slot{index}-{self._gen[index]}.data"
        path = os.path.join(self.directory, name)
        if os.path.exists(path):
            os.unlink(path)
        buf = torch.from_file(path, shared=True, size=max(1, num_words), dtype=torch.int64)
        old, self._data[index] = self._data[index], name
        if old is not None and old != name:
            try:
                os.unlink(os.path.join(self.directory, old))
            except FileNotFoundError:
                pass
        return buf[:num_words]

    def _fd(self, index: int) -> int:
        fd = self._fds.get(index)
        if fd is None:
            os.makedirs(self.directory, mode=0o700, exist_ok=True)
            fd = os.open(os.path.join(self.directory, f"slot{index}.meta"),
                         os.O_RDWR | os.O_CREAT, 0o600)
            self._fds[index] = fd
        return fd

    def begin(self, index: int) -> None:
        """Mark slot `index` incomplete: its buffer is about to be overwritten."""
        os.pwrite(self._fd(index), _HEADER.pack(-1, 0, 0), 0)

    def commit(self, index: int, step: int,
               signature: list[tuple[torch.Size, torch.dtype] | None], tree: Any) -> None:
        """Record slot `index` as the complete snapshot of `step`."""
        name = self._data[index]
        if name is None:
            return
        payload = pickle.dumps({"data": name, "owner": self.owner, "signature": _encode_signature(signature),
                                "skeleton": skeleton_of(tree)}, protocol=5)
        fd = self._fd(index)
        os.pwrite(fd, payload, _HEADER.size)
        # The header last, in one write: a reader that sees the new step with the old
        # length or CRC fails the CRC check and skips the slot.
        os.pwrite(fd, _HEADER.pack(step, len(payload), zlib.crc32(payload)), 0)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    # ---- reader -------------------------------------------------------------------------
    def load(self, layout_words: Any) -> Iterator[LoadedSlot]:
        """The committed slots in the directory (e.g. a dead predecessor's), each mapped
        shared; this object then writes into them. `layout_words(signature)` gives the
        int64 words a slot of that signature needs. A slot that cannot be read is logged
        and skipped."""
        for index in (0, 1):
            try:
                slot = self._read(index, layout_words)
            except SlotUnreadable as e:
                log.warning("snapshot slot %d in %s is not usable: %s", index,
                            self.directory, e)
                continue
            if slot is not None:
                self._data[index] = slot.data_name
                self._gen[index] = int(slot.data_name.split("-")[1].split(".")[0])
                yield slot

    def _read(self, index: int, layout_words: Any) -> LoadedSlot | None:
        path = os.path.join(self.directory, f"slot{index}.meta")
        try:
            with open(path, "rb") as f:
                raw = f.read(_MAX_META + _HEADER.size)
        except FileNotFoundError:
            return None
        if len(raw) < _HEADER.size:
            raise SlotUnreadable(f"meta is {len(raw)} bytes, shorter than its header")
        step, length, crc = _HEADER.unpack_from(raw)
        if step < 0:
            return None  # never committed, or being rewritten when its worker died
        payload = raw[_HEADER.size:_HEADER.size + length]
        if len(payload) != length or zlib.crc32(payload) != crc:
            raise SlotUnreadable("meta payload is truncated or fails its CRC-32")
        try:
            meta = _NoGlobals(io.BytesIO(payload)).load()
        except Exception as e:
            raise SlotUnreadable(f"meta payload does not load: {e}") from e
        if not isinstance(meta, dict) or not isinstance(meta.get("data"), str):
            raise SlotUnreadable("meta payload is not a slot record")
        name = meta["data"]
        if not _DATA_NAME.match(name) or not name.startswith(f"slot{index}-"):
            raise SlotUnreadable(f"meta names data file {name!r}")
        signature = _decode_signature(meta.get("signature"))
        words = layout_words(signature)
        data_path = os.path.join(self.directory, name)
        try:
            size = os.path.getsize(data_path)
        except FileNotFoundError:
            raise SlotUnreadable(f"data file {name} is missing") from None
        if size < words * 8:
            raise SlotUnreadable(f"data file {name} is {size} bytes, its layout needs "
                                 f"{words * 8}")
        buf = torch.from_file(data_path, shared=True, size=max(1, words), dtype=torch.int64)
        return LoadedSlot(index=index, step=step, signature=signature,
                          skeleton=meta.get("skeleton"), buffer=buf[:words], data_name=name,
                          owner=str(meta.get("owner", "")))
