"""Per-step in-memory snapshots, double-buffered: the last two steps' state, kept locally.

A snapshot of step k is the state before step k runs. Capturing step k+1 overwrites the
slot of step k-1, never the one of step k, so a complete snapshot of the newer step always
exists before the older one is touched. A slot keeps its CPU tensors in one flat buffer,
allocated once (again only when the state's shapes or dtypes change), every tensor
starting on a block of 512 words (4 KiB: at most that much zero padding per tensor).
`capture` copies into it in one batched call, at memcpy speed with no allocation
(bench/snapshot.py).

Checksums. `capture` takes a checksum of every tensor right after the copy, and `restore`
checks the copy it hands back against it: a mismatch raises `SnapshotCorrupt`, naming the
step and the tensors (`model.layer.weight`). A tensor's checksum reads its row-major bytes
as little-endian 64-bit words w_0 .. w_{n-1} (the last one zero-padded):

    S1 = sum_i w_i              mod 2^64
    S2 = sum_i (i + 1) * w_i    mod 2^64          checksum = S1 * 2^64 + S2 (128 bits)

It is computed for the whole slot at once with a fixed handful of torch calls, however
many tensors the state has (`_block_sums`): per 4 KiB block (16 rows of 32 words) its row
sums and its column sums, two passes of plain int64 additions, then a matrix-vector
product over the column sums (1/16 of the data) for the in-row weights. A capture records
those per-block sums; the per-tensor values are derived when asked for. In bulk on one
core that is about twice the speed of the zlib CRC-32 it replaces (bench/snapshot.py:
verify_gbps, crc32_gbps); in the demo job's step loop, where the data comes from memory
rather than cache, it took ~0.2 ms of CPU per step against ~0.7 ms for the CRC-32.

It runs inline, at the end of `capture`. In the demo's step loop (bench/hook_overhead.py)
a helper thread, as the CRC-32 used, spent more CPU on the same sums (~0.35 ms) plus the
hand-off, and the step was no faster with it even with a core to spare; inline also
leaves no window between the copy and the checksum. `SnapshotRing(checksum_in_background=
True)` keeps the helper thread, for that comparison.

What it detects, whatever the data (tests/test_snapshot.py checks each):
  - any change confined to one word: every single bit flip, any damage within 8 aligned
    bytes. S1 moves by the word's difference, never 0 mod 2^64.
  - two different words swapped, d words apart, whenever they differ in one of their
    lowest 64 - v2(d) bits (2^v2(d) the largest power of two dividing d): S2 moves by
    (difference * d). So every swap at an odd distance, and every swap of two words that
    differ in their low 32 bits in a tensor under 2^32 words (32 GiB).
What it does not guarantee: changes spread over two or more words can cancel in both
sums. Random damage goes unseen with probability about 2^-128, but some patterns always
do: bit b flipped in two words d apart, one from 0 to 1 and the other from 1 to 0 (for
bit 63 either way), when b + v2(d) >= 64: e.g. the sign bits of two float64 an even
distance apart, or a float64 x and -x swapped at an even distance. CRC-32 caught every
2-bit error; this checksum trades that for speed.

What is covered: any change to a slot's tensor bytes after `capture` returns, up to the
moment `restore` copies them out (the copy handed back is what is checked, so corruption
while copying out is caught too). What is not: a source tensor already wrong when
captured, non-tensor values (ints, RNG tuples), which are Python objects rather than bytes
in a buffer, and tensors inside other objects than dicts, lists and tuples (deep-copied).
Tensors not on the CPU are cloned on their device, outside the flat buffer, and copied to
the host for their checksums (slow, but splice snapshots GPU state with gpu_snapshot.py).
"""

from __future__ import annotations

import concurrent.futures as cf
import copy
import logging
import math
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from splice.checkpoint.shm import Frozen, SlotFiles, SlotUnreadable, loads_tree

log = logging.getLogger(__name__)

_SCALARS = (int, float, str, bool, bytes, type(None), Frozen)


class SnapshotMissing(Exception):
    """No snapshot of the requested step is held here; ask a peer or the persistent store."""


class SnapshotCorrupt(SnapshotMissing):
    """A held snapshot's bytes no longer match the checksums taken when it was captured
    (raised by both the CPU and the GPU ring). As for a missing one, restore the step from
    a peer's replica or the persistent checkpoint; the CPU ring forgets the snapshot."""


ROW_WORDS = 32  # C: words per row
BLOCK_ROWS = 16  # G: rows per block; every tensor starts on a block (4 KiB)
CHUNK_BLOCKS = 512  # blocks per pair of passes (2 MiB): the second pass reads from cache
BLOCK_WORDS = BLOCK_ROWS * ROW_WORDS
_COL_WEIGHTS = torch.arange(1, ROW_WORDS + 1, dtype=torch.int64)  # k + 1
_ROW_WEIGHTS = torch.arange(BLOCK_ROWS, dtype=torch.int64) * ROW_WORDS  # g * C
_M64 = (1 << 64) - 1

Signature = list[tuple[torch.Size, torch.dtype] | None]  # None: a tensor off the CPU


class _Layout:
    """Where each tensor of a slot lives in its flat buffer, and what its checksums need.
    The checksum of a step is recorded per block of the buffer (`record`), in buffers
    allocated here once: a capture's checksum allocates nothing and calls a fixed handful
    of torch ops. The per-tensor values are derived from the blocks' when asked for."""

    __slots__ = ("signature", "words", "blocks", "views", "flat_views", "num_tensors",
                 "num_blocks", "chunk", "block_tensor", "block_offset", "row_sums",
                 "col_sums", "record", "first_block", "pinned")

    def __init__(self, signature: Signature, chunk: int = CHUNK_BLOCKS,
                 buffer: torch.Tensor | None = None) -> None:
        self.signature = signature
        rows, cols = BLOCK_ROWS, ROW_WORDS
        block_bytes = 8 * rows * cols
        blocks = _blocks_of(signature)
        self.num_tensors, self.num_blocks = len(blocks), sum(blocks)
        # `buffer` (`total_words(signature)` int64, e.g. a shared-memory file): the words,
        # then the per-block checksums of the last capture.
        self.words = (torch.zeros(self.num_blocks * rows * cols, dtype=torch.int64)
                      if buffer is None else buffer[:self.num_blocks * rows * cols])
        self.blocks = self.words.view(self.num_blocks, rows, cols)
        raw = self.words.view(torch.uint8)
        self.views: list[torch.Tensor | None] = []
        self.first_block: list[int] = []  # per tensor of the signature
        first = 0
        for sig, n in zip(signature, blocks, strict=True):
            self.first_block.append(first)
            if sig is None:
                self.views.append(None)
            else:
                shape, dtype = sig
                start = first * block_bytes
                nbytes = math.prod(shape) * dtype.itemsize
                self.views.append(raw[start:start + nbytes].view(dtype).view(shape))
            first += n
        self.flat_views = [v for v in self.views if v is not None]
        counts = torch.tensor(blocks, dtype=torch.int64)
        self.block_tensor = torch.repeat_interleave(torch.arange(len(blocks)), counts)
        first_block = torch.cumsum(counts, 0) - counts
        # words before each block within its own tensor
        self.block_offset = ((torch.arange(self.num_blocks) - first_block[self.block_tensor])
                             * (rows * cols))
        self.chunk = max(1, min(chunk, self.num_blocks))
        self.row_sums = torch.empty(self.chunk, rows, dtype=torch.int64)
        self.col_sums = torch.empty(self.chunk, cols, dtype=torch.int64)
        self.record = (torch.zeros(2, self.num_blocks, dtype=torch.int64) if buffer is None
                       else buffer[self.num_blocks * rows * cols:].view(2, self.num_blocks))
        self.pinned: Any = None  # device_copy.PinnedHostMemory while GPU copies target it

    def blocks_of(self, indices: Sequence[int]) -> torch.Tensor:
        """The blocks of the tensors at `indices` of the signature, in order."""
        blocks = _blocks_of(self.signature)
        return torch.tensor([self.first_block[i] + k for i in indices
                             for k in range(blocks[i])], dtype=torch.int64)

    def pin(self, device: torch.device) -> None:
        """Page-lock the buffer for copies from `device` (once)."""
        if self.pinned is None:
            from splice.checkpoint.device_copy import PinnedHostMemory
            self.pinned = PinnedHostMemory.of([self.words, self.record], device)

    def release(self) -> None:
        """Un-pin the buffer (before the layout is dropped)."""
        for p in self.pinned or ():
            p.release()
        self.pinned = None

    def block_sums(self, out: torch.Tensor) -> None:
        """Into `out` (2 x blocks): each block's two sums (`_block_sums`)."""
        _block_sums(self.blocks, out, self.row_sums, self.col_sums, self.chunk)

    def per_tensor(self, block: torch.Tensor) -> list[int]:
        """The checksum of each tensor from its blocks' sums (0 for tensors off the CPU,
        which have no blocks here): S1 adds the blocks' sums, S2 their weighted sums plus
        each block's offset in its tensor times its sum."""
        both = block.clone()
        both[1].addcmul_(both[0], self.block_offset)
        out = torch.zeros(2, self.num_tensors, dtype=torch.int64)
        out.index_add_(1, self.block_tensor, both)
        a, b = out.tolist()
        return [((x & _M64) << 64) | (y & _M64) for x, y in zip(a, b, strict=True)]

    def sums(self) -> list[int]:
        """The checksum of each tensor as the flat buffer holds it now."""
        now = torch.empty_like(self.record)
        self.block_sums(now)
        return self.per_tensor(now)


def _blocks_of(signature: Signature) -> list[int]:
    """How many 4 KiB blocks each tensor of a layout takes (0 for one off the CPU)."""
    block_bytes = 8 * BLOCK_WORDS
    return [0 if sig is None else -(-math.prod(sig[0]) * sig[1].itemsize // block_bytes)
            for sig in signature]


def total_words(signature: Signature) -> int:
    """The int64 words a layout of `signature` takes with its checksums."""
    blocks = sum(_blocks_of(signature))
    return blocks * BLOCK_WORDS + 2 * blocks


def _block_sums(blocks: torch.Tensor, out: torch.Tensor, row_sums: torch.Tensor,
                col_sums: torch.Tensor, chunk: int) -> None:
    """Into `out` (2 x n): the sum of the words of each of `blocks` (n x G x C int64), and
    their sum weighted by position in the block plus one. int64 arithmetic wraps: all of
    it is mod 2^64. Word (g, k) of a block has weight C*g + (k+1), so per chunk of blocks
    two passes of additions, row sums r (the plain sum, and the C*g part) and column sums
    c, then a matrix-vector product over c (1/G of the data) for the k+1 part. `chunk`
    blocks at a time, small enough for the second pass to read from cache; `row_sums` and
    `col_sums` are scratch for that many."""
    n = blocks.shape[0]
    s1, s2 = out[0], out[1]
    r, c = row_sums, col_sums
    for b0 in range(0, n, chunk):
        part = blocks if n <= chunk else blocks[b0:b0 + chunk]
        m = part.shape[0]
        if m != r.shape[0]:
            r, c = r[:m], c[:m]
        p1, p2 = (s1, s2) if m == n else (s1[b0:b0 + m], s2[b0:b0 + m])
        torch.sum(part, 2, out=r)
        torch.sum(part, 1, out=c)
        torch.sum(r, 1, out=p1)
        torch.mv(c, _COL_WEIGHTS, out=p2)
        p2.addmv_(r, _ROW_WEIGHTS)


def _in_place_blocks(t: torch.Tensor) -> torch.Tensor | None:
    """The whole blocks at the start of a tensor's own memory, as int64 blocks (no copy),
    if it is a CPU tensor laid out so that they can be read in place."""
    nbytes = t.nbytes
    if (nbytes < 8 * BLOCK_WORDS or not t.is_cpu or t.layout != torch.strided
            or not t.is_contiguous() or t.data_ptr() % 8
            or t.storage_offset() * t.element_size() % 8):
        return None
    n = nbytes // (8 * BLOCK_WORDS)
    raw = t.detach().reshape(-1).view(torch.uint8)
    return raw[:n * 8 * BLOCK_WORDS].view(torch.int64).view(n, BLOCK_ROWS, ROW_WORDS)


def checksums_of(tensors: Sequence[torch.Tensor]) -> list[int]:
    """The checksum (module docstring) of each tensor, on any device and in any layout of
    strides: it depends only on the values' bytes in row-major order.

    Large contiguous CPU tensors are read in place, block by block; what is left (their
    last partial block, and every other tensor) is copied into a small flat buffer, so the
    check of a copy (`restore`) allocates little beyond the copy itself."""
    if not tensors:
        return []
    bodies = [_in_place_blocks(t) for t in tensors]
    rests = [t if b is None else t.detach().reshape(-1).view(torch.uint8)[b.numel() * 8:]
             for t, b in zip(tensors, bodies, strict=True)]
    layout = _Layout([(t.shape, t.dtype) for t in rests])
    with torch.no_grad():
        torch._foreach_copy_(layout.flat_views, rests)
    sums = layout.sums()
    for i, body in enumerate(bodies):
        if body is None:
            continue
        part = torch.empty(2, body.shape[0], dtype=torch.int64)
        chunk = min(CHUNK_BLOCKS, body.shape[0])
        _block_sums(body, part, torch.empty(chunk, BLOCK_ROWS, dtype=torch.int64),
                    torch.empty(chunk, ROW_WORDS, dtype=torch.int64), chunk)
        offsets = torch.arange(body.shape[0], dtype=torch.int64) * BLOCK_WORDS
        b1, b2 = int(part[0].sum()), int(part[1].addcmul_(part[0], offsets).sum())
        r1, r2 = sums[i] >> 64, sums[i] & _M64  # the rest starts at word body.numel()
        sums[i] = (((b1 + r1) & _M64) << 64) | ((b2 + r2 + body.numel() * r1) & _M64)
    return sums


def _record(layout: _Layout, others: dict[int, torch.Tensor]) -> dict[int, int]:
    """Take a capture's checksums: the flat buffer's into `layout.record`, and those of
    the tensors off the CPU, returned by walk index."""
    layout.block_sums(layout.record)
    return dict(zip(others, checksums_of(list(others.values())), strict=True))


class _Pending:
    """Stands for a tensor whose place in a new layout is not known yet."""


_PENDING = _Pending()


class _Capture:
    """One capture's walk: the sources in walk order, and where each goes (the slot's
    current layout if the state still fits it). CUDA tensors of `gpu` (the device whose
    copies go asynchronously through `device_copy`; None: no such copies) take their
    place in the layout like CPU ones but are collected apart."""

    __slots__ = ("signature", "old", "views", "srcs", "src_idx", "gpu", "dev_idx",
                 "dev_srcs", "others", "num_bytes", "fits")

    def __init__(self, layout: _Layout | None, gpu: torch.device | None = None) -> None:
        self.signature: Signature = []
        self.old: Signature = layout.signature if layout is not None else []
        self.views = layout.views if layout is not None else []
        self.srcs: list[torch.Tensor] = []
        self.src_idx: list[int] = []  # walk indices of `srcs`
        self.gpu = gpu
        self.dev_idx: list[int] = []
        self.dev_srcs: list[torch.Tensor] = []
        self.others: dict[int, torch.Tensor] = {}  # by walk index: tensors off the CPU
        self.num_bytes = 0
        self.fits = layout is not None

    def tensor(self, value: torch.Tensor) -> Any:
        self.num_bytes += value.nbytes
        i = len(self.signature)
        on_gpu = (self.gpu is not None and value.device == self.gpu
                  and value.layout == torch.strided)
        if not on_gpu and (not value.is_cpu or value.layout != torch.strided):
            self.signature.append(None)
            self.others[i] = clone = value.detach().clone()
            return clone
        sig = (value.shape, value.dtype)
        self.signature.append(sig)
        if on_gpu:
            self.dev_idx.append(i)
            self.dev_srcs.append(value.detach())
        else:
            self.src_idx.append(i)
            self.srcs.append(value.detach() if value.requires_grad else value)
        if self.fits:
            if i < len(self.views) and self.old[i] == sig:
                return self.views[i]
            self.fits = False
        return _PENDING

    def done(self) -> bool:
        """Whether every tensor found its place in the current layout."""
        return self.fits and len(self.signature) == len(self.views)


_SCALAR_TYPES = frozenset(_SCALARS)
_DICTS = frozenset({dict, OrderedDict})


def _copy_into(value: Any, cap: _Capture) -> Any:
    """Deep-copy `value`'s structure, each tensor replaced by its place in the slot.
    (Exact-type checks first: this walk runs every step, over every optimizer setting.)"""
    kind = type(value)
    if kind in _SCALAR_TYPES:
        return value
    if kind in _DICTS:
        return {k: _copy_into(v, cap) for k, v in value.items()}
    if kind is torch.Tensor or isinstance(value, torch.Tensor):
        return cap.tensor(value)
    if kind is list:
        return [_copy_into(v, cap) for v in value]
    if isinstance(value, _SCALARS):
        return value
    if isinstance(value, Mapping):
        return {k: _copy_into(v, cap) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [_copy_into(v, cap) for v in value]
        return items if isinstance(value, list) else tuple(items)
    return copy.deepcopy(value)


def _place(value: Any, views: Iterator[torch.Tensor | None]) -> Any:
    """`value` (a tree from `_copy_into`) with every tensor moved into a new layout."""
    if value is _PENDING or isinstance(value, torch.Tensor):
        view = next(views)
        return value if view is None else view
    if isinstance(value, _SCALARS):
        return value
    if isinstance(value, dict):
        return {k: _place(v, views) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [_place(v, views) for v in value]
        return items if isinstance(value, list) else tuple(items)
    return value


def _clone(value: Any) -> Any:
    if isinstance(value, _SCALARS):
        return value
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, Mapping):
        return {k: _clone(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clone(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_clone(v) for v in value)
    return copy.deepcopy(value)


def tensor_bytes(value: Any) -> int:
    if isinstance(value, _SCALARS):
        return 0
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, Mapping):
        return sum(tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(v) for v in value)
    return 0


def _tensors(value: Any, path: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of a snapshot tree with its dotted path ("model.layer.weight")."""
    if isinstance(value, torch.Tensor):
        yield path, value
    elif isinstance(value, Mapping):
        for k, v in value.items():
            yield from _tensors(v, f"{path}.{k}" if path else str(k))
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _tensors(v, f"{path}.{i}" if path else str(i))


@dataclass(eq=False)  # compared by identity: its tensors have no truth value
class _Slot:
    step: int = -1
    tree: Any = None
    num_bytes: int = 0
    layout: _Layout | None = None  # its flat buffer holds the tree's CPU tensors
    others: dict[int, torch.Tensor] = field(default_factory=dict)  # walk index: off-CPU
    recorded: dict[int, int] | cf.Future[dict[int, int]] | None = None  # others' checksums
    shared: bool = False  # its layout's buffer is a file in the ring's directory
    pending: Any = None  # device_copy.PendingCopy: GPU copies still in flight


class SnapshotRing:
    """The two newest per-step snapshots of one worker's state.

    `checksum_in_background=True` takes the checksums on a helper thread instead of at the
    end of `capture` (bench/hook_overhead.py compares the two): `restore`, `checksums` and
    `verify` of a step, and the capture that reuses its slot two steps later, wait for it;
    a change to the slot before the thread has read it would go unnoticed."""

    def __init__(self, *, checksum_in_background: bool = False,
                 directory: str | None = None, owner: str = "",
                 gpu_copies: bool = True) -> None:
        self._slots = [_Slot(), _Slot()]
        # CUDA tensors: copied asynchronously (device_copy.py) when there is a GPU and
        # Triton; otherwise, or with gpu_copies=False, cloned on their device.
        self._gpu_copies = gpu_copies
        self._copier: Any = None  # device_copy.DeviceCopier, made at the first CUDA tensor
        self._later: tuple[int, Callable[[], Mapping[str, Any]], frozenset[int], Any] | None \
            = None  # a capture to run at the flush (`capture` with a function)
        self._background = checksum_in_background
        self._checksummer: cf.ThreadPoolExecutor | None = None
        self._files: SlotFiles | None = None
        if directory:
            if checksum_in_background:
                raise ValueError("a ring in shared memory takes its checksums inline")
            self._files = SlotFiles(directory, owner)
        self.adopted_from = ""  # the worker whose snapshots `adopt` took over
        self.epoch = 0  # recorded with each commit in shared memory (what replicas order by)

    def adopt(self) -> list[int]:
        """Take over the committed snapshots in this ring's directory (a dead worker's,
        handed over by the agent): the steps now held, unverified (`verify` them)."""
        if self._files is None or self.steps():
            return self.steps()
        for found in self._files.load(total_words):
            try:
                layout = _Layout(found.signature, buffer=found.buffer)
                tree = loads_tree(found.tree, layout.views)
                named = [t for _, t in _tensors(tree)]
                if (len(named) != len(layout.flat_views)
                        or any(a is not b for a, b in zip(named, layout.flat_views,
                                                          strict=True))):
                    raise SlotUnreadable("its tree does not name each tensor of its layout "
                                         "once, in order")
            except (SlotUnreadable, RuntimeError, ValueError, TypeError) as e:
                log.warning("snapshot slot %d in %s is not usable: %s", found.index,
                            self._files.directory, e)
                continue
            slot = self._slots[found.index]
            slot.step, slot.tree, slot.layout = found.step, tree, layout
            slot.num_bytes, slot.others, slot.recorded = tensor_bytes(tree), {}, {}
            slot.shared = True
            self.adopted_from = found.owner
        return self.steps()

    def close(self) -> None:
        """Finish the copies in flight (committing their snapshots) and release the slot
        files' descriptors (the snapshots stay where they are)."""
        self.synchronize()
        for slot in self._slots:
            if slot.layout is not None:
                slot.layout.release()
        if self._files is not None:
            self._files.close()

    def _forget(self, slot: _Slot) -> None:
        slot.step = -1
        if slot.pending is not None:  # let the copy land before the slot is reused
            slot.pending.wait()
            slot.pending = None
        if self._files is not None:
            self._files.begin(self._slots.index(slot))

    def _settle(self, slot: _Slot) -> None:
        """Complete a slot whose GPU copies were in flight: wait for them, put the CPU
        tensors' block sums beside the GPU ones, and commit it to shared memory."""
        pending = slot.pending
        if pending is None:
            return
        pending.wait()
        layout = slot.layout
        assert layout is not None
        if pending.cpu_blocks.numel():
            layout.record[:, pending.cpu_blocks] = pending.cpu_sums
        slot.pending = None
        self._commit(slot)

    def _commit(self, slot: _Slot) -> None:
        if self._files is not None and slot.shared and not slot.others:  # off-CPU: private
            assert slot.layout is not None
            self._files.commit(self._slots.index(slot), slot.step, slot.layout.signature,
                               slot.layout.views, slot.tree, self.epoch)

    def synchronize(self) -> None:
        """Block until every capture's GPU copies are complete (and committed)."""
        self._run_later()
        for slot in sorted(self._slots, key=lambda s: s.step):
            self._settle(slot)

    def flush(self) -> None:
        """Launch the GPU copies a deferred capture prepared (nothing to do otherwise)."""
        self._run_later()
        for slot in self._slots:
            if slot.pending is not None:
                slot.pending.flush()

    def wait_copied(self) -> None:
        """Make the current CUDA stream wait, on the GPU, until the captures so far have
        read their sources: call before anything overwrites captured CUDA tensors (the
        optimizer step). Does not block the host; nothing to do without GPU state."""
        self._run_later()
        for slot in self._slots:
            if slot.pending is not None:
                self._copier.wait_on(slot.pending.flush())

    def _gpu_device(self, state: Mapping[str, Any]) -> torch.device | None:
        """The CUDA device whose tensors this ring copies asynchronously, if any."""
        if self._copier is not None:
            return self._copier.device  # type: ignore[no-any-return]
        if not self._gpu_copies or not torch.cuda.is_available():
            return None
        device = next((t.device for _, t in _tensors(state) if t.is_cuda), None)
        if device is None:
            # Looked once: a state that moves to a GPU later is still snapshotted, its
            # CUDA tensors cloned on the device (`_Capture.others`), only slower.
            self._gpu_copies = False
            return None
        from splice.kernels.fingerprint import triton
        if triton is None:
            log.warning("triton is not installed: GPU snapshots are cloned on the device "
                        "and checksummed through host copies (slow); pip install triton")
            self._gpu_copies = False
            return None
        from splice.checkpoint.device_copy import DeviceCopier
        self._copier = DeviceCopier(device)
        return device

    def capture(self, step: int, state: Mapping[str, Any] | Callable[[], Mapping[str, Any]],
                stable: frozenset[int] = frozenset(), defer: bool = False) -> None:
        """Record `state` as the snapshot of `step` (the state before step `step` runs).
        CPU tensors are copied and checksummed by the time it returns. CUDA tensors are
        copied asynchronously (device_copy.py): call `wait_copied()` before overwriting
        them; those whose data_ptr is in `stable` are read in place, the others cloned on
        the device first. The snapshot is complete, and visible in shared memory, once
        the copies have landed (the next capture, or a read of the step, waits for it).
        With `defer`, the copies are copies of the state as of now, but their launch (a
        few ms of host time for hundreds of tensors) waits for `flush()` (or anything
        that needs them): a training loop that calls it after launching its backward
        pass hides that host time behind queued GPU work.

        `state` may also be a function returning the state, with `defer`, once this ring
        copies GPU state: then the whole capture (walking the state, committing the
        previous slot, the copies) waits for `flush()`, and copies the GPU tensors as they
        were now. Every CUDA tensor the function returns must then be left unchanged until
        `wait_copied()` (clone the others now and return the clones; nothing is cloned
        for you on this path), and its CPU tensors must be what they are now."""
        self._run_later()
        if callable(state):
            if not defer or self._copier is None:
                state = state()
            else:
                start = torch.cuda.Event()
                start.record(torch.cuda.current_stream(self._copier.device))
                self._later = (step, state, stable, start)
                return
        self._capture_now(step, state, stable, defer)

    def _run_later(self) -> None:
        """Run a capture whose state was to be built at the flush."""
        if self._later is not None:
            step, fn, stable, start = self._later
            self._later = None
            self._capture_now(step, fn(), stable, False, start)

    def _capture_now(self, step: int, state: Mapping[str, Any], stable: frozenset[int],
                     defer: bool, start: Any = None) -> None:
        for s in sorted(self._slots, key=lambda s: s.step):
            self._settle(s)  # the newer slot's commit comes before the older is reused
        held = self.steps()
        assert not held or step >= max(held), (step, held)
        if step in held:
            # Only after a rollback to `step`: the state equals that snapshot already, and
            # rewriting its slot would leave a window with one fewer complete snapshot.
            return
        slot = min(self._slots, key=lambda s: s.step)
        self._forget(slot)  # incomplete while copying
        if isinstance(slot.recorded, cf.Future) and not slot.recorded.cancel():
            cf.wait([slot.recorded])  # still reading the buffers about to be overwritten
        cap = _Capture(slot.layout, self._gpu_device(state))
        tree = _copy_into(state, cap)
        if not cap.done():  # first capture into this slot, or the state changed shape
            buffer = None
            if self._files is not None:
                try:
                    buffer = self._files.allocate(self._slots.index(slot),
                                                  total_words(cap.signature))
                except OSError as e:
                    log.warning("snapshot slot in %s stays in private memory: %s (the "
                                "shared memory is too small: a replacement cannot adopt "
                                "it)", self._files.directory, e)
            if buffer is None and cap.dev_idx:  # the GPU's copies need page-locked memory
                buffer = torch.zeros(total_words(cap.signature), dtype=torch.int64,
                                     pin_memory=True)
            if slot.layout is not None:
                slot.layout.release()
            slot.layout = _Layout(cap.signature, buffer=buffer)
            slot.shared = buffer is not None and self._files is not None
            tree = _place(tree, iter(slot.layout.views))
        layout = slot.layout
        assert layout is not None
        slot.tree, slot.num_bytes, slot.others = tree, cap.num_bytes, cap.others
        if cap.dev_idx:
            self._capture_gpu(slot, layout, cap, stable, defer, start)
            slot.step = step
            return
        if cap.srcs:
            # One call for all tensors: ~memcpy speed, where a Python loop of `copy_`
            # reaches half of it on two busy cores (each copy_ its own parallel region).
            torch._foreach_copy_(layout.flat_views, cap.srcs)
        if self._background:
            if self._checksummer is None:
                self._checksummer = cf.ThreadPoolExecutor(
                    max_workers=1, thread_name_prefix="splice-snapshot-sum")
            slot.recorded = self._checksummer.submit(_record, layout, cap.others)
        else:
            slot.recorded = _record(layout, cap.others)
        slot.step = step
        self._commit(slot)

    def _capture_gpu(self, slot: _Slot, layout: _Layout, cap: _Capture,
                     stable: frozenset[int], defer: bool, start: Any) -> None:
        """The CPU tensors copied and summed now (their blocks only), the CUDA ones
        enqueued now or at `flush` (device_copy.py); the slot commits when `_settle`
        finds them landed."""
        from splice.checkpoint.device_copy import PendingCopy

        if cap.srcs:
            torch._foreach_copy_([v for i in cap.src_idx if (v := layout.views[i]) is not None],
                                 cap.srcs)
        cpu_blocks = layout.blocks_of(cap.src_idx)
        cpu_sums = torch.empty(2, cpu_blocks.numel(), dtype=torch.int64)
        if cpu_blocks.numel():
            chunk = min(CHUNK_BLOCKS, cpu_blocks.numel())
            _block_sums(layout.blocks.index_select(0, cpu_blocks), cpu_sums,
                        torch.empty(chunk, BLOCK_ROWS, dtype=torch.int64),
                        torch.empty(chunk, ROW_WORDS, dtype=torch.int64), chunk)
        copier = self._copier
        layout.pin(copier.device)
        start, srcs, keep = copier.prepare(cap.dev_srcs, stable, start)
        views = [v for i in cap.dev_idx if (v := layout.views[i]) is not None]
        firsts = [layout.first_block[i] for i in cap.dev_idx]
        slot.recorded = dict(zip(cap.others, checksums_of(list(cap.others.values())),
                                 strict=True))
        slot.pending = PendingCopy(start, lambda: copier.launch(
            start, layout.record, srcs, views, firsts, keep), cpu_blocks, cpu_sums, srcs)
        if not defer:
            slot.pending.flush()

    def steps(self) -> list[int]:
        self._run_later()
        return sorted(s.step for s in self._slots if s.step >= 0)

    def restore(self, step: int) -> dict[str, Any]:
        """A private copy of the snapshot of `step` (the caller may keep or mutate it),
        checked against the checksums taken at capture: SnapshotCorrupt if it differs."""
        slot = self._slot(step)
        recorded = self._recorded(slot)
        out = _clone(slot.tree)
        self._check(slot, recorded, checksums_of([t for _, t in _tensors(out)]))
        return out  # type: ignore[no-any-return]

    def checksums(self, step: int) -> dict[str, int]:
        """The checksum (module docstring) of each tensor of the snapshot of `step` as
        taken at capture, by path."""
        slot = self._slot(step)
        return {path: s for (path, _), s in zip(_tensors(slot.tree), self._recorded(slot),
                                                strict=True)}

    def verify(self, step: int) -> None:
        """Check the held snapshot of `step` in place, e.g. before sending it to a peer;
        SnapshotCorrupt (and the snapshot forgotten) if any tensor changed."""
        slot = self._slot(step)
        recorded = self._recorded(slot)
        assert slot.layout is not None
        now = slot.layout.sums()
        for i, value in zip(slot.others, checksums_of(list(slot.others.values())),
                            strict=True):
            now[i] = value
        self._check(slot, recorded, now)

    def buffers(self, step: int) -> dict[str, torch.Tensor]:
        """The ring's own tensors of the snapshot of `step`, by path, not copies: to send
        without copying (after `verify`). Writing to them corrupts the snapshot."""
        return dict(_tensors(self._slot(step).tree))

    def discard_after(self, step: int) -> None:
        """Forget snapshots newer than `step`: they belong to an abandoned timeline."""
        self._run_later()
        for s in self._slots:
            if s.step > step:
                self._forget(s)

    @property
    def num_bytes(self) -> int:
        return sum(s.num_bytes for s in self._slots if s.step >= 0)

    def _slot(self, step: int) -> _Slot:
        self._run_later()
        for s in self._slots:
            if s.step == step:
                self._settle(s)
                return s
        raise SnapshotMissing(f"no snapshot of step {step} here (held: {self.steps()})")

    @staticmethod
    def _recorded(slot: _Slot) -> list[int]:
        """The checksums taken at capture, per tensor in walk order."""
        assert slot.recorded is not None and slot.layout is not None, "a held slot has both"
        others = (slot.recorded.result() if isinstance(slot.recorded, cf.Future)
                  else slot.recorded)
        sums = slot.layout.per_tensor(slot.layout.record)
        for i, value in others.items():
            sums[i] = value
        return sums

    def _check(self, slot: _Slot, recorded: list[int], now: list[int]) -> None:
        bad = [f"{path} (recorded {want:#034x}, now {got:#034x})"
               for (path, _), want, got in zip(_tensors(slot.tree), recorded, now, strict=True)
               if want != got]
        if bad:
            step = slot.step
            self._forget(slot)  # no longer a snapshot anyone should train on
            raise SnapshotCorrupt(
                f"snapshot of step {step} is corrupt: {len(bad)} of {len(recorded)} "
                f"tensors changed since capture: {', '.join(bad[:5])}"
                f"{' ...' if len(bad) > 5 else ''}; restore step {step} from a peer's "
                "replica or the persistent checkpoint")
