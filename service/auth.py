"""API keys and tenants: keys are stored as sha256 hashes, each bound to one tenant."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from infra.records import ApiKey, Tenant, new_id
from service.errors import Unauthorized

KEY_PREFIX = "rk_"
OPEN_TENANT = "default"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def get_or_create_tenant(db: Session, name: str) -> Tenant:
    tenant = db.scalar(select(Tenant).where(Tenant.name == name))
    if tenant is not None:
        return tenant
    try:
        with db.begin_nested():  # two first requests at once: one creates, the other reads it
            tenant = Tenant(id=new_id("tn"), name=name)
            db.add(tenant)
    except IntegrityError:
        tenant = db.scalars(select(Tenant).where(Tenant.name == name)).one()  # the other request's
    return tenant


def create_key(db: Session, tenant_name: str) -> str:
    """A new key for ``tenant_name`` (created if new); the key itself is never stored."""
    if (
        not tenant_name
        or len(tenant_name) > 100
        or not tenant_name.replace("-", "").replace("_", "").isalnum()
    ):
        raise ValueError("a tenant name is 1-100 letters, digits, '-' or '_'")
    tenant = get_or_create_tenant(db, tenant_name)
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    db.add(ApiKey(id=new_id("key"), tenant_id=tenant.id, key_hash=hash_key(key), prefix=key[:10]))
    db.commit()
    return key


def any_keys(db: Session) -> bool:
    return db.scalar(select(ApiKey.id).where(ApiKey.revoked_at.is_(None)).limit(1)) is not None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def open_mode_allowed(db: Session, host: str, keys_required: bool) -> bool:
    """Without keys the service answers everyone as one tenant, but only on loopback."""
    return not keys_required and is_loopback(host) and not any_keys(db)


def authenticate(db: Session, authorization: str | None, *, open_mode: bool) -> Tenant:
    if authorization:
        scheme, _, key = authorization.partition(" ")
        if scheme.lower() != "bearer" or not key:
            raise Unauthorized("use the header `Authorization: Bearer <api key>`")
        digest = hash_key(key.strip())
        row = db.scalar(select(ApiKey).where(ApiKey.key_hash == digest, ApiKey.revoked_at.is_(None)))
        if row is None or not hmac.compare_digest(row.key_hash, digest):
            raise Unauthorized(
                "unknown or revoked API key; create one with `robustness keys create --tenant NAME`"
            )
        return db.get_one(Tenant, row.tenant_id)
    if open_mode:
        tenant = get_or_create_tenant(db, OPEN_TENANT)
        db.commit()
        return tenant
    raise Unauthorized(
        "an API key is required: send `Authorization: Bearer <api key>`; create one with "
        "`robustness keys create --tenant NAME`"
    )
