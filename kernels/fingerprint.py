"""Position-sensitive 32-bit fingerprints of tensors, exact on every device.

A snapshot must carry a checksum that a restore verifies, and on a GPU the checksum has to
run at memory speed beside training. A plain sum misses swapped elements and a CRC is a
serial chain; this fingerprint is a sum of independent per-word terms, so any block
schedule (Triton programs, CPU chunks, a Python loop) gives the same number:

    words   w_i = the tensor's row-major bytes read as little-endian uint32, zero-padded
    term    t_i = mix(w_i XOR (i * KEY mod 2^32))        mix: a bijective 32-bit mixer
    result      = (sum_i t_i + mix(nbytes * KEY2)) mod 2^32

`mix` is bijective, so changing any single word (e.g. flipping any one bit) always changes
the result; the key makes the term depend on the position, so swapping two different
words changes the result except with probability ~2^-32; the length term separates a
tensor from the same tensor with zero padding. Positions are taken mod 2^32 words (16 GiB).
Dtypes are irrelevant: float32, bfloat16, float16, ints are all just bytes.

Three implementations agree bit for bit: `fingerprint_reference` (pure Python ints, the
oracle for tests), `fingerprint_cpu` (vectorised torch int64 ops, chunked so temporaries
stay small) and `fingerprint_triton` (a Triton kernel: on CUDA, or on CPU tensors under
TRITON_INTERPRET=1). `torch.ops.splice.fingerprint(t)` dispatches to the CPU or CUDA one
and returns a 0-dim int64 tensor on `t`'s device, so a GPU caller never has to sync.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

MASK32 = 0xFFFFFFFF
# Odd constants below 2^31: products with a 32-bit word stay below 2^63, so the int64 CPU
# path is exact without relying on signed overflow. M1/M2 and the shifts are the
# "lowbias32" mixer found by hash-prospector (bias 0.107).
KEY = 0x61C88647
KEY2 = 0x2545F491
M1 = 0x21F0AAAD
M2 = 0x735A2D97
CPU_CHUNK_WORDS = 1 << 20  # 4 MiB of source per chunk: int64 temporaries stay cache-sized

try:  # Triton is optional: CPU-only installs fingerprint with torch ops
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on machines without triton
    triton = None


def _mix_py(x: int) -> int:
    x &= MASK32
    x ^= x >> 16
    x = (x * M1) & MASK32
    x ^= x >> 15
    x = (x * M2) & MASK32
    x ^= x >> 15
    return x


def length_term(nbytes: int) -> int:
    return _mix_py(nbytes * KEY2)


def _flat_bytes(t: torch.Tensor) -> torch.Tensor:
    """The tensor's row-major bytes as a 1-D uint8 view (a copy only if not contiguous)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def fingerprint_reference(t: torch.Tensor) -> int:
    """Obvious, slow oracle: the definition above over Python ints."""
    data = bytes(_flat_bytes(t).cpu().tolist())
    nbytes = len(data)
    data += b"\0" * (-nbytes % 4)
    total = 0
    for i in range(len(data) // 4):
        word = int.from_bytes(data[4 * i:4 * i + 4], "little")
        total += _mix_py(word ^ ((i * KEY) & MASK32))
    return (total + length_term(nbytes)) & MASK32


def _mix_t(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = (x * M1) & MASK32
    x = x ^ (x >> 15)
    x = (x * M2) & MASK32
    return x ^ (x >> 15)


def _words_i64(raw: torch.Tensor) -> torch.Tensor:
    """uint8 bytes (any length, any alignment) -> uint32 words held in int64."""
    pad = -raw.numel() % 4
    if pad:
        raw = torch.cat([raw, raw.new_zeros(pad)])
    if raw.storage_offset() % 4 or raw.data_ptr() % 4:
        raw = raw.clone()
    return raw.view(torch.int32).to(torch.int64) & MASK32


def partial_sum_cpu(raw: torch.Tensor, first_word: int) -> int:
    """Sum of the terms of `raw` (bytes whose first word has index `first_word`), unreduced
    mod 2^32. `raw` must start on a word boundary of the whole tensor."""
    total = 0
    for start in range(0, raw.numel(), 4 * CPU_CHUNK_WORDS):
        words = _words_i64(raw[start:start + 4 * CPU_CHUNK_WORDS])
        first = first_word + start // 4
        pos = torch.arange(first, first + words.numel(), dtype=torch.int64) & MASK32
        total += int(_mix_t(words ^ ((pos * KEY) & MASK32)).sum())
    return total


def fingerprint_cpu(t: torch.Tensor) -> int:
    raw = _flat_bytes(t.cpu() if t.device.type != "cpu" else t)
    return (partial_sum_cpu(raw, 0) + length_term(raw.numel())) & MASK32


# ---- Triton ------------------------------------------------------------------------------
BLOCK_WORDS = 4096
NUM_WARPS = 8

if triton is not None:
    @triton.jit
    def _mix_tl(x):
        x ^= x >> 16
        x *= 0x21F0AAAD
        x ^= x >> 15
        x *= 0x735A2D97
        x ^= x >> 15
        return x

    @triton.jit
    def lanes_to_word(part, lane, LANES: tl.constexpr):
        """Little-endian uint32 words from [BLOCK, LANES] int16 or uint8 items."""
        bits = part.to(tl.uint32) & ((1 << (32 // LANES)) - 1)
        return tl.sum(bits << (lane[None, :] * (32 // LANES)).to(tl.uint32), axis=1)

    @triton.jit
    def load_words(src, w, n_items, LANES: tl.constexpr):
        """Words `w` of a buffer viewed as int32 (LANES=1), int16 (2) or uint8 (4)."""
        if LANES == 1:
            word = tl.load(src + w, mask=w < n_items, other=0).to(tl.uint32, bitcast=True)
        else:
            lane = tl.arange(0, LANES)
            item = w[:, None] * LANES + lane[None, :]
            part = tl.load(src + item, mask=item < n_items, other=0)
            word = lanes_to_word(part, lane, LANES)
        return word

    @triton.jit
    def term(word, w, n_words):
        """A word's fingerprint term, 0 past the end."""
        key = w.to(tl.uint32) * 0x61C88647
        return tl.where(w < n_words, _mix_tl(word ^ key), 0)

    @triton.jit
    def _fingerprint_kernel(src, partials, n_items, n_words, LANES: tl.constexpr,
                            BLOCK: tl.constexpr, WIDE: tl.constexpr):
        pid = tl.program_id(0)
        if WIDE:  # 64-bit offsets only past 2^31 items: 32-bit index math is cheaper
            w = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        else:
            w = pid * BLOCK + tl.arange(0, BLOCK)
        word = load_words(src, w, n_items, LANES)
        total = tl.sum(term(word, w, n_words), axis=0)
        tl.store(partials + pid, total.to(tl.int32, bitcast=True))


_LANE_DTYPES = {1: torch.int32, 2: torch.int16, 4: torch.uint8}


def lanes_for(t: torch.Tensor) -> int:
    """Items per word a kernel can read `t` in: 1 (int32, the fast path) when its bytes are
    word-sized and aligned, else 2 (int16) or 4 (uint8)."""
    raw = _flat_bytes(t)
    for lanes in (1, 2):
        size = 4 // lanes
        if raw.numel() % size == 0 and raw.storage_offset() % size == 0 \
                and raw.data_ptr() % size == 0:
            return lanes
    return 4


def lane_view(t: torch.Tensor, lanes: int) -> torch.Tensor:
    """`t`'s bytes as a flat view of the integer type with `lanes` items per word (a view
    of `t` itself when `t` is contiguous, so kernels can write through it)."""
    return _flat_bytes(t).view(_LANE_DTYPES[lanes])


def launch_grid(n_words: int) -> tuple[int]:
    return (max(1, triton.cdiv(n_words, BLOCK_WORDS)),)


def finish(partials: torch.Tensor, nbytes: int) -> torch.Tensor:
    """Reduce per-program partial sums (int32 bit patterns) to the fingerprint, on device."""
    total = partials.to(torch.int64).sum() + length_term(nbytes)
    return total & MASK32


def fingerprint_triton(t: torch.Tensor) -> torch.Tensor:
    """The Triton kernel; CUDA tensors, or CPU tensors under TRITON_INTERPRET=1."""
    if triton is None:
        raise RuntimeError("triton is not installed; use fingerprint_cpu")
    lanes = lanes_for(t)
    view = lane_view(t, lanes)
    nbytes = view.numel() * view.element_size()
    n_words = -(-nbytes // 4)
    grid = launch_grid(n_words)
    partials = torch.zeros(grid[0], dtype=torch.int32, device=view.device)
    if n_words:
        _fingerprint_kernel[grid](view, partials, view.numel(), n_words, LANES=lanes,
                                  BLOCK=BLOCK_WORDS, WIDE=view.numel() >= 2**31 - BLOCK_WORDS,
                                  num_warps=NUM_WARPS)
    return finish(partials, nbytes)


if triton is not None:
    @triton.jit
    def _fingerprint_many_kernel(addrs, words, block_tensor, block_start, partials,
                                 BLOCK: tl.constexpr):
        """One program per (tensor, block) pair: many small tensors in one launch."""
        pid = tl.program_id(0)
        tid = tl.load(block_tensor + pid)
        src = tl.load(addrs + tid).to(tl.pointer_type(tl.int32))
        n_words = tl.load(words + tid)
        w = tl.load(block_start + pid) + tl.arange(0, BLOCK)
        word = tl.load(src + w, mask=w < n_words, other=0).to(tl.uint32, bitcast=True)
        total = tl.sum(term(word, w, n_words), axis=0)
        tl.store(partials + pid, total.to(tl.int32, bitcast=True))


class _Plan:
    """Device-side tables for one set of tensors (cached: a model's buffers keep their
    addresses from step to step, so the tables are built once)."""

    def __init__(self, views: list[torch.Tensor], device: torch.device) -> None:
        words = [v.numel() for v in views]
        blocks = [max(1, -(-n // BLOCK_WORDS)) for n in words]
        owner = [i for i, b in enumerate(blocks) for _ in range(b)]
        start = [k * BLOCK_WORDS for b in blocks for k in range(b)]
        dev = dict(dtype=torch.int64, device=device)
        self.addrs = torch.tensor([v.data_ptr() for v in views], **dev)
        self.words = torch.tensor(words, **dev)
        self.block_tensor = torch.tensor(owner, dtype=torch.int32, device=device)
        self.owner = self.block_tensor.to(torch.int64)
        self.block_start = torch.tensor(start, dtype=torch.int32, device=device)
        self.lengths = torch.tensor([length_term(4 * n) for n in words], **dev)


_plans: dict[tuple[int, ...], _Plan] = {}


def fingerprint_many(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Fingerprints of many tensors of one device as an int64 tensor on that device. On
    CUDA the word-aligned ones (nearly all) go through one kernel launch: per-tensor
    launches cost ~0.2 ms of host time each, which a 600-tensor model state cannot afford."""
    if not tensors:
        return torch.zeros(0, dtype=torch.int64)
    device = tensors[0].device
    if device.type != "cuda" or triton is None:
        return torch.stack([torch.ops.splice.fingerprint(t) for t in tensors])
    batched = [i for i, t in enumerate(tensors) if t.is_contiguous() and lanes_for(t) == 1]
    out = torch.empty(len(tensors), dtype=torch.int64, device=device)
    for i in sorted(set(range(len(tensors))) - set(batched)):
        out[i] = fingerprint_triton(tensors[i])
    if batched:
        views = [lane_view(tensors[i], 1) for i in batched]
        key = tuple(x for v in views for x in (v.data_ptr(), v.numel()))
        plan = _plans.get(key)
        if plan is None:
            if len(_plans) > 64:
                _plans.clear()
            plan = _plans[key] = _Plan(views, device)
        partials = torch.empty(plan.owner.numel(), dtype=torch.int32, device=device)
        _fingerprint_many_kernel[(plan.owner.numel(),)](
            plan.addrs, plan.words, plan.block_tensor, plan.block_start, partials,
            BLOCK=BLOCK_WORDS, num_warps=NUM_WARPS)
        sums = torch.zeros(len(views), dtype=torch.int64, device=device)
        sums.index_add_(0, plan.owner, partials.to(torch.int64))
        sums = (sums + plan.lengths) & MASK32
        if len(batched) == len(tensors):
            return sums
        out[torch.tensor(batched, device=device)] = sums
    return out


# ---- the custom op -----------------------------------------------------------------------
@torch.library.custom_op("splice::fingerprint", mutates_args=(), device_types="cpu")
def fingerprint(t: torch.Tensor) -> torch.Tensor:
    """Fingerprint of `t` as a 0-dim int64 tensor on `t`'s device (value < 2^32)."""
    return torch.tensor(fingerprint_cpu(t), dtype=torch.int64)


@fingerprint.register_kernel("cuda")
def _fingerprint_cuda(t: torch.Tensor) -> torch.Tensor:
    return fingerprint_triton(t)


@fingerprint.register_fake
def _fingerprint_fake(t: torch.Tensor) -> torch.Tensor:
    return t.new_empty((), dtype=torch.int64)


# ---- many buffers ------------------------------------------------------------------------
_COMBINE = 0x9E3779B97F4A7C15  # odd 64-bit multiplier for the order-sensitive combination


def combine(fingerprints: Iterable[int]) -> int:
    """One 64-bit number for an ordered list of per-buffer fingerprints."""
    h = 0
    for fp in fingerprints:
        h = ((h ^ fp) * _COMBINE + 1) & 0xFFFFFFFFFFFFFFFF
    return h


def fingerprint_tensors(tensors: Iterable[torch.Tensor]) -> int:
    """Fingerprint an ordered collection of tensors: one number per buffer, combined.
    Syncs once per device (the per-buffer results are gathered in one transfer)."""
    items = list(tensors)
    by_device: dict[torch.device, list[int]] = {}
    for i, t in enumerate(items):
        by_device.setdefault(t.device, []).append(i)
    fetched: dict[int, int] = {}
    for idx in by_device.values():
        sums = fingerprint_many([items[i] for i in idx]).tolist()
        fetched.update(zip(idx, sums, strict=True))
    return combine(fetched[i] for i in range(len(items)))


def fingerprint_module(module: torch.nn.Module) -> int:
    """Parameters and buffers of a module, in `state_dict` order."""
    return fingerprint_tensors(v for v in module.state_dict().values()
                               if isinstance(v, torch.Tensor))


def fingerprint_optimizer(optimizer: torch.optim.Optimizer) -> int:
    """Every tensor of an optimizer's state (e.g. Adam moments, step counts), ordered by
    parameter position and state key so the number is stable across processes."""
    state = optimizer.state_dict()["state"]
    return fingerprint_tensors(v for idx in sorted(state) for _, v in sorted(state[idx].items())
                               if isinstance(v, torch.Tensor))
