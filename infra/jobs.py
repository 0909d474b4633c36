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

from sqlalchemy import CursorResult, Executable, case, func, select, update
from sqlalchemy.orm import Session

from infra.records import Job, Shard, Tenant, utcnow

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


def claim_next(db: Session, worker: str, lease_s: float, max_attempts: int) -> Claim | None:
    """Take the fairest claimable shard of any job, or None when none is left.

    Each message in the broker is a ticket for one shard's worth of work, not an order to
    run that shard: whichever message a worker takes, it runs the shard of the tenant with
    the fewest shards running, the tenant served longest ago first among equals (round robin),
    that tenant's oldest job first. A tenant who queued a thousand shards thus holds no more
    workers than its fair share while another tenant has work waiting. There is a message for
    every queued shard, so every shard still runs; a message that finds nothing left is a no-op.
    """
    for _ in range(16):  # another worker may take the chosen shard first: choose again
        choice = _fairest(db)
        if choice is None:
            return None
        claimed = claim(db, choice[0], choice[1], worker, lease_s, max_attempts)
        if claimed is not None:
            return claimed
    return None


def _fairest(db: Session) -> tuple[str, int] | None:
    now = time.time()
    claimable = (Shard.state == "queued") | ((Shard.state == "running") & (Shard.lease_until < now))
    of_active_jobs = (Job.id == Shard.job_id) & Job.state.in_(ACTIVE)
    waiting = db.execute(
        select(Job.tenant_id, func.min(Job.created_at)).join(Shard, of_active_jobs).where(claimable)
        .group_by(Job.tenant_id)
    ).all()
    if not waiting:
        return None
    running = dict(db.execute(
        select(Job.tenant_id, func.count()).join(Shard, of_active_jobs)
        .where(Shard.state == "running", Shard.lease_until >= now).group_by(Job.tenant_id)
    ).all())
    served = dict(db.execute(
        select(Job.tenant_id, func.max(Shard.started_at)).join(Shard, of_active_jobs).group_by(Job.tenant_id)
    ).all())

    def moment(when: datetime | None) -> float:  # naive on SQLite, aware on PostgreSQL
        return when.timestamp() if when is not None else float("-inf")

    def turn(row) -> tuple:
        tenant, oldest = row
        return running.get(tenant, 0), moment(served.get(tenant)), moment(oldest)

    tenant = min(waiting, key=turn)[0]
    row = db.execute(
        select(Shard.job_id, Shard.position).join(Job, of_active_jobs)
        .where(Job.tenant_id == tenant, claimable)
        .order_by(Job.created_at, Job.id, Shard.position).limit(1)
    ).first()
    db.commit()  # end the read: the claim that follows is a transaction of its own
    return (row.job_id, row.position) if row is not None else None


def heartbeat(db: Session, claim: Claim, lease_s: float, progress: tuple[str, int] | None = None) -> str:
    """Renew the lease (and record progress). Returns the job's state, so a running shard
    learns that its job was cancelled or failed elsewhere ("gone" if it was deleted), or
    "lease_lost" when the reaper gave the shard to another attempt (this worker stalled past
    its lease)."""
    values: dict[str, Any] = {"lease_until": time.time() + lease_s}
    if progress is not None:  # a later attempt shows its progress once it passes the earlier one's
        values.update(stage=progress[0], done=case((Shard.done < progress[1], progress[1]), else_=Shard.done))
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


def verdict_of(job: Any) -> str | None:
    """passed, failed or inconclusive once succeeded (jobs finished before verdicts: from passed)."""
    if job.verdict is not None or job.passed is None:
        return job.verdict
    return "passed" if job.passed else "failed"


def complete_job(db: Session, claim: Claim, result: dict, passed: bool, artifacts: dict,
                 verdict: str | None = None) -> bool:
    """The job succeeded with ``result``; its report is rendered after this (attach_report),
    so the result is not kept waiting for it."""
    finished = _write(
        db,
        update(Job)
        .where(Job.id == claim.job_id, Job.state == "running")
        .values(state="succeeded", result=result, passed=passed, artifacts=artifacts,
                report_state="rendering", finished_at=utcnow(),
                verdict=verdict or ("passed" if passed else "failed"))
    )
    db.execute(
        update(Shard)
        .where(Shard.id == claim.shard_id, Shard.attempts == claim.attempt)
        .values(state="succeeded", finished_at=utcnow(), lease_until=None, done=1)
    )
    db.commit()
    return finished.rowcount == 1


def attach_report(db: Session, job_id: str, report_sha256: str | None) -> None:
    """The rendered report of a succeeded job, or None: it could not be rendered."""
    db.execute(
        update(Job).where(Job.id == job_id)
        .values(report_sha256=report_sha256, report_state="ready" if report_sha256 else "failed")
    )
    db.commit()


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


# what a status read needs of a job: never its spec, result or baselines (large JSON)
STATUS_COLUMNS = (
    Job.id, Job.tenant_id, Job.model_id, Job.dataset_id, Job.state, Job.created_at, Job.started_at,
    Job.finished_at, Job.error_code, Job.error_message, Job.passed, Job.verdict, Job.shards, Job.cost,
    Job.report_sha256, Job.report_state,
)
_SHARD_COLUMNS = (
    Shard.job_id, Shard.position, Shard.kind, Shard.state, Shard.stage, Shard.done, Shard.total,
    Shard.attempts, Shard.started_at, Shard.finished_at,
)


def statuses(db: Session, job_ids: list[str]) -> dict[str, tuple[Any, dict]]:
    """job id -> (its STATUS_COLUMNS row, its progress), in two queries for any number of jobs."""
    if not job_ids:
        return {}
    rows = db.execute(select(*STATUS_COLUMNS).where(Job.id.in_(job_ids))).all()
    shards: dict[str, list] = {row.id: [] for row in rows}
    for shard in db.execute(
        select(*_SHARD_COLUMNS).where(Shard.job_id.in_(list(shards))).order_by(Shard.job_id, Shard.position)
    ):
        shards[shard.job_id].append(shard)
    now = utcnow()
    return {row.id: (row, progress(row.state, shards[row.id], now)) for row in rows}


def progress_of(db: Session, job: Job) -> dict:
    return statuses(db, [job.id])[job.id][1]


def progress(state: str, shards: list, now: datetime) -> dict:
    """Done and total work units (each never goes backwards: a requeued shard keeps what it had
    done until its new attempt passes it), the stage (never null before the job ends; where
    it stopped once it failed or was cancelled), and the ETA from the measured rate of work."""
    done = sum(r.done for r in shards)
    total = sum(r.total for r in shards)
    return {"stage": _stage(state, shards), "done": done, "total": total,
            "eta_seconds": _eta(shards, total - done, now) if state == "running" else None}


def _stage(state: str, shards: list) -> str | None:
    if state == "queued":
        return "queued"
    if state == "succeeded":
        return "done"
    current = [r for r in shards if r.state == "running"]
    if state in TERMINAL:  # failed or cancelled: the furthest a shard that did not finish got
        current = [r for r in shards if r.state != "succeeded" and (r.stage or r.kind == FINISH)
                   and r.started_at is not None]
    if not current:  # running between shards, or stopped before any shard started
        return "waiting_for_worker" if state == "running" else "queued"
    first = current[0]
    if first.kind == FINISH:
        return "aggregating"
    return first.stage or "starting"


def _eta(shards: list, remaining: int, now: datetime) -> float | None:
    """Remaining work over the measured rate: units per second of a worker on this job (from
    its finished shards and its running first attempts), times the workers on it now."""
    measured_done, measured_s = 0, 0.0
    for r in shards:
        if r.started_at is None or r.kind == FINISH:
            continue
        if r.state == "succeeded" and r.finished_at is not None:
            measured_done += r.total
            measured_s += (r.finished_at - r.started_at).total_seconds()
        elif r.state == "running" and r.attempts == 1:
            measured_done += r.done
            measured_s += (now - r.started_at).total_seconds()
    if measured_done <= 0 or measured_s <= 0:
        return None  # nothing measured yet
    workers = max(1, sum(1 for r in shards if r.state == "running"))
    return round(remaining / (measured_done / measured_s) / workers, 1)


def counts_by_state(db: Session) -> dict[str, int]:
    return dict(db.execute(select(Job.state, func.count()).group_by(Job.state)).all())


def lock_admissions(db: Session, tenant_id: str) -> None:
    """Serialize the tenant's submissions until this transaction ends, so that counting its active
    jobs (and their cost) and adding one more is a single step even for concurrent requests: on
    PostgreSQL a lock on the tenant's row (gateway processes and threads alike; FOR NO KEY UPDATE,
    so rows that only refer to the tenant are not held up), on SQLite the database's write lock
    (BEGIN IMMEDIATE: one writer at a time, and what is read after it is the newest)."""
    if db.get_bind().dialect.name == "sqlite":
        db.commit()  # end the reads so far: the write transaction starts here, before the counts
        db.connection().exec_driver_sql("BEGIN IMMEDIATE")
    else:
        db.execute(select(Tenant.id).where(Tenant.id == tenant_id).with_for_update(key_share=True))


def active_jobs(db: Session, tenant_id: str) -> int:
    return db.scalars(
        select(func.count()).select_from(Job).where(Job.tenant_id == tenant_id, Job.state.in_(ACTIVE))
    ).one()


def seconds_since(when: datetime | None) -> float:
    """Seconds from a stored time (naive UTC; PostgreSQL may hand back an aware one) to now."""
    if when is None:
        return float("inf")
    return (utcnow() - when.replace(tzinfo=None)).total_seconds()


def iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat(timespec="milliseconds") + "Z"
