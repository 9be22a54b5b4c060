"""`splice status --watch`: the status table redrawn every interval until Ctrl-C.

On a terminal each refresh clears the screen and redraws in place; into a pipe or a file
each refresh is appended under a time stamp, so a log keeps the whole history.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, TextIO

from splice.diagnostics.timeline import format_status

if TYPE_CHECKING:
    from splice.security import TLSConfig

CLEAR_SCREEN = "\x1b[H\x1b[2J"  # cursor home, erase the screen


def watch(render: Callable[[], str], *, interval_s: float, out: TextIO, is_tty: bool,
          clock: Callable[[], float] = time.time,
          sleep: Callable[[float], None] = time.sleep) -> int:
    """Write `render()` every `interval_s` until interrupted; Ctrl-C is the normal way out,
    so it returns 0."""
    try:
        while True:
            text = render()
            stamp = time.strftime("%H:%M:%S", time.localtime(clock()))
            if is_tty:
                out.write(f"{CLEAR_SCREEN}every {interval_s:g} s, {stamp} (Ctrl-C to quit)\n"
                          f"{text}\n")
            else:
                out.write(f"--- {stamp}\n{text}\n")
            out.flush()
            sleep(interval_s)
    except KeyboardInterrupt:
        return 0


def run_watch(controller: str, job_id: str, tls: TLSConfig | None, *,
              interval_s: float) -> int:
    """The CLI's entry. An unreachable controller is shown in place of the table and
    retried at the next refresh: a failover should not end the watch."""
    if interval_s <= 0:
        raise ValueError("--interval-s must be positive")
    import grpc

    from splice.proto import controller_pb2 as pb
    from splice.proto import controller_pb2_grpc as pb_grpc
    from splice.security import open_channel

    with open_channel(controller, tls) as channel:
        stub = pb_grpc.ControllerStub(channel)

        def render() -> str:
            try:
                return format_status(stub.GetJobStatus(pb.JobStatusRequest(job_id=job_id),
                                                       timeout=5))
            except grpc.RpcError as e:
                return f"splice status: {e.code().name}: {e.details()}"

        return watch(render, interval_s=interval_s, out=sys.stdout,
                     is_tty=sys.stdout.isatty())
