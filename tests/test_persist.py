"""Persistent checkpoints (checkpoint/persist.py): durable, atomic, verified, pruned.

The background writer is held with an Event-gated encoder, never with sleeps: a test
knows a save is in flight because the encoder said so, and lets it finish by opening the
gate.
"""

from __future__ import annotations

import json
import logging
import os
import random
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch

from splice.checkpoint import persist
from splice.checkpoint.codec import encode_state
from splice.checkpoint.persist import (
    CheckpointCorrupt,
    CheckpointInfo,
    PersistentStore,
    PersistError,
)
from splice.checkpoint.snapshot import Frozen


def training_tree(step: int = 1) -> dict[str, Any]:
    """A realistic snapshot: model and AdamW after one update, both RNGs, the data cursor."""
    torch.manual_seed(step)
    model = torch.nn.Linear(8, 4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(16, 8)).pow(2).mean().backward()
    opt.step()
    return {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "python": Frozen(random.getstate())},
        "step": step,
        "samples_seen": 16 * step,
    }


def small_tree(step: int) -> dict[str, Any]:
    return {"model": {"w": torch.full((4,), float(step))}, "step": step}


def assert_bit_exact(a: Any, b: Any) -> None:
    if isinstance(a, Mapping):  # a state_dict's OrderedDict comes back as a dict, in order
        assert isinstance(b, Mapping)
        assert list(a) == list(b)
        for k in a:
            assert_bit_exact(a[k], b[k])
        return
    assert type(a) is type(b), (type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert (a.dtype, a.shape) == (b.dtype, b.shape)
        assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
    elif isinstance(a, Frozen):
        assert a.value == b.value
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_bit_exact(x, y)
    else:
        assert a == b


class GatedEncoder:
    """Stands in for the codec's encoder: reports each call, then waits for the gate."""

    def __init__(self) -> None:
        self.started = threading.Semaphore(0)
        self.gate = threading.Event()
        self.steps: list[int] = []

    def __call__(self, tree: Mapping[str, Any]) -> bytes:
        self.steps.append(tree["step"])
        self.started.release()
        assert self.gate.wait(timeout=30), "test never opened the gate"
        return encode_state(tree)

    def wait_started(self) -> None:
        assert self.started.acquire(timeout=30), "the writer never started a save"


@pytest.fixture
def gated(monkeypatch: pytest.MonkeyPatch) -> Iterator[GatedEncoder]:
    enc = GatedEncoder()
    monkeypatch.setattr(persist, "encode_state", enc)
    yield enc
    enc.gate.set()  # never leave a writer thread parked


def files(store: PersistentStore) -> list[str]:
    return sorted(os.listdir(store.dir))


def test_round_trip_is_bit_exact_and_manifest_describes_the_file(tmp_path: Path) -> None:
    store = PersistentStore(tmp_path, job_id="run7")
    tree = training_tree()
    info = store.save(1, tree)

    assert info.path == str(tmp_path / "run7" / "step-000000000001.ckpt")
    assert info.num_bytes == os.path.getsize(info.path)
    assert store.list() == [info]
    manifest = json.loads((tmp_path / "run7" / "step-000000000001.json").read_text())
    assert manifest == {"step": 1, "num_bytes": info.num_bytes, "crc32": info.crc32,
                        "saved_at_s": info.saved_at_s, "job_id": "run7"}

    loaded = store.load(1)
    assert_bit_exact(tree, loaded)
    model = torch.nn.Linear(8, 4)
    model.load_state_dict(loaded["model"])  # the restored state is usable as such
    opt = torch.optim.AdamW(model.parameters())
    opt.load_state_dict(loaded["optimizer"])
    # A fresh store on the same root (a cold start) sees the same checkpoint.
    assert PersistentStore(tmp_path, job_id="run7").load_latest() is not None


def test_save_async_returns_while_the_write_is_held_and_flush_makes_it_durable(
        tmp_path: Path, gated: GatedEncoder) -> None:
    store = PersistentStore(tmp_path)
    store.save_async(5, small_tree(5))  # returns although the writer is parked
    gated.wait_started()
    assert store.list() == []
    assert store.flush(timeout_s=0.05) is False  # still held

    gated.gate.set()
    assert store.flush(timeout_s=30) is True
    assert [i.step for i in store.list()] == [5]
    assert store.last_saved is not None and store.last_saved.step == 5
    assert store.last_error is None
    assert_bit_exact(store.load(5), small_tree(5))
    store.close()


def test_a_newer_request_replaces_the_queued_one(tmp_path: Path, gated: GatedEncoder) -> None:
    store = PersistentStore(tmp_path, keep=5)
    store.save_async(1, small_tree(1))
    gated.wait_started()  # step 1 is in flight
    store.save_async(2, small_tree(2))  # queued
    store.save_async(3, small_tree(3))  # replaces 2, which never started
    gated.gate.set()
    store.close()

    assert gated.steps == [1, 3]
    assert [i.step for i in store.list()] == [1, 3]
    assert store.coalesced_saves == 1


def test_close_is_idempotent_and_refuses_later_async_saves(tmp_path: Path) -> None:
    store = PersistentStore(tmp_path)
    store.save_async(1, small_tree(1))
    store.close()
    store.close()
    assert [i.step for i in store.list()] == [1]
    with pytest.raises(PersistError, match="closed"):
        store.save_async(2, small_tree(2))


def test_prunes_to_the_newest_keep(tmp_path: Path) -> None:
    store = PersistentStore(tmp_path, keep=2)
    for step in range(1, 6):
        store.save(step * 10, small_tree(step * 10))
    assert [i.step for i in store.list()] == [40, 50]
    assert files(store) == ["step-000000000040.ckpt", "step-000000000040.json",
                            "step-000000000050.ckpt", "step-000000000050.json"]


def flip_byte(path: str, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def truncate_half(path: str) -> None:
    os.truncate(path, os.path.getsize(path) // 2)


@pytest.mark.parametrize("damage", [
    lambda p: flip_byte(p, os.path.getsize(p) // 2),
    lambda p: flip_byte(p, 20),  # inside the header's CRC field
    truncate_half,
], ids=["flipped-payload-byte", "flipped-header-byte", "truncated"])
def test_a_damaged_newest_checkpoint_is_reported_and_the_older_one_loaded(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: Any) -> None:
    store = PersistentStore(tmp_path, keep=3)
    older, newer = training_tree(1), training_tree(2)
    store.save(1, older)
    bad = store.save(2, newer)
    damage(bad.path)

    with pytest.raises(CheckpointCorrupt, match=bad.path):
        store.load(2)
    with caplog.at_level(logging.ERROR, logger="splice.persist"):
        latest = store.load_latest()
    assert latest is not None
    step, tree = latest
    assert step == 1
    assert_bit_exact(tree, older)
    assert store.skipped_corrupt == 1
    assert any(bad.path in r.getMessage() for r in caplog.records)


def test_load_latest_is_none_without_an_intact_checkpoint(tmp_path: Path) -> None:
    store = PersistentStore(tmp_path)
    assert store.load_latest() is None
    info = store.save(1, small_tree(1))
    truncate_half(info.path)
    assert store.load_latest() is None
    assert store.skipped_corrupt == 1


def test_a_crashed_writers_tmp_file_is_ignored_then_removed(tmp_path: Path) -> None:
    store = PersistentStore(tmp_path)
    store.save(1, small_tree(1))
    # A writer that died mid-save: its pid names the temporary file, and it is gone.
    crashed = subprocess.run(
        [sys.executable, "-c", "import os, sys; open(os.path.join(sys.argv[1], "
         "f'step-000000000002.ckpt.tmp-{os.getpid()}'), 'wb').write(b'partial')",
         str(store.dir)], check=True)
    assert crashed.returncode == 0
    # A writer that is still running keeps its file.
    live = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                            stdin=subprocess.PIPE)
    try:
        live_tmp = store.dir / f"step-000000000003.ckpt.tmp-{live.pid}"
        live_tmp.write_bytes(b"partial")
        assert [i.step for i in store.list()] == [1]
        with pytest.raises(PersistError, match="step-000000000002.ckpt"):
            store.load(2)

        restarted = PersistentStore(tmp_path)
        assert files(restarted) == ["step-000000000001.ckpt", "step-000000000001.json",
                                    live_tmp.name]
        assert restarted.load_latest() is not None
    finally:
        assert live.stdin is not None
        live.stdin.close()
        live.wait()


CRASHING_WRITER = """
import sys, torch
from splice.checkpoint.persist import PersistentStore
store = PersistentStore(sys.argv[1], keep=2)
tree = {"model": {"w": torch.randn(1 << 20)}}
step = 0
while True:
    step += 1
    tree["step"] = step
    store.save(step, tree)
    print(step, flush=True)
"""


def test_a_writer_killed_mid_save_leaves_an_intact_latest_checkpoint(tmp_path: Path) -> None:
    child = subprocess.Popen([sys.executable, "-c", CRASHING_WRITER, str(tmp_path)],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        for line in child.stdout:
            if int(line) >= 3:
                break
        child.kill()  # SIGKILL: somewhere in the next save, no cleanup runs
    finally:
        child.kill()
        child.wait()

    store = PersistentStore(tmp_path)
    assert not [n for n in files(store) if ".tmp-" in n]
    latest = store.load_latest()
    assert latest is not None and latest[0] >= 3
    assert latest[1]["step"] == latest[0]
    assert store.skipped_corrupt == 0


@pytest.mark.parametrize("job_id", ["", "a/b", "..", "a..b", ".", "a\\b"])
def test_bad_job_id_is_refused(tmp_path: Path, job_id: str) -> None:
    with pytest.raises(ValueError, match="job_id"):
        PersistentStore(tmp_path, job_id=job_id)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("keep", [0, -1, 1.5, True])
def test_bad_keep_is_refused(tmp_path: Path, keep: Any) -> None:
    with pytest.raises(ValueError, match="keep"):
        PersistentStore(tmp_path, keep=keep)


@pytest.mark.parametrize("step", [-1, 10**12, 1.0])
def test_bad_step_is_refused(tmp_path: Path, step: Any) -> None:
    store = PersistentStore(tmp_path)
    with pytest.raises(ValueError, match="step"):
        store.save_async(step, small_tree(0))
    with pytest.raises(ValueError, match="step"):
        store.save(step, small_tree(0))


def test_loading_a_missing_step_names_the_path(tmp_path: Path) -> None:
    store = PersistentStore(tmp_path, job_id="j")
    store.save(1, small_tree(1))
    with pytest.raises(PersistError, match="step-000000000009.ckpt") as e:
        store.load(9)
    assert not isinstance(e.value, CheckpointCorrupt)
    assert str(tmp_path / "j") in str(e.value) and "[1]" in str(e.value)


def test_jobs_do_not_see_each_other(tmp_path: Path) -> None:
    a = PersistentStore(tmp_path, job_id="a")
    b = PersistentStore(tmp_path, job_id="b")
    a.save(1, small_tree(1))
    assert b.list() == [] and b.load_latest() is None


@pytest.mark.parametrize("fail_on", [".ckpt", ".json"], ids=["data-rename", "manifest-rename"])
def test_a_write_error_is_kept_and_leaves_no_listed_or_partial_checkpoint(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        fail_on: str) -> None:
    store = PersistentStore(tmp_path)
    real_replace = os.replace

    def replace(src: Any, dst: Any) -> None:
        if str(dst).endswith(fail_on):
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with caplog.at_level(logging.ERROR, logger="splice.persist"):
        store.save_async(1, small_tree(1))
        assert store.flush(timeout_s=30)
    err = store.last_error
    assert isinstance(err, PersistError)
    assert "step-000000000001.ckpt" in str(err) and "No space left" in str(err)
    assert store.failed_saves == 1
    assert any("No space left" in r.getMessage() for r in caplog.records)
    assert store.list() == []
    assert not [n for n in files(store) if ".tmp-" in n]

    monkeypatch.setattr(os, "replace", real_replace)
    store.save_async(2, small_tree(2))
    store.close()
    assert store.last_error is None  # a later success clears it
    assert [i.step for i in store.list()] == [2]
    assert files(store) == ["step-000000000002.ckpt", "step-000000000002.json"]


def test_an_unencodable_tree_fails_in_the_background_not_the_caller(tmp_path: Path) -> None:
    store = PersistentStore(tmp_path)
    store.save_async(1, {"step": 1, "hook": lambda: None})
    store.close()
    assert isinstance(store.last_error, PersistError)
    assert "step 1" in str(store.last_error)
    assert store.list() == []


def test_info_is_frozen(tmp_path: Path) -> None:
    info = PersistentStore(tmp_path).save(1, small_tree(1))
    assert isinstance(info, CheckpointInfo)
    with pytest.raises(AttributeError):
        info.step = 2  # type: ignore[misc]
