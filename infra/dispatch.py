"""Sending work units to the broker. A unit whose message could not be sent keeps
``dispatched_at`` empty, and the reaper sends it again."""

from __future__ import annotations

import logging

from celery import group
from sqlalchemy.orm import Session, sessionmaker

from infra import jobs
from infra.broker import QUEUE, UNIT_TASK

log = logging.getLogger("robustness.dispatch")


def dispatch(sessions: sessionmaker[Session], celery, job_id: str, positions: list[int]) -> int:
    """Send the units as one Celery group; the fan-in is the database's (jobs.complete_shard),
    so no result backend is needed and a redelivered unit cannot trigger it twice."""
    if not positions:
        return 0
    units = group(celery.signature(UNIT_TASK, args=[job_id, p], queue=QUEUE) for p in positions)
    try:
        units.apply_async()
    except Exception as exc:  # the broker is down: the reaper sends them again
        log.warning("evaluation.dispatch_failed job=%s shards=%s error=%s", job_id, positions, exc)
        return 0
    with sessions() as db:
        for position in positions:
            jobs.mark_dispatched(db, job_id, position)
    return len(positions)
