"""The watchdog's view of a worker's pool: live children only (a killed, unreaped process is
already lost). Losing one stops a real worker: tests/service/test_jobs_end_to_end.py."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jobrunner.pool_watchdog import EXIT_POOL_LOST, child_pids, exit_status, tripped

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")


def _state(pid: int) -> str:
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rfind(")") + 2:].split()[0]


def test_child_pids_lists_live_children_and_drops_killed_ones_before_they_are_reaped():
    # a name with spaces and a parenthesis, as /proc/PID/stat's comm field may hold
    rename = "import ctypes, time; ctypes.CDLL(None).prctl(15, b'pool (x) 1'); time.sleep(60)"
    child = subprocess.Popen([sys.executable, "-c", rename])  # 15: PR_SET_NAME
    try:
        deadline = time.monotonic() + 10
        while "pool (x)" not in Path(f"/proc/{child.pid}/stat").read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "pool (x)" in Path(f"/proc/{child.pid}/stat").read_text()
        assert child.pid in child_pids(os.getpid())
        assert child.pid not in child_pids(child.pid)
        child.kill()
        while _state(child.pid) != "Z" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _state(child.pid) == "Z"
        assert child.pid not in child_pids(os.getpid())
    finally:
        child.kill()
        child.wait()


def test_exit_status_keeps_celerys_code_until_a_pool_process_is_lost():
    assert [exit_status(code) for code in (None, 0, 3, "a message")] == [0, 0, 3, 1]
    tripped.set()
    try:
        assert exit_status(0) == EXIT_POOL_LOST
    finally:
        tripped.clear()
