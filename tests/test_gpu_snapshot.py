"""GPU snapshots into pinned memory: round trip, double buffering, the capture/update
ordering, and corruption caught on restore. Without a GPU only the CPU-side contract runs."""

from __future__ import annotations

import pytest
import torch

from splice.checkpoint import snapshot as cpu_snapshot
from splice.checkpoint.gpu_snapshot import (
    GpuSnapshotRing,
    SnapshotCorrupt,
    capture_fingerprint,
    state_tensors,
)
from splice.checkpoint.snapshot import SnapshotMissing
from splice.kernels import fingerprint as fp

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_without_cuda_the_ring_says_what_to_use_instead() -> None:
    with pytest.raises(RuntimeError, match="SnapshotRing"):
        GpuSnapshotRing()


def test_both_rings_raise_the_same_snapshot_corrupt() -> None:
    # One class: a caller that handles a corrupt CPU snapshot (or any missing one, by
    # asking a peer) handles a corrupt GPU snapshot the same way.
    assert SnapshotCorrupt is cpu_snapshot.SnapshotCorrupt
    assert issubclass(SnapshotCorrupt, SnapshotMissing)


def test_state_tensors_names_model_and_optimizer_state() -> None:
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    names = set(state_tensors(model, opt))
    assert {"param/weight", "param/bias", "optim/0/exp_avg", "optim/1/exp_avg_sq"} <= names
    assert capture_fingerprint(state_tensors(model, opt)) == capture_fingerprint(
        state_tensors(model, opt))


def state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(513, 257, generator=g).cuda(),
            "b": torch.randn(1001, generator=g).to(torch.bfloat16).cuda(),
            "h": torch.randn(7, generator=g).to(torch.float16).cuda()}


@cuda
def test_round_trip_and_recorded_fingerprints() -> None:
    ring = GpuSnapshotRing()
    s = state(0)
    ring.capture(5, s)
    ring.synchronize()
    assert ring.steps() == [5]
    assert ring.fingerprints(5) == {k: fp.fingerprint_cpu(v.cpu()) for k, v in s.items()}
    out = ring.restore(5)
    for k, v in s.items():
        assert out[k].device.type == "cpu" and torch.equal(out[k], v.cpu())
    into = {k: torch.zeros_like(v) for k, v in s.items()}
    ring.restore(5, into=into)
    for k, v in s.items():
        assert torch.equal(into[k], v)
    with pytest.raises(ValueError, match="named exactly"):
        ring.restore(5, into={"w": into["w"]})
    with pytest.raises(SnapshotMissing):
        ring.restore(4)


@cuda
def test_double_buffering_keeps_the_two_newest_steps() -> None:
    ring = GpuSnapshotRing()
    states = [state(i) for i in range(4)]
    for step, s in enumerate(states):
        ring.capture(step, s)
    ring.synchronize()
    assert ring.steps() == [2, 3]
    assert torch.equal(ring.restore(2)["w"], states[2]["w"].cpu())
    ring.discard_after(2)
    assert ring.steps() == [2]


@cuda
def test_updates_after_wait_copied_do_not_leak_into_the_snapshot() -> None:
    ring = GpuSnapshotRing()
    s = {"x": torch.zeros(64 << 20, device="cuda")}  # 256 MiB: the copy takes ~5 ms
    ring.capture(1, s)
    ring.wait_copied()
    s["x"].add_(1.0)  # the optimizer step of step 1, ordered after the copy
    assert ring.restore(1)["x"].abs().max().item() == 0.0


@cuda
def test_a_flipped_bit_in_host_memory_is_caught_on_restore() -> None:
    ring = GpuSnapshotRing()
    ring.capture(3, state(1))
    ring.synchronize()
    ring.host_buffers(3)["b"].view(torch.int16)[17] ^= 1 << 4
    with pytest.raises(SnapshotCorrupt, match=r"step 3 is corrupt: 1 of 3 tensors.*\bb\b"):
        ring.restore(3)
    with pytest.raises(SnapshotCorrupt, match="peer"):
        ring.restore(3, into={k: torch.empty_like(v) for k, v in state(1).items()})
