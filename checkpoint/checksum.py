"""The snapshot checksum: per-tensor sums over 4 KiB blocks of a slot's flat buffer.

`SnapshotRing.capture` takes a checksum of every tensor right after the copy, and
`restore` checks the copy it hands back against it: a mismatch raises `SnapshotCorrupt`,
naming the step and the tensors (`model.layer.weight`). A tensor's checksum reads its
row-major bytes as little-endian 64-bit words w_0 .. w_{n-1} (the last one zero-padded):

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
CUDA tensors take their place in the flat buffer like CPU ones; their block sums are
computed on the GPU (`kernels/block_sums.py`, equal bit for bit). Other tensors off the CPU
are cloned on their device and checksummed through host copies (`checksums_of`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

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
