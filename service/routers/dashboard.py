"""The read-only dashboard at ``/``: the tenant's evaluations, server-rendered (Jinja2,
autoescaped), signed in with an API key that opens a server-side session (service/auth.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Form, Header, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from jinja2 import Environment, FileSystemLoader, select_autoescape
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from infra import jobs
from infra.records import Job, StoredDataset, StoredModel
from service.auth import close_session, open_session
from service.deps import SESSION_COOKIE, SettingsDep, tenant_of
from service.errors import ERROR_RESPONSES, Unauthorized

router = APIRouter(tags=["dashboard"], include_in_schema=False, responses=ERROR_RESPONSES)
templates = Environment(
    loader=FileSystemLoader(Path(__file__).parents[1] / "templates"),
    autoescape=select_autoescape(default=True, default_for_string=True),
)
LIMIT = 100


@router.get("/", response_class=HTMLResponse)
async def dashboard(request: Request, authorization: Annotated[str | None, Header()] = None):
    cookie = request.cookies.get(SESSION_COOKIE)
    try:
        tenant = await tenant_of(request, authorization)
    except Unauthorized as exc:
        error = str(exc) if cookie or authorization else None
        page = templates.get_template("login.html.j2").render(error=error)
        response = HTMLResponse(page, status_code=401 if error else 200)
        if cookie:
            response.delete_cookie(SESSION_COOKIE)
        return response
    page = await run_in_threadpool(_page, request.app.state.sessions, tenant, bool(cookie))
    return HTMLResponse(page)


def _page(sessions, tenant, signed_in: bool) -> str:
    with sessions() as db:
        return _render(db, tenant, signed_in)


def _render(db, tenant, signed_in: bool) -> str:
    ids = list(db.scalars(
        select(Job.id).where(Job.tenant_id == tenant.id).order_by(Job.created_at.desc()).limit(LIMIT)
    ))
    found = jobs.statuses(db, ids)
    rows = [found[i] for i in ids if i in found]
    names = _names(db, [row for row, _ in rows])
    evaluations = []
    for row, progress in rows:
        evaluations.append(
            {
                "id": row.id,
                "state": row.state,
                "error": row.error_message if row.state == "failed" else None,
                "done": progress["done"],
                "total": max(progress["total"], 1),
                "stage": progress["stage"],
                "eta": progress["eta_seconds"],
                "model": names.get(row.model_id, row.model_id),
                "dataset": names.get(row.dataset_id, row.dataset_id),
                "passed": row.passed,
                "verdict": jobs.verdict_of(row),
                "created": jobs.iso(row.created_at),
                # a report being rendered is linked: GET /report waits for it
                "report": row.report_sha256 is not None or row.report_state == "rendering",
            }
        )
    return templates.get_template("dashboard.html.j2").render(
        tenant=tenant.name,
        evaluations=evaluations,
        signed_in=signed_in,
        refresh=any(e["state"] in jobs.ACTIVE for e in evaluations),
    )


@router.post("/login")
def login(key: Annotated[str, Form(max_length=200)], request: Request, settings: SettingsDep):
    """Open a server-side session: the cookie carries an opaque token that expires after
    ROBUSTNESS_SESSION_LIFETIME_S, never the key."""
    try:
        with request.app.state.sessions() as db:
            token = open_session(db, key, settings.session_lifetime_s)
    except Unauthorized as exc:
        page = templates.get_template("login.html.j2").render(error=str(exc))
        return HTMLResponse(page, status_code=401)
    response = RedirectResponse("/", status_code=303)
    response.set_cookie(
        SESSION_COOKIE,
        token,
        httponly=True,
        samesite="strict",
        secure=settings.https or request.url.scheme == "https",
        max_age=int(settings.session_lifetime_s),
    )
    return response


@router.post("/logout")
def logout(request: Request):
    """End the session on the server too: the token stops working even if it was copied."""
    token = request.cookies.get(SESSION_COOKIE)
    if token:
        with request.app.state.sessions() as db:
            close_session(db, token)
        request.app.state.tenants.forget(None, token)
    response = RedirectResponse("/", status_code=303)
    response.delete_cookie(SESSION_COOKIE)
    return response


def _names(db, rows) -> dict[str, str]:
    model_ids = {r.model_id for r in rows}
    dataset_ids = {r.dataset_id for r in rows}
    names = dict(
        db.execute(select(StoredModel.id, StoredModel.name).where(StoredModel.id.in_(model_ids))).all()
    )
    names.update(
        db.execute(
            select(StoredDataset.id, StoredDataset.name).where(StoredDataset.id.in_(dataset_ids))
        ).all()
    )
    return names
