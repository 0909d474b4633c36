"""FastAPI dependencies as ``Annotated`` aliases: a handler is its signature plus its logic.

Database discipline: a request holds a pooled connection only while one of its threads runs.
Handlers that need a session for their whole body take ``SessionDep``: its session is closed
(the connection back in the pool) before the response is sent, and at most
``request_threads`` such requests hold one at a time; the others wait in the event loop,
holding nothing. The tenant is resolved in a thread of its own, with its own short session,
and remembered for ``auth_cache_s`` (service/auth.py's TenantCache); so is a status read
(service/status_reads.py).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Header, Request
from sqlalchemy.orm import Session

from infra.blobs import LocalBlobStore
from infra.records import Tenant
from infra.settings import Settings


def _settings(request: Request) -> Settings:
    return request.app.state.settings


async def _db(request: Request) -> AsyncIterator[Session]:
    async with request.app.state.admission:
        db = request.app.state.sessions()
        try:
            yield db
        finally:
            db.close()  # the handler committed or only read: nothing slow is left to do here


def _store(request: Request) -> LocalBlobStore:
    return request.app.state.store


SettingsDep = Annotated[Settings, Depends(_settings)]
SessionDep = Annotated[Session, Depends(_db)]
StoreDep = Annotated[LocalBlobStore, Depends(_store)]


SESSION_COOKIE = "robustness_session"


async def tenant_of(request: Request, authorization: Annotated[str | None, Header()] = None) -> Tenant:
    # the dashboard's cookie counts for reading only: a cookie sent along with a cross-site
    # POST must not be able to cancel a job or upload a model
    cookie = request.cookies.get(SESSION_COOKIE) if request.method in ("GET", "HEAD") else None
    return await request.app.state.tenants.tenant(authorization, cookie)


TenantDep = Annotated[Tenant, Depends(tenant_of)]
