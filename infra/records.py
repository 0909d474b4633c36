"""Metadata tables (SQLAlchemy 2). Alembic migrations in infra/migrations mirror them.

Ids are random and prefixed by kind. Every row that a user can name belongs to a tenant, and
every query for one goes through service.store's tenant-scoped helpers.
"""

from __future__ import annotations

import secrets
from datetime import UTC, datetime

from sqlalchemy import JSON, BigInteger, Float, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)  # stored naive, always UTC


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(16)}"


class Base(DeclarativeBase):
    pass


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)  # sha256 of the key
    prefix: Mapped[str] = mapped_column(String(16))  # shown in listings, never the key
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)


class DashboardSession(Base):
    """A dashboard sign-in: the cookie holds an opaque token, the table its sha256; it ends at
    ``expires_at``, on sign-out, or when the key that opened it is revoked."""

    __tablename__ = "dashboard_sessions"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # sha256 of the cookie's token
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    key_id: Mapped[str] = mapped_column(ForeignKey("api_keys.id"), index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime] = mapped_column()
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)


class StoredModel(Base):
    __tablename__ = "models"
    __table_args__ = (UniqueConstraint("tenant_id", "sha256"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    size: Mapped[int] = mapped_column(BigInteger)
    info: Mapped[dict] = mapped_column(JSON)  # input, classes, opset, gradient verdict
    # a bundle or a model sent with its data files: schemas.api.upload_digest of the upload
    source_sha256: Mapped[str | None] = mapped_column(String(64), index=True, default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class StoredDataset(Base):
    __tablename__ = "datasets"
    __table_args__ = (UniqueConstraint("tenant_id", "sha256"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    size: Mapped[int] = mapped_column(BigInteger)
    info: Mapped[dict] = mapped_column(JSON)  # format, samples, shape, classes
    # an image zip processed at upload: the zip's sha256 (``sha256`` is the stored .npz's)
    source_sha256: Mapped[str | None] = mapped_column(String(64), index=True, default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Job(Base):
    """An evaluation: its state is the source of truth, never Celery's result backend."""

    __tablename__ = "evaluations"
    __table_args__ = (
        UniqueConstraint("tenant_id", "idempotency_key"),
        Index("ix_evaluations_tenant_state", "tenant_id", "state"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"))
    model_id: Mapped[str] = mapped_column(String(40), index=True)
    dataset_id: Mapped[str] = mapped_column(String(40))
    model_sha256: Mapped[str] = mapped_column(String(64))
    dataset_sha256: Mapped[str] = mapped_column(String(64))
    spec: Mapped[dict] = mapped_column(JSON)
    baselines: Mapped[dict] = mapped_column(JSON, default=dict)  # baseline id -> result document
    models: Mapped[dict] = mapped_column(JSON, default=dict)  # transfer model name -> sha256
    idempotency_key: Mapped[str | None] = mapped_column(String(200), default=None)
    request_hash: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16), default="queued")
    shards: Mapped[int] = mapped_column(Integer)  # work units, not counting the final aggregation
    # the estimated model calls x samples (workers/cost.py); None for jobs from before estimates
    cost: Mapped[int | None] = mapped_column(BigInteger, default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
    error_code: Mapped[str | None] = mapped_column(String(40), default=None)
    error_message: Mapped[str | None] = mapped_column(Text, default=None)
    passed: Mapped[bool | None] = mapped_column(default=None)
    verdict: Mapped[str | None] = mapped_column(String(16), default=None)  # passed | failed | inconclusive
    result: Mapped[dict | None] = mapped_column(JSON, default=None)
    artifacts: Mapped[dict] = mapped_column(JSON, default=dict)  # name -> {"sha256", "size"}
    report_sha256: Mapped[str | None] = mapped_column(String(64), default=None)  # the HTML report
    # rendering (after the result is stored) | ready | failed; None before migration 0007
    report_state: Mapped[str | None] = mapped_column(String(16), default=None)


class Shard(Base):
    """One unit of a job (a slice of the dataset, or the final aggregation), leased to a worker."""

    __tablename__ = "shards"
    __table_args__ = (UniqueConstraint("job_id", "position"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("evaluations.id", ondelete="CASCADE"), index=True)
    position: Mapped[int] = mapped_column(Integer)  # the engine's WorkUnit.index; finish comes last
    kind: Mapped[str] = mapped_column(String(16))  # shard | whole | finish
    # waiting (finish, until the shards are done) | queued | running | succeeded | failed | cancelled
    state: Mapped[str] = mapped_column(String(16), index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    lease_until: Mapped[float | None] = mapped_column(Float, default=None)  # unix time
    dispatched_at: Mapped[float | None] = mapped_column(Float, default=None)
    worker: Mapped[str | None] = mapped_column(String(200), default=None)
    stage: Mapped[str | None] = mapped_column(String(100), default=None)
    done: Mapped[int] = mapped_column(Integer, default=0)
    total: Mapped[int] = mapped_column(Integer, default=0)
    output_sha256: Mapped[str | None] = mapped_column(String(64), default=None)
    timing: Mapped[dict | None] = mapped_column(JSON, default=None)  # seconds per stage (not in the output)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
