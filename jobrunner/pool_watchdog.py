"""Keep a Celery worker whose prefork pool lost a process from hanging: stop it for a restart.

The pool processes share one job queue whose read lock an idle process holds while it waits.
When that process dies (the kernel's OOM killer, a stray SIGKILL, a signal to the worker's
whole process group) the lock is never released: every pool process, old or new, then waits
on it forever, and the worker goes on taking units off the broker without running them
(celery/celery#2011; checked on Celery 5.7 and billiard). Celery's own shutdown then hangs
too, waiting for those units and, at exit, for the same lock.

So the first lost process trips a warm shutdown: shards running in other pool processes
finish, and the worker exits with EXIT_POOL_LOST for `serve`, Compose or systemd to start a
fresh one. Whatever the cause of a shutdown, once no unit has run for SHUTDOWN_STALL_S the
process exits without waiting for the stuck pool; units it held unstarted stay
unacknowledged and the gateway's reaper sends them again.

Pool processes are the worker's only children, and none exits on its own while the worker
runs (no max-tasks-per-child, no autoscaling), so any child that disappears was lost.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

from celery.signals import worker_ready, worker_shutting_down

log = logging.getLogger("robustness.worker")

EXIT_POOL_LOST = 70  # EX_SOFTWARE
CHECK_INTERVAL_S = 1.0
SHUTDOWN_STALL_S = 15.0

tripped = threading.Event()  # a pool process was lost
_shutting_down = threading.Event()


def child_pids(parent: int) -> set[int]:
    """Live (not zombie) child processes of ``parent``, from /proc (Linux)."""
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


def exit_status(code: object) -> int:
    """The worker's exit status: EXIT_POOL_LOST once tripped, else Celery's ``code`` (a
    SystemExit code: None, an int or a message)."""
    if tripped.is_set():
        return EXIT_POOL_LOST
    return code if isinstance(code, int) else (0 if code is None else 1)


def force_exit(status: int, why: str) -> None:
    """Exit now, skipping Celery's and billiard's remaining shutdown."""
    print(f"robustness worker: {why}; exiting with status {status}", file=sys.stderr, flush=True)
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    os._exit(status)


def exit_within(seconds: float, status: int) -> None:
    """Exit with ``status`` if the interpreter's exit handlers still run after ``seconds``:
    billiard's pool finalizer waits for the queue lock that a lost process held."""
    timer = threading.Timer(seconds, force_exit,
                            args=(status, f"exit handlers still running after {seconds:g} s"))
    timer.daemon = True
    timer.start()


def _watch_pool(parent: int) -> None:
    known = child_pids(parent)
    while not _shutting_down.wait(CHECK_INTERVAL_S):
        current = child_pids(parent)
        lost = known - current
        if lost and not _shutting_down.is_set():
            log.error("worker.pool_process_lost pids=%s: the pool's queue lock may be lost with "
                      "it, so no unit would run here again; stopping this worker so that it is "
                      "restarted", sorted(lost))
            tripped.set()
            os.kill(parent, signal.SIGTERM)  # Celery's warm shutdown
            return
        known = current


def _exit_if_shutdown_stalls() -> None:
    from celery.worker import state

    idle_since = time.monotonic()
    while True:
        time.sleep(CHECK_INTERVAL_S)
        if state.active_requests:
            idle_since = time.monotonic()
        elif time.monotonic() - idle_since >= SHUTDOWN_STALL_S:
            force_exit(exit_status(0), f"shutdown still waiting {SHUTDOWN_STALL_S:g} s after the last "
                       "unit ended (units handed to a stuck pool never start; the gateway sends "
                       "them again)")


@worker_ready.connect
def _start(**_) -> None:
    if Path("/proc/self/stat").exists():
        threading.Thread(target=_watch_pool, args=(os.getpid(),), name="pool-watchdog",
                         daemon=True).start()


@worker_shutting_down.connect
def _on_shutdown(**_) -> None:
    if not _shutting_down.is_set():
        _shutting_down.set()
        threading.Thread(target=_exit_if_shutdown_stalls, name="shutdown-watchdog", daemon=True).start()
