"""The job state machine in the metadata database: claims, leases, fencing, the reaper and
the hand-over to the aggregation, without a broker or a worker."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import update

from infra import jobs
from infra.database import migrate, session_factory
from infra.records import Job, Tenant
from workers.units import WorkUnit


@pytest.fixture
def db(tmp_path):
    url = f"sqlite:///{tmp_path / 'meta.db'}"
    migrate(url)
    with session_factory(url)() as session:
        session.add(Tenant(id="tn_1", name="t"))
        session.flush()
        job = Job(
            id="ev_1",
            tenant_id="tn_1",
            model_id="m",
            dataset_id="d",
            model_sha256="0" * 64,
            dataset_sha256="1" * 64,
            spec={},
            request_hash="h",
            shards=2,
        )
        session.add(job)
        units = [
            WorkUnit(index=i, start=10 * i, stop=10 * i + 10, attacks=(0,), kind="shard") for i in range(2)
        ]
        jobs.add_shards(session, job, units, [10, 10])
        session.commit()
        yield session


def claim(db, position, lease=30.0, max_attempts=3):
    return jobs.claim(db, "ev_1", position, "w", lease, max_attempts)


def state(db) -> str:
    db.expire_all()
    return db.get(Job, "ev_1").state


def test_a_shard_is_claimed_once_and_the_job_starts_running(db):
    first = claim(db, 0)
    assert first is not None and first.attempt == 1 and state(db) == "running"
    assert claim(db, 0) is None  # a duplicate message finds it taken


def test_the_last_shard_to_finish_hands_over_to_the_aggregation_once(db):
    a, b = claim(db, 0), claim(db, 1)
    assert jobs.complete_shard(db, a, "a" * 64, {}) is False
    assert jobs.complete_shard(db, b, "b" * 64, {}) is True
    assert jobs.complete_shard(db, b, "b" * 64, {}) is False  # a redelivery changes nothing
    assert jobs.shards_to_dispatch(db, "ev_1") == [2]
    final = claim(db, 2)
    assert final.kind == "finish"
    assert jobs.complete_job(db, final, {"passed": True}, True, {}) is True
    assert state(db) == "succeeded"


def test_an_expired_lease_is_requeued_and_the_stale_attempt_is_fenced_out(db):
    stale = claim(db, 0, lease=0.01)
    time.sleep(0.05)
    assert jobs.reap(db, max_attempts=3) == [("ev_1", 0), ("ev_1", 1)]  # 1 was never sent
    fresh = claim(db, 0)
    assert fresh.attempt == 2
    assert jobs.heartbeat(db, stale, 30) == "lease_lost"
    assert jobs.complete_shard(db, stale, "s" * 64, {}) is False
    assert jobs.heartbeat(db, fresh, 30) == "running"


def test_a_shard_that_keeps_losing_its_worker_fails_the_job(db):
    for _ in range(2):
        claim(db, 0, lease=0.01)
        time.sleep(0.05)
        jobs.reap(db, max_attempts=2)
    db.expire_all()
    job = db.get(Job, "ev_1")
    assert job.state == "failed" and job.error_code == "worker_lost" and "2 times" in job.error_message
    assert claim(db, 1) is None  # the other shards will not run


def test_cancel_reaches_a_running_shard_through_its_heartbeat(db):
    running = claim(db, 0)
    assert jobs.cancel_job(db, "ev_1") is True
    assert jobs.heartbeat(db, running, 30) == "cancelled"
    assert jobs.cancel_job(db, "ev_1") is False
    assert claim(db, 1) is None


def test_progress_sums_the_shards_and_estimates_the_rest(db):
    a = claim(db, 0)
    jobs.heartbeat(db, a, 30, ("pgd", 5))
    db.execute(update(Job).values(started_at=jobs.utcnow().replace(microsecond=0)))
    db.commit()
    db.expire_all()
    progress = jobs.progress_of(db, db.get(Job, "ev_1"))
    assert progress["stage"] == "pgd" and progress["done"] == 5 and progress["total"] == 21
    assert progress["eta_seconds"] is not None and progress["eta_seconds"] >= 0
