"""Telling whether other processes disturbed a timing (the machine has only 2 cores)."""

from __future__ import annotations

import os
import resource
import time


def busy_seconds() -> tuple[float, float]:
    """(CPU seconds busy on the whole machine, CPU seconds used by this process)."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(v) for v in stat.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        machine = (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        machine = float("nan")
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return machine, usage.ru_utime + usage.ru_stime


class ForeignLoad:
    """How busy other processes kept the machine's CPUs, as a fraction of all of them."""

    fraction = float("nan")

    def __enter__(self) -> ForeignLoad:
        self.start = time.perf_counter()
        self.machine, self.own = busy_seconds()
        return self

    def __exit__(self, *exc) -> None:
        wall = time.perf_counter() - self.start
        machine, own = busy_seconds()
        foreign = (machine - self.machine) - (own - self.own)
        self.fraction = max(0.0, foreign) / (max(wall, 1e-9) * (os.cpu_count() or 1))
