"""An agent killed outright cannot remove its shared memory (its workers' snapshots): the
next agent on the node, and a local job when it closes, sweep the directories of agents
that are gone (agent/agent.py `sweep_stale_dirs`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from splice.agent.agent import OWNER_FILE, SHM_PREFIX, sweep_stale_dirs


def _agent_dir(root: Path, name: str, owner: str | None) -> Path:
    d = root / f"{SHM_PREFIX}{name}"
    (d / "snapshots" / "node-0_0").mkdir(parents=True)
    (d / "snapshots" / "node-0_0" / "slot0-1.data").write_bytes(b"\0" * 4096)
    if owner is not None:
        (d / OWNER_FILE).write_text(owner)
    return d


def test_only_the_directories_of_agents_that_are_gone_are_removed(tmp_path: Path) -> None:
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True, timeout=60)
    dead = _agent_dir(tmp_path, "dead", gone.stdout.strip())
    alive = _agent_dir(tmp_path, "alive", str(os.getpid()))
    unowned = _agent_dir(tmp_path, "unowned", None)
    garbled = _agent_dir(tmp_path, "garbled", "not a pid")
    other = tmp_path / "not-an-agent"
    other.mkdir()
    (other / OWNER_FILE).write_text(gone.stdout.strip())

    assert sweep_stale_dirs(str(tmp_path)) == [str(dead)]
    assert not dead.exists()
    assert alive.exists() and unowned.exists() and garbled.exists() and other.exists()
    assert sweep_stale_dirs(str(tmp_path)) == []


def test_a_missing_root_is_nothing_to_sweep(tmp_path: Path) -> None:
    assert sweep_stale_dirs(str(tmp_path / "absent")) == []
