"""Sending work units to the broker. A unit whose message could not be sent keeps
``dispatched_at`` empty, and the reaper sends it again."""

from __future__ import annotations

import logging

from sqlalchemy.orm import Session, sessionmaker

from service import jobs

log = logging.getLogger("robustness.dispatch")


def dispatch(sessions: sessionmaker[Session], celery, job_id: str, positions: list[int]) -> int:
    from workers.celery_app import QUEUE, UNIT_TASK

    sent = 0
    for position in positions:
        try:
            celery.send_task(UNIT_TASK, args=[job_id, position], queue=QUEUE)
        except Exception as exc:  # the broker is down: the reaper retries
            log.warning("evaluation.dispatch_failed job=%s shard=%s error=%s", job_id, position, exc)
            continue
        with sessions() as db:
            jobs.mark_dispatched(db, job_id, position)
        sent += 1
    return sent
