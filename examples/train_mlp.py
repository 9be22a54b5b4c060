"""Train the toy regression MLP with splice: the job the demo and the benchmarks run.

    splice agent --controller 127.0.0.1:29400 --nproc 2 -- python -m splice.examples.train_mlp

Run without an agent it trains as a single process (the same global batch, one rank).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

import splice
from splice.examples.toy import TeacherDataset, make_mlp, mse_loss


def flip_one_bit(model: torch.nn.Module, bit: int = 22) -> None:
    """Flip one mantissa bit of the first weight: what a faulty GPU or memory might do."""
    with torch.no_grad():
        w = next(model.parameters()).view(-1)
        w[:1].view(torch.int32).bitwise_xor_(1 << bit)


def slowed(loss_fn, session, factor: float, from_step: int):  # type: ignore[no-untyped-def]
    """`loss_fn` taking `factor` x as long from step `from_step` (a slower device)."""
    def run(model, batch):  # type: ignore[no-untyped-def]
        t0 = time.perf_counter()
        loss = loss_fn(model, batch)
        if session.step >= from_step:
            time.sleep((factor - 1) * (time.perf_counter() - t0) * 3)  # fwd + ~2x bwd
        return loss
    return run


def stalled(loss_fn, session, at_step: int, seconds: float):  # type: ignore[no-untyped-def]
    """`loss_fn` that sleeps `seconds` inside step `at_step`, once."""
    done: list[bool] = []

    def run(model, batch):  # type: ignore[no-untyped-def]
        if session.step == at_step and not done:
            done.append(True)
            time.sleep(seconds)
        return loss_fn(model, batch)
    return run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--global-batch", type=int, default=64)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--ddp", action="store_true", help="wrap the model in DDP")
    p.add_argument("--step-sleep-s", type=float, default=0.0,
                   help="extra compute time per step (makes a demo's timeline readable)")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--sdc-every", type=int, default=0,
                   help="compare every replica's fingerprint every N steps (0: off)")
    p.add_argument("--bitflip", default="",
                   help="WORKER_ID:STEP - flip one bit of that worker's weights after step "
                        "STEP (silent data corruption, for the demo)")
    p.add_argument("--stall", default="",
                   help="WORKER_ID:STEP:SECONDS - that worker sleeps inside step STEP (a "
                        "wedged data loader or kernel, for the hang benchmark)")
    p.add_argument("--slow-worker", default="",
                   help="WORKER_ID:FACTOR:FROM_STEP - that worker's compute runs FACTOR x "
                        "slower from FROM_STEP on (simulates a slow GPU, for the demo)")
    p.add_argument("--result", help="write the final step's result as JSON to this file")
    p.add_argument("--step-times", help="rank 0 writes [[step, wall-clock completion], ...] "
                                        "as JSON to this file at the end")
    args = p.parse_args(argv)

    torch.set_num_threads(1)
    # The model first: a standby or spare worker waits in init() until it takes a rank,
    # and then only has to load its state.
    model = make_mlp(hidden=args.hidden, seed=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    session = splice.init()
    loss_fn = mse_loss
    if args.slow_worker:
        who, factor, from_step = args.slow_worker.rsplit(":", 2)
        if who == session.worker_id:
            loss_fn = slowed(mse_loss, session, float(factor), int(from_step))
    if args.stall:
        who, at_step, seconds = args.stall.rsplit(":", 2)
        if who == session.worker_id:
            loss_fn = stalled(loss_fn, session, int(at_step), float(seconds))
    session.register(model=model, optimizer=optimizer, dataset=TeacherDataset(),
                     loss_fn=loss_fn, global_batch_size=args.global_batch,
                     micro_batch_size=args.micro_batch, seed=0, ddp=args.ddp,
                     sdc_check_every_steps=args.sdc_every)
    flip_at = -1
    if args.bitflip and args.bitflip.rsplit(":", 1)[0] == session.worker_id:
        flip_at = int(args.bitflip.rsplit(":", 1)[1])

    completions: list[tuple[int, float]] = []

    def progress(r: splice.StepResult) -> None:  # type: ignore[name-defined]
        completions.append((r.step, time.time()))
        if r.step == flip_at:
            flip_one_bit(model)
        if args.step_sleep_s:
            time.sleep(args.step_sleep_s)  # stands in for more compute; not synchronisation
        if session.rank == 0 and (r.step % args.log_every == 0 or r.step == args.steps - 1):
            print(f"step {r.step:5d}  loss {r.loss:.5f}  world {r.world_size}  "
                  f"epoch {r.epoch}  {r.step_time_s * 1e3:.1f} ms", flush=True)

    last = session.train(args.steps, on_step=progress)
    if args.result and last is not None and session.rank == 0:
        with open(args.result, "w") as f:
            json.dump({"step": last.step, "loss": last.loss, "world_size": last.world_size,
                       "epoch": last.epoch, "recoveries": session.recoveries}, f)
    if args.step_times and session.rank == 0:
        with open(args.step_times, "w") as f:
            json.dump(completions, f)
    session.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
