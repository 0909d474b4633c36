"""Fair dispatch between tenants (jobs.claim_next): whichever message a worker takes, it runs
the shard of the tenant with the fewest shards running, round robin among equals, so one
tenant's queue of jobs cannot hold every worker while another tenant waits."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
from sqlalchemy import update

from infra import jobs
from infra.database import migrate, session_factory
from infra.records import Job, Shard, Tenant, utcnow
from workers.units import WorkUnit


def _add_job(db, job_id: str, tenant: str, shards: int, created) -> None:
    job = Job(id=job_id, tenant_id=tenant, model_id="m", dataset_id="d", model_sha256="0" * 64,
              dataset_sha256="1" * 64, spec={}, request_hash=job_id, shards=shards, created_at=created)
    db.add(job)
    units = [WorkUnit(index=i, start=i, stop=i + 1, attacks=(0,), kind="shard") for i in range(shards)]
    jobs.add_shards(db, job, units, [1] * shards)


@pytest.fixture
def db(tmp_path):
    url = f"sqlite:///{tmp_path / 'meta.db'}"
    migrate(url)
    with session_factory(url)() as session:
        session.add_all([Tenant(id=f"tn_{name}", name=name) for name in "abc"])
        session.flush()
        start = utcnow() - timedelta(minutes=10)
        _add_job(session, "ev_a1", "tn_a", 6, start)  # tenant a queued first, and the most
        _add_job(session, "ev_a2", "tn_a", 2, start + timedelta(seconds=1))
        _add_job(session, "ev_b1", "tn_b", 2, start + timedelta(seconds=2))
        _add_job(session, "ev_c1", "tn_c", 1, start + timedelta(seconds=3))
        session.commit()
        yield session


def _next(db, worker="w"):
    claimed = jobs.claim_next(db, worker, 30.0, 3)
    assert claimed is not None
    return claimed


def _finish(db, claimed) -> None:
    assert jobs.complete_shard(db, claimed, "0" * 64, {}) in (True, False)
    time.sleep(0.002)  # distinct start times: the round robin reads them


def test_one_worker_serves_the_tenants_in_turn(db):
    order = []
    while (claimed := jobs.claim_next(db, "w", 30.0, 3)) is not None:
        order.append((claimed.job_id, claimed.kind))
        _finish(db, claimed)
    tenants = "".join(job_id[3] for job_id, _ in order)
    # b: 2 shards then its aggregation, c: 1 then its aggregation; a waits its turn each round
    assert tenants == "abcabcab" + "a" * 7, order
    assert [job for job, _ in order[8:]] == ["ev_a1"] * 4 + ["ev_a2"] * 3  # a's older job first
    assert len(order) == 6 + 2 + 2 + 1 + 4  # every shard and every aggregation ran, once


def test_the_tenant_with_the_fewest_running_shards_goes_first(db):
    held = [_next(db, f"w{i}") for i in range(3)]  # a, b, c: one each
    assert sorted(c.job_id[3] for c in held) == ["a", "b", "c"]
    _finish(db, held[1])  # b's finishes: b now runs none
    assert _next(db, "w1").job_id == "ev_b1"
    fourth = _next(db, "w4")  # all run one (c has no more work): a, served longest ago
    assert fourth.job_id == "ev_a1"


def test_cancelled_jobs_and_live_leases_are_passed_over_and_expired_leases_taken(db):
    db.execute(update(Job).where(Job.tenant_id.in_(("tn_b", "tn_c"))).values(state="cancelled"))
    db.commit()
    first = _next(db)
    assert first.job_id == "ev_a1" and first.position == 0
    assert _next(db).position == 1  # the first is running under a live lease
    db.execute(update(Shard).where(Shard.id == first.shard_id).values(lease_until=time.time() - 1))
    db.commit()
    again = _next(db, "other")
    assert (again.job_id, again.position, again.attempt) == ("ev_a1", 0, 2)
