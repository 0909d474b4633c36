"""The job state machine in the metadata database: claims, leases, fencing, the reaper and
the hand-over to the aggregation, without a broker or a worker."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
from sqlalchemy import update

from infra import jobs
from infra.database import migrate, session_factory
from infra.records import Job, Shard, Tenant
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


def _progress(db) -> dict:
    db.expire_all()
    return jobs.progress_of(db, db.get(Job, "ev_1"))


def test_progress_sums_the_shards_and_estimates_the_rest_from_the_measured_rate(db):
    a = claim(db, 0)
    assert _progress(db)["stage"] == "starting" and _progress(db)["eta_seconds"] is None  # nothing measured
    # the shard started 2 s ago and has done 5 of its 10 units: 2.5 units/s, 16 units left
    db.execute(update(Shard).where(Shard.id == a.shard_id).values(
        started_at=jobs.utcnow() - timedelta(seconds=2)))
    db.commit()
    jobs.heartbeat(db, a, 30, ("pgd", 5))
    progress = _progress(db)
    assert progress["stage"] == "pgd" and progress["done"] == 5 and progress["total"] == 21
    assert progress["eta_seconds"] == pytest.approx(16 / 2.5, rel=0.1)
    b = claim(db, 1)  # two workers on the job now: half the time
    db.execute(update(Shard).where(Shard.id == b.shard_id).values(started_at=jobs.utcnow()))
    db.commit()
    assert _progress(db)["eta_seconds"] == pytest.approx(16 / 2.5 / 2, rel=0.1)


def test_progress_never_goes_backwards_across_a_requeue(db):
    first = claim(db, 0)
    jobs.heartbeat(db, first, 30, ("pgd", 8))
    assert _progress(db)["done"] == 8
    assert jobs.requeue_shard(db, first)
    assert _progress(db)["done"] == 8
    second = claim(db, 0)
    jobs.heartbeat(db, second, 30, ("clean", 3))  # the new attempt starts over
    assert _progress(db)["done"] == 8
    jobs.heartbeat(db, second, 30, ("pgd", 9))
    assert _progress(db)["done"] == 9


def test_the_stage_is_never_null_while_the_job_runs(db):
    assert _progress(db)["stage"] == "queued"
    a = claim(db, 0)
    assert _progress(db)["stage"] == "starting"
    jobs.heartbeat(db, a, 30, ("pgd", 2))
    assert _progress(db)["stage"] == "pgd"
    jobs.complete_shard(db, a, "a" * 64, {})
    assert _progress(db)["stage"] == "waiting_for_worker"  # running, the other shard not yet taken
    b = claim(db, 1)
    jobs.complete_shard(db, b, "b" * 64, {})
    final = claim(db, 2)
    assert _progress(db)["stage"] == "aggregating"
    jobs.complete_job(db, final, {"passed": True}, True, {})
    progress = _progress(db)
    assert progress["stage"] == "done" and progress["done"] == progress["total"] == 21


def test_a_failed_job_shows_where_it_stopped(db):
    a = claim(db, 0)
    jobs.heartbeat(db, a, 30, ("deepfool", 4))
    jobs.fail_job(db, "ev_1", "time_limit", "shard 0 ran past the time limit")
    jobs.release_shard(db, a, "failed")
    progress = _progress(db)
    assert progress["stage"] == "deepfool" and progress["done"] == 4 and progress["eta_seconds"] is None
