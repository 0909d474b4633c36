"""/internal: what workers on other machines need of the gateway, and nothing else.

A worker that shares no folder with the gateway fetches models, datasets and shard outputs by
sha256 and sends back what it writes (infra/gateway_blobs.py). These routes take only the
worker token (``ROBUSTNESS_WORKER_TOKEN``, compared in constant time) and the worker token
takes only these routes: it is no API key, so every /v1 route answers it 401. Without a
token configured the routes do not exist (404). A blob sent is stored only if its sha256 is
its name; blob names are validated digests, so no request names a path.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Request, Response, status
from fastapi.responses import FileResponse

from infra.blobs import BlobTooLarge, check_digest, stream_to_file
from service.deps import SettingsDep, StoreDep
from service.errors import ApiError, NotFound, TooLarge, Unauthorized

router = APIRouter(prefix="/internal", tags=["internal"], include_in_schema=False)


def _worker(settings: SettingsDep, authorization: Annotated[str | None, Header()] = None) -> None:
    token = settings.worker_token
    if not token:
        raise NotFound("no such route: remote workers are off (set ROBUSTNESS_WORKER_TOKEN to turn them on)")
    scheme, _, presented = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(presented.encode(), token.encode()):
        raise Unauthorized("these routes take the worker token (ROBUSTNESS_WORKER_TOKEN) only")


WorkerDep = Annotated[None, Depends(_worker)]


def _digest(sha256: str) -> str:
    try:
        return check_digest(sha256)
    except ValueError:
        raise NotFound(f"no blob named {sha256[:80]!r} (blobs are named by sha256 hex digests)") from None


@router.api_route("/blobs/{sha256}", methods=["GET", "HEAD"])
def get_blob(sha256: str, _: WorkerDep, store: StoreDep):
    if not store.exists(_digest(sha256)):
        raise NotFound(f"no blob {sha256}")
    return FileResponse(store.local_path(sha256), media_type="application/octet-stream")


@router.put("/blobs/{sha256}", status_code=status.HTTP_201_CREATED)
async def put_blob(sha256: str, _: WorkerDep, request: Request, store: StoreDep, settings: SettingsDep):
    _digest(sha256)
    if store.exists(sha256):
        return Response(status_code=status.HTTP_200_OK)
    with store.temp_file() as (path, handle):
        try:
            received, _size = await stream_to_file(request.stream(), handle, settings.max_body_bytes)
        except BlobTooLarge as exc:
            raise TooLarge(f"the blob is {exc}; raise ROBUSTNESS_MAX_BODY_BYTES") from None
        handle.close()
        if received != sha256:
            raise ApiError(f"the bytes sent hash to {received}, not to the blob's name {sha256}")
        store.put_file(path, sha256)
    return Response(status_code=status.HTTP_201_CREATED)
