"""The torchrun baseline's training script: plain DDP over gloo on CPU, launched by torchrun.

It trains exactly the job splice trains (``splice.examples.toy``) and recovers the way
torchrun users do: rank 0 writes a disk checkpoint after every step, and every attempt
(torchrun restarts the whole worker group after any failure) loads it if it exists.

Launch: ``python -m torch.distributed.run --nproc-per-node N bench/torchrun_train.py
--steps 400 --ckpt-dir DIR --events FILE``.

Step numbering: global step ``s`` (0-based) uses samples ``[s*64, (s+1)*64)`` (mod the
data set's length) of a fixed permutation, split evenly over the ranks. After step ``s``
completes, the checkpoint holds ``"step": s + 1`` (the next step to run), and then rank 0
appends ``{"step": s, "t": ..., "attempt": ...}`` to the events file.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from splice.examples.toy import TeacherDataset, make_mlp, mse_loss

GLOBAL_BATCH = 64
CKPT_NAME = "ckpt.pt"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, required=True, help="total optimizer steps")
    p.add_argument("--ckpt-dir", type=Path, required=True)
    p.add_argument("--events", type=Path, required=True, help="rank 0 appends one JSON line a step")
    p.add_argument("--step-sleep-s", type=float, default=0.0, help="extra sleep per step")
    return p.parse_args(argv)


def batch_indices(perm: torch.Tensor, step: int, rank: int, world: int) -> torch.Tensor:
    """This rank's share of global step ``step``'s 64 samples."""
    per_rank = GLOBAL_BATCH // world
    n = perm.numel()
    start = step * GLOBAL_BATCH + rank * per_rank
    return perm[torch.arange(start, start + per_rank) % n]


def save_checkpoint(
    path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, step: int
) -> None:
    tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}")
    torch.save({"model": model.state_dict(), "optim": opt.state_dict(), "step": step}, tmp)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if GLOBAL_BATCH % world:
        raise SystemExit(f"world size {world} does not divide the global batch {GLOBAL_BATCH}")
    args.ckpt_dir.mkdir(parents=True, exist_ok=True)
    (args.ckpt_dir / f"pid.{rank}").write_text(str(os.getpid()))
    torch.set_num_threads(1)

    dist.init_process_group("gloo")
    dataset = TeacherDataset()
    perm = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    ckpt_path = args.ckpt_dir / CKPT_NAME
    start_step = 0
    if ckpt_path.exists():  # every rank loads the same file: rank 0 only replaces it atomically
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optim"])
        start_step = int(state["step"])
    ddp = DistributedDataParallel(model)  # broadcasts rank 0's parameters

    events = open(args.events, "a", encoding="utf-8") if rank == 0 else None  # noqa: SIM115
    try:
        for step in range(start_step, args.steps):
            torch.manual_seed(1_000_003 * step + rank)  # dropout masks depend only on (step, rank)
            idx = batch_indices(perm, step, rank, world)
            loss = mse_loss(ddp, (dataset.x[idx], dataset.y[idx]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if rank == 0:
                save_checkpoint(ckpt_path, model, opt, step + 1)
                assert events is not None
                events.write(
                    json.dumps({"step": step, "t": time.time(), "attempt": attempt}) + "\n"
                )
                events.flush()
            if args.step_sleep_s > 0:
                time.sleep(args.step_sleep_s)
    finally:
        if events is not None:
            events.close()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
