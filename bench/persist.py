"""Persistent checkpoints: what saving a snapshot to disk costs, and what the caller pays.

Measures, for a synthetic snapshot of `--mb` MB of float32 tensors (plus RNG state and the
data cursor), over `--runs` runs:
  encode_s        the codec alone (torch.save into memory + CRC-32)
  save_s          a synchronous save: encode, write, fsync, rename, manifest, directory fsync
  save_async_block_s  how long `save_async` holds the caller (the rest runs in a thread)
  save_async_total_s  from `save_async` to `flush` returning (durable)
  load_s          read + verify + decode; the file was just written, so it is read from the
                  page cache: a cold read after a reboot is bounded by the disk instead
and prints one JSON object with medians. Pick the disk with `--dir`; its file system type is
reported, since fsync on tmpfs costs nothing.

    python -m bench.persist [--mb 100] [--runs 3] [--dir PATH]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from splice.checkpoint.codec import encode_state
from splice.checkpoint.persist import PersistentStore
from splice.checkpoint.snapshot import Frozen, tensor_bytes


def make_tree(mb: int) -> dict[str, Any]:
    """Model weights and two AdamW moments in the proportion 1:1:1, `mb` MB in all."""
    numel = max(1, mb * (1 << 20) // 4 // 3)
    gen = torch.Generator().manual_seed(0)
    return {
        "model": {"weight": torch.randn(numel, generator=gen)},
        "optimizer": {"state": {0: {"step": torch.tensor(1.0),
                                    "exp_avg": torch.randn(numel, generator=gen),
                                    "exp_avg_sq": torch.rand(numel, generator=gen)}},
                      "param_groups": [{"lr": 1e-3, "params": [0]}]},
        "rng": {"torch": torch.get_rng_state(), "python": Frozen(random.getstate())},
        "step": 1,
        "samples_seen": 1024,
    }


def fs_type(path: Path) -> str:
    """The file system holding `path`, from the longest matching mount point."""
    best, kind = "", "unknown"
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                fields = line.split()
                mount = fields[1]
                if (str(path) == mount or str(path).startswith(mount.rstrip("/") + "/")) \
                        and len(mount) > len(best):
                    best, kind = mount, fields[2]
    except OSError:
        pass
    return kind


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=int, default=100, help="snapshot size in MB")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where to write (default: the temp dir)")
    args = ap.parse_args(argv)
    if args.mb < 1 or args.runs < 1:
        ap.error("--mb and --runs must be >= 1")

    tree = make_tree(args.mb)
    state_bytes = tensor_bytes(tree)
    root = Path(tempfile.mkdtemp(prefix="splice-bench-persist-", dir=args.dir)).resolve()
    enc, save, block, total, load = [], [], [], [], []
    try:
        store = PersistentStore(root, job_id="bench", keep=2)
        for run in range(args.runs):
            t0 = time.perf_counter()
            blob = encode_state(tree)
            enc.append(time.perf_counter() - t0)
            num_bytes = len(blob)
            del blob

            step = 2 * run
            t0 = time.perf_counter()
            store.save(step, tree)
            save.append(time.perf_counter() - t0)

            t0 = time.perf_counter()
            store.save_async(step + 1, tree)
            block.append(time.perf_counter() - t0)
            store.flush()
            total.append(time.perf_counter() - t0)
            if store.last_error is not None:
                raise store.last_error

            t0 = time.perf_counter()
            store.load(step + 1)
            load.append(time.perf_counter() - t0)
        store.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)

    med = statistics.median
    mb = state_bytes / 1e6
    print(json.dumps({
        "benchmark": "persist",
        "command": " ".join(["python -m bench.persist", *(argv if argv is not None
                                                          else sys.argv[1:])]),
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus",
        "platform": platform.platform(),
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "dir_fs": fs_type(root),
        "runs": args.runs,
        "state_bytes": state_bytes,
        "file_bytes": num_bytes,
        "encode_s": round(med(enc), 4),
        "save_s": round(med(save), 4),
        "save_async_block_s": round(med(block), 6),
        "save_async_total_s": round(med(total), 4),
        "load_s": round(med(load), 4),
        "save_mb_per_s": round(mb / med(save), 1),
        "load_mb_per_s": round(mb / med(load), 1),
        "note": "medians; MB = 1e6 bytes of tensor state; load reads from the page cache",
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
