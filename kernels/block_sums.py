"""The snapshot checksum's per-block sums, computed on the GPU over many tensors at once.

A snapshot slot (`checkpoint/snapshot.py`) lays its tensors out in 4 KiB blocks, each
tensor starting on a block, and records for every block b two sums over its 512
little-endian int64 words w_0 .. w_511 (zero past the tensor's last byte):

    S1[b] = sum_j w_j              mod 2^64
    S2[b] = sum_j (j + 1) * w_j    mod 2^64

The CPU ring takes them over its flat host buffer after copying. A GPU tensor's bytes
reach that buffer by an asynchronous device-to-host copy, and summing them there would
cost the host a pass over the whole state every step; instead one launch here reads the
source tensors where they are, in HBM, and writes each block's two sums at the block's
column of the slot's record. The result equals what the CPU computes over the copy, bit
for bit (tests/test_block_sums.py), so everything downstream (verify, restore, a peer
checking a fetched snapshot) is unchanged.

`block_sums_many(sources, first_blocks, out)`: `out` is 2 x N int64 on the sources'
device; source i's blocks go to columns first_blocks[i], first_blocks[i] + 1, ...
Sources must be contiguous. Those whose bytes are 8-byte aligned and a whole number of
words (nearly all) are read as int64; the rest byte by byte (a second, slower launch).
"""

from __future__ import annotations

import torch

from splice.kernels.fingerprint import triton

BLOCK_WORDS = 512  # int64 words per 4 KiB block
BLOCK_BYTES = 8 * BLOCK_WORDS

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _block_sums_kernel(addrs, n_items, dst_first, prog_tensor, prog_block, out, n_out,
                           LANES: tl.constexpr, ROWS: tl.constexpr, WORDS: tl.constexpr):
        """One program per ROWS consecutive blocks (of WORDS words) of one tensor. LANES
        items per word: 1 (the tensor read as int64) or 8 (as bytes, any length and
        alignment)."""
        pid = tl.program_id(0)
        t = tl.load(prog_tensor + pid)
        first = tl.load(prog_block + pid).to(tl.int64)
        n = tl.load(n_items + t)
        blocks = (n + WORDS * LANES - 1) // (WORDS * LANES)
        row = tl.arange(0, ROWS)
        j = tl.arange(0, WORDS)
        word = (first + row[:, None]) * WORDS + j[None, :]
        if LANES == 1:
            src = tl.load(addrs + t).to(tl.pointer_type(tl.int64))
            w = tl.load(src + word, mask=word < n, other=0)
        else:
            src = tl.load(addrs + t).to(tl.pointer_type(tl.uint8))
            lane = tl.arange(0, LANES)
            item = word[:, :, None] * LANES + lane[None, None, :]
            part = tl.load(src + item, mask=item < n, other=0).to(tl.int64)
            w = tl.sum(part << (lane.to(tl.int64) * 8)[None, None, :], axis=2)
        s1 = tl.sum(w, axis=1)
        s2 = tl.sum(w * (j + 1).to(tl.int64)[None, :], axis=1)
        col = tl.load(dst_first + t) + first + row
        valid = first + row < blocks
        tl.store(out + col, s1, mask=valid)
        tl.store(out + n_out + col, s2, mask=valid)


def blocks_of(nbytes: int) -> int:
    return -(-nbytes // BLOCK_BYTES)


def _word_aligned(t: torch.Tensor) -> bool:
    return t.nbytes % 8 == 0 and t.data_ptr() % 8 == 0


class _Plan:
    """The device tables of one launch (cached: a model's tensors keep their addresses
    and the slot its layout from step to step, so they are built once)."""

    def __init__(self, sources: list[torch.Tensor], first_blocks: list[int], lanes: int,
                 rows: int, device: torch.device) -> None:
        items = [t.nbytes // (8 // lanes) if lanes == 1 else t.nbytes for t in sources]
        programs = [(i, b) for i, t in enumerate(sources)
                    for b in range(0, blocks_of(t.nbytes), rows)]
        i64 = torch.int64
        self.addrs = torch.tensor([t.data_ptr() for t in sources], dtype=i64, device=device)
        self.n_items = torch.tensor(items, dtype=i64, device=device)
        self.dst_first = torch.tensor(first_blocks, dtype=i64, device=device)
        self.prog_tensor = torch.tensor([i for i, _ in programs], dtype=torch.int32,
                                        device=device)
        self.prog_block = torch.tensor([b for _, b in programs], dtype=torch.int32,
                                       device=device)
        self.num_programs = len(programs)


_plans: dict[tuple[object, ...], list[tuple[int, _Plan]]] = {}
_ROWS = {1: 4, 8: 1}


def _make_plans(sources: list[torch.Tensor], first_blocks: list[int],
                out: torch.Tensor) -> list[tuple[int, _Plan]]:
    for t, first in zip(sources, first_blocks, strict=True):
        if not t.is_contiguous():
            raise ValueError("block_sums_many reads sources in place: make them contiguous")
        if first < 0 or first + blocks_of(t.nbytes) > out.shape[1]:
            raise ValueError(f"blocks {first}..{first + blocks_of(t.nbytes)} of a source "
                             f"fall outside out's {out.shape[1]} columns")
    plans = []
    for lanes in (1, 8):
        picked = [i for i, t in enumerate(sources)
                  if t.nbytes and _word_aligned(t) == (lanes == 1)]
        if picked:
            plans.append((lanes, _Plan([sources[i] for i in picked],
                                       [first_blocks[i] for i in picked], lanes,
                                       _ROWS[lanes], out.device)))
    return plans


def block_sums_many(sources: list[torch.Tensor], first_blocks: list[int],
                    out: torch.Tensor) -> None:
    """Write the two sums of every 4 KiB block of each source into `out` (module
    docstring); one or two kernel launches however many sources there are."""
    if triton is None:
        raise RuntimeError("triton is not installed: GPU snapshot checksums need it")
    if out.dtype != torch.int64 or out.dim() != 2 or out.shape[0] != 2 \
            or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous 2 x N int64 tensor, got "
                         f"{out.dtype} {tuple(out.shape)}")
    # The same tensors at the same places step after step: checked and planned once.
    key = (out.shape[1], out.device, tuple(first_blocks),
           tuple([t.data_ptr() for t in sources]), tuple([t.nbytes for t in sources]),
           tuple([t.is_contiguous() for t in sources]))
    plans = _plans.get(key)
    if plans is None:
        if len(_plans) > 64:
            _plans.clear()
        plans = _plans[key] = _make_plans(sources, first_blocks, out)
    for lanes, plan in plans:
        _block_sums_kernel[(plan.num_programs,)](
            plan.addrs, plan.n_items, plan.dst_first, plan.prog_tensor, plan.prog_block,
            out, out.shape[1], LANES=lanes, ROWS=_ROWS[lanes], WORDS=BLOCK_WORDS, num_warps=4)
