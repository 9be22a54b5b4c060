"""Layering contract: lower layers never import upper ones, and torch stays out of the
control plane (it is imported only where tensors are touched)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# folder -> module prefixes its top-level imports must not name
FORBIDDEN = {
    "controller": ("torch", "splice.agent", "splice.checkpoint", "splice.kernels",
                   "splice.diagnostics"),
    "proto": ("torch", "splice.agent", "splice.controller", "splice.checkpoint"),
    "agent": ("torch", "splice.checkpoint", "splice.diagnostics"),  # the agent, not its hook
    "checkpoint": ("splice.agent", "splice.controller", "splice.diagnostics"),
    "diagnostics": ("torch", "splice.agent.worker", "splice.checkpoint"),
}
# The worker hook lives under agent/ but is the in-process half: it may use torch.
EXEMPT_DIRS = {ROOT / "agent" / "worker"}


def module_level_imports(path: Path) -> list[str]:
    """Names imported at module level (function-local imports are deliberate and lazy)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names: list[str] = []
    for node in tree.body:
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


def cases() -> list[tuple[str, Path]]:
    out = []
    for folder in FORBIDDEN:
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path.name.endswith(("_pb2.py", "_pb2_grpc.py")):
                continue
            if any(d in path.parents for d in EXEMPT_DIRS):
                continue
            out.append((folder, path))
    return out


@pytest.mark.parametrize(("folder", "path"), cases(),
                         ids=lambda v: str(v.relative_to(ROOT)) if isinstance(v, Path) else v)
def test_module_respects_its_layer(folder: str, path: Path) -> None:
    bad = [n for n in module_level_imports(path)
           if any(n == f or n.startswith(f + ".") for f in FORBIDDEN[folder])]
    assert not bad, f"{path.relative_to(ROOT)} imports {bad}, forbidden in {folder}/"


def test_importing_the_control_plane_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = ("import sys, splice, splice.cli, splice.controller.service, splice.agent.agent; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr
