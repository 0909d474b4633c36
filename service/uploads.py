"""Receiving an uploaded file: streamed into the blob store's tmp folder while hashed,
validated there, then moved into the store under its sha256."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from fastapi import UploadFile

from infra.blobs import BlobTooLarge, LocalBlobStore, stream_to_file
from service.errors import ApiError, TooLarge

CHUNK = 1 << 20
Info = TypeVar("Info")  # what the validator of an upload returns


async def _chunks(upload: UploadFile):
    while chunk := await upload.read(CHUNK):
        yield chunk


async def receive(
    upload: UploadFile, store: LocalBlobStore, limit: int, what: str,
    validate: Callable[[Path], Awaitable[Info]],
) -> tuple[str, int, Info]:
    """(sha256, size, what ``validate`` returned); the blob is in the store afterwards.
    ``validate`` runs the validator away from the event loop (service/validation_pool.py)."""
    with store.temp_file() as (path, handle):
        try:
            sha256, size = await stream_to_file(_chunks(upload), handle, limit)
        except BlobTooLarge:
            raise TooLarge(f"the {what} is larger than the limit of {limit} bytes") from None
        handle.close()
        if size == 0:
            raise ApiError(f"the {what} file is empty", type=f"invalid_{what}")
        info = await validate(path)  # a UserError answers its own 4xx
        if not store.exists(sha256):
            await asyncio.to_thread(store.put_file, path, sha256)
    return sha256, size, info
