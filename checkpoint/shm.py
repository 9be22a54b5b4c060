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

import array
import io
import logging
import os
import pickle
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from splice.checkpoint import slotmeta
from splice.checkpoint.slotmeta import _DATA_NAME, _HEADER, SlotUnreadable, _crc, _NoGlobals  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)

# What a slot's tensors may be: plain numbers (a quantized or other exotic dtype cannot
# be rebuilt from bytes alone).
_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.complex64,
    torch.complex128, torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8,
    torch.bool)}
_MAX_ELEMENTS = 1 << 48


class Frozen:
    """An immutable value kept by reference in a snapshot (no copy, no walk): e.g. the
    Python RNG state, a tuple of 625 ints that would otherwise be walked every step."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


@dataclass
class LoadedSlot:
    """A committed slot found on disk: its step, layout signature, skeleton, and buffer."""
    index: int
    step: int
    signature: list[tuple[torch.Size, torch.dtype] | None]
    tree: bytes  # `dumps_tree` of the snapshot's tree; `loads_tree` over the layout's views
    buffer: torch.Tensor  # int64: the words, then 2 x blocks of checksums
    data_name: str
    owner: str  # the worker that wrote it


class _Tensor:
    """Pickled in place of a slot's tensor: its index in the layout."""


class _Pickler(pickle.Pickler):
    """Pickles a slot's tree in C, called back only for its tensors (their layout index)
    and `Frozen` values (the Python RNG state's 625 ints packed as bytes: pickling them
    one by one took ~60 us a step)."""

    def __init__(self, file: io.BytesIO, index: dict[int, int]) -> None:
        super().__init__(file, protocol=5)
        self.index = index

    def reducer_override(self, obj: Any) -> Any:
        if type(obj) is torch.Tensor or isinstance(obj, torch.Tensor):
            i = self.index.get(id(obj))
            if i is None:
                raise SlotUnreadable("a tensor of the tree is not in the slot's layout")
            return _Tensor, (i,)
        if isinstance(obj, Frozen):
            v = obj.value
            if (type(v) is tuple and len(v) == 3 and type(v[0]) is int
                    and type(v[1]) is tuple and set(map(type, v[1])) == {int}
                    and (v[2] is None or type(v[2]) is float)):
                try:
                    return Frozen, (_RANDOM, v[0], array.array("I", v[1]).tobytes(), v[2])
                except OverflowError:  # not 32-bit words: pickled as it is
                    pass
            return Frozen, (v,)
        return NotImplemented


_RANDOM = "__splice_random_state__"


def dumps_tree(tree: Any, index: dict[int, int]) -> bytes:
    """`tree` (a slot's) as bytes; `index` maps id(view) to the view's layout index."""
    buf = io.BytesIO()
    _Pickler(buf, index).dump(tree)
    return buf.getvalue()


class _Ref:
    """Stands for a layout tensor while the tree is unpickled. The views are put in place
    afterwards: a forged pickle could otherwise BUILD (`__setstate__`) a live view into
    another tensor's memory."""

    __slots__ = ("index",)

    def __init__(self, index: Any) -> None:
        if type(index) is not int:
            raise SlotUnreadable(f"skeleton names tensor {index!r}, not in the layout")
        self.index = index

    def __setstate__(self, state: Any) -> None:
        raise SlotUnreadable("skeleton tries to set a tensor's state")

    def __reduce__(self) -> Any:
        raise SlotUnreadable("a placeholder is not pickled")


class _Unpickler(pickle.Unpickler):
    """Rebuilds plain containers and scalars; the only callables it hands the pickle are
    the two markers above, which make a placeholder for a layout view or a `Frozen`."""

    def find_class(self, module: str, name: str) -> Any:
        if module == __name__ and name == "_Tensor":
            return _Ref
        if module == __name__ and name == "Frozen":
            return _frozen
        raise pickle.UnpicklingError(f"a snapshot skeleton may not name {module}.{name}")


def _placed(value: Any, views: list[torch.Tensor | None]) -> Any:
    """`value` with each placeholder replaced by its layout view (exact container types
    only: nothing else comes out of the restricted unpickler)."""
    kind = type(value)
    if kind is _Ref:
        i = value.index
        if not 0 <= i < len(views) or views[i] is None:
            raise SlotUnreadable(f"skeleton names tensor {i!r}, not in the layout")
        return views[i]
    if kind is dict:
        return {k: _placed(v, views) for k, v in value.items()}
    if kind is list:
        return [_placed(v, views) for v in value]
    if kind is tuple:
        return tuple(_placed(v, views) for v in value)
    if kind is Frozen and _has_ref(value.value):
        raise SlotUnreadable("skeleton puts a tensor inside a frozen value")
    return value


def _has_ref(value: Any) -> bool:
    kind = type(value)
    if kind is _Ref:
        return True
    if kind is dict:
        return any(_has_ref(v) for v in value.values())
    if kind in (list, tuple):
        return any(_has_ref(v) for v in value)
    return False


def _frozen(*args: Any) -> Any:
    if len(args) == 4 and args[0] == _RANDOM and isinstance(args[2], bytes):
        words = array.array("I")
        words.frombytes(args[2])
        return Frozen((args[1], tuple(words), args[3]))
    if len(args) != 1:
        raise SlotUnreadable("malformed frozen value in a skeleton")
    return Frozen(args[0])


def loads_tree(raw: bytes, views: list[torch.Tensor | None]) -> Any:
    try:
        tree = _Unpickler(io.BytesIO(raw)).load()
    except SlotUnreadable:
        raise
    except Exception as e:
        raise SlotUnreadable(f"skeleton does not load: {e}") from e
    return _placed(tree, views)


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
                and isinstance(s[0], tuple) and len(s[0]) <= 64
                and all(type(d) is int and 0 <= d <= _MAX_ELEMENTS for d in s[0])):
            raise SlotUnreadable(f"bad layout entry {s!r:.200}")
        dtype = _DTYPES.get(s[1])
        if dtype is None:
            raise SlotUnreadable(f"unknown dtype {s[1]!r:.50}")
        count = 1
        for d in s[0]:
            count *= d
        if count > _MAX_ELEMENTS or any(d > _MAX_ELEMENTS for d in s[0]):
            raise SlotUnreadable(f"layout entry of {count} elements")
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
        self._stale: list[list[str]] = [[], []]  # data files found but not adopted
        # Per slot: (the layout's views, the encoded slot record, id(view) -> index).
        self._cached: list[tuple[Any, bytes, dict[int, int], int] | None] = [None, None]

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
        # Reserve the pages now: a tmpfs that runs out of room later would kill the worker
        # with SIGBUS in the middle of a copy; here it is an OSError (ENOSPC) instead.
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.posix_fallocate(fd, 0, max(1, num_words) * 8)
        except OSError:
            os.unlink(path)
            self._gen[index] -= 1
            raise
        finally:
            os.close(fd)
        buf = torch.from_file(path, shared=True, size=max(1, num_words), dtype=torch.int64)
        old, self._data[index] = self._data[index], name
        for gone in {old, *self._stale[index]} - {None, name}:
            try:
                os.unlink(os.path.join(self.directory, str(gone)))
            except FileNotFoundError:
                pass
        self._stale[index] = []
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
               signature: list[tuple[torch.Size, torch.dtype] | None],
               views: list[torch.Tensor | None], tree: Any, epoch: int = 0) -> None:
        """Record slot `index` as the complete snapshot of `step`, taken in `epoch`: `tree`
        (the slot's, its tensors among `views`, the layout of `signature`)."""
        name = self._data[index]
        if name is None:
            return
        cached = self._cached[index]
        if cached is None or cached[0] is not views or cached[3] != epoch:
            info = pickle.dumps({"data": name, "owner": self.owner, "epoch": epoch,
                                 "signature": _encode_signature(signature)}, protocol=5)
            ids = {id(v): i for i, v in enumerate(views) if v is not None}
            cached = self._cached[index] = (views, struct.pack("<I", len(info)) + info, ids,
                                            epoch)
        payload = cached[1] + dumps_tree(tree, cached[2])
        fd = self._fd(index)
        os.pwrite(fd, payload, _HEADER.size)
        # The header last, in one write: a reader that sees the new step with the old
        # length or CRC fails the CRC check and skips the slot.
        os.pwrite(fd, _HEADER.pack(step, len(payload), _crc(step, payload)), 0)

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
        names = os.listdir(self.directory) if os.path.isdir(self.directory) else []
        for index in (0, 1):
            mine = [n for n in names
                    if _DATA_NAME.fullmatch(n) and n.startswith(f"slot{index}-")]
            # Number the slot's next layouts past every file it has had; the next layout
            # removes them all (those not adopted hold nothing usable).
            self._gen[index] = max((int(n[6:-5]) for n in mine), default=0)
            try:
                slot = self._read(index, layout_words)
            except SlotUnreadable as e:
                log.warning("snapshot slot %d in %s is not usable: %s", index,
                            self.directory, e)
                slot = None
            self._stale[index] = [n for n in mine if slot is None or n != slot.data_name]
            if slot is not None:
                self._data[index] = slot.data_name
                yield slot

    def _read(self, index: int, layout_words: Any) -> LoadedSlot | None:
        rec = slotmeta.read(self.directory, index)
        if rec is None:
            return None
        meta, name = rec.info, rec.data_name
        signature = _decode_signature(meta.get("signature"))
        words = layout_words(signature)
        data_path = os.path.join(self.directory, name)
        try:
            size = os.path.getsize(data_path)
        except OSError as e:
            raise SlotUnreadable(f"data file {name} is not readable: {e}") from None
        if size < words * 8:
            raise SlotUnreadable(f"data file {name} is {size} bytes, its layout needs "
                                 f"{words * 8}")
        buf = torch.from_file(data_path, shared=True, size=max(1, words), dtype=torch.int64)
        return LoadedSlot(index=index, step=rec.step, signature=signature,
                          tree=rec.tree, buffer=buf[:words], data_name=name,
                          owner=str(meta.get("owner", "")))
