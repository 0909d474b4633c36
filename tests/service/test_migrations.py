"""The Alembic migrations build exactly the schema the models describe, on SQLite and on
PostgreSQL, and migrating twice changes nothing."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from infra.database import engine_for, migrate
from infra.records import Base


def _differences(url: str) -> list:
    migrate(url)
    migrate(url)  # idempotent: every start runs it
    with engine_for(url).connect() as connection:
        return compare_metadata(MigrationContext.configure(connection), Base.metadata)


def test_sqlite_schema_matches_the_models(tmp_path):
    assert _differences(f"sqlite:///{tmp_path / 'meta.db'}") == []


def test_postgres_schema_matches_the_models(distributed_settings):
    assert _differences(distributed_settings.database_url) == []
