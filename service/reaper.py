"""The lease reaper: puts shards whose worker died back in the queue (a SIGKILLed worker's
message may take minutes to come back from the broker, or never from the embedded one),
and sends again the messages a worker took and died with before it claimed them."""

from __future__ import annotations

import logging
import threading
import time

from kombu.exceptions import ChannelError

from infra import jobs
from infra.broker import QUEUE
from infra.dispatch import dispatch

log = logging.getLogger("robustness.reaper")


class Reaper(threading.Thread):
    def __init__(self, sessions, celery, every_s: float, max_attempts: int, claim_grace_s: float):
        super().__init__(daemon=True, name="lease-reaper")
        self.sessions, self.celery, self.every_s, self.max_attempts = sessions, celery, every_s, max_attempts
        self.claim_grace_s = claim_grace_s  # a delivered message is claimed well within this
        self._stopping = threading.Event()

    def run(self) -> None:
        while not self._stopping.wait(self.every_s):
            try:
                self.sweep()
            except Exception:  # keep reaping after a database or broker hiccup
                log.exception("reaper.sweep_failed")

    def sweep(self) -> int:
        # the queue is read before the database: a shard sent after this read is too recent
        # to count as lost, and one sent before it and still unclaimed is not in the queue
        if self.queue_is_empty():
            with self.sessions() as db:
                jobs.forget_lost_deliveries(db, time.time() - self.claim_grace_s)
        with self.sessions() as db:
            pending = jobs.reap(db, self.max_attempts)
        by_job: dict[str, list[int]] = {}
        for job_id, position in pending:
            by_job.setdefault(job_id, []).append(position)
        return sum(
            dispatch(self.sessions, self.celery, job_id, positions) for job_id, positions in by_job.items()
        )

    def queue_is_empty(self) -> bool:
        """Whether the broker holds no message waiting for a worker (False when unsure)."""
        try:
            with self.celery.connection_for_read() as connection:
                _, waiting, _ = connection.default_channel.queue_declare(queue=QUEUE, passive=True)
        except ChannelError as exc:
            # Redis keeps no empty list, so an empty queue is a missing one there
            return "NOT_FOUND" in str(exc) or getattr(exc, "reply_code", None) == 404
        except Exception as exc:  # the broker is down: unsure, so nothing counts as lost
            log.debug("reaper.queue_unknown error=%s", exc)
            return False
        return waiting == 0

    def stop(self) -> None:
        self._stopping.set()
