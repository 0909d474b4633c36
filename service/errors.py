"""API errors: a small hierarchy, each with a status, rendered as ``{"type", "detail"}``.

The user's errors come from the engine (``workers.errors.UserError``: a bad model, dataset or
spec, each with its own 4xx status and type) and are answered by one handler; the classes
here are the gateway's own (not found, unauthorized, conflicts, quotas)."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from workers.errors import UserError


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


def error_response(status: int, type: str, detail: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"type": type, "detail": detail}, status_code=status, headers=headers)


def _validation_detail(exc: RequestValidationError) -> str:
    parts = []
    for error in exc.errors()[:5]:
        where = ".".join(str(p) for p in error.get("loc", ()) if p not in ("body", "query", "path"))
        parts.append(f"{where}: {error.get('msg')}" if where else str(error.get("msg")))
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

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException):
        kind = {404: "not_found", 405: "method_not_allowed", 401: "unauthorized"}.get(
            exc.status_code, "error"
        )
        return error_response(exc.status_code, kind, str(exc.detail), getattr(exc, "headers", None))
