"""/v1/models: upload, list, read and delete ONNX classifiers."""

from __future__ import annotations

from functools import partial
from typing import Annotated

from fastapi import APIRouter, File, Form, Query, Request, Response, UploadFile, status
from pydantic import AfterValidator
from starlette.concurrency import run_in_threadpool

from infra.records import StoredModel
from schemas.api import GradientVerdict, ModelInput, ModelList, ModelPublic
from service import uploads
from service.deps import SessionDep, SettingsDep, StoreDep, TenantDep
from service.errors import ERROR_RESPONSES, printable_name
from service.model_admission import validate_model_upload
from service.scoping import (
    delete_record,
    made_from,
    owned,
    refuse_if_in_use,
    store_record_in,
    tenant_records,
    validated_info,
)

router = APIRouter(prefix="/v1/models", tags=["models"], responses=ERROR_RESPONSES)


def public(row: StoredModel) -> ModelPublic:
    info = row.info
    image_to_image = info.get("kind") == "image_to_image"
    return ModelPublic(
        id=row.id,
        name=row.name,
        sha256=row.sha256,
        size=row.size,
        created_at=row.created_at.isoformat() + "Z",
        input=ModelInput(name=info["input_name"], shape=info["input_shape"]),
        kind=info.get("kind", "classifier"),  # records from before image-to-image models have none
        num_classes=None if image_to_image else info["num_classes"],
        opset=info["opset"],
        gradients=GradientVerdict(available=info["gradients_available"], unsupported=info["unsupported"],
                                  probed_side=info.get("gradients_probed_side"),
                                  straight_through=info.get("gradients_straight_through", 0)),
        attacks="none" if image_to_image else "all" if info["gradients_available"] else "black_box_only",
        dtype=info.get("dtype", "float32"),  # records from before half precision have none
        output_squeezed_from=info.get("output_squeezed_from"),
        binary=info.get("binary"),
        source_sha256=row.source_sha256,
    )


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=ModelPublic,
    responses={200: {"model": ModelPublic, "description": "this tenant already has these bytes"}},
)
async def upload_model(
    tenant: TenantDep,
    settings: SettingsDep,
    store: StoreDep,
    request: Request,
    response: Response,
    file: Annotated[UploadFile, File(
        description="the .onnx file, or a .zip / .tar.gz of it with its data files")],
    name: Annotated[str | None, Form(max_length=200), AfterValidator(printable_name)] = None,
    data: Annotated[list[UploadFile] | None, File(description=(
        "the model's external data files, each under the file name the model gives it "
        "(PyTorch's default exporter writes model.onnx.data)"))] = None,
) -> ModelPublic:
    """Validate and store an ONNX classifier; the answer says whether exact gradients are
    available or only black-box attacks, naming the operators that block gradients. A model
    with external data is stored as one self-contained model (its sha256 is that model's). A
    model with one output shaped like its input (an autoencoder) is stored as `image_to_image`,
    for an autoencoder defense's `model`."""
    sha256, size, info, source = await uploads.receive_model(
        file,
        data or [],
        store,
        settings.max_model_bytes,
        lambda path, files, out: request.app.state.validation.run(
            "model", partial(validate_model_upload, max_bytes=settings.max_model_bytes,
                             max_loop_iterations=settings.max_loop_iterations,
                             inline_bytes=settings.inline_model_bytes), path, files, out),
        lambda sha256: run_in_threadpool(validated_info, request.app.state.sessions, StoredModel, sha256),
        lambda digest: run_in_threadpool(made_from, request.app.state.sessions, StoredModel, digest),
    )
    row, created = await run_in_threadpool(
        store_record_in,
        request.app.state.sessions,
        StoredModel,
        "mdl",
        tenant,
        sha256=sha256,
        size=size,
        name=name or file.filename or sha256[:12],
        info=info,
        source_sha256=source,
    )
    if not created:
        response.status_code = status.HTTP_200_OK
    return public(row)


@router.get("", response_model=ModelList)
def list_models(
    tenant: TenantDep,
    db: SessionDep,
    sha256: Annotated[str | None, Query(pattern="^[0-9a-f]{64}$")] = None,
    source_sha256: Annotated[str | None, Query(
        pattern="^[0-9a-f]{64}$", description=(
            "models made from this upload: a bundle's sha256, or upload_digest of a model and its "
            "data files (schemas/api.py)"),
    )] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> ModelList:
    rows = tenant_records(db, StoredModel, tenant, sha256, limit, source_sha256=source_sha256)
    return ModelList(items=[public(r) for r in rows], count=len(rows))


@router.get("/{model_id}", response_model=ModelPublic)
def get_model(model_id: str, tenant: TenantDep, db: SessionDep) -> ModelPublic:
    return public(owned(db, StoredModel, model_id, tenant))


@router.delete("/{model_id}", status_code=status.HTTP_204_NO_CONTENT)
def delete_model(model_id: str, tenant: TenantDep, db: SessionDep, store: StoreDep) -> None:
    row = owned(db, StoredModel, model_id, tenant)
    refuse_if_in_use(db, "model", row)
    delete_record(db, store, row)
