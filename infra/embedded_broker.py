"""The embedded broker of `robustness serve`: kombu's SQLAlchemy transport on a SQLite file.

Two changes to the stock transport: it polls every 50 ms instead of every second when idle,
and every 5 ms while a message it delivered is being worked on and for a second after (a
job's shards and its aggregation follow each other through the broker: measured, each
hand-over took 20-60 ms at a fixed 50 ms, and polling at 10 ms all the time tripled the idle
CPU of `serve`); and its engine gets only SQLite's own options (the stock transport hands
every transport option to ``create_engine``).
"""

from __future__ import annotations

from queue import Empty
from time import monotonic, sleep

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
    polling_interval = 0.05  # idle
    busy_interval = 0.005  # while a delivered message is unacknowledged (no query: kombu's QoS says so)
    busy_window_s = 1.0  # ... and this long after, polling the queue

    _delivered_at = float("-inf")

    def drain_events(self, connection, timeout=None):  # type: ignore[override]  # kombu's own signature
        """kombu's loop (virtual.Transport.drain_events) with the interval of `_interval`."""
        started = monotonic()
        while True:
            try:
                self.cycle.get(self._deliver, timeout=timeout)  # type: ignore[union-attr]  # set in __init__
            except Empty:
                if timeout is not None and monotonic() - started >= timeout:
                    raise TimeoutError() from None  # socket.timeout, as kombu's loop raises
                sleep(self._interval())
            else:
                self._delivered_at = monotonic()
                return

    def _interval(self) -> float:
        if any(not channel.qos.can_consume() for channel in self.channels):
            self._delivered_at = monotonic()  # still working on one
        recent = monotonic() - self._delivered_at < self.busy_window_s
        return self.busy_interval if recent else self.polling_interval


def register() -> None:
    TRANSPORT_ALIASES.setdefault(SCHEME, f"{__name__}:EmbeddedTransport")
