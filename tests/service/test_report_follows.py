"""The report is rendered after the result is stored (so the result is not kept waiting for
it): GET /report in between waits for it; a report that failed to render, or whose worker died
while rendering it, is a 404 that says so."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

from sqlalchemy import update

from infra import jobs
from infra.blobs import LocalBlobStore
from infra.database import session_factory
from infra.records import Job, utcnow
from tests.service.conftest import DATA, MODEL, gateway, make_settings, upload
from tests.service.test_api import spec


def _succeeded_without_report(api, settings, report_state: str, finished_ago_s: float = 0) -> str:
    ids = [upload(api, kind, path).json()["id"] for kind, path in (("models", MODEL), ("datasets", DATA))]
    job_id = api.post("/v1/evaluations", json=spec(*ids)).json()["id"]
    with session_factory(settings.database_url)() as db:
        db.execute(update(Job).where(Job.id == job_id).values(
            state="succeeded", result={}, passed=True, report_state=report_state,
            finished_at=utcnow() - timedelta(seconds=finished_ago_s)))
        db.commit()
    return job_id


def test_a_report_request_waits_for_the_report_being_rendered(tmp_path):
    settings = make_settings(tmp_path / "data")
    with gateway(settings) as api:
        job_id = _succeeded_without_report(api, settings, "rendering")

        def render_elsewhere():  # as the worker does once the result is stored
            time.sleep(0.5)
            sha = LocalBlobStore(settings.blob_dir).put_bytes(b"<html>the report</html>")
            with session_factory(settings.database_url)() as db:
                jobs.attach_report(db, job_id, sha)

        threading.Thread(target=render_elsewhere).start()
        started = time.monotonic()
        report = api.get(f"/v1/evaluations/{job_id}/report")
        assert report.status_code == 200 and report.text == "<html>the report</html>"
        assert 0.4 < time.monotonic() - started < 5
        dashboard = api.get("/")
        assert f"/v1/evaluations/{job_id}/report" in dashboard.text


def test_a_failed_or_lost_report_is_a_404_that_says_why(tmp_path):
    settings = make_settings(tmp_path / "data")
    with gateway(settings) as api:
        failed = _succeeded_without_report(api, settings, "failed")
        lost = _succeeded_without_report(api, settings, "rendering", finished_ago_s=3600)
        answer = api.get(f"/v1/evaluations/{failed}/report")
        assert answer.status_code == 404
        assert "could not be rendered; see the worker log" in answer.json()["detail"]
        answer = api.get(f"/v1/evaluations/{lost}/report")
        assert answer.status_code == 404 and "its worker stopped" in answer.json()["detail"]
        assert f"/v1/evaluations/{failed}/report" not in api.get("/").text
