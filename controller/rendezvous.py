"""The rendezvous store that workers' process groups meet in.

It lives in the controller, not in a worker, because a process group must never depend on
a store hosted by a process that can die with the group. Each epoch's groups use their
own key prefix, so groups of different epochs never see each other's keys.
"""

from __future__ import annotations

import datetime
from typing import Any


class RendezvousStore:
    """A torch TCPStore server. torch is imported here only: it is the store's wire format."""

    def __init__(self, host: str, port: int = 0, *, timeout_s: float = 60.0) -> None:
        from torch.distributed import TCPStore

        self._store: Any = TCPStore(
            host, port, is_master=True, wait_for_workers=False,
            timeout=datetime.timedelta(seconds=timeout_s), use_libuv=True,
        )
        self.host = host
        self.port = int(self._store.port)

    def close(self) -> None:
        self._store = None  # the server stops when its last reference goes

    def prefix(self, job_id: str, epoch: int) -> str:
        return f"{job_id}/epoch-{epoch}"
