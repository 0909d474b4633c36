"""API errors: a small hierarchy, each with a status, rendered as ``{"type", "detail"}``.

The user's errors come from the engine (``workers.errors.UserError``: a bad model, dataset or
spec, each with its own 4xx status and type) and are answered by one handler; the classes
here are the gateway's own (not found, unauthorized, conflicts, quotas)."""

from __future__ import annotations

import logging
import re
import secrets
from contextvars import ContextVar
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import OperationalError, SQLAlchemyError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException

from schemas.api import Error
from workers.errors import UserError

log = logging.getLogger("robustness.gateway")
# the database did not answer (down, locked past its timeout, no pooled connection free): 503
DatabaseUnavailable = (OperationalError, PoolTimeout)


class ApiError(Exception):
    status = 400
    type = "invalid_input"

    def __init__(
        self,
        detail: str,
        *,
        type: str | None = None,
        status: int | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(detail)
        self.detail = detail
        self.headers = headers
        if type:
            self.type = type
        if status:
            self.status = status


class NotFound(ApiError):
    status = 404
    type = "not_found"


class Unauthorized(ApiError):
    status = 401
    type = "unauthorized"


class Conflict(ApiError):
    status = 409
    type = "conflict"


class TooLarge(ApiError):
    status = 413
    type = "too_large"


class TooManyJobs(ApiError):
    status = 429
    type = "too_many_jobs"


class Unavailable(ApiError):
    status = 503
    type = "unavailable"


def printable_name(value: str | None) -> str | None:
    """A record's name: no control characters (PostgreSQL stores no NUL)."""
    if value is not None and any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValueError("a name may not contain control characters (such as NUL, tab or newline)")
    return value


def error_response(status: int, type: str, detail: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"type": type, "detail": detail}, status_code=status, headers=headers)


# What any route may answer besides its success, for the OpenAPI document: every error is an Error.
_ERROR_STATUSES = {
    400: "the upload or the request is not usable (the detail says why)",
    401: "no API key, or an unknown or revoked one",
    404: "no such record for this tenant",
    409: "the request conflicts with the record's state",
    413: "the request or the upload is too large",
    422: "the spec or a parameter is invalid (the detail names the field)",
    429: "too many queued or running evaluations for this tenant (see Retry-After)",
    500: "an unexpected error; the detail carries the request id the log has",
    503: "the database or the broker cannot be reached now; retry after Retry-After seconds",
}
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": Error, "description": description} for status, description in _ERROR_STATUSES.items()
}
# The same for a route whose success is not JSON (an HTML report, a file): its errors still are.
JSON_ERRORS_OF_A_FILE_ROUTE: dict[int | str, dict[str, Any]] = {
    status: {"description": description,
             "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    for status, description in _ERROR_STATUSES.items()
}

# the current request's id, for log lines written while it is handled
request_id: ContextVar[str] = ContextVar("request_id", default="-")


class RequestIdMiddleware:
    """Pure ASGI middleware: gives each request an id (its X-Request-ID header when that is a
    short token, else a new one), answers it in X-Request-ID and keeps it for the log."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = dict(scope.get("headers") or []).get(b"x-request-id", b"").decode("latin-1")
        rid = given if _TOKEN.fullmatch(given) else secrets.token_hex(8)
        scope.setdefault("state", {})["request_id"] = rid
        token = request_id.set(rid)

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            request_id.reset(token)


_TOKEN = re.compile(r"[A-Za-z0-9._-]{1,64}")


def _validation_detail(exc: RequestValidationError) -> str:
    parts = []
    for error in exc.errors()[:5]:
        where = ".".join(str(p) for p in error.get("loc", ()) if p not in ("body", "query", "path"))
        message = str(error.get("msg")).removeprefix("Value error, ")
        parts.append(f"{where}: {message}" if where else message)
    return "; ".join(parts)


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError):
        return error_response(exc.status, exc.type, exc.detail, exc.headers)

    @app.exception_handler(UserError)
    async def _user_error(_: Request, exc: UserError):
        return error_response(exc.status, exc.type, str(exc))

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError):
        return error_response(422, "invalid_spec", _validation_detail(exc))

    @app.exception_handler(SQLAlchemyError)
    async def _database(request: Request, exc: SQLAlchemyError):
        if not isinstance(exc, DatabaseUnavailable):
            return await _unexpected(request, exc)
        rid = getattr(request.state, "request_id", "-")
        log.warning("request.database_unavailable request_id=%s %s: %s", rid, request.url.path, exc)
        return error_response(503, "unavailable", "the metadata database is busy or unreachable; retry "
                              f"in a few seconds (request {rid})", {"Retry-After": "5"})

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        rid = getattr(request.state, "request_id", "-")
        log.error("request.failed request_id=%s %s %s", rid, request.method, request.url.path,
                  exc_info=exc)
        return JSONResponse({"type": "internal_error", "request_id": rid,
                             "detail": f"an unexpected error (request {rid}); the gateway's log has the "
                                       "details under this id"},
                            status_code=500, headers={"X-Request-ID": rid})

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException):
        kind = {404: "not_found", 405: "method_not_allowed", 401: "unauthorized"}.get(
            exc.status_code, "error"
        )
        return error_response(exc.status_code, kind, str(exc.detail), getattr(exc, "headers", None))
