"""Long polls (`GET /v1/evaluations/{id}?wait=S`): a state change made by another process (a
worker writes the database, not this gateway) ends the wait within a fraction of a second even
though the status cache keeps reads for 10 s; an unchanged job waits the time out; finished
jobs, other tenants' ids and a full waiter table answer at once; closing wakes every waiter."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest

from infra import jobs
from infra.database import migrate, session_factory
from service.status_waits import StatusWaits
from tests.service.conftest import DATA, MODEL, make_settings, tenant_headers, upload, uvicorn_gateway
from tests.service.test_api import spec


def _queued_job(client, headers=None) -> str:
    ids = [upload(client, kind, path, headers=headers or {}).json()["id"]
           for kind, path in (("models", MODEL), ("datasets", DATA))]
    return client.post("/v1/evaluations", json=spec(*ids), headers=headers or {}).json()["id"]


def test_a_state_change_in_the_database_ends_the_long_poll_at_once(tmp_path):
    settings = make_settings(tmp_path / "data", status_cache_s=10)  # plain reads kept 10 s
    with uvicorn_gateway(settings) as url, httpx.Client(base_url=url, timeout=60) as client:
        job_id = _queued_job(client)
        assert client.get(f"/v1/evaluations/{job_id}").json()["state"] == "queued"  # now cached

        def fail_from_elsewhere():
            time.sleep(0.5)
            with session_factory(settings.database_url)() as db:  # as a worker process would
                jobs.fail_job(db, job_id, "internal_error", "stopped by the test")

        threading.Thread(target=fail_from_elsewhere).start()
        started = time.monotonic()
        answer = client.get(f"/v1/evaluations/{job_id}", params={"wait": 20}).json()
        waited = time.monotonic() - started
        assert answer["state"] == "failed" and answer["error"]["message"] == "stopped by the test"
        assert 0.4 < waited < 2.0, waited
        # the plain poll after it sees the change too: the long poll dropped the cached read
        assert client.get(f"/v1/evaluations/{job_id}").json()["state"] == "failed"


def test_an_unchanged_job_waits_out_the_wait_and_finished_ones_answer_at_once(tmp_path):
    settings = make_settings(tmp_path / "data")
    with uvicorn_gateway(settings) as url, httpx.Client(base_url=url, timeout=60) as client:
        job_id = _queued_job(client)
        started = time.monotonic()
        assert client.get(f"/v1/evaluations/{job_id}", params={"wait": 0.6}).json()["state"] == "queued"
        assert 0.6 <= time.monotonic() - started < 3
        client.post(f"/v1/evaluations/{job_id}/cancel")
        started = time.monotonic()
        assert client.get(f"/v1/evaluations/{job_id}", params={"wait": 20}).json()["state"] == "cancelled"
        assert time.monotonic() - started < 1
        too_long = client.get(f"/v1/evaluations/{job_id}", params={"wait": 31})
        assert too_long.status_code == 422 and "wait" in too_long.text


def test_other_tenants_and_a_full_waiter_table_answer_at_once(tmp_path):
    settings = make_settings(tmp_path / "data", max_status_waiters=0)
    a, b = tenant_headers(settings, "alice", "bob")
    with uvicorn_gateway(settings) as url, httpx.Client(base_url=url, timeout=60) as client:
        job_id = _queued_job(client, a)
        started = time.monotonic()
        assert client.get(f"/v1/evaluations/{job_id}", params={"wait": 20}, headers=b).status_code == 404
        own = client.get(f"/v1/evaluations/{job_id}", params={"wait": 20}, headers=a)
        assert own.json()["state"] == "queued"
        assert time.monotonic() - started < 2


def test_closing_wakes_every_waiter_and_takes_no_new_ones(tmp_path):
    settings = make_settings(tmp_path / "data")
    migrate(settings.database_url)
    waits = StatusWaits(session_factory(settings.database_url), 0.05, 100, on_change=lambda _: None)

    async def scenario():
        waiting = [asyncio.create_task(waits.until_changed(f"ev_{i}", "running", 30)) for i in range(3)]
        await asyncio.sleep(0.2)  # the watcher reads: the ids are unknown, which counts as a change
        assert all(w.done() and w.result() is True for w in waiting)
        waiting = [asyncio.create_task(waits.until_changed("ev_x", "gone", 30))]
        await asyncio.sleep(0.01)
        started = time.monotonic()
        waits.close()
        assert await waiting[0] is False and time.monotonic() - started < 0.5
        assert await waits.until_changed("ev_y", "running", 30) is False  # closed: at once

    asyncio.run(scenario())


@pytest.mark.parametrize("waiters", [50])
def test_many_long_polls_share_one_query_per_interval(tmp_path, waiters):
    settings = make_settings(tmp_path / "data")
    migrate(settings.database_url)
    queries = []
    sessions = session_factory(settings.database_url)
    waits = StatusWaits(sessions, 0.1, 1000, on_change=lambda _: None)
    real = waits._states
    waits._states = lambda ids: queries.append(len(ids)) or real(ids)

    async def scenario():
        started = time.monotonic()
        await asyncio.gather(*(waits.until_changed(f"ev_{i}", None, 0.55) for i in range(waiters)))
        return time.monotonic() - started

    # the ids are unknown (state None both before and after): nobody is woken, all time out
    assert asyncio.run(scenario()) < 2
    assert 3 <= len(queries) <= 6 and max(queries) == waiters, queries
