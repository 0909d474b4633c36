"""Dashboard sign-in opens a server-side session (an opaque token in the cookie, never the
key) that expires, ends on sign-out and ends with its key; `robustness keys create|list|revoke`
work on the store named by --data-dir and say so when there is none."""

from __future__ import annotations

import json
import time

from sqlalchemy import select

from infra.database import migrate, session_factory
from infra.records import DashboardSession
from service.auth import create_key, hash_key, revoke_key
from tests.service.conftest import gateway, make_settings
from tests.service.test_serve import run_cli


def _keys(settings, *tenants):
    migrate(settings.database_url)
    with session_factory(settings.database_url)() as db:
        return [create_key(db, t) for t in tenants]


def _cookie(response) -> str:
    header = response.headers["set-cookie"]
    return header.split(";", 1)[0].split("=", 1)[1]


def test_the_cookie_holds_an_opaque_session_not_the_key(tmp_path):
    settings = make_settings(tmp_path / "data")
    (key,) = _keys(settings, "alice")
    with gateway(settings) as api:
        signed = api.post("/login", data={"key": key}, follow_redirects=False)
        token = _cookie(signed)
        assert signed.status_code == 303 and key not in signed.headers["set-cookie"] and token != key
        header = signed.headers["set-cookie"].lower()
        assert "httponly" in header and "samesite=strict" in header and "secure" not in header
        assert f"max-age={int(settings.session_lifetime_s)}" in header
        with session_factory(settings.database_url)() as db:
            row = db.scalar(select(DashboardSession))
            assert row.id == hash_key(token) and token not in row.id  # only its hash is stored
        assert "Evaluations of alice" in api.get("/").text


def test_sign_out_revokes_the_session_on_the_server(tmp_path):
    settings = make_settings(tmp_path / "data", auth_cache_s=0)
    (key,) = _keys(settings, "alice")
    with gateway(settings) as api:
        token = _cookie(api.post("/login", data={"key": key}, follow_redirects=False))
        api.post("/logout", follow_redirects=False)
        api.cookies.clear()
        api.cookies.set("robustness_session", token)  # a copied cookie after sign-out
        page = api.get("/")
        assert page.status_code == 401 and "expired or was revoked" in page.text
        assert api.get("/v1/models").status_code == 401


def test_a_session_expires(tmp_path):
    # 3 s: a 1 s session expired between login and the first request on a loaded 2-core CI machine
    settings = make_settings(tmp_path / "data", auth_cache_s=0, session_lifetime_s=3)
    (key,) = _keys(settings, "alice")
    with gateway(settings) as api:
        token = _cookie(api.post("/login", data={"key": key}, follow_redirects=False))
        assert api.get("/v1/models").status_code == 200
        time.sleep(3.3)
        api.cookies.clear()
        api.cookies.set("robustness_session", token)  # a client that keeps it past its max-age
        assert api.get("/v1/models").status_code == 401
        assert "expired or was revoked" in api.get("/").text


def test_revoking_the_key_ends_its_sessions_within_the_auth_cache_time(tmp_path):
    settings = make_settings(tmp_path / "data", auth_cache_s=0.3)
    (key,) = _keys(settings, "alice")
    with gateway(settings) as api:
        api.post("/login", data={"key": key}, follow_redirects=False)
        bearer = {"Authorization": f"Bearer {key}"}
        assert api.get("/v1/models").status_code == 200
        assert api.get("/v1/models", headers=bearer).status_code == 200
        with session_factory(settings.database_url)() as db:
            revoke_key(db, key[:10])
        time.sleep(0.4)
        assert api.get("/v1/models", headers=bearer).status_code == 401
        assert api.get("/v1/models").status_code == 401


def test_the_cookie_is_secure_behind_https(tmp_path):
    settings = make_settings(tmp_path / "data", https=True)
    (key,) = _keys(settings, "alice")
    with gateway(settings) as api:
        signed = api.post("/login", data={"key": key}, follow_redirects=False)
        assert "secure" in signed.headers["set-cookie"].lower()


def test_keys_create_list_and_revoke_with_a_data_dir(tmp_path):
    env = {"PATH": "/usr/bin:/bin"}
    data = str(tmp_path / "store")
    created = run_cli("keys", "create", "--tenant", "team-a", "--data-dir", data, env=env)
    assert created.returncode == 0, created.stderr
    assert f"created a new store at {tmp_path / 'store'}" in created.stderr
    assert "alembic" not in created.stderr.lower()  # migrations are quiet
    key = created.stdout.strip()
    again = run_cli("keys", "create", "--tenant", "team-b", "--data-dir", data, env=env)
    assert "new store" not in again.stderr
    listed = json.loads(run_cli("keys", "list", "--json", "--data-dir", data, env=env).stdout)
    assert {k["tenant"] for k in listed} == {"team-a", "team-b"}
    assert all(k["revoked_at"] is None for k in listed)
    assert all(key not in json.dumps(k) for k in listed) and key[:10] in {k["prefix"] for k in listed}
    table = run_cli("keys", "list", "--data-dir", data, env=env).stdout
    assert "team-a" in table and key not in table
    revoked = run_cli("keys", "revoke", key[:10], "--data-dir", data, env=env)
    assert revoked.returncode == 0 and "revoked" in revoked.stderr
    listed = json.loads(run_cli("keys", "list", "--json", "--data-dir", data, env=env).stdout)
    assert [k["tenant"] for k in listed if k["revoked_at"]] == ["team-a"]
    unknown = run_cli("keys", "revoke", "rk_nothing", "--data-dir", data, env=env)
    assert unknown.returncode == 2 and "no key with id or prefix" in unknown.stderr


def test_keys_list_and_revoke_refuse_a_folder_without_a_store(tmp_path):
    env = {"PATH": "/usr/bin:/bin"}
    for args in (("list",), ("revoke", "rk_x")):
        refused = run_cli("keys", *args, "--data-dir", str(tmp_path / "elsewhere"), env=env)
        assert refused.returncode == 2 and "no store at" in refused.stderr and "--data-dir" in refused.stderr
        assert not (tmp_path / "elsewhere" / "metadata.db").exists()


def test_migrate_is_quiet_unless_asked(tmp_path):
    env = {"PATH": "/usr/bin:/bin"}
    quiet = run_cli("migrate", "--data-dir", str(tmp_path / "a"), env=env)
    assert quiet.returncode == 0 and "alembic" not in quiet.stderr.lower()
    verbose = run_cli("migrate", "--verbose", "--data-dir", str(tmp_path / "b"), env=env)
    assert verbose.returncode == 0 and "alembic" in verbose.stderr.lower()
