"""``GET /v1/evaluations/{id}``, the route a CI fleet polls, answered without FastAPI's routing,
dependency solving and parameter validation: profiled under 1,000 polls a second, those took
most of a poll's CPU, the status itself (a cached read) little.

Same semantics as the declared route (service/routers/evaluations.py, which documents it and
answers everything this does not take): the credential is resolved by the same TenantCache,
the body comes from the same `status_body`, and an ApiError becomes the same JSON error. A
request it is not sure about (another method or path, a query other than one valid ``wait``,
any other exception) goes on to the app unchanged.
"""

from __future__ import annotations

import json
from urllib.parse import parse_qsl

from starlette.requests import cookie_parser

from service.deps import SESSION_COOKIE
from service.errors import ApiError

PREFIX = "/v1/evaluations/"


class StatusFastPath:
    def __init__(self, app, status_body, max_wait_s: float):
        self.app, self.status_body, self.max_wait_s = app, status_body, max_wait_s

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "") if scope["type"] == "http" else ""
        evaluation_id = path[len(PREFIX):] if path.startswith(PREFIX) and scope["method"] == "GET" else ""
        wait = _wait(scope.get("query_string", b""), self.max_wait_s) if evaluation_id else None
        if not evaluation_id or "/" in evaluation_id or wait is None:
            return await self.app(scope, receive, send)
        state = scope["app"].state
        headers = dict(scope.get("headers") or [])
        authorization = headers.get(b"authorization", b"").decode("latin-1") or None
        cookie = _session_cookie(headers.get(b"cookie"))
        try:
            tenant = await state.tenants.tenant(authorization, cookie)
            body = await self.status_body(state, evaluation_id, tenant, wait)
            status, extra = 200, []
        except ApiError as exc:
            body = json.dumps({"type": exc.type, "detail": exc.detail}).encode()
            status = exc.status
            extra = [(k.lower().encode("latin-1"), v.encode("latin-1"))
                     for k, v in (exc.headers or {}).items()]
        except Exception:  # a database hiccup and the like: the app's handlers answer it
            return await self.app(scope, receive, send)
        state.metrics.status_polls.labels("fast").inc()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()), *extra]})
        await send({"type": "http.response.body", "body": body})


def _wait(query: bytes, max_wait_s: float) -> float | None:
    """The long poll's seconds: 0 without a query; None (the app decides) for anything but one
    ``wait`` within [0, max_wait_s]."""
    if not query:
        return 0.0
    pairs = parse_qsl(query.decode("latin-1"), keep_blank_values=True)
    if len(pairs) != 1 or pairs[0][0] != "wait":
        return None
    try:
        value = float(pairs[0][1])
    except ValueError:
        return None
    return value if 0 <= value <= max_wait_s else None


def _session_cookie(raw: bytes | None) -> str | None:
    """The dashboard session's cookie, parsed as Starlette parses it for the app."""
    return cookie_parser(raw.decode("latin-1")).get(SESSION_COOKIE) if raw else None
