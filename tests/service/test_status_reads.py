"""Status reads under a fleet of pollers: a real uvicorn gateway with a deliberately small
database pool answers hundreds of concurrent keep-alive pollers without an error (no request
waits for a connection while holding one), status reads are shared and batched, a cancel is
seen at once, and another tenant's evaluation stays invisible."""

from __future__ import annotations

import pytest

from bench import pollers
from infra.database import migrate, session_factory
from service.auth import create_key
from tests.service.conftest import (
    DATA,
    MODEL,
    gateway,
    make_settings,
    tenant_headers,
    upload,
    uvicorn_gateway,
)
from tests.service.test_api import spec


def _fleet_targets(url: str, settings, jobs: int) -> list[tuple[str, str]]:
    import httpx

    migrate(settings.database_url)
    with session_factory(settings.database_url)() as db:
        keys = [create_key(db, f"team-{i}") for i in range(3)]
    targets = []
    with httpx.Client(base_url=url, timeout=30) as client:
        for key in keys:
            headers = {"Authorization": f"Bearer {key}"}
            ids = [client.post(f"/v1/{kind}", files={"file": (path.name, path.read_bytes())},
                               headers=headers).json()["id"]
                   for kind, path in (("models", MODEL), ("datasets", DATA))]
            for _ in range(jobs // len(keys)):
                job = client.post("/v1/evaluations", json=spec(*ids), headers=headers).json()
                targets.append((f"/v1/evaluations/{job['id']}", key))
            targets.append(("/v1/models", key))  # a route whose session spans the handler
    return targets


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_hundreds_of_pollers_and_a_small_pool_give_no_error(tmp_path, request, backend):
    # 2 request threads: a pool of 8 connections, 2 s to get one; 300 pollers with no pause
    small = dict(request_threads=2, db_pool_timeout_s=2, max_concurrent_jobs=100, status_cache_s=0.2)
    if backend == "sqlite":
        settings = make_settings(tmp_path / "data", **small)
    else:
        base = request.getfixturevalue("distributed_settings")
        settings = make_settings(tmp_path / "pg", database_url=base.database_url, broker_url=base.broker_url,
                                 **small)
    with uvicorn_gateway(settings) as url:
        targets = _fleet_targets(url, settings, jobs=30)
        figures = pollers.run(url, targets, pollers=300, interval=0.0, seconds=4)
    assert figures["errors"] == 0, figures
    assert figures["requests"] > 1000, figures


def test_a_cancel_is_seen_at_once_and_other_tenants_see_nothing(tmp_path):
    settings = make_settings(tmp_path / "data", status_cache_s=10)  # reads kept 10 s
    a, b = tenant_headers(settings, "alice", "bob")
    with gateway(settings) as api:
        ids = [upload(api, kind, path, headers=a).json()["id"] for kind, path in (("models", MODEL),
                                                                                 ("datasets", DATA))]
        job = api.post("/v1/evaluations", json=spec(*ids), headers=a).json()
        assert api.get(f"/v1/evaluations/{job['id']}", headers=a).json()["state"] == "queued"
        assert api.get(f"/v1/evaluations/{job['id']}", headers=b).status_code == 404
        api.post(f"/v1/evaluations/{job['id']}/cancel", headers=a)
        seen = api.get(f"/v1/evaluations/{job['id']}", headers=a).json()
        assert seen["state"] == "cancelled" and seen["progress"]["stage"] == "queued"
        assert api.get(f"/v1/evaluations/{job['id']}", headers=b).status_code == 404
        assert api.get("/v1/evaluations/ev_nothing", headers=a).status_code == 404
