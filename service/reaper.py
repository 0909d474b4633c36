"""The lease reaper: puts shards whose worker died back in the queue (a SIGKILLed worker's
message may take minutes to come back from the broker, or never from the embedded one)."""

from __future__ import annotations

import logging
import threading

from service import jobs
from service.dispatch import dispatch

log = logging.getLogger("robustness.reaper")


class Reaper(threading.Thread):
    def __init__(self, sessions, celery, every_s: float, max_attempts: int):
        super().__init__(daemon=True, name="lease-reaper")
        self.sessions, self.celery, self.every_s, self.max_attempts = sessions, celery, every_s, max_attempts
        self._stopping = threading.Event()

    def run(self) -> None:
        while not self._stopping.wait(self.every_s):
            try:
                self.sweep()
            except Exception:  # keep reaping after a database or broker hiccup
                log.exception("reaper.sweep_failed")

    def sweep(self) -> int:
        with self.sessions() as db:
            pending = jobs.reap(db, self.max_attempts)
        by_job: dict[str, list[int]] = {}
        for job_id, position in pending:
            by_job.setdefault(job_id, []).append(position)
        return sum(
            dispatch(self.sessions, self.celery, job_id, positions) for job_id, positions in by_job.items()
        )

    def stop(self) -> None:
        self._stopping.set()
