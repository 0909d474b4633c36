"""Concurrent submissions of one tenant cannot pass its limits: ROBUSTNESS_MAX_CONCURRENT_JOBS and
ROBUSTNESS_TENANT_COST_QUOTA hold for 20 requests at once, on SQLite (one gateway, many threads)
and on PostgreSQL. The counts are slowed down so that, without the tenant's admission lock,
every request would count before any had added its job."""

from __future__ import annotations

import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from infra import jobs
from service import budgets
from tests.service.conftest import DATA, MODEL, make_settings, tenant_headers, uvicorn_gateway

PGD = {"name": "pgd", "eps": [0.05, 0.1], "steps": 40}  # 1660 model calls x samples at 20 samples


def _slowed(monkeypatch) -> None:
    for module, name in ((jobs, "active_jobs"), (budgets, "queued_cost")):
        count = getattr(module, name)

        def slow(*args, count=count):
            counted = count(*args)
            time.sleep(0.1)  # the window between the count and the insert, made wide
            return counted

        monkeypatch.setattr(module, name, slow)


def _submit_at_once(settings, n: int = 20) -> list[int]:
    headers = tenant_headers(settings, "ci")[0]
    with uvicorn_gateway(settings) as url, httpx.Client(base_url=url, headers=headers, timeout=120) as api:
        ids = {}
        for kind, path in (("models", MODEL), ("datasets", DATA)):
            with path.open("rb") as handle:
                ids[kind] = api.post(f"/v1/{kind}", files={"file": handle}).json()["id"]
        body = {"model_id": ids["models"], "dataset_id": ids["datasets"], "samples": 20, "attacks": [PGD]}

        def submit(seed: int) -> int:
            key = {"Idempotency-Key": uuid.uuid4().hex}
            return api.post("/v1/evaluations", json={**body, "seed": seed}, headers=key).status_code

        with ThreadPoolExecutor(n) as pool:
            codes = list(pool.map(submit, range(n)))
        active = [e for e in api.get("/v1/evaluations").json()["items"] if e["state"] in jobs.ACTIVE]
    assert len(active) == codes.count(202), (codes, active)
    return codes


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request, tmp_path):
    if request.param == "sqlite":
        return lambda **limits: make_settings(tmp_path / "data", **limits)
    base = request.getfixturevalue("distributed_settings")  # skips, saying why, without PostgreSQL
    return lambda **limits: make_settings(tmp_path / "data", database_url=base.database_url,
                                          broker_url=base.broker_url, **limits)


def test_concurrent_submissions_stay_within_the_job_limit(database, monkeypatch):
    _slowed(monkeypatch)
    codes = _submit_at_once(database(max_concurrent_jobs=4))
    assert codes.count(202) == 4 and codes.count(429) == 16, codes


def test_concurrent_submissions_stay_within_the_cost_quota(database, monkeypatch):
    _slowed(monkeypatch)
    codes = _submit_at_once(database(max_concurrent_jobs=100, tenant_cost_quota=4000))  # 2 x 1660 fit
    assert codes.count(202) == 2 and codes.count(429) == 18, codes
