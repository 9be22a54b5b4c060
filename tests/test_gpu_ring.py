"""GPU state in the session's snapshot ring: the per-block checksum sums computed on the
GPU equal the CPU's over the copy (kernel under Triton's interpreter on CPU, natively on
a GPU), and with a GPU the asynchronous copy into page-locked shared memory keeps the
snapshot semantics: the state as of the capture, nothing torn by a later in-place write,
committed for the agent only once it has landed, adoptable by a replacement, corruption
caught. GPU tests skip without one."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from splice.checkpoint.device_copy import training_state_ptrs
from splice.checkpoint.shm import SlotFiles
from splice.checkpoint.snapshot import SnapshotCorrupt, SnapshotRing, total_words

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
has_triton = importlib.util.find_spec("triton") is not None

# Tensors of every shape of trouble: sub-word and odd lengths, a misaligned view (read
# byte by byte), several blocks, an empty one.
BLOCK_SUMS_CHECK = """
import json, sys, torch
from splice.kernels import block_sums as bs
from splice.checkpoint import snapshot as sn
device = sys.argv[1]
g = torch.Generator().manual_seed(0)
base = torch.randn(9001, generator=g)
ts = [torch.randn(n, generator=g).to(dt) for n, dt in [
    (1, torch.float32), (3, torch.bfloat16), (1024, torch.float32), (5000, torch.float16),
    (1025, torch.float64), (7, torch.uint8), (0, torch.float32), (4096 * 3, torch.int32)]]
ts += [base[1:], base[2:4000], (torch.rand(77, generator=g) > 0.5)]
lay = sn._Layout([(t.shape, t.dtype) for t in ts])
torch._foreach_copy_(lay.flat_views, ts)
want = torch.empty_like(lay.record)
lay.block_sums(want)
out = torch.full((2, lay.num_blocks), 12345, dtype=torch.int64, device=device)
src = [t.to(device) if t.is_contiguous() else t for t in ts]
if device != "cpu":
    src[-3] = base.to(device)[1:]  # still misaligned on the device
    src[-2] = base.to(device)[2:4000]
bs.block_sums_many(src, lay.first_block, out)
print(json.dumps({"equal": torch.equal(out.cpu(), want), "blocks": lay.num_blocks}))
"""


def _run_block_sums_check(device: str, interpret: bool) -> dict[str, object]:
    env = dict(os.environ, TRITON_INTERPRET="1") if interpret else dict(os.environ)
    out = subprocess.run([sys.executable, "-c", BLOCK_SUMS_CHECK, device], env=env,
                         text=True, capture_output=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


@pytest.mark.skipif(not has_triton, reason="triton is not installed (pip install triton)")
def test_block_sums_kernel_under_the_interpreter_equals_the_cpu_checksum() -> None:
    assert _run_block_sums_check("cpu", interpret=True) == {"equal": True, "blocks": 36}


def test_block_sums_refuses_what_it_cannot_read() -> None:
    bs = pytest.importorskip("splice.kernels.block_sums")
    if bs.triton is None:
        pytest.skip("triton is not installed")
    out = torch.zeros(2, 4, dtype=torch.int64)
    with pytest.raises(ValueError, match="contiguous"):
        bs.block_sums_many([torch.zeros(4, 4).t()], [0], out)
    with pytest.raises(ValueError, match="outside"):
        bs.block_sums_many([torch.zeros(2000)], [3], out)
    with pytest.raises(ValueError, match="2 x N int64"):
        bs.block_sums_many([], [], torch.zeros(4, dtype=torch.int64))


@cuda
def test_block_sums_kernel_on_the_gpu_equals_the_cpu_checksum() -> None:
    assert _run_block_sums_check("cuda", interpret=False) == {"equal": True, "blocks": 36}


# ---- the ring with GPU state ------------------------------------------------------------

def _gpu_state() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(33, 65), torch.nn.BatchNorm1d(65),
                                torch.nn.Linear(65, 3)).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    step(model, opt)
    return model, opt


def step(model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    model(torch.randn(8, 33, device="cuda")).square().mean().backward()
    opt.step()
    opt.zero_grad()


def state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, object]:
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": 7,
            "rng": torch.get_rng_state()}


def on_cpu(tree: object) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in tree.items()}  # type: ignore[attr-defined]


@pytest.fixture
def shm_dir(tmp_path: Path) -> str:
    root = Path("/dev/shm") if Path("/dev/shm").is_dir() else tmp_path
    d = root / f"splice-test-gpu-ring-{os.getpid()}"
    yield str(d)
    import shutil
    shutil.rmtree(d, ignore_errors=True)


@cuda
@pytest.mark.parametrize("defer", [False, True], ids=["launched", "deferred"])
def test_gpu_state_lands_in_shared_memory_as_of_the_capture(shm_dir: str,
                                                            defer: bool) -> None:
    model, opt = _gpu_state()
    ring = SnapshotRing(directory=shm_dir, owner="node-0/0")
    before = on_cpu(model.state_dict())
    ring.capture(1, state(model, opt), training_state_ptrs(model, opt), defer=defer)
    # Training goes on at once: the optimizer step waits for the copy on the GPU only,
    # and the BatchNorm statistics the forward pass updates in place were cloned first.
    # A deferred capture launches its copies after the backward pass: still of the
    # state as it was at the capture.
    model(torch.randn(8, 33, device="cuda")).square().mean().backward()
    if defer:
        ring.flush()
    ring.wait_copied()
    opt.step()
    snap = ring.restore(1)
    for name, want in before.items():
        assert torch.equal(snap["model"][name], want), name
    assert not torch.equal(snap["model"]["0.weight"], model.state_dict()["0.weight"].cpu())
    assert snap["step"] == 7
    ring.verify(1)
    ring.close()


@cuda
def test_a_gpu_snapshot_is_committed_only_once_it_has_landed(shm_dir: str) -> None:
    model, opt = _gpu_state()
    ring = SnapshotRing(directory=shm_dir, owner="node-0/0")
    ring.capture(1, state(model, opt), training_state_ptrs(model, opt))
    reader = SlotFiles(shm_dir)
    assert [s.step for s in reader.load(total_words)] == []  # not settled yet
    assert ring.steps() == [1]
    ring.synchronize()
    assert [s.step for s in reader.load(total_words)] == [1]
    reader.close()
    ring.close()


@cuda
def test_a_replacement_adopts_a_gpu_snapshot_and_its_checksums_hold(shm_dir: str) -> None:
    model, opt = _gpu_state()
    ring = SnapshotRing(directory=shm_dir, owner="node-0/0")
    want = []
    for k in (1, 2, 3):
        want.append(on_cpu(model.state_dict()))
        ring.capture(k, state(model, opt), training_state_ptrs(model, opt))
        ring.wait_copied()
        step(model, opt)
    ring.close()  # the worker dies; the agent hands its directory to a replacement
    heir = SnapshotRing(directory=shm_dir, owner="node-0/1")
    assert heir.adopt() == [2, 3]
    heir.verify(3)
    snap = heir.restore(3)
    for name, value in want[2].items():
        assert torch.equal(snap["model"][name], value), name
    # The heir goes on capturing its own GPU state into the adopted (now pinned) slots.
    heir.capture(4, state(model, opt), training_state_ptrs(model, opt))
    heir.synchronize()
    heir.verify(4)
    heir.close()


@cuda
def test_a_flipped_bit_in_a_landed_gpu_snapshot_is_caught(shm_dir: str) -> None:
    model, opt = _gpu_state()
    ring = SnapshotRing(directory=shm_dir, owner="node-0/0")
    ring.capture(1, state(model, opt), training_state_ptrs(model, opt))
    ring.buffers(1)["model.0.weight"].view(torch.uint8)[5] ^= 0x10
    with pytest.raises(SnapshotCorrupt, match="model.0.weight"):
        ring.verify(1)
    ring.close()


def _gpu_session(model: torch.nn.Module, ddp: bool = False) -> Any:
    """A one-rank session (no agent) training `model` (on the GPU) with AdamW on 64 random
    samples, 16 a step."""
    import splice

    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    data = [(torch.randn(8), torch.randn(1)) for _ in range(64)]

    def loss_fn(m: torch.nn.Module, batch: object) -> torch.Tensor:
        x, y = batch  # type: ignore[misc]
        return (m(x.cuda()) - y.cuda()).square().mean()

    session = splice.init()
    session.register(model=model, optimizer=opt, dataset=data, loss_fn=loss_fn,
                     global_batch_size=16, micro_batch_size=8, ddp=ddp)
    return session


@cuda
def test_a_session_on_the_gpu_snapshots_the_state_before_each_step() -> None:
    torch.manual_seed(0)
    # BatchNorm: buffers the forward pass updates in place, which the session's capture
    # (built only once the backward pass is queued) must take as they were at the start.
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.BatchNorm1d(32),
                                torch.nn.ReLU(), torch.nn.Linear(32, 1)).cuda()
    session = _gpu_session(model)
    losses = []
    for _ in range(2):
        losses.append(session.run_step().loss)  # type: ignore[union-attr]
    before = on_cpu(model.state_dict())
    losses.append(session.run_step().loss)  # type: ignore[union-attr]
    snap = session._snapshots.restore(2)
    for name, value in before.items():
        assert torch.equal(snap["model"][name], value), name
    assert all(torch.isfinite(torch.tensor(losses)))
    session.close()


def _gpu_losses(ddp: bool, steps: int = 4) -> list[float]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(),
                                torch.nn.Linear(32, 1)).cuda()
    session = _gpu_session(model, ddp=ddp)
    try:
        return [session.run_step().loss for _ in range(steps)]  # type: ignore[union-attr]
    finally:
        session.close()


@cuda
def test_a_ddp_session_on_the_gpu_trains_like_a_plain_one() -> None:
    # DDP wraps a GPU model in a one-rank group that must carry CUDA tensors.
    assert _gpu_losses(ddp=True) == pytest.approx(_gpu_losses(ddp=False), rel=1e-5)


@cuda
def test_a_clone_the_caller_drops_is_not_overwritten_before_it_is_copied(
        shm_dir: str) -> None:
    # The session's pattern: a buffer cloned at the step's start, handed over only inside
    # the state function and dropped by the caller. The ring must keep it alive until its
    # copy is done, else the training stream's next allocations reuse and overwrite it
    # before the (here artificially delayed) side stream reads it, and the snapshot, with
    # checksums of the overwritten bytes, would pass every check.
    w = torch.randn(1 << 20, device="cuda")
    buf = torch.randn(4096, device="cuda")
    ring = SnapshotRing(directory=shm_dir, owner="node-0/0")
    ring.capture(0, {"w": w, "b": buf.clone()}, frozenset({w.data_ptr()}))
    ring.synchronize()
    for k in range(1, 4):
        clone = buf.clone()
        want = clone.cpu()
        stable_ptrs = frozenset({w.data_ptr(), clone.data_ptr()})
        ring.capture(k, (lambda c: lambda: {"w": w, "b": c})(clone), stable_ptrs, defer=True)
        del clone
        with torch.cuda.stream(ring._copier.stream):
            torch.cuda._sleep(200_000_000)  # the side stream falls behind
        ring.flush()
        junk = [torch.full((4096,), 7.0, device="cuda") for _ in range(4)]
        ring.wait_copied()
        assert torch.equal(ring.restore(k)["b"], want), k
        del junk
    ring.close()
