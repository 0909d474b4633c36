"""The embedded broker of `robustness serve`: kombu's SQLAlchemy transport on a SQLite file.

Two changes to the stock transport: it polls every 50 ms instead of every second (a job
crosses the broker twice, submission and aggregation), and its engine gets only SQLite's
own options (the stock transport hands every transport option to ``create_engine``).
"""

from __future__ import annotations

from kombu.transport import TRANSPORT_ALIASES
from kombu.transport.sqlalchemy import Channel, Transport
from sqlalchemy import create_engine, event

SCHEME = "embedded"


class EmbeddedChannel(Channel):
    def _engine_from_config(self):
        engine = create_engine(self.connection.client.hostname, connect_args={"timeout": 30})

        @event.listens_for(engine, "connect")
        def _wal(connection, _record):
            cursor = connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        return engine


class EmbeddedTransport(Transport):
    Channel = EmbeddedChannel
    polling_interval = 0.05


def register() -> None:
    TRANSPORT_ALIASES.setdefault(SCHEME, f"{__name__}:EmbeddedTransport")
