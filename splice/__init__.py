"""splice: keep distributed PyTorch training running through failures.

The worker hook is the public API (`splice.init`); it is imported lazily so that the
controller and agent, which never touch tensors, do not pay for importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from splice.agent.worker.session import (
        CollectiveAborted,
        Evicted,
        HookConfig,
        RecoveryFailed,
        Session,
        StepResult,
        init,
    )

__all__ = ["CollectiveAborted", "Evicted", "HookConfig", "RecoveryFailed", "Session",
           "StepResult", "__version__", "init"]


def __getattr__(name: str) -> Any:
    if name in ("init", "Session", "StepResult", "HookConfig", "CollectiveAborted", "Evicted",
                "RecoveryFailed"):
        from splice.agent.worker import session

        return getattr(session, name)
    raise AttributeError(f"module 'splice' has no attribute {name!r}")
