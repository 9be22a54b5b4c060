"""Per-step in-memory snapshots (checkpoint/snapshot.py): double buffering, private copies
and checksums verified on restore.

Checked through the public API, and against a naive model: a dict of deep copies of the
two newest captured steps, with each tensor's checksum computed here from its definition
(two wrapping sums over little-endian 64-bit words, numpy and plain Python ints). What
the checksum detects is checked exhaustively where small (every bit of a tensor) and over
random positions where large (across rows, blocks and chunks of the flat buffer).
Corruption is injected by flipping bits of a tensor the ring holds (`ring.buffers`).
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from splice.checkpoint import snapshot as snapshot_module
from splice.checkpoint.snapshot import (
    SnapshotCorrupt,
    SnapshotMissing,
    SnapshotRing,
    checksums_of,
    tensor_bytes,
)


def make_state(step: int, size: int = 4) -> dict[str, Any]:
    """A training state whose every value is determined by `step`."""
    return {
        "model": {"w": torch.full((size, 3), float(step)), "b": torch.arange(3) + step},
        "optim": [torch.full((2,), step * 0.5), {"lr": 0.1 * step, "betas": (0.9, 0.99)}],
        "rng": torch.tensor([step % 256, 7], dtype=torch.uint8),
        "cursor": {"sample": step * 32, "seed": 1234},
    }


def assert_same(a: Any, b: Any) -> None:
    assert type(a) is type(b), (type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    else:
        assert a == b


def tensors(tree: Any) -> list[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):
        return [t for v in tree.values() for t in tensors(v)]
    if isinstance(tree, (list, tuple)):
        return [t for v in tree for t in tensors(v)]
    return []


M64 = (1 << 64) - 1


def raw(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def checksum_py(data: bytes) -> int:
    """The definition, over Python ints: S1 = sum w_i, S2 = sum (i+1) w_i, mod 2^64, of
    the little-endian 64-bit words of `data` zero-padded; S1 * 2^64 + S2."""
    data += b"\0" * (-len(data) % 8)
    words = [int.from_bytes(data[i:i + 8], "little") for i in range(0, len(data), 8)]
    s1 = sum(words) & M64
    s2 = sum((i + 1) * w for i, w in enumerate(words)) & M64
    return (s1 << 64) | s2


def checksum_np(data: bytes) -> int:
    """The same definition with numpy's wrapping uint64 arithmetic (fast: large tensors)."""
    data += b"\0" * (-len(data) % 8)
    w = np.frombuffer(data, dtype="<u8")
    s1 = int(w.sum(dtype=np.uint64))
    s2 = int((w * np.arange(1, len(w) + 1, dtype=np.uint64)).sum(dtype=np.uint64))
    return (s1 << 64) | s2


def crc(t: torch.Tensor) -> int:
    """The oracle for one tensor (name kept from the CRC-32 days: a tensor's checksum)."""
    return checksum_np(raw(t))


def expected_checksums(tree: Any, path: str = "") -> dict[str, int]:
    """The oracle: the checksum of each tensor's bytes by dotted path, computed here."""
    if isinstance(tree, torch.Tensor):
        return {path: crc(tree)}
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) \
        if isinstance(tree, (list, tuple)) else []
    return {p: c for k, v in items
            for p, c in expected_checksums(v, f"{path}.{k}" if path else str(k)).items()}


def flip_byte(t: torch.Tensor, index: int) -> None:
    raw = t.view(-1).view(torch.uint8)
    raw[index] ^= 0x10


def test_empty_ring() -> None:
    ring = SnapshotRing()
    assert ring.steps() == [] and ring.num_bytes == 0
    with pytest.raises(SnapshotMissing, match="step 0"):
        ring.restore(0)


def test_keeps_the_two_newest_steps_and_the_older_survives_the_newer_capture() -> None:
    ring = SnapshotRing()
    for s in range(1, 6):
        ring.capture(s, make_state(s))
        assert ring.steps() == ([s - 1, s] if s > 1 else [1])
        assert_same(ring.restore(s - 1 if s > 1 else 1), make_state(s - 1 if s > 1 else 1))
    with pytest.raises(SnapshotMissing, match=r"held: \[4, 5\]"):
        ring.restore(3)


def test_capture_copies_so_later_training_does_not_change_the_snapshot() -> None:
    ring = SnapshotRing()
    state = make_state(1)
    ring.capture(1, state)
    state["model"]["w"].add_(100.0)
    state["optim"][1]["lr"] = 99.0
    state["cursor"]["sample"] = -1
    assert_same(ring.restore(1), make_state(1))


def test_restore_returns_private_copies() -> None:
    ring = SnapshotRing()
    ring.capture(1, make_state(1))
    ring.capture(2, make_state(2))
    first = ring.restore(2)
    second = ring.restore(2)
    ptrs = {t.untyped_storage().data_ptr() for t in tensors(first)}
    assert ptrs.isdisjoint(t.untyped_storage().data_ptr() for t in tensors(second))
    for t in tensors(first):
        t.fill_(0)  # the caller trains on the restored state...
    first["optim"][1]["lr"] = 0.0
    first["cursor"]["sample"] = 0
    ring.capture(3, make_state(3))  # ...and the ring reuses the buffers of step 1 for step 3
    assert_same(ring.restore(2), make_state(2))
    assert_same(second, make_state(2))
    assert_same(ring.restore(3), make_state(3))


def test_restored_copy_survives_the_slot_being_overwritten() -> None:
    ring = SnapshotRing()
    ring.capture(1, make_state(1))
    kept = ring.restore(1)
    ring.capture(2, make_state(2))
    ring.capture(3, make_state(3))  # overwrites the slot step 1 lived in
    assert_same(kept, make_state(1))


def test_rollback_then_recapture_of_the_same_step_is_a_no_op() -> None:
    ring = SnapshotRing()
    ring.capture(4, make_state(4))
    ring.capture(5, make_state(5))
    ring.discard_after(4)  # the new membership resumes at step 4
    assert ring.steps() == [4]
    ring.capture(4, make_state(999))  # the hook captures "before step 4" again
    assert_same(ring.restore(4), make_state(4))
    ring.capture(5, make_state(55))  # the re-run step 5 must not overwrite step 4
    assert ring.steps() == [4, 5]
    assert_same(ring.restore(4), make_state(4))
    assert_same(ring.restore(5), make_state(55))


def test_discard_after_forgets_newer_steps() -> None:
    ring = SnapshotRing()
    ring.capture(7, make_state(7))
    ring.capture(8, make_state(8))
    ring.discard_after(8)
    assert ring.steps() == [7, 8]
    ring.discard_after(6)
    assert ring.steps() == [] and ring.num_bytes == 0
    with pytest.raises(SnapshotMissing):
        ring.restore(7)


def test_capturing_an_older_step_is_an_invariant_violation() -> None:
    ring = SnapshotRing()
    ring.capture(5, make_state(5))
    with pytest.raises(AssertionError):
        ring.capture(4, make_state(4))


def test_num_bytes_counts_complete_snapshots() -> None:
    ring = SnapshotRing()
    one = tensor_bytes(make_state(1))
    assert one == 4 * 3 * 4 + 3 * 8 + 2 * 4 + 2 * 1
    ring.capture(1, make_state(1))
    assert ring.num_bytes == one
    ring.capture(2, make_state(2, size=10))
    assert ring.num_bytes == one + tensor_bytes(make_state(2, size=10))
    ring.discard_after(1)
    assert ring.num_bytes == one


def test_snapshot_is_detached_from_autograd() -> None:
    ring = SnapshotRing()
    w = torch.ones(3, requires_grad=True)
    ring.capture(1, {"w": w})
    restored = ring.restore(1)["w"]
    assert not restored.requires_grad
    assert torch.equal(restored, torch.ones(3))


# ---- checksums ------------------------------------------------------------------------------

def test_checksums_are_the_defined_sums_of_each_tensor_by_path() -> None:
    ring = SnapshotRing()
    ring.capture(1, make_state(1))
    sums = ring.checksums(1)
    assert sums == expected_checksums(make_state(1))
    assert set(sums) == {"model.w", "model.b", "optim.0", "rng"}
    ring.verify(1)


def test_a_flipped_byte_in_a_held_slot_is_caught_on_restore_naming_the_tensor() -> None:
    ring = SnapshotRing()
    ring.capture(2, make_state(2))
    ring.capture(3, make_state(3))
    ring.checksums(3)  # the background checksum has read the slot: corruption from here on
    flip_byte(ring.buffers(3)["model.w"], 5)
    with pytest.raises(SnapshotCorrupt, match=r"step 3 is corrupt: 1 of 4 tensors "
                                              r"changed since capture: model\.w \(recorded"):
        ring.restore(3)
    # A corrupt snapshot is not held any more: callers that treat it as missing move on.
    assert issubclass(SnapshotCorrupt, SnapshotMissing)
    assert ring.steps() == [2]
    with pytest.raises(SnapshotMissing, match="held: \\[2\\]"):
        ring.restore(3)
    assert_same(ring.restore(2), make_state(2))


def test_verify_checks_in_place_and_names_every_changed_tensor() -> None:
    ring = SnapshotRing()
    state = {"model": {"layer": {"weight": torch.randn(64, 64), "bias": torch.randn(64)}},
             "optimizer": {"state": {0: {"exp_avg": torch.randn(64, 64)}}}}
    ring.capture(7, state)
    ring.verify(7)
    held = ring.buffers(7)
    assert set(held) == {"model.layer.weight", "model.layer.bias", "optimizer.state.0.exp_avg"}
    flip_byte(held["model.layer.weight"], 4 * 64 * 64 - 1)  # the very last byte
    flip_byte(held["optimizer.state.0.exp_avg"], 0)  # the very first
    with pytest.raises(SnapshotCorrupt) as err:
        ring.verify(7)
    message = str(err.value)
    assert "step 7" in message and "2 of 3 tensors" in message
    assert "model.layer.weight" in message and "optimizer.state.0.exp_avg" in message
    assert "model.layer.bias" not in message
    assert "peer" in message  # says what to do next
    assert ring.steps() == []


def test_an_intact_ring_restores_bit_exactly() -> None:
    g = torch.Generator().manual_seed(0)
    bits = torch.randint(-2**31, 2**31, (4096,), generator=g, dtype=torch.int64)
    state = {  # arbitrary bit patterns, NaN payloads and signed zeros included
        "f32": bits.to(torch.int32).view(torch.float32),
        "bf16": bits[:1000].to(torch.int16).view(torch.bfloat16),
        "f64": bits.view(torch.float64),
        "mask": bits[:77] % 2 == 0,
        "step": torch.tensor(3.0),
        "empty": torch.empty(0, 5),
        "strided": torch.arange(24.0).reshape(4, 6).t(),
    }
    ring = SnapshotRing()
    ring.capture(1, state)
    ring.capture(2, {k: v.clone() for k, v in state.items()})
    for step in (1, 2):
        ring.verify(step)
        got = ring.restore(step)
        for k, v in state.items():
            assert got[k].dtype == v.dtype and got[k].shape == v.shape
            assert crc(got[k]) == crc(v), k
            assert torch.equal(got[k].reshape(-1).view(torch.uint8),
                               v.contiguous().reshape(-1).view(torch.uint8)), k
        assert ring.checksums(step) == expected_checksums(state)


def test_each_slot_keeps_its_own_checksums_through_the_rotation() -> None:
    ring = SnapshotRing()
    ring.capture(1, make_state(1))
    ring.capture(2, make_state(2))
    of_two = ring.checksums(2)
    assert of_two == expected_checksums(make_state(2)) != ring.checksums(1)
    ring.capture(3, make_state(3))  # reuses the buffers of step 1
    assert ring.checksums(2) == of_two
    assert ring.checksums(3) == expected_checksums(make_state(3))
    flip_byte(ring.buffers(2)["optim.0"], 1)  # the older slot goes bad...
    assert_same(ring.restore(3), make_state(3))  # ...the newer one is unaffected
    with pytest.raises(SnapshotCorrupt, match=r"step 2 .*optim\.0"):
        ring.restore(2)
    ring.capture(4, make_state(4))  # overwrites the forgotten slot with fresh checksums
    assert ring.steps() == [3, 4]
    for s in (3, 4):
        ring.verify(s)
        assert ring.checksums(s) == expected_checksums(make_state(s))


def test_checksums_of_a_step_not_held_is_missing() -> None:
    ring = SnapshotRing()
    ring.capture(1, make_state(1))
    for call in (ring.checksums, ring.verify, ring.buffers):
        with pytest.raises(SnapshotMissing, match="step 2"):
            call(2)


# ---- what the checksum detects ---------------------------------------------------------------

def random_bytes(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def as_tensor(data: bytes) -> torch.Tensor:
    if not data:
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).clone()


def test_the_definition_two_ways_and_the_ring_agree() -> None:
    for n in (0, 1, 7, 8, 9, 255, 4096, 4097, 40_000):
        data = random_bytes(n, n)
        assert checksum_py(data) == checksum_np(data), n
        assert checksums_of([as_tensor(data)]) == [checksum_py(data)], n
    assert checksum_py(b"") == 0
    assert checksum_py((3).to_bytes(8, "little")) == (3 << 64) | 3  # S1 = 3, S2 = 1*3
    two = (5).to_bytes(8, "little") + (7).to_bytes(8, "little")
    assert checksum_py(two) == (12 << 64) | (5 + 2 * 7)
    # The tail is zero-padded: 3 bytes are the word 0x030201.
    assert checksum_py(b"\x01\x02\x03") == (0x030201 << 64) | 0x030201


def test_checksum_depends_only_on_the_bytes_not_on_dtype_strides_or_layout() -> None:
    g = torch.Generator().manual_seed(1)
    base = torch.randn(6, 10, generator=g)
    variants = [base, base.t().contiguous().t(), base.view(torch.int32), base.reshape(60),
                base.view(torch.uint8)]
    assert len(set(checksums_of(variants))) == 1
    # Whatever the chunks of the flat buffer's passes, the values are the same.
    tensors = [torch.randn(n, generator=g) for n in (1, 100, 3000, 70_000)] + [
        torch.randint(0, 255, (4099,), dtype=torch.uint8, generator=g)]
    want = [crc(t) for t in tensors]
    for chunk in (1, 3, 512, 100_000):
        layout = snapshot_module._Layout([(t.shape, t.dtype) for t in tensors], chunk)
        for view, t in zip(layout.flat_views, tensors, strict=True):
            view.copy_(t)
        assert layout.sums() == want, chunk
    # Read in place (large contiguous tensors) or copied into a flat buffer: the same.
    strided = [torch.stack([t, t])[1] for t in tensors]  # views at an offset
    ragged = [t.view(torch.uint8)[1:] for t in tensors if t.dtype == torch.float32]
    assert checksums_of(tensors) == checksums_of([t.clone() for t in tensors]) == want
    assert checksums_of(strided) == want
    assert checksums_of(ragged) == [crc(t.clone()) for t in ragged]


def test_extreme_words_wrap_mod_2_64_as_defined() -> None:
    words = torch.tensor([-1, -(2**63), 2**63 - 1, 1, -1, -1] * 700, dtype=torch.int64)
    assert checksums_of([words]) == [checksum_py(raw(words))]


def flipped(data: bytes, bit: int) -> bytes:
    out = bytearray(data)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


def test_every_single_bit_flip_changes_the_checksum_exhaustively() -> None:
    """Why it must: flipping bit b of word i adds +-2^b to w_i, so S1 moves by +-2^b, which
    is not 0 mod 2^64 for b < 64. Checked for every bit of a 3-block tensor with a ragged
    tail (on the ring's own implementation, 2048 flips per batch)."""
    data = random_bytes(2 * 4096 + 5, 7)
    want = checksum_py(data)
    assert checksum_py(flipped(data, 8 * len(data) - 1)) != want  # the oracle agrees
    base = as_tensor(data)
    for first in range(0, 8 * len(data), 4096):
        bits = torch.arange(first, min(first + 4096, 8 * len(data)))
        copies = base.repeat(len(bits), 1)
        copies[torch.arange(len(bits)), bits // 8] ^= (1 << (bits % 8)).to(torch.uint8)
        assert want not in checksums_of(list(copies))


def test_single_bit_flips_at_random_positions_of_a_large_tensor() -> None:
    t = torch.randn(1_100_000)  # 4.4 MB: several chunks of the flat buffer
    want = crc(t)
    rng = random.Random(3)
    for _ in range(100):
        bit = rng.randrange(8 * t.numel() * 4)
        damaged = t.clone()
        damaged.view(torch.uint8)[bit // 8] ^= 1 << (bit % 8)
        assert checksums_of([damaged]) != [want], bit


def signed(word: int) -> int:
    return word - (1 << 64) if word >= 1 << 63 else word


def test_any_change_confined_to_one_word_is_detected() -> None:
    """S1 moves by the word's difference, never 0 mod 2^64 when the word changed: every
    non-zero XOR mask on any one word, including all 64 bits at once, and any new value
    for the bytes of a ragged last word."""
    rng = random.Random(5)
    words = torch.tensor([signed(rng.getrandbits(64)) for _ in range(5001)],
                         dtype=torch.int64)
    want = crc(words)
    masks = [M64, 1 << 63, (1 << 63) | 1, 0xFFFFFFFF00000000] + [
        rng.randrange(1, 1 << 64) for _ in range(150)]
    damaged = []
    for mask in masks:
        t = words.clone()
        t[rng.randrange(t.numel())] ^= signed(mask)
        damaged.append(t)
    assert all(c != want for c in checksums_of(damaged))
    data = random_bytes(8 * 100 + 3, 12)
    tails = [data[:-3] + bytes(rng.getrandbits(8) for _ in range(3)) for _ in range(100)]
    got = checksums_of([as_tensor(d) for d in tails if d != data])
    assert checksum_py(data) not in got


def swapped(t: torch.Tensor, i: int, j: int) -> torch.Tensor:
    w = t.clone().view(torch.int64)
    w[i], w[j] = w[j].clone(), w[i].clone()
    return w.view(t.dtype)


def v2(x: int) -> int:
    return (x & -x).bit_length() - 1


def test_swapped_words_are_detected_as_the_docstring_says() -> None:
    """A swap of words i < j moves S2 by (w_i - w_j)(j - i), so it is caught unless
    v2(w_i - w_j) + v2(j - i) >= 64. Random words differ in their low bits: every random
    swap is caught; the exceptions need words equal in all their low bits."""
    g = torch.Generator().manual_seed(2)
    t = torch.randn(2 * 60_000, generator=g, dtype=torch.float32)
    want = crc(t)
    rng = random.Random(9)
    pairs = [(0, 1), (0, 59_999), (123, 124)] + [
        tuple(sorted(rng.sample(range(60_000), 2))) for _ in range(200)]
    got = checksums_of([swapped(t, i, j) for i, j in pairs])
    assert all(c != want for c in got)


def test_sign_swaps_caught_at_odd_distances_and_the_documented_exception() -> None:
    """float64 x and -x differ only in bit 63: swapping them moves S2 by 2^63 * (j - i),
    caught at every odd distance, missed at even ones (as the module docstring says)."""
    x = torch.full((64,), 1.5, dtype=torch.float64)
    x[1::2] = -1.5
    want = crc(x)
    for i, j in ((0, 1), (0, 3), (10, 33), (62, 63)):
        assert checksums_of([swapped(x, i, j)]) != [want], (i, j)
    assert checksums_of([swapped(x, 0, 5)]) != [want]
    assert checksums_of([swapped(x, 1, 4)]) != [want]
    assert checksums_of([swapped(x, 0, 2)]) == [want]  # same values: not a change
    x[2] = -1.5
    assert checksums_of([swapped(x, 0, 2)]) == [crc(x)]  # the documented blind spot
    # The exact condition, on random pairs of words differing only in their top bits.
    rng = random.Random(4)
    for _ in range(200):
        top = rng.randrange(1, 12)
        low = rng.randrange(1 << (64 - top))
        a = ((rng.randrange(1 << top) << (64 - top)) | low)
        b = ((rng.randrange(1 << top) << (64 - top)) | low)
        if a == b:
            continue
        n = 4096
        i, j = sorted(rng.sample(range(n), 2))
        w = torch.zeros(n, dtype=torch.int64)
        w[i], w[j] = signed(a), signed(b)
        caught = v2(a - b) + v2(j - i) < 64
        assert (checksums_of([swapped(w, i, j)]) != checksums_of([w])) == caught, (i, j)


def test_a_flip_in_any_tensor_of_a_real_state_is_named_on_restore() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(32, 256), torch.nn.Linear(256, 3))
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 32)).sum().backward()
    opt.step()
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(),
             "rng": torch.get_rng_state(), "step": 1}
    rng = random.Random(1)
    for path in list(expected_checksums(state)):
        ring = SnapshotRing()
        ring.capture(1, state)
        held = ring.buffers(1)[path]
        raw_bytes = held.view(-1).view(torch.uint8)
        raw_bytes[rng.randrange(raw_bytes.numel())] ^= 1 << rng.randrange(8)
        with pytest.raises(SnapshotCorrupt, match=rf"1 of \d+ tensors changed since "
                                                  rf"capture: {path} \(recorded"):
            ring.restore(1)


def test_checksums_in_the_background_thread_give_the_same_results() -> None:
    ring = SnapshotRing(checksum_in_background=True)
    inline = SnapshotRing()
    for s in range(1, 5):
        ring.capture(s, make_state(s, size=300))
        inline.capture(s, make_state(s, size=300))
    assert ring.steps() == [3, 4]
    for s in (3, 4):
        assert ring.checksums(s) == inline.checksums(s) == expected_checksums(
            make_state(s, size=300))
        assert_same(ring.restore(s), make_state(s, size=300))
    flip_byte(ring.buffers(4)["model.w"], 17)
    with pytest.raises(SnapshotCorrupt, match=r"step 4 .*model\.w"):
        ring.verify(4)
    assert ring.steps() == [3]


def test_a_state_whose_shapes_change_gets_a_new_layout_and_right_checksums() -> None:
    ring = SnapshotRing()
    ring.capture(1, {"w": torch.ones(3)})
    ring.capture(2, {"w": torch.ones(3)})
    ring.capture(3, {"w": torch.ones(3), "m": torch.zeros(5000)})  # optimizer state appears
    ring.capture(4, {"w": torch.ones(3, dtype=torch.float64), "m": torch.zeros(5000)})
    ring.capture(5, {"w": torch.full((3,), 2.0, dtype=torch.float64), "m": torch.ones(5000)})
    assert ring.steps() == [4, 5]
    assert ring.checksums(5) == expected_checksums(
        {"w": torch.full((3,), 2.0, dtype=torch.float64), "m": torch.ones(5000)})
    assert_same(ring.restore(4), {"w": torch.ones(3, dtype=torch.float64),
                                  "m": torch.zeros(5000)})


# ---- against a naive model ----------------------------------------------------------------

ops = st.lists(st.one_of(
    st.tuples(st.just("capture"), st.integers(0, 2), st.integers(1, 6)),  # step delta, size
    st.tuples(st.just("discard"), st.integers(-2, 1), st.just(0)),        # below newest
), min_size=1, max_size=25)


@settings(max_examples=60, deadline=None)
@given(ops)
def test_ring_matches_naive_two_newest_model(script: list[tuple[str, int, int]]) -> None:
    ring = SnapshotRing()
    model: dict[int, dict[str, Any]] = {}
    newest = 0
    for op, arg, size in script:
        if op == "capture":
            step = newest + arg
            newest = step
            state = make_state(step + 1000 * size, size=size)
            ring.capture(step, state)
            if step not in model:
                if len(model) == 2:
                    del model[min(model)]
                model[step] = make_state(step + 1000 * size, size=size)
            state["model"]["w"].fill_(-1)  # training moves on in place
        else:
            bound = newest + arg
            ring.discard_after(bound)
            model = {s: v for s, v in model.items() if s <= bound}
            newest = max(model, default=newest)
        assert ring.steps() == sorted(model)
        for s, want in model.items():
            assert_same(ring.restore(s), want)
            assert ring.checksums(s) == expected_checksums(want)
        assert ring.num_bytes == sum(tensor_bytes(v) for v in model.values())
