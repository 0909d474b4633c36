"""The dashboard at `/`: signed in with a key kept in a cookie, the tenant's evaluations
only, names shown as text, and a cookie that cannot act (only read)."""

from __future__ import annotations

from infra.database import migrate, session_factory
from service.auth import create_key
from tests.service.conftest import DATA, MODEL, gateway, upload
from tests.service.test_api import spec

XSS = "<script>alert(1)</script>"


def test_open_mode_lists_evaluations_with_names_as_text(api):
    model = upload(api, "models", MODEL, name=XSS).json()
    dataset = upload(api, "datasets", DATA, name=XSS + "data").json()
    job = api.post("/v1/evaluations", json=spec(model["id"], dataset["id"])).json()
    page = api.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert job["id"] in page.text and "queued" in page.text
    assert XSS not in page.text and "&lt;script&gt;alert(1)&lt;/script&gt;" in page.text
    assert 'http-equiv="refresh"' in page.text  # a job is queued: the page refreshes itself


def test_sign_in_with_a_key_and_see_only_your_evaluations(settings):
    migrate(settings.database_url)
    with session_factory(settings.database_url)() as db:
        alice, bob = create_key(db, "alice"), create_key(db, "bob")
    with gateway(settings) as api:
        headers = {"Authorization": f"Bearer {alice}"}
        model = upload(api, "models", MODEL, headers=headers).json()
        dataset = upload(api, "datasets", DATA, headers=headers).json()
        job = api.post("/v1/evaluations", json=spec(model["id"], dataset["id"]), headers=headers).json()
        form = api.get("/")
        assert form.status_code == 200 and 'name="key"' in form.text and job["id"] not in form.text
        wrong = api.post("/login", data={"key": "rk_nope"}, follow_redirects=False)
        assert wrong.status_code == 401 and "unknown or revoked API key" in wrong.text
        signed = api.post("/login", data={"key": bob}, follow_redirects=False)
        assert signed.status_code == 303 and "httponly" in signed.headers["set-cookie"].lower()
        assert "samesite=strict" in signed.headers["set-cookie"].lower()
        page = api.get("/")
        assert "Evaluations of bob" in page.text and job["id"] not in page.text
        api.cookies.clear()
        api.post("/login", data={"key": alice}, follow_redirects=False)
        page = api.get("/")
        assert "Evaluations of alice" in page.text and job["id"] in page.text
        assert api.get(f"/v1/evaluations/{job['id']}").status_code == 200  # the cookie reads...
        assert api.post(f"/v1/evaluations/{job['id']}/cancel").status_code == 401  # ...but does not act
        api.post("/logout", follow_redirects=False)
        api.cookies.clear()
        assert 'name="key"' in api.get("/").text


def test_an_inconclusive_evaluation_says_so_in_the_status_and_the_dashboard(api, settings):
    from sqlalchemy import update

    from infra.records import Job

    model = upload(api, "models", MODEL).json()
    dataset = upload(api, "datasets", DATA).json()
    ids = [api.post("/v1/evaluations", json=spec(model["id"], dataset["id"], seed=seed)).json()["id"]
           for seed in range(3)]
    with session_factory(settings.database_url)() as db:  # as the final unit leaves them
        for job_id, verdict, passed in zip(ids, ("inconclusive", "passed", None), (False, True, True),
                                           strict=True):
            db.execute(update(Job).where(Job.id == job_id).values(state="succeeded", passed=passed,
                                                                   verdict=verdict))
        db.commit()
    statuses = [api.get(f"/v1/evaluations/{job_id}").json() for job_id in ids]
    # the third stands for a job finished before verdicts existed: its verdict comes from passed
    assert [(s["verdict"], s["passed"]) for s in statuses] == [("inconclusive", False), ("passed", True),
                                                                ("passed", True)]
    page = api.get("/").text
    assert page.count('class="verdict-inconclusive"') == 1 and ">inconclusive</strong>" in page
    assert page.count('class="verdict-passed"') == 2
