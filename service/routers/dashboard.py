"""The read-only dashboard at ``/``: the tenant's evaluations, server-rendered (Jinja2,
autoescaped), signed in with an API key kept in an HttpOnly cookie."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from jinja2 import Environment, FileSystemLoader, select_autoescape
from sqlalchemy import select

from infra import jobs
from infra.records import Job, StoredDataset, StoredModel
from service.auth import authenticate, open_mode_allowed
from service.deps import KEY_COOKIE, SessionDep, SettingsDep
from service.errors import ERROR_RESPONSES, Unauthorized

router = APIRouter(tags=["dashboard"], include_in_schema=False, responses=ERROR_RESPONSES)
templates = Environment(
    loader=FileSystemLoader(Path(__file__).parents[1] / "templates"),
    autoescape=select_autoescape(default=True, default_for_string=True),
)
LIMIT = 100


@router.get("/", response_class=HTMLResponse)
def dashboard(request: Request, db: SessionDep, settings: SettingsDep):
    cookie = request.cookies.get(KEY_COOKIE)
    header = request.headers.get("authorization")
    open_mode = open_mode_allowed(db, settings.host, settings.api_keys_required)
    try:
        tenant = authenticate(db, header or (f"Bearer {cookie}" if cookie else None), open_mode=open_mode)
    except Unauthorized as exc:
        error = str(exc) if cookie or header else None
        return HTMLResponse(
            templates.get_template("login.html.j2").render(error=error), status_code=401 if error else 200
        )
    rows = db.scalars(
        select(Job).where(Job.tenant_id == tenant.id).order_by(Job.created_at.desc()).limit(LIMIT)
    ).all()
    names = _names(db, rows)
    evaluations = []
    for row in rows:
        progress = jobs.progress_of(db, row)
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
                "report": row.report_sha256 is not None,
            }
        )
    page = templates.get_template("dashboard.html.j2").render(
        tenant=tenant.name,
        evaluations=evaluations,
        signed_in=bool(cookie),
        refresh=any(e["state"] in jobs.ACTIVE for e in evaluations),
    )
    return HTMLResponse(page)


@router.post("/login")
def login(key: Annotated[str, Form(max_length=200)], db: SessionDep, request: Request):
    try:
        authenticate(db, f"Bearer {key}", open_mode=False)
    except Unauthorized as exc:
        page = templates.get_template("login.html.j2").render(error=str(exc))
        return HTMLResponse(page, status_code=401)
    response = RedirectResponse("/", status_code=303)
    response.set_cookie(
        KEY_COOKIE,
        key,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        max_age=7 * 24 * 3600,
    )
    return response


@router.post("/logout")
def logout():
    response = RedirectResponse("/", status_code=303)
    response.delete_cookie(KEY_COOKIE)
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
