"""/v1/evaluations: submit (checked against the model and dataset before anything is
queued), poll, read the result, cancel, download artifacts."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response, status
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from starlette.concurrency import run_in_threadpool

from infra import jobs
from infra.dispatch import dispatch
from infra.records import Job, StoredDataset, StoredModel, new_id
from schemas.api import (
    Artifact,
    ArtifactList,
    EvaluationCreate,
    EvaluationList,
    EvaluationPublic,
    JobState,
)
from schemas.evaluation import MAIN_MODEL, EvaluationResult, EvaluationSpec
from service.budgets import check_cost, check_parameter_bounds, check_quota
from service.deps import SessionDep, SettingsDep, StoreDep, TenantDep
from service.errors import (
    ERROR_RESPONSES,
    JSON_ERRORS_OF_A_FILE_ROUTE,
    Conflict,
    NotFound,
    TooManyJobs,
    Unavailable,
)
from service.fit_checks import check_fit, needs_gradients
from service.scoping import owned
from workers.cost import estimate
from workers.errors import InvalidSpecError
from workers.layout import image_nchw
from workers.plan import plan, unit_work
from workers.spec_checks import check_spec

MAX_WAIT_S = 30  # a long poll's longest wait (ROBUSTNESS_MAX_STATUS_WAIT_S may lower it)

router = APIRouter(prefix="/v1/evaluations", tags=["evaluations"], responses=ERROR_RESPONSES)


def public(db, row: Job) -> EvaluationPublic:
    return publics(db, [row.id])[0]


def publics(db, job_ids: list[str]) -> list[EvaluationPublic]:
    return [status for _, status in owned_publics(db, job_ids)]


def owned_publics(db, job_ids: list[str]) -> list[tuple[str, EvaluationPublic]]:
    """(tenant id, public status) of jobs, in the order given; jobs.statuses reads only what
    a status needs."""
    found = jobs.statuses(db, job_ids)
    return [(found[i][0].tenant_id, _public(*found[i])) for i in job_ids if i in found]


def _public(row, progress: dict) -> EvaluationPublic:
    error = {"code": row.error_code, "message": row.error_message} if row.error_code else None
    return EvaluationPublic.model_validate({  # the row's strings are the contract's literals
        "id": row.id,
        "model_id": row.model_id,
        "dataset_id": row.dataset_id,
        "state": row.state,
        "progress": progress,
        "created_at": jobs.iso(row.created_at),
        "started_at": jobs.iso(row.started_at),
        "finished_at": jobs.iso(row.finished_at),
        "error": error,
        "passed": row.passed,
        "verdict": jobs.verdict_of(row),
        "shards": row.shards,
        "cost": row.cost,
    })


def _request_hash(body: EvaluationCreate) -> str:
    canonical = json.dumps(body.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=EvaluationPublic,
    responses={200: {"model": EvaluationPublic, "description": "a retry with the same Idempotency-Key"}},
)
def submit(
    body: EvaluationCreate,
    tenant: TenantDep,
    db: SessionDep,
    settings: SettingsDep,
    request: Request,
    response: Response,
    idempotency_key: Annotated[str | None, Header(min_length=1, max_length=200)] = None,
) -> EvaluationPublic:
    """Queue an evaluation. The spec is checked against the model and the dataset first
    (shapes, classes, attack parameters, gradient availability): a bad one is a 422 and
    nothing is queued. A retried request with the same ``Idempotency-Key`` returns the same job."""
    request_hash = _request_hash(body)
    if idempotency_key is not None:
        earlier = db.scalar(
            select(Job).where(Job.tenant_id == tenant.id, Job.idempotency_key == idempotency_key)
        )
        if earlier is not None:
            return _replay(db, earlier, request_hash, response)
    model = owned(db, StoredModel, body.model_id, tenant)
    dataset = owned(db, StoredDataset, body.dataset_id, tenant)
    _refuse_image_to_image(model, "model_id")
    spec = EvaluationSpec.model_validate(body.model_dump(exclude={"model_id", "dataset_id"}))
    check_parameter_bounds(spec, settings)
    check_spec(spec)
    check_fit(spec, model.info, dataset.info)
    transfer_models = (
        _transfer_models(db, spec, model, tenant)
        | _defense_models(db, spec, dataset, tenant)
        | _fit_datasets(db, spec, dataset, tenant)
    )
    baselines = _baselines(db, spec, tenant)
    cost = estimate(spec, dataset.info["samples"], model.info["num_classes"])
    check_cost(cost, settings)
    jobs.lock_admissions(db, tenant.id)  # until the commit: concurrent submissions count one another
    if jobs.active_jobs(db, tenant.id) >= settings.max_concurrent_jobs:
        raise TooManyJobs(
            f"this tenant already has {settings.max_concurrent_jobs} queued or running "
            "evaluations (ROBUSTNESS_MAX_CONCURRENT_JOBS); retry later",
            headers={"Retry-After": "30"},
        )
    check_quota(db, tenant.id, cost, settings)
    units = plan(spec, dataset.info["samples"])
    job = Job(
        id=new_id("ev"),
        tenant_id=tenant.id,
        model_id=model.id,
        dataset_id=dataset.id,
        model_sha256=model.sha256,
        dataset_sha256=dataset.sha256,
        spec=spec.model_dump(mode="json"),
        baselines=baselines,
        models=transfer_models,
        idempotency_key=idempotency_key,
        request_hash=request_hash,
        shards=len(units),
        cost=cost.total,
    )
    try:
        db.add(job)
        jobs.add_shards(db, job, units, [unit_work(spec, u) for u in units])  # flushes the job
        db.commit()
    except IntegrityError:  # a concurrent retry with the same key won the race
        db.rollback()
        earlier = db.scalar(
            select(Job).where(Job.tenant_id == tenant.id, Job.idempotency_key == idempotency_key)
        )
        if earlier is None:
            raise
        return _replay(db, earlier, request_hash, response)
    dispatch(
        request.app.state.sessions, request.app.state.celery, job.id, jobs.shards_to_dispatch(db, job.id)
    )
    request.app.state.metrics.submitted()
    return public(db, job)


def _replay(db, earlier: Job, request_hash: str, response: Response) -> EvaluationPublic:
    if earlier.request_hash != request_hash:
        raise Conflict(
            "this Idempotency-Key was used for a different request; use a new key for a new evaluation"
        )
    response.status_code = status.HTTP_200_OK
    return public(db, earlier)


def _transfer_models(db, spec: EvaluationSpec, model: StoredModel, tenant) -> dict[str, str]:
    """On the service, transfer.models are model ids of this tenant, with the same input and
    classes as the evaluated model; the job keeps their sha256."""
    if spec.transfer is None:
        return {}
    gradient_attacks = [a.key for a in spec.transfer.attacks if needs_gradients(a)]
    if (
        MAIN_MODEL in spec.transfer.names("sources")
        and gradient_attacks
        and not model.info["gradients_available"]
    ):
        raise InvalidSpecError(
            f"transfer.sources: the evaluated model is a source of {', '.join(gradient_attacks)}, "
            "which need gradients it does not have"
        )
    found = {}
    for name, model_id in spec.transfer.models.items():
        other = db.get(StoredModel, model_id) if len(model_id) <= 40 else None
        if other is None or other.tenant_id != tenant.id:
            raise InvalidSpecError(f"transfer.models.{name}: no model with id {model_id!r}; upload it first")
        _refuse_image_to_image(other, f"transfer.models.{name}")
        ours, theirs = model.info, other.info
        if (
            ours["input_shape"][1:] != theirs["input_shape"][1:]
            or ours["num_classes"] != theirs["num_classes"]
        ):
            raise InvalidSpecError(
                f"transfer.models.{name}: takes {theirs['input_shape'][1:]} with "
                f"{theirs['num_classes']} classes; the evaluated model takes "
                f"{ours['input_shape'][1:]} with {ours['num_classes']} classes"
            )
        if name in spec.transfer.names("sources") and gradient_attacks and not theirs["gradients_available"]:
            raise InvalidSpecError(
                f"transfer.models.{name}: a source of {', '.join(gradient_attacks)}, which need "
                "gradients this model does not have; make it a target only"
            )
        found[name] = other.sha256
    return found


def _refuse_image_to_image(model: StoredModel, field: str) -> None:
    if model.info.get("kind") == "image_to_image":
        raise InvalidSpecError(f"{field}: model {model.id} maps images to images (an autoencoder), it has no "
                               "classes to evaluate; name it as an autoencoder defense's model instead")


def _defense_models(db, spec: EvaluationSpec, dataset: StoredDataset, tenant) -> dict[str, str]:
    """An autoencoder defense's `model` is an image-to-image model id of this tenant that takes
    the dataset's images (NCHW: defenses run on the pixels, before the model's own layout)."""
    image = image_nchw(dataset.info["shape"], spec.input.layout)
    found = {}
    for index, defense in enumerate(spec.defenses):
        if defense.model is None:
            continue
        other = db.get(StoredModel, defense.model) if len(defense.model) <= 40 else None
        if other is None or other.tenant_id != tenant.id:
            raise InvalidSpecError(
                f"defenses[{index}].model: no model with id {defense.model!r}; upload it first")
        if other.info.get("kind") != "image_to_image":
            raise InvalidSpecError(
                f"defenses[{index}].model: model {other.id} is a classifier; an autoencoder's model has one "
                "output shaped like its input (the reconstructed images)")
        takes = other.info["input_shape"][1:]
        fits = len(takes) == len(image) and all(d in (None, i) for d, i in zip(takes, image, strict=True))
        if not fits:
            raise InvalidSpecError(
                f"defenses[{index}].model: model {other.id} takes {takes}, the dataset's images are {image} "
                "(NCHW); an autoencoder in front of the model takes the images")
        found[defense.reference_key()] = other.sha256
    return found


def _fit_datasets(db, spec: EvaluationSpec, dataset: StoredDataset, tenant) -> dict[str, str]:
    """A PCA's `fit_dataset` is a dataset id of this tenant with images like the evaluated ones."""
    found = {}
    for index, defense in enumerate(spec.defenses):
        if defense.fit_dataset is None:
            continue
        fit = db.get(StoredDataset, defense.fit_dataset) if len(defense.fit_dataset) <= 40 else None
        if fit is None or fit.tenant_id != tenant.id:
            raise InvalidSpecError(
                f"defenses[{index}].fit_dataset: no dataset with id {defense.fit_dataset!r}")
        if fit.info["shape"] != dataset.info["shape"]:
            raise InvalidSpecError(
                f"defenses[{index}].fit_dataset: its images are {fit.info['shape']} but the "
                f"evaluated ones are {dataset.info['shape']}"
            )
        found[defense.fit_key()] = fit.sha256
    return found


def _baselines(db, spec: EvaluationSpec, tenant) -> dict:
    found = {}
    for gate in spec.gates:
        baseline = getattr(gate, "baseline", None)
        if not baseline or baseline in found:
            continue
        row = db.get(Job, baseline) if len(baseline) <= 40 else None
        if row is None or row.tenant_id != tenant.id:
            raise InvalidSpecError(f"gates: baseline {baseline!r} is not an evaluation of yours")
        if row.state != "succeeded":
            raise InvalidSpecError(
                f"gates: baseline {baseline!r} is {row.state}; a baseline must have succeeded")
        found[baseline] = row.result
    return found


@router.get("", response_model=EvaluationList)
def list_evaluations(
    tenant: TenantDep,
    db: SessionDep,
    state: JobState | None = None,
    model_id: Annotated[str | None, Query(max_length=40, pattern=r"^\w*$")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> EvaluationList:
    query = select(Job.id).where(Job.tenant_id == tenant.id)
    if state:
        query = query.where(Job.state == state)
    if model_id:
        query = query.where(Job.model_id == model_id)
    items = publics(db, list(db.scalars(query.order_by(Job.created_at.desc()).limit(limit))))
    return EvaluationList(items=items, count=len(items))


@router.get("/{evaluation_id}", response_model=EvaluationPublic)
async def get_evaluation(
    evaluation_id: str,
    tenant: TenantDep,
    request: Request,
    wait: Annotated[float, Query(ge=0, le=MAX_WAIT_S, description=(
        "long poll: answer when the state changes (the evaluation starts or ends) or after this "
        "many seconds, whichever is first; 0 answers at once"))] = 0,
) -> Response:
    """The evaluation's state and progress; poll it (service/status_reads.py keeps it cheap),
    or long-poll it with ``wait`` (service/status_waits.py). Polls that need no validation
    are answered before routing (service/status_fast_path.py), by `status_body` too."""
    body = await status_body(request.app.state, evaluation_id, tenant, wait)
    request.app.state.metrics.status_polls.labels("routed").inc()
    return Response(body, media_type="application/json")


async def status_body(state, evaluation_id: str, tenant, wait: float) -> bytes:
    """The JSON status of the tenant's evaluation, after a long poll of ``wait`` seconds."""
    body = await state.status.read(evaluation_id, tenant)
    if wait > 0:
        seen = json.loads(body)["state"]
        wait = min(wait, state.settings.max_status_wait_s)
        if seen not in jobs.TERMINAL and await state.waits.until_changed(evaluation_id, seen, wait):
            body = await state.status.read(evaluation_id, tenant)
    return body


@router.get("/{evaluation_id}/result", response_model=EvaluationResult,
            responses={200: {"description": "the result document"}})
def get_result(evaluation_id: str, tenant: TenantDep, db: SessionDep):
    """The result document, as the worker stored it (validated against EvaluationResult then)."""
    row = owned(db, Job, evaluation_id, tenant)
    if row.state != "succeeded":
        raise Conflict(f"the evaluation is {row.state}; the result exists once it has succeeded")
    return JSONResponse(row.result)


@router.post("/{evaluation_id}/cancel", response_model=EvaluationPublic)
def cancel(evaluation_id: str, tenant: TenantDep, db: SessionDep, request: Request) -> EvaluationPublic:
    """Cancel a queued or running evaluation; a running shard stops between batches."""
    row = owned(db, Job, evaluation_id, tenant)
    if row.state in jobs.TERMINAL:
        raise Conflict(f"the evaluation already ended ({row.state})")
    jobs.cancel_job(db, row.id)
    request.app.state.status.forget(row.id)
    db.refresh(row)
    return public(db, row)


REPORT_WAIT_S = 30  # GET /report waits this long for a report being rendered
REPORT_LOST_AFTER_S = 300  # a report still "rendering" this long after the result: its worker died


@router.get(
    "/{evaluation_id}/report",
    response_class=HTMLResponse,
    responses={**JSON_ERRORS_OF_A_FILE_ROUTE,
               200: {"content": {"text/html": {}}, "description": "a self-contained HTML report"}},
)
async def get_report(evaluation_id: str, tenant: TenantDep, request: Request, store: StoreDep):
    """The evaluation's report: curves, examples, transfer, defenses, Lipschitz bounds. It is
    rendered just after the result is stored; a request in between waits for it."""
    deadline = time.monotonic() + REPORT_WAIT_S
    while True:
        row = await run_in_threadpool(_report_row, request.app.state.sessions, evaluation_id, tenant)
        if row.state != "succeeded":
            raise Conflict(f"the evaluation is {row.state}; the report exists once it has succeeded")
        if row.report_sha256 is not None:
            break
        rendering = row.report_state == "rendering" and (
            jobs.seconds_since(row.finished_at) < REPORT_LOST_AFTER_S)
        if not rendering:
            why = ": its worker stopped" if row.report_state == "rendering" else ""
            raise NotFound(f"evaluation {evaluation_id} has no report (it could not be rendered{why}; "
                           "see the worker log)")
        if time.monotonic() > deadline:
            raise Unavailable(f"the report of evaluation {evaluation_id} is still being rendered; "
                              "try again in a few seconds", headers={"Retry-After": "5"})
        await asyncio.sleep(0.05)
    return HTMLResponse(
        store.get_bytes(row.report_sha256).decode(),
        headers={"Content-Security-Policy": "default-src 'none'; img-src data:; style-src 'unsafe-inline'"},
    )


def _report_row(sessions, evaluation_id: str, tenant):
    with sessions() as db:
        row = owned(db, Job, evaluation_id, tenant)
        db.expunge(row)
        return row


@router.get("/{evaluation_id}/artifacts", response_model=ArtifactList)
def list_artifacts(evaluation_id: str, tenant: TenantDep, db: SessionDep) -> ArtifactList:
    row = owned(db, Job, evaluation_id, tenant)
    items = [Artifact(name=name, size=meta["size"]) for name, meta in sorted((row.artifacts or {}).items())]
    return ArtifactList(items=items, count=len(items))


@router.get(
    "/{evaluation_id}/artifacts/{name}",
    response_class=FileResponse,
    responses={**JSON_ERRORS_OF_A_FILE_ROUTE,
               200: {"content": {"application/octet-stream": {}}, "description": "an .npz file"}},
)
def download_artifact(evaluation_id: str, name: str, tenant: TenantDep, db: SessionDep, store: StoreDep):
    row = owned(db, Job, evaluation_id, tenant)
    meta = (row.artifacts or {}).get(name)
    if meta is None:
        raise NotFound(
            f"no artifact {name!r} in evaluation {evaluation_id}; list them at "
            f"/v1/evaluations/{evaluation_id}/artifacts"
        )
    return FileResponse(
        store.local_path(meta["sha256"]),
        media_type="application/octet-stream",
        filename=f"{evaluation_id}-{name}.npz",
    )
