"""Receiving an uploaded file: streamed into the blob store's tmp folder while hashed,
validated there, then moved into the store under its sha256. A model may come with its
external data files (PyTorch's default exporter writes model.onnx.data): they are received
the same way, and what is stored is the one self-contained model made of them (past
protobuf's 2 GiB: the model with its large tensors' data files stored beside it as blobs,
workers/onnxgrad/weights.py). A zip of
images that need processing is stored as the uint8 .npz they become."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

from fastapi import UploadFile

from infra.blobs import BlobTooLarge, LocalBlobStore, file_sha256, stream_to_file
from schemas.api import upload_digest
from service.errors import ApiError, TooLarge
from service.model_admission import outside_weights_folder
from workers.onnxgrad.weights import blob_location

CHUNK = 1 << 20
# what was found in already stored bytes (service.scoping.validated_info), None when they are new
Known = Callable[[str], Awaitable[dict | None]]


async def _chunks(upload: UploadFile):
    while chunk := await upload.read(CHUNK):
        yield chunk


@asynccontextmanager
async def _received(upload: UploadFile, store: LocalBlobStore, limit: int, what: str
                    ) -> AsyncIterator[tuple[Path, str, int]]:
    """(temp path, sha256, size) of the upload, streamed to disk; the file is removed on exit
    unless moved into the store."""
    with store.temp_file() as (path, handle):
        try:
            sha256, size = await stream_to_file(_chunks(upload), handle, limit)
        except BlobTooLarge:
            raise TooLarge(f"the {what} is larger than the limit of {limit} bytes") from None
        handle.close()
        if size == 0:
            named = f" {upload.filename!r}" if upload.filename else ""
            raise ApiError(f"the {what} file{named} is empty", type=f"invalid_{what}")
        yield path, sha256, size


# what earlier uploads of these bytes (sha256, size) became: (stored sha256, size, info)
Stored = Callable[[str, int], Awaitable[tuple[str, int, dict] | None]]


async def receive(
    upload: UploadFile, store: LocalBlobStore, limit: int, what: str,
    validate: Callable[[Path, Path], Awaitable[tuple[Any, bool]]], stored: Stored,
) -> tuple[str, int, dict]:
    """(sha256, size, what ``validate`` returned, as a dict) of what is stored. ``validate(path,
    out)`` runs the validator away from the event loop (service/validation_pool.py) and returns
    (info, whether it wrote what is to be stored to ``out``, in place of the upload: an image zip
    made into a uint8 .npz). Bytes that ``stored`` finds were validated (and processed) before
    are not validated again."""
    async with AsyncExitStack() as stack:
        path, sha256, size = await stack.enter_async_context(_received(upload, store, limit, what))
        found = await stored(sha256, size)
        if found is not None and store.exists(found[0]):
            return found
        out, handle = stack.enter_context(store.temp_file())
        handle.close()
        info, wrote = await validate(path, out)  # a UserError answers its own 4xx
        if wrote:
            path, sha256, size = out, await asyncio.to_thread(file_sha256, out), out.stat().st_size
        if not store.exists(sha256):
            await asyncio.to_thread(store.put_file, path, sha256)
    return sha256, size, asdict(info)


def _data_file_name(upload: UploadFile, seen: dict[str, Path]) -> str:
    name = upload.filename or ""
    if not name or "/" in name or "\\" in name or "\x00" in name or name in (".", ".."):
        raise ApiError(f"a data file is named {name!r}; send each under its plain file name, as the model's "
                       "external data names it (model.onnx.data)", type="invalid_model")
    if name in seen:
        raise ApiError(f"two data files are named {name!r}; send each once", type="invalid_model")
    return name


async def receive_model(
    upload: UploadFile, data: list[UploadFile], store: LocalBlobStore, limit: int,
    validate: Callable[[Path, dict[str, Path], Path], Awaitable[tuple[Any, bool]]], known: Known,
    made_from: Known,
) -> tuple[str, int, dict, str | None]:
    """A model with its data files (or a .zip / .tar.gz bundle in ``upload``): (sha256, size,
    info) of what is stored, and the upload's digest (schemas.api.upload_digest) where that is
    not the upload as sent. ``validate(model, data files by name, out)`` returns (info, whether
    it wrote a self-contained model to ``out``, which is then stored in place of the upload).
    An upload that ``made_from(digest)`` finds made into a stored model before is not
    validated again."""
    async with AsyncExitStack() as stack:
        path, sha256, size = await stack.enter_async_context(_received(upload, store, limit, "model"))
        if not data and store.exists(sha256):  # a plain model stored before: validated then
            found = await known(sha256)
            if found is not None:
                return sha256, size, found, None
        files: dict[str, Path] = {}
        digests: dict[str, str] = {}
        received = size
        for part in data:
            name = _data_file_name(part, files)
            files[name], digests[name], part_size = await stack.enter_async_context(
                _received(part, store, limit - received, "model"))
            received += part_size
        source = upload_digest(sha256, digests)
        made = await made_from(source)
        if made is not None and all(store.exists(blob)
                                    for blob in (made["sha256"], *made["info"].get("weights", []))):
            return made["sha256"], made["size"], made["info"], source
        out, handle = stack.enter_context(store.temp_file())
        handle.close()
        outside = outside_weights_folder(out)
        stack.callback(shutil.rmtree, outside, ignore_errors=True)
        info, bundled = await validate(path, files, out)
        if bundled:
            path, sha256, size = out, await asyncio.to_thread(file_sha256, out), out.stat().st_size
        for blob in info.weights:  # a model past protobuf's limit: its large tensors' data files
            if not store.exists(blob):
                await asyncio.to_thread(store.put_file, outside / blob_location(blob), blob)
            size += store.local_path(blob).stat().st_size
        if not store.exists(sha256):
            await asyncio.to_thread(store.put_file, path, sha256)
    return sha256, size, asdict(info), source if bundled else None


