"""Fingerprint and fused copy kernels: every implementation agrees with the Python oracle,
and the fingerprint sees swaps and single bit flips. Triton runs under TRITON_INTERPRET=1
on CPU (in a subprocess: the variable is read when kernels are decorated) and natively on
a GPU when there is one."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from splice.kernels import fingerprint as fp
from splice.kernels import snapshot_copy as sc

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.uint8, torch.float64]
SIZES = [0, 1, 2, 3, 5, 1023, 4096 * 1 + 3, 3 * 4096]  # incl. non-multiples of the block
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
has_triton = importlib.util.find_spec("triton") is not None


def sample(n: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=g) * 1000).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", SIZES)
def test_custom_op_matches_reference(dtype: torch.dtype, n: int) -> None:
    t = sample(n, dtype)
    want = fp.fingerprint_reference(t)
    assert fp.fingerprint_cpu(t) == want
    got = torch.ops.splice.fingerprint(t)
    assert got.dtype == torch.int64 and got.shape == () and int(got) == want


def test_unaligned_and_strided_views_fingerprint_their_logical_bytes() -> None:
    t = sample(1001, torch.bfloat16)
    assert int(torch.ops.splice.fingerprint(t[1:])) == fp.fingerprint_reference(t[1:].clone())
    m = sample(60, torch.float32).reshape(6, 10)
    assert int(torch.ops.splice.fingerprint(m.t())) == fp.fingerprint_reference(m.t().clone())


def test_small_cpu_chunks_give_the_same_result(monkeypatch: pytest.MonkeyPatch) -> None:
    t = sample(10_001, torch.float16)
    want = fp.fingerprint_cpu(t)
    monkeypatch.setattr(fp, "CPU_CHUNK_WORDS", 7)
    assert fp.fingerprint_cpu(t) == want


def test_fake_impl_and_schema() -> None:
    torch.library.opcheck(torch.ops.splice.fingerprint.default, (sample(100, torch.float32),))


def test_zero_padding_and_length_are_distinguished() -> None:
    a = torch.tensor([1.5], dtype=torch.bfloat16)
    b = torch.tensor([1.5, 0.0], dtype=torch.bfloat16)
    assert fp.fingerprint_cpu(a) != fp.fingerprint_cpu(b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_swapping_two_elements_changes_the_fingerprint(dtype: torch.dtype) -> None:
    t = sample(5000, dtype)
    base = fp.fingerprint_cpu(t)
    g = torch.Generator().manual_seed(1)
    for _ in range(50):
        i, j = torch.randint(0, t.numel(), (2,), generator=g).tolist()
        if not torch.equal(t[i:i + 1].view(torch.uint8), t[j:j + 1].view(torch.uint8)):
            s = t.clone()
            s[i], s[j] = t[j], t[i]
            assert fp.fingerprint_cpu(s) != base, (i, j)


def test_swapping_x_and_minus_x_changes_the_fingerprint() -> None:
    # Sign-bit-only differences defeat multiplicative position weights; not this mixer.
    t = torch.tensor([3.0, -3.0] + [0.0] * 30)
    for j in range(2, 32):
        s = t.clone()
        s[1], s[j] = t[j], t[1]
        assert fp.fingerprint_cpu(s) != fp.fingerprint_cpu(t)


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 3000), data=st.data(),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
def test_any_single_bit_flip_changes_the_fingerprint(n: int, data: st.DataObject,
                                                     dtype: torch.dtype) -> None:
    t = sample(n, dtype, seed=n)
    raw = t.view(torch.uint8).clone()
    byte = data.draw(st.integers(0, raw.numel() - 1))
    bit = data.draw(st.integers(0, 7))
    flipped = raw.clone()
    flipped[byte] ^= 1 << bit
    assert fp.fingerprint_cpu(flipped.view(dtype)) != fp.fingerprint_cpu(t)


@settings(max_examples=100, deadline=None)
@given(words=st.lists(st.integers(0, 2**32 - 1), min_size=2, max_size=64, unique=True),
       data=st.data())
def test_any_swap_of_distinct_words_changes_the_fingerprint(words: list[int],
                                                            data: st.DataObject) -> None:
    t = torch.tensor(words, dtype=torch.int64).to(torch.int32)  # wraps to the same bits
    i = data.draw(st.integers(0, len(words) - 1))
    j = data.draw(st.integers(0, len(words) - 1).filter(lambda x: x != i))
    s = t.clone()
    s[i], s[j] = t[j], t[i]
    assert fp.fingerprint_cpu(s) != fp.fingerprint_cpu(t)


def test_copy_fingerprint_cpu_copies_and_fingerprints() -> None:
    src = sample(3 * 1024 * 1024 + 5, torch.bfloat16)
    dst = torch.empty_like(src)
    got = torch.ops.splice.copy_fingerprint(src, dst)
    assert torch.equal(dst.view(torch.int16), src.view(torch.int16))
    assert int(got) == fp.fingerprint_cpu(src)
    with pytest.raises(ValueError, match="bytes"):
        torch.ops.splice.copy_fingerprint(src, torch.empty(3, dtype=torch.bfloat16))


def test_tensor_sets_module_and_optimizer_fingerprints() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(3, 8)).sum().backward()
    opt.step()
    before = (fp.fingerprint_module(model), fp.fingerprint_optimizer(opt))
    assert before == (fp.fingerprint_module(model), fp.fingerprint_optimizer(opt))
    with torch.no_grad():
        model[1].bias[2] += 1
    assert fp.fingerprint_module(model) != before[0]
    a, b = torch.ones(4), torch.zeros(4)
    assert fp.fingerprint_tensors([a, b]) != fp.fingerprint_tensors([b, a])


INTERPRET_CHECK = """
import json, torch
from splice.kernels import fingerprint as fp, snapshot_copy as sc
bad = []
for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.uint8):
    for n in (1, 3, 4097, 9000):
        t = (torch.randn(n) * 100).to(dtype)
        for view in (t, t[1:]):
            want = fp.fingerprint_cpu(view)
            if int(fp.fingerprint_triton(view)) != want:
                bad.append(f"fingerprint {dtype} {view.numel()}")
            dst = torch.empty_like(view)
            if int(sc.copy_fingerprint_triton(view, dst)) != want or not torch.equal(
                    dst.view(torch.uint8), view.contiguous().view(torch.uint8)):
                bad.append(f"copy_fingerprint {dtype} {view.numel()}")
print(json.dumps({"bad": bad}))
"""


@pytest.mark.skipif(not has_triton, reason="triton is not installed (pip install triton)")
def test_triton_kernels_under_the_interpreter_match_cpu() -> None:
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", INTERPRET_CHECK], env=env, text=True,
                         capture_output=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"bad": []}


@cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", SIZES + [10_000_019])
def test_triton_on_gpu_is_bit_exact_with_cpu(dtype: torch.dtype, n: int) -> None:
    t = sample(n, dtype)
    want = fp.fingerprint_cpu(t)
    g = t.cuda()
    got = torch.ops.splice.fingerprint(g)
    assert got.device.type == "cuda" and int(got) == want
    if n > 1:
        assert int(torch.ops.splice.fingerprint(g[1:])) == fp.fingerprint_cpu(t[1:])
    dst = torch.empty_like(g)
    assert int(torch.ops.splice.copy_fingerprint(g, dst)) == want
    assert torch.equal(dst.cpu().view(torch.uint8), t.view(torch.uint8))


@cuda
def test_fused_copy_writes_straight_into_pinned_host_memory() -> None:
    t = sample(1_000_003, torch.bfloat16).cuda()
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    got = sc.copy_fingerprint_triton(t, host)
    torch.cuda.synchronize()
    assert int(got) == fp.fingerprint_cpu(host)
    assert torch.equal(host.view(torch.int16), t.cpu().view(torch.int16))


def test_fingerprint_many_matches_one_by_one() -> None:
    ts = [sample(n, d, seed=n) for n, d in [(5, torch.float32), (4099, torch.bfloat16),
                                             (3, torch.float16), (0, torch.float32)]]
    assert fp.fingerprint_many(ts).tolist() == [fp.fingerprint_cpu(t) for t in ts]


@cuda
def test_fingerprint_many_on_gpu_batches_and_matches_cpu() -> None:
    ts = [sample(n, d, seed=n) for n, d in [(5, torch.float32), (10_000, torch.bfloat16),
                                             (3, torch.float16), (0, torch.float32),
                                             (9_000_001, torch.float32)]]
    want = [fp.fingerprint_cpu(t) for t in ts]
    g = [t.cuda() for t in ts]
    assert fp.fingerprint_many(g).tolist() == want
    assert fp.fingerprint_many(g).tolist() == want  # cached plan
    assert fp.fingerprint_many(g[:2]).tolist() == want[:2]
