"""The commit record of a shared-memory snapshot slot (checkpoint/shm.py), without torch.

The agent reads it to serve its workers' snapshots to peers (it never imports torch); the
worker hook writes it and reads it back when it adopts a slot. A slot's meta file is

    header   (step: int64, -1 while incomplete; payload length: uint64; CRC-32 of the
             step and the payload: uint32)
    payload  uint32 length of the record, the record (a plain pickle: the data file's
             name, the writer's id, the layout's signature), then the tree (shm.py)
"""

from __future__ import annotations

import io
import mmap
import os
import pickle
import re
import shutil
import struct
import zlib
from dataclasses import dataclass
from typing import Any

_HEADER = struct.Struct("<qQI")  # step (-1: incomplete), payload length, CRC-32 of it
_MAX_META = 64 << 20
_DATA_NAME = re.compile(r"slot[01]-\d{1,9}\.data")


def _crc(step: int, payload: bytes) -> int:
    """CRC-32 of the step and the payload: a flipped step is caught like a flipped byte."""
    return zlib.crc32(payload, zlib.crc32(struct.pack("<q", step)))


class SlotUnreadable(Exception):
    """A slot's files do not hold a complete snapshot this reader can use."""


class _NoGlobals(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"a slot record may not name {module}.{name}")


@dataclass(frozen=True)
class Record:
    """A committed slot's meta, checked: its step, whole meta bytes, record and tree."""
    index: int
    step: int
    meta: bytes       # the whole meta file (header + payload), as a peer receives it
    info: dict[str, Any]
    tree: bytes
    data_name: str


def parse(index: int | None, raw: bytes) -> Record | None:
    """Slot `index`'s meta bytes checked and split; None if it is not committed. With
    `index` None (a peer's meta), the slot is the one its data file names."""
    if len(raw) < _HEADER.size:
        raise SlotUnreadable(f"meta is {len(raw)} bytes, shorter than its header")
    step, length, crc = _HEADER.unpack_from(raw)
    if step < 0:
        return None  # never committed, or being rewritten when its worker died
    payload = raw[_HEADER.size:_HEADER.size + length]
    if len(payload) != length or _crc(step, payload) != crc:
        raise SlotUnreadable("meta payload is truncated or fails its CRC-32")
    if len(payload) < 4 or 4 + struct.unpack_from("<I", payload)[0] > len(payload):
        raise SlotUnreadable("meta payload is shorter than its slot record")
    info_len = struct.unpack_from("<I", payload)[0]
    try:
        info = _NoGlobals(io.BytesIO(payload[4:4 + info_len])).load()
    except Exception as e:
        raise SlotUnreadable(f"slot record does not load: {e}") from e
    if not isinstance(info, dict) or not isinstance(info.get("data"), str):
        raise SlotUnreadable("meta payload is not a slot record")
    name = info["data"]
    if index is None and _DATA_NAME.fullmatch(name):
        index = int(name[4])
    if not _DATA_NAME.fullmatch(name) or not name.startswith(f"slot{index}-"):
        raise SlotUnreadable(f"meta names data file {name!r}")
    assert index is not None
    return Record(index=index, step=step, meta=raw[:_HEADER.size + length], info=info,
                  tree=payload[4 + info_len:], data_name=name)


def read(directory: str, index: int) -> Record | None:
    """Slot `index`'s committed record in `directory`; None if none (SlotUnreadable if
    its meta is damaged)."""
    try:
        with open(os.path.join(directory, f"slot{index}.meta"), "rb") as f:
            raw = f.read(_MAX_META + _HEADER.size)
    except FileNotFoundError:
        return None
    return parse(index, raw)


def newest(directory: str, step: int = 0) -> Record | None:
    """The committed slot of `step` in `directory` (0: the newest), if any is readable."""
    found = []
    for index in (0, 1):
        try:
            rec = read(directory, index)
        except SlotUnreadable:
            continue
        if rec is not None and (step == 0 or rec.step == step):
            found.append(rec)
    return max(found, key=lambda r: r.step, default=None)


def open_committed(directory: str, step: int = 0) -> tuple[int, bytes, memoryview] | None:
    """(step, meta, data) of the committed slot of `step` (0: the newest) in `directory`,
    the data mapped read-only from shared memory (no copy): what an agent serves a peer."""
    rec = newest(directory, step)
    if rec is None:
        return None
    try:
        with open(os.path.join(directory, rec.data_name), "rb") as f:
            data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError):
        return None
    return rec.step, rec.meta, memoryview(data)


class IncomingSlot:
    """A peer's committed slot written into `directory` as it arrives (a fetch's `into`):
    once its meta names the data file, that file is sized and mapped for the bytes to land
    in, with no copy on the way; the meta file is written last (`finish`), so the
    directory holds a slot only once its data is all there."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.record: Record | None = None
        self._map: mmap.mmap | None = None

    def into(self, data_bytes: int, meta: bytes) -> memoryview:
        rec = parse(None, meta)
        if rec is None:
            raise SlotUnreadable("the peer sent an uncommitted slot")
        self.close()
        shutil.rmtree(self.directory, ignore_errors=True)
        os.makedirs(self.directory, mode=0o700)
        fd = os.open(os.path.join(self.directory, rec.data_name),
                     os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            # Reserved now (ENOSPC here), not as the bytes land: a tmpfs that ran out of room
            # under a mapping would kill the worker with SIGBUS (as checkpoint/shm.py does).
            if data_bytes:
                os.posix_fallocate(fd, 0, data_bytes)
            self._map = mmap.mmap(fd, data_bytes) if data_bytes else None
        except OSError:
            os.close(fd)
            shutil.rmtree(self.directory, ignore_errors=True)
            raise
        else:
            os.close(fd)
        self.record = rec
        return memoryview(self._map) if self._map is not None else memoryview(bytearray())

    def finish(self) -> Record:
        """The data is in: write the meta. The record of the slot written."""
        if self.record is None:
            raise SlotUnreadable("nothing was received")
        self.close()
        path = os.path.join(self.directory, f"slot{self.record.index}.meta")
        with open(path, "wb") as f:
            f.write(self.record.meta)
        return self.record

    def close(self) -> None:
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:  # a view of it is still alive: unmapped when it goes
                pass
            self._map = None
