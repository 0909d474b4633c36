"""The life of an evaluation in the metadata database, shared by the gateway and the workers.

A job is a row in ``evaluations`` and one row per work unit in ``shards`` (slices of the
dataset, a whole-set unit for universal perturbations, then the final aggregation). Workers
claim a shard with a conditional update and hold a lease they renew; each write is fenced by
the attempt number, so a redelivered or duplicated message changes nothing. A reaper puts
shards whose lease expired back in the queue, and fails the job after too many attempts.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import CursorResult, Executable, func, select, update
from sqlalchemy.orm import Session

from infra.records import Job, Shard, utcnow

log = logging.getLogger("robustness.jobs")

ACTIVE = ("queued", "running")
TERMINAL = ("succeeded", "failed", "cancelled")


def _write(db: Session, statement: Executable) -> CursorResult[Any]:
    """An UPDATE, whose result says how many rows it changed (the fencing depends on it)."""
    return cast(CursorResult[Any], db.execute(statement))
FINISH = "finish"


@dataclass(frozen=True)
class Claim:
    shard_id: int
    job_id: str
    position: int
    kind: str
    attempt: int


def add_shards(db: Session, job: Job, units, work: list[int]) -> None:
    """Shard rows for the engine's work units, then the aggregation that waits for them."""
    db.flush()  # the job row first: shards refer to it
    for unit, total in zip(units, work, strict=True):
        db.add(Shard(job_id=job.id, position=unit.index, kind=unit.kind, state="queued", total=total))
    db.add(Shard(job_id=job.id, position=len(units), kind=FINISH, state="waiting", total=1))


def shards_to_dispatch(db: Session, job_id: str) -> list[int]:
    return list(
        db.scalars(
            select(Shard.position).where(
                Shard.job_id == job_id, Shard.state == "queued", Shard.dispatched_at.is_(None)
            )
        )
    )


def mark_dispatched(db: Session, job_id: str, position: int) -> None:
    db.execute(
        update(Shard)
        .where(Shard.job_id == job_id, Shard.position == position, Shard.state == "queued")
        .values(dispatched_at=time.time())
    )
    db.commit()


def claim(
    db: Session, job_id: str, position: int, worker: str, lease_s: float, max_attempts: int
) -> Claim | None:
    """Take a shard for this worker, or None when it is not ours to run (done, running on a
    live worker, or its job ended). Too many attempts fail the job instead."""
    now = time.time()
    job_state = db.scalar(select(Job.state).where(Job.id == job_id))
    if job_state not in ACTIVE:
        return None
    claimable = (Shard.state == "queued") | ((Shard.state == "running") & (Shard.lease_until < now))
    row = db.execute(
        select(Shard.id, Shard.attempts, Shard.kind).where(
            Shard.job_id == job_id, Shard.position == position, claimable
        )
    ).first()
    if row is None:
        return None
    if row.attempts >= max_attempts:
        fail_job(
            db,
            job_id,
            "worker_lost",
            f"shard {position} was started {row.attempts} times and its worker stopped each time "
            "(killed, out of memory, or past the hard time limit); try a smaller batch_size or "
            "fewer samples per shard (shard_size)",
        )
        return None
    claimed = _write(
        db,
        update(Shard)
        .where(Shard.id == row.id, Shard.attempts == row.attempts, claimable)
        .values(
            state="running",
            attempts=row.attempts + 1,
            lease_until=now + lease_s,
            worker=worker,
            started_at=utcnow(),
            done=0,
        )
    )
    if claimed.rowcount != 1:
        db.rollback()
        return None
    db.execute(
        update(Job)
        .where(Job.id == job_id, Job.state == "queued")
        .values(state="running", started_at=utcnow())
    )
    db.commit()
    return Claim(row.id, job_id, position, row.kind, row.attempts + 1)


def heartbeat(db: Session, claim: Claim, lease_s: float, progress: tuple[str, int] | None = None) -> str:
    """Renew the lease (and record progress). Returns the job's state, so a running shard
    learns that its job was cancelled or failed elsewhere ("gone" if it was deleted), or
    "lease_lost" when the reaper gave the shard to another attempt (this worker stalled past
    its lease)."""
    values: dict[str, Any] = {"lease_until": time.time() + lease_s}
    if progress is not None:
        values.update(stage=progress[0], done=progress[1])
    renewed = _write(
        db,
        update(Shard)
        .where(Shard.id == claim.shard_id, Shard.attempts == claim.attempt, Shard.state == "running")
        .values(**values)
    )
    db.commit()
    state = db.scalar(select(Job.state).where(Job.id == claim.job_id))
    if renewed.rowcount != 1 and state in ACTIVE:
        return "lease_lost"
    return state or "gone"


def complete_shard(db: Session, claim: Claim, output_sha256: str, timing: dict) -> bool:
    """Record a finished unit; True when this call made the aggregation ready to dispatch."""
    done = _write(
        db,
        update(Shard)
        .where(Shard.id == claim.shard_id, Shard.attempts == claim.attempt, Shard.state == "running")
        .values(
            state="succeeded",
            output_sha256=output_sha256,
            timing=timing,
            finished_at=utcnow(),
            lease_until=None,
            done=Shard.total,
        )
    )
    db.commit()
    if done.rowcount != 1:
        return False
    # counted after our own commit, so the last unit to commit always sees all of them
    remaining = db.scalar(
        select(func.count())
        .select_from(Shard)
        .where(Shard.job_id == claim.job_id, Shard.kind != FINISH, Shard.state != "succeeded")
    )
    if remaining:
        return False
    ready = _write(
        db,
        update(Shard)
        .where(Shard.job_id == claim.job_id, Shard.kind == FINISH, Shard.state == "waiting")
        .values(state="queued")
    )
    db.commit()
    return ready.rowcount == 1


def verdict_of(job: Job) -> str | None:
    """passed, failed or inconclusive once succeeded (jobs finished before verdicts: from passed)."""
    if job.verdict is not None or job.passed is None:
        return job.verdict
    return "passed" if job.passed else "failed"


def complete_job(db: Session, claim: Claim, result: dict, passed: bool, artifacts: dict,
                 report_sha256: str | None = None, verdict: str | None = None) -> bool:
    finished = _write(
        db,
        update(Job)
        .where(Job.id == claim.job_id, Job.state == "running")
        .values(state="succeeded", result=result, passed=passed, artifacts=artifacts,
                report_sha256=report_sha256, finished_at=utcnow(),
                verdict=verdict or ("passed" if passed else "failed"))
    )
    db.execute(
        update(Shard)
        .where(Shard.id == claim.shard_id, Shard.attempts == claim.attempt)
        .values(state="succeeded", finished_at=utcnow(), lease_until=None, done=1)
    )
    db.commit()
    return finished.rowcount == 1


def fail_job(db: Session, job_id: str, code: str, message: str) -> bool:
    """End an active job as failed; shards not yet finished will not run."""
    failed = _write(
        db,
        update(Job)
        .where(Job.id == job_id, Job.state.in_(ACTIVE))
        .values(state="failed", error_code=code, error_message=message[:4000], finished_at=utcnow())
    )
    _stop_shards(db, job_id)
    db.commit()
    if failed.rowcount:
        log.warning("evaluation.failed job=%s code=%s %s", job_id, code, message[:200])
    return failed.rowcount == 1


def cancel_job(db: Session, job_id: str) -> bool:
    cancelled = _write(
        db,
        update(Job)
        .where(Job.id == job_id, Job.state.in_(ACTIVE))
        .values(
            state="cancelled",
            finished_at=utcnow(),
            error_code="cancelled",
            error_message="cancelled on request",
        )
    )
    _stop_shards(db, job_id)
    db.commit()
    return cancelled.rowcount == 1


def release_shard(db: Session, claim: Claim, state: str) -> None:
    """A shard stopped without output (its job was cancelled or failed)."""
    db.execute(
        update(Shard)
        .where(Shard.id == claim.shard_id, Shard.attempts == claim.attempt)
        .values(state=state, finished_at=utcnow(), lease_until=None)
    )
    db.commit()


def requeue_shard(db: Session, claim: Claim) -> bool:
    """Put a shard that failed with an internal error back in the queue, unsent, for another
    attempt (its attempts count stays); False when it is no longer this attempt's."""
    requeued = _write(
        db,
        update(Shard)
        .where(Shard.id == claim.shard_id, Shard.attempts == claim.attempt, Shard.state == "running")
        .values(state="queued", dispatched_at=None, lease_until=None)
    )
    db.commit()
    return requeued.rowcount == 1


def _stop_shards(db: Session, job_id: str) -> None:
    db.execute(
        update(Shard)
        .where(Shard.job_id == job_id, Shard.state.in_(("queued", "waiting", "running")))
        .values(state="cancelled", lease_until=None)
    )


def reap(db: Session, max_attempts: int) -> list[tuple[str, int]]:
    """Requeue shards whose worker stopped renewing its lease; return (job, position) pairs
    to send again (with those never sent, e.g. when the broker was down at submission)."""
    now = time.time()
    expired = db.execute(
        select(Shard.id, Shard.job_id, Shard.position, Shard.attempts).where(
            Shard.state == "running", Shard.lease_until < now
        )
    ).all()
    for row in expired:
        if row.attempts >= max_attempts:
            fail_job(
                db,
                row.job_id,
                "worker_lost",
                f"the worker running shard {row.position} stopped responding {row.attempts} times "
                "(killed, out of memory, or past the hard time limit)",
            )
            continue
        requeued = _write(
        db,
            update(Shard)
            .where(
                Shard.id == row.id,
                Shard.state == "running",
                Shard.attempts == row.attempts,
                Shard.lease_until < now,
            )
            .values(state="queued", dispatched_at=None, lease_until=None)
        )
        if requeued.rowcount:
            log.warning(
                "evaluation.shard_requeued job=%s shard=%s attempt=%s", row.job_id, row.position, row.attempts
            )
        db.commit()
    return [
        (r.job_id, r.position)
        for r in db.execute(
            select(Shard.job_id, Shard.position)
            .join(Job, Job.id == Shard.job_id)
            .where(Shard.state == "queued", Shard.dispatched_at.is_(None), Job.state.in_(ACTIVE))
        )
    ]


def forget_lost_deliveries(db: Session, sent_before: float) -> int:
    """Mark shards sent before ``sent_before`` but never claimed as not yet sent, so the
    reaper sends them again; returns how many.

    Only call this when the broker's queue is empty: then such a message is not waiting
    but gone, taken by a worker that died before claiming it (the embedded broker never
    gives a delivered message back). A duplicate is harmless: a claim runs a shard once.
    """
    lost = _write(
        db,
        update(Shard)
        .where(
            Shard.state == "queued",
            Shard.dispatched_at.is_not(None),
            Shard.dispatched_at < sent_before,
            Shard.job_id.in_(select(Job.id).where(Job.state.in_(ACTIVE))),
        )
        .values(dispatched_at=None)
        .execution_options(synchronize_session=False)
    )
    db.commit()
    if lost.rowcount:
        log.warning("evaluation.delivery_lost shards=%s: sending them again", lost.rowcount)
    return lost.rowcount


def progress_of(db: Session, job: Job) -> dict:
    rows = db.execute(
        select(Shard.position, Shard.kind, Shard.state, Shard.stage, Shard.done, Shard.total)
        .where(Shard.job_id == job.id)
        .order_by(Shard.position)
    ).all()
    done = sum(r.done for r in rows)
    total = sum(r.total for r in rows)
    running = [r for r in rows if r.state == "running"]
    stage = None
    if job.state == "queued":
        stage = "queued"
    elif running:
        stage = "aggregating" if running[0].kind == FINISH else running[0].stage
    eta = None
    if job.state == "running" and job.started_at is not None and 0 < done < total:
        elapsed = (utcnow() - job.started_at).total_seconds()
        eta = round(elapsed * (total - done) / done, 1)
    return {"stage": stage, "done": done, "total": total, "eta_seconds": eta}


def counts_by_state(db: Session) -> dict[str, int]:
    return dict(db.execute(select(Job.state, func.count()).group_by(Job.state)).all())


def active_jobs(db: Session, tenant_id: str) -> int:
    return db.scalars(
        select(func.count()).select_from(Job).where(Job.tenant_id == tenant_id, Job.state.in_(ACTIVE))
    ).one()


def iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat(timespec="milliseconds") + "Z"
