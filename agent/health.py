"""Node health as the agent sees it: memory pressure, CPU throttling, GPUs through NVML.

Each probe is best effort: what the platform does not expose is reported as 0 with a note,
never guessed.
"""

from __future__ import annotations

import psutil

from splice.proto import controller_pb2 as pb

_CPU_STAT = "/sys/fs/cgroup/cpu.stat"  # cgroup v2


def _read_cpu_stat() -> tuple[int, int] | None:
    try:
        with open(_CPU_STAT) as f:
            fields = dict(line.split() for line in f if line.strip())
        return int(fields.get("nr_periods", 0)), int(fields.get("nr_throttled", 0))
    except (OSError, ValueError):
        return None


class NodeHealthProbe:
    def __init__(self) -> None:
        self._last_cpu = _read_cpu_stat()
        self._nvml = None
        try:  # NVML only where it is installed and a driver answers
            import pynvml  # type: ignore[import-not-found]

            pynvml.nvmlInit()
            self._nvml = pynvml
        except Exception:
            self._nvml = None

    def read(self) -> pb.NodeHealth:
        health = pb.NodeHealth(memory_used_ratio=psutil.virtual_memory().percent / 100.0)
        cpu = _read_cpu_stat()
        if cpu is not None and self._last_cpu is not None:
            periods = cpu[0] - self._last_cpu[0]
            throttled = cpu[1] - self._last_cpu[1]
            health.cpu_throttled_ratio = throttled / periods if periods > 0 else 0.0
        self._last_cpu = cpu
        if self._nvml is not None:
            try:
                health.gpus = int(self._nvml.nvmlDeviceGetCount())
            except Exception as e:
                health.notes = f"NVML: {e}"
        else:
            health.notes = "no NVML"
        return health
