"""Batch sizes from a memory budget: a gradient call must not take more memory than a worker has.

A 224x224 model's gradient graph holds every activation of the forward pass for the backward
one: ResNet-50 needs about 100 MB per image, so the spec's batch of 64 would take 6 GB per
worker. The footprint of a model's calls is measured once per process (and cached): a fresh
ONNX Runtime session runs a batch of 1, then of ``PROBE_BATCH`` (larger, up to the spec's batch,
until memory grows by ``RESOLUTION``), twice each, while the
process's peak resident memory (Linux's VmHWM, reset through /proc/self/clear_refs) is read,
and memory is taken as ``base + per_sample x batch``. With a budget, the batch-1 peak is checked
against it first, and no larger probe is run whose peak, scaled from the last one as if all of it
grew with the batch, would pass it (a 495-byte model whose Expand makes 1 GiB per image took
8.7 GB at a probe of 4 under a 1.5 GB budget); where the growth cannot be resolved that way the
footprint is that scaling itself. Twice, because from its second run of a
shape ONNX Runtime's memory pattern allocates one block for all the intermediate tensors
while its arena keeps the first run's: a session's steady state takes about twice a first
run's peak. Freed heap is handed back to the system (malloc_trim) before each measurement, so
that the growth seen is the call's own. The batch used is the largest within the
budget, at most the spec's. Where the peak cannot be read (not Linux) the spec's batch is kept.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import math
import os
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from workers.errors import UserError

log = logging.getLogger(__name__)

MiB = 1 << 20
PROBE_BATCH = 4
RESOLUTION = 8 * MiB  # a smaller growth between the two probes is measured again at a larger batch
_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


class OverMemoryBudget(UserError):
    status = 422
    type = "over_budget"


@dataclass(frozen=True)
class Footprint:
    """Memory of one gradient call, beyond what the process held before it."""

    base: int  # bytes at any batch size (the session's own buffers)
    per_sample: int  # bytes per sample of the batch

    def at(self, batch: int) -> int:
        return self.base + self.per_sample * batch

    def batch_within(self, budget: int, cap: int) -> int:
        """The largest batch, at most ``cap``, whose call fits in ``budget``; 0 if none does."""
        if self.per_sample <= 0:
            return cap if self.base <= budget else 0
        return max(0, min(cap, (budget - self.base) // self.per_sample))


def peak_tracking_available() -> bool:
    try:
        _reset_peak()
        return _status("VmHWM") > 0
    except OSError:
        return False


def _status(field: str) -> int:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024  # kB
    raise OSError(f"{_STATUS} has no {field}")


def _reset_peak() -> None:
    with _CLEAR_REFS.open("w") as handle:
        handle.write("5")  # resets VmHWM to the current resident size


def _trim() -> None:
    with contextlib.suppress(OSError, AttributeError):  # not glibc: freed heap may hide some growth
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def peak_of(run: Callable[[], object]) -> int:
    """Bytes by which the process's resident memory peaked above its size before ``run``."""
    _trim()
    before = _status("VmRSS")
    _reset_peak()
    run()
    return max(0, _status("VmHWM") - before)


_FOOTPRINTS: dict[tuple, Footprint] = {}
_LOCK = threading.Lock()


def footprint(key: tuple, measure: Callable[[int], int], cap: int, budget: int | None = None) -> Footprint:
    """The cached footprint under ``key``, measured with ``measure(batch)`` -> peak bytes; with a
    ``budget``, no probe is predicted to pass it."""
    with _LOCK:
        if key in _FOOTPRINTS:
            return _FOOTPRINTS[key]
    small = measure(1)
    probe, large = 1, small
    while probe < cap and (probe == 1 or large - small < RESOLUTION):  # a small model: its growth hides
        larger = min(cap, PROBE_BATCH if probe == 1 else probe * 4, _probe_within(budget, probe, large))
        if larger <= probe:
            break
        probe, large = larger, measure(larger)
    if probe == 1 or (probe < cap and large - small < RESOLUTION):  # stopped by the budget, unresolved
        found = Footprint(base=0, per_sample=-(-large // probe))
    else:
        per_sample = max((large - small) // (probe - 1), 0)
        found = Footprint(base=max(large - per_sample * probe, 0), per_sample=per_sample)
    with _LOCK:
        _FOOTPRINTS[key] = found
    log.info("memory.footprint key=%s base=%.1fMB per_sample=%.1fMB", key[0][:12], found.base / MiB,
             found.per_sample / MiB)
    return found


def _probe_within(budget: int | None, batch: int, peak: int) -> int:
    """The largest batch whose peak stays within ``budget`` if ``peak`` at ``batch`` were all per sample
    (an upper bound: the base does not grow)."""
    return batch * 4 if budget is None else budget * batch // max(peak, 1)


def largest_sample_tensor(graph: onnx.GraphProto) -> tuple[str, int]:
    """The name and bytes of ``graph``'s largest intermediate tensor for one sample, from the shapes
    inference gave it (value_info): every call holds at least that much. A symbolic axis (the batch, a
    free image side) counts as 1; a tensor of unknown shape is skipped."""
    largest = ("", 0)
    for value in graph.value_info:
        size = _sample_bytes(value.type.tensor_type)
        if size > largest[1]:
            largest = (value.name, size)
    return largest


def _sample_bytes(tensor_type: onnx.TypeProto.Tensor) -> int:
    if not tensor_type.HasField("shape"):
        return 0
    try:
        itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)).itemsize
    except (KeyError, TypeError, ValueError):  # no element type, or a packed one (4-bit): a small share
        return 0
    return itemsize * math.prod(d.dim_value if d.HasField("dim_value") else 1 for d in tensor_type.shape.dim)


GPU_SHARE = 0.8  # of the GPU memory free when a model's batch is chosen


def gpu_memory() -> tuple[int, int] | None:
    """(bytes in use, bytes free) on the GPU this process uses (the first of CUDA_VISIBLE_DEVICES,
    an index or a UUID as nvidia-smi takes them; a worker started by ``--gpus`` sees one), read
    from nvidia-smi; None where it cannot be read. ONNX Runtime's CUDA arena keeps what a session
    allocated, so the growth in use while a session lives is its peak (rounded up to the arena's
    chunks: a conservative figure)."""
    device = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip() or "0"
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=memory.used,memory.free",
                               "--format=csv,noheader,nounits", "-i", device],
                              capture_output=True, text=True, timeout=10, check=True)
        used, free = (int(value) for value in done.stdout.strip().splitlines()[0].split(","))
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None
    return used * MiB, free * MiB


def default_budget(concurrency: int, share: float = 0.5) -> int:
    """``share`` of the memory available now, split between ``concurrency`` worker processes."""
    try:
        lines = Path("/proc/meminfo").read_text().splitlines()
        available = next(int(line.split()[1]) * 1024 for line in lines if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(available * share / max(1, concurrency))
