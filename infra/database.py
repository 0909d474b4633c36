"""The metadata database: engine, sessions and migrations (SQLite by default, PostgreSQL by URL)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

MIGRATIONS = Path(__file__).with_name("migrations")
# Workers and command-line tools hold a session or two at a time; the gateway passes its own
# pool size (Settings.pool_size, sized from its threads).
SMALL_POOL = 8


@lru_cache(maxsize=8)
def engine_for(url: str, pool_size: int = SMALL_POOL, pool_timeout_s: float = 30) -> Engine:
    pool = {"pool_size": pool_size, "max_overflow": 0, "pool_timeout": pool_timeout_s}
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30}, **pool)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(connection, _record):
            # WAL lets the gateway read while a worker writes; several processes share the file.
            cursor = connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine
    return create_engine(url, pool_pre_ping=True, **pool)


@lru_cache(maxsize=8)
def session_factory(
    url: str, pool_size: int = SMALL_POOL, pool_timeout_s: float = 30
) -> sessionmaker[Session]:
    return sessionmaker(engine_for(url, pool_size, pool_timeout_s), expire_on_commit=False)


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def migrate(url: str) -> None:
    """Bring the schema to the newest revision (idempotent; safe on every start)."""
    command.upgrade(alembic_config(url), "head")
