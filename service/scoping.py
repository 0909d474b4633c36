"""Tenant scoping in one place: every read of a user-named record goes through ``owned``,
and another tenant's id answers exactly like an id that does not exist."""

from __future__ import annotations

from sqlalchemy import String, cast, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from infra.blobs import BlobStore
from infra.jobs import ACTIVE
from infra.records import Job, StoredDataset, StoredModel, Tenant, new_id
from service.errors import Conflict, NotFound

_KINDS = {StoredModel: "model", StoredDataset: "dataset", Job: "evaluation"}


def owned(db: Session, table, record_id: str, tenant: Tenant):
    row = db.get(table, record_id) if len(record_id) <= 40 and "\x00" not in record_id else None
    if row is None or row.tenant_id != tenant.id:
        raise NotFound(f"no {_KINDS[table]} with id {record_id!r}")
    return row


def tenant_records(db: Session, table, tenant: Tenant, sha256: str | None, limit: int,
                   source_sha256: str | None = None) -> list:
    """The tenant's models or datasets, newest first, optionally those with given bytes (or,
    for datasets, made from a given upload)."""
    query = select(table).where(table.tenant_id == tenant.id)
    if sha256:
        query = query.where(table.sha256 == sha256)
    if source_sha256:
        query = query.where(table.source_sha256 == source_sha256)
    return list(db.scalars(query.order_by(table.created_at.desc()).limit(limit)))


def store_record(
    db: Session, table, prefix: str, tenant: Tenant, *, sha256: str, size: int, name: str, info: dict,
    **columns,
):
    """(record, created): the tenant's record of these bytes, made if it is new. The same
    upload twice, even at once, gives one record; ``columns`` it lacks (a record from before
    uploads were named by their source) are filled in."""
    existing = db.scalar(select(table).where(table.tenant_id == tenant.id, table.sha256 == sha256))
    if existing is not None:
        missing = {k: v for k, v in columns.items() if v is not None and getattr(existing, k) is None}
        if missing:
            for key, value in missing.items():
                setattr(existing, key, value)
            db.commit()
        return existing, False
    row = table(id=new_id(prefix), tenant_id=tenant.id, name=name, sha256=sha256, size=size, info=info,
                **columns)
    db.add(row)
    try:
        db.commit()
    except IntegrityError:  # a concurrent upload of the same bytes won
        db.rollback()
        return db.scalar(select(table).where(table.tenant_id == tenant.id, table.sha256 == sha256)), False
    return row, True


def validated_info(sessions: sessionmaker[Session], table, sha256: str) -> dict | None:
    """What validation found in these exact bytes, from any tenant's record of them: it is a
    function of the bytes, so the same file uploaded again (every CI run re-sends its model)
    is not validated twice."""
    with sessions() as db:
        return db.scalar(select(table.info).where(table.sha256 == sha256).limit(1))


def processed_before(sessions: sessionmaker[Session], source_sha256: str, processing: dict | None
                     ) -> tuple[str, int, dict] | None:
    """(sha256, size, info) of what an earlier upload of these exact bytes with the same
    processing became, from any tenant's record: the result is a function of both."""
    with sessions() as db:
        rows = db.scalars(select(StoredDataset).where(StoredDataset.source_sha256 == source_sha256))
        for row in rows:
            if row.info.get("processing") == processing:
                return row.sha256, row.size, dict(row.info)
    return None


def made_from(sessions: sessionmaker[Session], table, source_sha256: str) -> dict | None:
    """sha256, size and info of what an earlier upload with this digest became, from any
    tenant's record: the stored model is a function of the upload."""
    with sessions() as db:
        row = db.scalars(select(table).where(table.source_sha256 == source_sha256).limit(1)).first()
        return None if row is None else {"sha256": row.sha256, "size": row.size, "info": dict(row.info)}


def store_record_in(sessions: sessionmaker[Session], table, prefix: str, tenant: Tenant, **fields):
    """``store_record`` with a session of its own (for a handler that holds none)."""
    with sessions() as db:
        return store_record(db, table, prefix, tenant, **fields)


def refuse_if_in_use(db: Session, kind: str, row) -> None:
    """409 while a queued or running job of the row's tenant evaluates it or names it in its spec."""
    column = Job.model_id if kind == "model" else Job.dataset_id
    active = db.execute(
        select(column, Job.spec).where(Job.tenant_id == row.tenant_id, Job.state.in_(ACTIVE))
    ).all()
    users = sum(1 for evaluated, spec in active if evaluated == row.id or row.id in named_in_spec(spec, kind))
    if users:
        raise Conflict(
            f"the {kind} is used by {users} queued or running evaluation(s); cancel them or "
            "wait until they end"
        )


def named_in_spec(spec: dict, kind: str) -> set[str]:
    """The ids of the models (transfer models, autoencoder defenses) or the datasets (PCA fit
    datasets) a job's stored spec names. Read from the JSON, not validated: a job queued before
    the schema changed must not make its models undeletable."""
    defenses = [d for d in spec.get("defenses") or [] if isinstance(d, dict)]
    if kind == "model":
        transfer_models = ((spec.get("transfer") or {}).get("models") or {}).values()
        named = [*transfer_models, *(d.get("model") for d in defenses)]
    else:
        named = [d.get("fit_dataset") for d in defenses]
    return {name for name in named if isinstance(name, str)}


def delete_record(db: Session, store: BlobStore, row) -> None:
    """Delete the row, and its blob once no tenant's record refers to it any more."""
    table = type(row)
    db.delete(row)
    db.commit()
    others = db.scalar(select(func.count()).select_from(table).where(table.sha256 == row.sha256))
    if not others:
        store.delete(row.sha256)
        for blob in (row.info or {}).get("weights", []):  # a large model's data files (weights.py)
            mentioned = db.scalar(select(func.count()).select_from(table).where(
                cast(table.info, String).contains(blob)))
            if not mentioned:
                store.delete(blob)
