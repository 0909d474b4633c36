"""FastAPI dependencies as ``Annotated`` aliases: a handler is its signature plus its logic."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Header, Request
from sqlalchemy.orm import Session

from infra.blobs import LocalBlobStore
from infra.records import Tenant
from infra.settings import Settings
from service.auth import authenticate, open_mode_allowed


def _settings(request: Request) -> Settings:
    return request.app.state.settings


def _db(request: Request) -> Iterator[Session]:
    with request.app.state.sessions() as db:
        yield db


def _store(request: Request) -> LocalBlobStore:
    return request.app.state.store


SettingsDep = Annotated[Settings, Depends(_settings)]
SessionDep = Annotated[Session, Depends(_db)]
StoreDep = Annotated[LocalBlobStore, Depends(_store)]


KEY_COOKIE = "robustness_key"


def _tenant(
    request: Request, db: SessionDep, settings: SettingsDep,
    authorization: Annotated[str | None, Header()] = None,
) -> Tenant:
    open_mode = open_mode_allowed(db, settings.host, settings.api_keys_required)
    # the dashboard's cookie counts for reading only: a cookie sent along with a cross-site
    # POST must not be able to cancel a job or upload a model
    cookie = request.cookies.get(KEY_COOKIE)
    if authorization is None and cookie and request.method in ("GET", "HEAD"):
        authorization = f"Bearer {cookie}"
    return authenticate(db, authorization, open_mode=open_mode)


TenantDep = Annotated[Tenant, Depends(_tenant)]
