"""Copy a tensor and fingerprint it in one pass over the source.

A snapshot copies state and checksums it; doing both separately reads the source twice.
On CUDA one Triton kernel reads each word once, writes it to the destination and adds its
fingerprint term (the definition is in `fingerprint.py`, so the result equals
`torch.ops.splice.fingerprint(src)` bit for bit). On CPU the copy goes chunk by chunk and
each chunk is fingerprinted while it is still in cache.

`torch.ops.splice.copy_fingerprint(src, dst)` writes `dst` (same number of bytes,
contiguous; the dtypes may differ, only bytes are copied) and returns the fingerprint as a
0-dim int64 tensor on the source's device.
"""

from __future__ import annotations

import torch

from splice.kernels import fingerprint as fp

CPU_CHUNK_BYTES = 4 << 20  # a multiple of 4: chunks start on word boundaries

if fp.triton is not None:
    import triton
    import triton.language as tl

    @triton.jit
    def _copy_fingerprint_kernel(src, dst, partials, n_items, n_words, LANES: tl.constexpr,
                                 BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        w = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        if LANES == 1:
            raw = tl.load(src + w, mask=w < n_items, other=0)
            tl.store(dst + w, raw, mask=w < n_items)
            word = raw.to(tl.uint32, bitcast=True)
        else:
            lane = tl.arange(0, LANES)
            item = w[:, None] * LANES + lane[None, :]
            part = tl.load(src + item, mask=item < n_items, other=0)
            tl.store(dst + item, part, mask=item < n_items)
            word = fp.lanes_to_word(part, lane, LANES)
        total = tl.sum(fp.term(word, w, n_words), axis=0)
        tl.store(partials + pid, total.to(tl.int32, bitcast=True))


def _check(src: torch.Tensor, dst: torch.Tensor) -> None:
    src_bytes = src.numel() * src.element_size()
    dst_bytes = dst.numel() * dst.element_size()
    if src_bytes != dst_bytes:
        raise ValueError(f"copy_fingerprint: source has {src_bytes} bytes, destination "
                         f"{dst_bytes}; allocate the destination like the source")
    if not dst.is_contiguous():
        raise ValueError("copy_fingerprint: the destination must be contiguous")


def copy_fingerprint_triton(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """The fused kernel. `dst` may be device memory or pinned host memory (the kernel then
    writes over PCIe through the unified address space)."""
    _check(src, dst)
    lanes = max(fp.lanes_for(src), fp.lanes_for(dst))
    s, d = fp.lane_view(src, lanes), fp.lane_view(dst, lanes)
    nbytes = s.numel() * s.element_size()
    n_words = -(-nbytes // 4)
    grid = fp.launch_grid(n_words)
    partials = torch.zeros(grid[0], dtype=torch.int32, device=src.device)
    if n_words:
        _copy_fingerprint_kernel[grid](s, d, partials, s.numel(), n_words, LANES=lanes,
                                       BLOCK=fp.BLOCK_WORDS, num_warps=8)
    return fp.finish(partials, nbytes)


def copy_fingerprint_cpu(src: torch.Tensor, dst: torch.Tensor) -> int:
    _check(src, dst)
    s = fp._flat_bytes(src)
    d = dst.detach().reshape(-1).view(torch.uint8)
    total = 0
    for start in range(0, s.numel(), CPU_CHUNK_BYTES):
        chunk = d[start:start + CPU_CHUNK_BYTES]
        chunk.copy_(s[start:start + CPU_CHUNK_BYTES])
        total += fp.partial_sum_cpu(chunk, start // 4)
    return (total + fp.length_term(s.numel())) & fp.MASK32


@torch.library.custom_op("splice::copy_fingerprint", mutates_args=("dst",), device_types="cpu")
def copy_fingerprint(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """Copy `src`'s bytes into `dst`; return `src`'s fingerprint (0-dim int64)."""
    return torch.tensor(copy_fingerprint_cpu(src, dst), dtype=torch.int64)


@copy_fingerprint.register_kernel("cuda")
def _copy_fingerprint_cuda(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    return copy_fingerprint_triton(src, dst)


@copy_fingerprint.register_fake
def _copy_fingerprint_fake(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    return src.new_empty((), dtype=torch.int64)
