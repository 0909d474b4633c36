"""The FastAPI gateway: ``create_app()`` builds it from settings (uvicorn's factory)."""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager

import anyio
from fastapi import FastAPI
from fastapi.routing import APIRoute

from infra.blobs import LocalBlobStore
from infra.broker import make_celery
from infra.database import migrate, session_factory
from infra.settings import Settings, get_settings
from service.auth import TenantCache, is_loopback
from service.docs import install_docs
from service.errors import RequestIdMiddleware, install_handlers
from service.limits import BodyLimitMiddleware
from service.metrics import ServiceMetrics
from service.reaper import Reaper
from service.routers import dashboard, datasets, evaluations, health, internal, models
from service.status_fast_path import StatusFastPath
from service.status_reads import StatusReads
from service.status_waits import StatusWaits
from service.validation_pool import ValidationPool

log = logging.getLogger("robustness.gateway")


def _operation_id(route: APIRoute) -> str:
    return f"{route.tags[0]}-{route.name}" if route.tags else route.name


def create_app(settings: Settings | None = None, *, reaper: bool = True) -> FastAPI:
    settings = settings or get_settings()
    settings.prepare()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        anyio.to_thread.current_default_thread_limiter().total_tokens = settings.request_threads
        migrate(settings.database_url)
        sweeper = None
        if reaper:
            sweeper = Reaper(
                app.state.sessions, app.state.celery, settings.reaper_every_s, settings.max_attempts,
                claim_grace_s=settings.lease_s,
            )
            sweeper.start()
        yield
        app.state.waits.close()
        if sweeper:
            sweeper.stop()

    app = FastAPI(
        title="robustness-service",
        version="0.1.0",
        lifespan=lifespan,
        description="Measure the adversarial robustness of ONNX image classifiers.",
        generate_unique_id_function=_operation_id,
        docs_url=None,  # service/docs.py serves it, offline
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.sessions = session_factory(
        settings.database_url, settings.pool_size, settings.db_pool_timeout_s
    )
    # requests whose session spans the handler (service/deps.py): at most as many as threads
    app.state.admission = asyncio.Semaphore(settings.request_threads)
    app.state.tenants = TenantCache(app.state.sessions, settings)
    app.state.validation = ValidationPool(settings.validation_processes, settings.validation_cpu_s)
    app.state.status = StatusReads(app.state.sessions, settings.status_cache_s, evaluations.owned_publics)
    app.state.waits = StatusWaits(app.state.sessions, settings.status_wait_interval_s,
                                  settings.max_status_waiters, app.state.status.forget)
    app.state.store = LocalBlobStore(settings.blob_dir)
    app.state.celery = make_celery(settings)
    app.state.metrics = ServiceMetrics()
    install_handlers(app)
    # innermost of ours: the polls it answers still get a request id and the body limit
    app.add_middleware(StatusFastPath, status_body=evaluations.status_body, max_wait_s=evaluations.MAX_WAIT_S)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestIdMiddleware)  # outermost of ours: a 413 carries its id too
    install_docs(app)
    for router in (health.router, models.router, datasets.router, evaluations.router, dashboard.router,
                   internal.router):
        app.include_router(router)
    if not settings.api_keys_required and not is_loopback(settings.host):
        log.warning("gateway.open_on_network host=%s: requests need API keys once any exists", settings.host)
    return app
