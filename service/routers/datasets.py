"""/v1/datasets: upload (.npz, or a zip of PNG / JPEG class folders, resized, cropped and labelled
as the upload declares), list, read and delete."""

from __future__ import annotations

from functools import partial
from typing import Annotated, Literal

from fastapi import APIRouter, File, Form, Query, Request, Response, UploadFile, status
from pydantic import AfterValidator
from starlette.concurrency import run_in_threadpool

from infra.records import StoredDataset
from schemas.api import DatasetList, DatasetPublic
from service import uploads
from service.deps import SessionDep, SettingsDep, StoreDep, TenantDep
from service.errors import ERROR_RESPONSES, printable_name
from service.scoping import (
    delete_record,
    owned,
    processed_before,
    refuse_if_in_use,
    store_record_in,
    tenant_records,
    validated_info,
)
from workers.dataset_files import validate_dataset
from workers.image_folders import ImageProcessing

router = APIRouter(prefix="/v1/datasets", tags=["datasets"], responses=ERROR_RESPONSES)


def public(row: StoredDataset) -> DatasetPublic:
    return DatasetPublic(
        id=row.id,
        name=row.name,
        sha256=row.sha256,
        size=row.size,
        created_at=row.created_at.isoformat() + "Z",
        **row.info,
    )


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=DatasetPublic,
    responses={200: {"model": DatasetPublic, "description": "this tenant already has these bytes"}},
)
async def upload_dataset(
    tenant: TenantDep,
    settings: SettingsDep,
    store: StoreDep,
    request: Request,
    response: Response,
    file: Annotated[UploadFile, File(description=".npz with x and y, or a zip of PNG / JPEG class folders")],
    name: Annotated[str | None, Form(max_length=200), AfterValidator(printable_name)] = None,
    resize: Annotated[str | None, Form(max_length=20, description=(
        "image zips: scale each image's shorter side to N pixels (torchvision's Resize(N)), or to "
        "exactly HxW"))] = None,
    center_crop: Annotated[str | None, Form(max_length=20, description=(
        "image zips: cut the central N x N (or HxW) pixels, after resize"))] = None,
    color: Annotated[Literal["rgb", "grayscale"] | None, Form(description=(
        "image zips: convert every image to RGB (as torchvision's ImageFolder does) or grayscale"))] = None,
    classes: Annotated[str | None, Form(max_length=1_000_000, description=(
        "image zips: the model's class names in output order, one per line (or a,b,c): a folder's "
        "label is its name's position here, not among the zip's folders, so a zip may hold some "
        "classes only"))] = None,
) -> DatasetPublic:
    """Validate (without pickle; sizes checked before decoding) and store a labelled dataset.
    A zip of JPEGs, of images of several sizes, or with resize / center_crop / color declared is
    processed once, here, one image at a time, and stored as a uint8 .npz (format "image-zip";
    its sha256 is that file's, the upload's is ``source_sha256``)."""
    processing = ImageProcessing.parse(resize, center_crop, color, classes)
    declared = processing.as_dict() if processing.declared else None
    sessions = request.app.state.sessions
    validate = partial(validate_dataset, max_bytes=settings.max_dataset_bytes,
                       max_samples=settings.max_samples, max_decoded_bytes=settings.max_dataset_decoded_bytes,
                       processing=processing)
    source: dict[str, str] = {}
    upload: dict[str, str] = {}  # the upload's sha256, which uploads.receive hands to `stored` first

    async def validated(path, out):
        info = await request.app.state.validation.run("dataset", validate, path, out)
        if info.format == "image-zip":
            source["sha256"] = upload["sha256"]
        return info, info.format == "image-zip"

    async def stored(sha256: str, size: int):
        """An earlier upload of these bytes: processed the same way, or stored as it is."""
        upload["sha256"] = sha256
        found = await run_in_threadpool(processed_before, sessions, sha256, declared)
        if found is not None:
            source["sha256"] = sha256
            return found
        if declared is None and store.exists(sha256):
            info = await run_in_threadpool(validated_info, sessions, StoredDataset, sha256)
            return None if info is None else (sha256, size, info)
        return None

    sha256, size, info = await uploads.receive(file, store, settings.max_dataset_bytes, "dataset", validated,
                                               stored)
    if source:
        info["source_sha256"] = source["sha256"]
    row, created = await run_in_threadpool(
        store_record_in,
        request.app.state.sessions,
        StoredDataset,
        "ds",
        tenant,
        sha256=sha256,
        size=size,
        name=name or file.filename or sha256[:12],
        info=info,
        source_sha256=source.get("sha256"),
    )
    if not created:
        response.status_code = status.HTTP_200_OK
    return public(row)


@router.get("", response_model=DatasetList)
def list_datasets(
    tenant: TenantDep,
    db: SessionDep,
    sha256: Annotated[str | None, Query(pattern="^[0-9a-f]{64}$")] = None,
    source_sha256: Annotated[str | None, Query(
        pattern="^[0-9a-f]{64}$", description="datasets made from this upload (an image zip, processed)",
    )] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> DatasetList:
    rows = tenant_records(db, StoredDataset, tenant, sha256, limit, source_sha256=source_sha256)
    return DatasetList(items=[public(r) for r in rows], count=len(rows))


@router.get("/{dataset_id}", response_model=DatasetPublic)
def get_dataset(dataset_id: str, tenant: TenantDep, db: SessionDep) -> DatasetPublic:
    return public(owned(db, StoredDataset, dataset_id, tenant))


@router.delete("/{dataset_id}", status_code=status.HTTP_204_NO_CONTENT)
def delete_dataset(dataset_id: str, tenant: TenantDep, db: SessionDep, store: StoreDep) -> None:
    row = owned(db, StoredDataset, dataset_id, tenant)
    refuse_if_in_use(db, "dataset", row)
    delete_record(db, store, row)
