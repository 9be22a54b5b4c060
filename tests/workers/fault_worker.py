"""A training worker for integration tests that can SIGKILL itself at an exact point.

    --die WORKER_ID:STEP:PHASE   (repeatable)

PHASE is where, within step STEP, the worker kills itself:
  before    before its gradient all-reduce is issued (its peers wait in the collective)
  during    right after issuing it (peers have part of its data, the rest never comes)
  after     after the all-reduce completed, before the optimizer update
  recovery  while joining epoch STEP (STEP names an epoch here), i.e. during a recovery
At the end every surviving worker writes {step: loss} and its recovery count to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time

import torch

import splice
from splice.examples.toy import TeacherDataset, make_mlp, mse_loss


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--out", required=True)
    p.add_argument("--die", action="append", default=[])
    p.add_argument("--ddp", action="store_true")
    p.add_argument("--sdc-every", type=int, default=0)
    p.add_argument("--bitflip", default="", help="WORKER_ID:STEP: flip a weight bit after STEP")
    p.add_argument("--slow", default="", help="WORKER_ID:FACTOR:FROM_STEP: that worker's "
                                             "compute is FACTOR x slower from FROM_STEP")
    p.add_argument("--step-sleep-s", type=float, default=0.0,
                   help="extra time per step (stands in for compute), so that faults of the "
                        "control plane happen while training is under way")
    p.add_argument("--corrupt-snapshots", default="",
                   help="WORKER_ID:STEP - in step STEP, right after taking its snapshot, "
                        "that worker flips a byte in every in-memory snapshot it holds")
    p.add_argument("--zero", action="store_true",
                   help="ZeRO-1: AdamW with its state sharded across the ranks")
    p.add_argument("--hold-at", default="",
                   help="STEP:EPOCH:WORLD - after completing any step >= STEP in a world "
                        "smaller than WORLD, wait (on the agent channel, at most 60 s) "
                        "until a membership of epoch >= EPOCH with WORLD members, or any "
                        "newer one, is announced: a survivor waits for a newcomer")
    p.add_argument("--device", default="cpu", help="where the model trains (cuda: a GPU)")
    p.add_argument("--start-gate", default="",
                   help="a FIFO: a job worker (not a spare) opens it before joining, which "
                        "blocks until the test opens its other end (once the spares are "
                        "warm, so that a fault finds them ready)")
    args = p.parse_args()
    if args.start_gate and os.environ.get("SPLICE_SPARE") != "1":
        open(args.start_gate, "rb").close()
    torch.set_num_threads(1)
    me = os.environ.get("SPLICE_WORKER_ID", "standalone/0")
    plans = []
    for spec in args.die:
        wid, step, phase = spec.rsplit(":", 2)
        if wid == me:
            plans.append((int(step), phase))

    session = splice.init()
    model = make_mlp(hidden=64, seed=0).to(args.device)
    if args.zero:
        from splice.agent.worker.zero import AdamWConfig, ShardedAdamW

        optimizer = ShardedAdamW(model.parameters(), session.group, AdamWConfig(lr=0.01))
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loss_fn = mse_loss
    if args.device != "cpu":
        def loss_fn(m, batch, device=args.device):  # type: ignore[no-untyped-def]
            return mse_loss(m, tuple(t.to(device, non_blocking=True) for t in batch))
    if args.slow and args.slow.rsplit(":", 2)[0] == me:
        from splice.examples.train_mlp import slowed

        _, factor, from_step = args.slow.rsplit(":", 2)
        loss_fn = slowed(mse_loss, session, float(factor), int(from_step))
    session.register(model=model, optimizer=optimizer, dataset=TeacherDataset(num_samples=1024),
                     loss_fn=loss_fn, sdc_check_every_steps=args.sdc_every, global_batch_size=32, micro_batch_size=4, seed=0,
                     ddp=args.ddp)

    group = session.group
    issue, opt_step, build = group.all_reduce_async, optimizer.step, group.begin_build

    def at(phase: str) -> bool:
        return any(s == session.step and ph == phase for s, ph in plans)

    corrupt_at = -1
    if args.corrupt_snapshots and args.corrupt_snapshots.rsplit(":", 1)[0] == me:
        corrupt_at = int(args.corrupt_snapshots.rsplit(":", 1)[1])

    capture = session._capture

    def capture_hook(step: int) -> None:
        # Right after the step's snapshot is taken (the first thing a step does), so the
        # damage is done however soon a fault elsewhere interrupts the step.
        nonlocal corrupt_at
        capture(step)
        if step == corrupt_at:
            corrupt_at = -1
            ring = session._snapshots
            for held in ring.steps():
                ring.checksums(held)  # the background checksum of the slot is complete
                victim = next(iter(ring.buffers(held).values()))
                victim.view(-1).view(torch.uint8)[0] ^= 0x40

    session._capture = capture_hook  # type: ignore[method-assign]

    def issue_hook(tensor: torch.Tensor):  # type: ignore[no-untyped-def]
        if at("before"):
            _die()
        fut = issue(tensor)
        if at("during"):
            _die()
        return fut

    def opt_hook(*a, **k):  # type: ignore[no-untyped-def]
        if at("after"):
            _die()
        return opt_step(*a, **k)

    def build_hook(spec, *a, **k):  # type: ignore[no-untyped-def]
        if any(s == spec.epoch and ph == "recovery" for s, ph in plans):
            _die()
        return build(spec, *a, **k)

    # DDP's buckets and the loss go through all_reduce_async too, so one hook covers both.
    group.all_reduce_async = issue_hook  # type: ignore[method-assign]
    optimizer.step = opt_hook  # type: ignore[method-assign]
    group.begin_build = build_hook  # type: ignore[method-assign]

    losses: dict[int, float] = {}
    while session.step < args.steps:
        r = session.run_step()
        if r is not None:
            losses[r.step] = r.loss
            if args.bitflip and args.bitflip == f"{me}:{r.step}":
                from splice.examples.train_mlp import flip_one_bit

                flip_one_bit(model)
            hold_step, epoch, world = (int(x) for x in (args.hold_at or "0:0:0").split(":"))
            if args.hold_at and r.step >= hold_step and session.world_size < world:
                # In a shrunk world: wait for the newcomer. Any newer membership ends the
                # wait too (a fault meanwhile must be recovered from, not held through).
                link = session._link
                assert link is not None
                now = session.epoch

                def grown(link=link, epoch=epoch, world=world, now=now) -> bool:  # type: ignore[no-untyped-def]
                    m = link.latest_membership()
                    return m is not None and (m.epoch >= epoch and len(m.members) >= world
                                              or m.epoch > now)

                link.wait(grown, 60.0)
            if args.step_sleep_s:
                time.sleep(args.step_sleep_s)  # simulated compute, not synchronisation
    with open(os.path.join(args.out, me.replace("/", "_") + ".json"), "w") as f:
        json.dump({"worker_id": me, "losses": losses, "recoveries": session.recoveries,
                   "world_size": session.world_size, "epoch": session.epoch,
                   "pid": os.getpid(), "restored_from": session.restored_from}, f)
    session.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
