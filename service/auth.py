"""API keys, dashboard sessions and tenants.

Keys are stored as sha256 hashes, each bound to one tenant. A dashboard sign-in opens a
server-side session: the cookie carries an opaque token, the table its hash; it expires,
ends on sign-out, and ends when the key that opened it is revoked. Who a credential is gets
remembered per gateway process for ``auth_cache_s`` (TenantCache), so a poll costs no query.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
from datetime import timedelta
from functools import partial

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from infra.records import ApiKey, DashboardSession, Tenant, new_id, utcnow
from infra.settings import Settings
from service.errors import Unauthorized
from service.shared_reads import SharedReads

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


def list_keys(db: Session) -> list[dict]:
    """Every key, newest first: id, tenant, the key's first characters, dates; never the key."""
    rows = db.execute(
        select(ApiKey, Tenant.name)
        .join(Tenant, Tenant.id == ApiKey.tenant_id)
        .order_by(ApiKey.created_at.desc())
    ).all()
    return [
        {"id": key.id, "tenant": tenant, "prefix": key.prefix, "created_at": key.created_at.isoformat() + "Z",
         "revoked_at": key.revoked_at.isoformat() + "Z" if key.revoked_at else None}
        for key, tenant in rows
    ]


def revoke_key(db: Session, key_id_or_prefix: str) -> dict:
    """Revoke one key, named by its id or its prefix, and every dashboard session it opened.
    Raises LookupError when nothing or more than one key matches."""
    matches = db.scalars(
        select(ApiKey).where((ApiKey.id == key_id_or_prefix) | (ApiKey.prefix == key_id_or_prefix))
    ).all()
    if len(matches) != 1:
        raise LookupError(
            f"no key with id or prefix {key_id_or_prefix!r}" if not matches
            else f"{len(matches)} keys have the prefix {key_id_or_prefix!r}; give the key's id"
        )
    key = matches[0]
    now = utcnow()
    if key.revoked_at is None:
        key.revoked_at = now
    db.execute(
        update(DashboardSession)
        .where(DashboardSession.key_id == key.id, DashboardSession.revoked_at.is_(None))
        .values(revoked_at=now)
    )
    db.commit()
    return {"id": key.id, "prefix": key.prefix, "revoked_at": key.revoked_at.isoformat() + "Z"}


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


def _key_row(db: Session, key: str) -> ApiKey | None:
    digest = hash_key(key.strip())
    row = db.scalar(select(ApiKey).where(ApiKey.key_hash == digest, ApiKey.revoked_at.is_(None)))
    if row is None or not hmac.compare_digest(row.key_hash, digest):
        return None
    return row


def authenticate(db: Session, authorization: str | None, *, open_mode: bool) -> Tenant:
    if authorization:
        scheme, _, key = authorization.partition(" ")
        if scheme.lower() != "bearer" or not key:
            raise Unauthorized("use the header `Authorization: Bearer <api key>`")
        row = _key_row(db, key)
        if row is None:
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


def open_session(db: Session, key: str, lifetime_s: float) -> str:
    """Sign in to the dashboard with an API key: the opaque token for the cookie."""
    row = _key_row(db, key)
    if row is None:
        raise Unauthorized(
            "unknown or revoked API key; create one with `robustness keys create --tenant NAME`"
        )
    token = secrets.token_urlsafe(32)
    db.add(DashboardSession(id=hash_key(token), tenant_id=row.tenant_id, key_id=row.id,
                            expires_at=utcnow() + timedelta(seconds=lifetime_s)))
    db.commit()
    return token


def close_session(db: Session, token: str) -> None:
    db.execute(
        update(DashboardSession)
        .where(DashboardSession.id == hash_key(token), DashboardSession.revoked_at.is_(None))
        .values(revoked_at=utcnow())
    )
    db.commit()


def session_tenant(db: Session, token: str) -> Tenant:
    row = db.scalar(
        select(DashboardSession)
        .join(ApiKey, ApiKey.id == DashboardSession.key_id)
        .where(DashboardSession.id == hash_key(token), DashboardSession.revoked_at.is_(None),
               DashboardSession.expires_at > utcnow(), ApiKey.revoked_at.is_(None))
    )
    if row is None:
        raise Unauthorized("the dashboard session expired or was revoked; sign in again with an API key")
    return db.get_one(Tenant, row.tenant_id)


def resolve_tenant(
    sessions: sessionmaker[Session], settings: Settings, authorization: str | None, cookie: str | None
) -> Tenant:
    """The tenant of a request: its API key, else its dashboard session, else the open tenant
    (no keys at all, loopback only). Runs in a thread with a session of its own."""
    with sessions() as db:
        if authorization or not cookie:
            open_mode = not authorization and open_mode_allowed(db, settings.host, settings.api_keys_required)
            return authenticate(db, authorization, open_mode=open_mode)
        return session_tenant(db, cookie)


class TenantCache:
    """Who a credential is, for ``ttl`` seconds per gateway process (a poll costs no query for
    it); concurrent requests with one credential share one lookup. Only successes are kept: a
    wrong key costs its lookup every time. The open tenant (no credential) is never kept: the
    first key created ends open mode at once."""

    def __init__(self, sessions: sessionmaker[Session], settings: Settings):
        self.sessions, self.settings = sessions, settings
        self._reads: SharedReads[Tenant] = SharedReads(settings.auth_cache_s, max_entries=10_000)
        self._open: SharedReads[Tenant] = SharedReads(0)

    @staticmethod
    def _key(authorization: str | None, cookie: str | None) -> str:
        return hash_key(f"{authorization or ''}\n{cookie or ''}")

    async def tenant(self, authorization: str | None, cookie: str | None) -> Tenant:
        reads = self._reads if authorization or cookie else self._open
        return await reads.get(
            self._key(authorization, cookie),
            partial(resolve_tenant, self.sessions, self.settings, authorization, cookie),
        )

    def forget(self, authorization: str | None, cookie: str | None) -> None:
        self._reads.forget(self._key(authorization, cookie))
