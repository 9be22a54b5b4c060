"""The NCCL path: options, one-rank collectives, abort while a collective is pending, and
the rebuild fallback, on a GPU. A CPU machine checks that it refuses clearly."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import pytest
import torch
import torch.distributed as dist

from splice.agent.worker.group import CollectiveAborted, EpochSpec
from splice.agent.worker.nccl import (
    NcclConfig,
    NcclEpochGroup,
    make_options,
    nccl_available,
    shrink_or_rebuild,
)

gpu = pytest.mark.skipif(not nccl_available(), reason="needs CUDA and a torch built with NCCL")


def spec(epoch: int, world_size: int = 1) -> EpochSpec:
    return EpochSpec(epoch=epoch, rank=0, world_size=world_size, store_host="",
                     store_port=0, store_prefix=f"e{epoch}")


@pytest.mark.skipif(nccl_available(), reason="checks the CPU-only behaviour")
def test_without_nccl_building_a_group_says_so() -> None:
    with pytest.raises(RuntimeError, match="NCCL is not available"):
        NcclEpochGroup.build(dist.HashStore(), spec(1), torch.device("cpu"))


def test_config_defaults_favour_abortable_groups() -> None:
    cfg = NcclConfig()
    assert cfg.nonblocking and cfg.eager_connect and cfg.timeout_s >= 60


@gpu
def test_options_make_the_communicator_non_blocking() -> None:
    assert make_options(NcclConfig()).config.blocking == 0


@gpu
def test_one_rank_all_reduce_and_rebuild_into_the_next_epoch() -> None:
    store = dist.HashStore()
    group = NcclEpochGroup.build(store, spec(1), torch.device("cuda", 0))
    x = torch.arange(8.0, device="cuda")
    assert torch.equal(group.all_reduce(x, timeout_s=30), torch.arange(8.0, device="cuda"))
    nxt, how = shrink_or_rebuild(group, [], spec(2), store)
    assert how == "rebuild" and group.aborted.is_set()
    with pytest.raises(CollectiveAborted):
        group.all_reduce_async(x)
    assert torch.equal(nxt.all_reduce(x, timeout_s=30), torch.arange(8.0, device="cuda"))
    nxt.abort("test over")


@gpu
def test_shrink_on_one_rank_is_refused_with_a_reason() -> None:
    group = NcclEpochGroup.build(dist.HashStore(), spec(1), torch.device("cuda", 0))
    if group.supports_shrinking():
        with pytest.raises(ValueError, match="exclude"):
            group.shrink([0], spec(2))
    else:
        with pytest.raises(NotImplementedError):
            group.shrink([1], spec(2))
    group.abort("test over")


@gpu
def test_abort_from_another_thread_ends_a_pending_collective() -> None:
    group = NcclEpochGroup.build(dist.HashStore(), spec(1), torch.device("cuda", 0))
    x = torch.ones(4, device="cuda")
    torch.cuda._sleep(2_000_000_000)  # ~1 s of GPU time queued ahead of the collective
    work = group.all_reduce_async(x)
    assert not work.is_completed()
    t0 = time.monotonic()
    threading.Timer(0.05, group.abort, args=("controller: rank 3 lost",)).start()
    with pytest.raises(CollectiveAborted, match="rank 3 lost"):
        group.wait(work, timeout_s=30)
    assert time.monotonic() - t0 < 0.5


HUNG_PEER = """
import faulthandler, sys
faulthandler.dump_traceback_later(20, exit=True, file=sys.stderr)
import json, threading, time, torch, torch.distributed as dist
from splice.agent.worker.group import CollectiveAborted, EpochSpec
from splice.agent.worker.nccl import NcclConfig, NcclEpochGroup
spec = EpochSpec(epoch=1, rank=0, world_size=2, store_host="", store_port=0, store_prefix="e1")
cfg = NcclConfig(eager_connect=False, timeout_s=120)
group = NcclEpochGroup.build(dist.HashStore(), spec, torch.device("cuda", 0), cfg)
res = {}
def run():
    t0 = time.monotonic()
    try:
        group.all_reduce(torch.ones(4, device="cuda"), timeout_s=60)
        res["outcome"] = "completed"
    except CollectiveAborted as e:
        res["outcome"] = f"aborted: {e}"
    except Exception as e:
        res["outcome"] = f"{type(e).__name__}: {e}"[:300]
    res["waited_s"] = time.monotonic() - t0
th = threading.Thread(target=run, daemon=True)
th.start()
time.sleep(1.0)  # a probe script: let the collective start; it blocks, nothing to wait on
res["abort_call_s"] = group.abort("peer never arrived")
th.join(20)
res["waiter_returned"] = not th.is_alive()
print(json.dumps(res), flush=True)
"""


@gpu
@pytest.mark.xfail(strict=True, reason=(
    "torch 2.11 / NCCL 2.28.9 on one H100: with the peer missing, allreduce() blocks in "
    "lazy communicator init and abort() from another thread blocks too (> 45 s)"))
def test_a_collective_waiting_for_a_missing_peer_is_aborted() -> None:
    """Rank 0 of a two-rank group whose rank 1 never comes: the collective hangs (NCCL
    init waits for the peer) until abort() from another thread ends it."""
    out = subprocess.run([sys.executable, "-c", HUNG_PEER], capture_output=True, text=True,
                         timeout=90)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    assert lines, f"no result within 20 s; thread stacks:\n{out.stderr[-4000:]}"
    res = json.loads(lines[-1])
    print(res)
    assert res["waiter_returned"] and res["outcome"].startswith("aborted"), res
    assert res["abort_call_s"] < 10, res
