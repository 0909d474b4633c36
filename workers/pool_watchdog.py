"""Stop a Celery worker whose prefork pool lost a process, so that its supervisor restarts it.

When a pool process dies outside a shutdown (the kernel's OOM killer, a stray SIGKILL),
billiard starts a replacement on the dead process's job queue. If the dead process was idle
it died holding that queue's read lock, and the replacement waits on the lock forever: the
worker keeps taking units off the broker and never runs them (celery/celery#2011; checked
on Celery 5.7). So the first lost process trips a warm shutdown: shards running in the other
pool processes finish, units this worker holds unacknowledged go back to the broker, and the
worker exits with EXIT_POOL_LOST for `serve`, Compose or systemd to start a fresh one.

Pool processes are the worker's only children, and none exits on its own while the worker
runs (no max-tasks-per-child, no autoscaling), so any child that disappears was lost.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path

from celery.signals import worker_ready, worker_shutting_down

log = logging.getLogger("robustness.worker")

EXIT_POOL_LOST = 70  # EX_SOFTWARE
CHECK_INTERVAL_S = 1.0

_stop = threading.Event()
tripped = threading.Event()


def child_pids(parent: int) -> set[int]:
    """Live child processes of ``parent``, from /proc (Linux)."""
    children = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # exited meanwhile
            continue
        fields = text[text.rfind(")") + 2:].split()  # after "pid (comm) "; comm may hold spaces
        if len(fields) > 1 and fields[1] == str(parent) and fields[0] != "Z":
            children.add(int(stat.parent.name))
    return children


def _watch(parent: int) -> None:
    known = child_pids(parent)
    while not _stop.wait(CHECK_INTERVAL_S):
        current = child_pids(parent)
        lost = known - current
        if lost and not _stop.is_set():
            log.error("worker.pool_process_lost pids=%s: a replacement may never receive work "
                      "(billiard reuses the dead process's queue and its lock); stopping this "
                      "worker so that it is restarted", sorted(lost))
            tripped.set()
            os.kill(parent, signal.SIGTERM)  # Celery's warm shutdown
            return
        known = current


@worker_ready.connect
def _start(**_) -> None:
    if Path("/proc/self/stat").exists():
        threading.Thread(target=_watch, args=(os.getpid(),), name="pool-watchdog", daemon=True).start()


@worker_shutting_down.connect
def _stop_watching(**_) -> None:
    _stop.set()
