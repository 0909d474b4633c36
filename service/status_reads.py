"""Status reads for fleets of pollers: ``GET /v1/evaluations/{id}`` without the thread pool's
queue or the database in the common case.

Each evaluation's public status is read from the database at most once per ``ttl`` seconds
per gateway process; the evaluations missed while one read is under way are read together by
the next (one thread, one short session, two queries for all of them: no connection is held
across an await), and the JSON bytes are kept for the polls after it. Progress is written by
workers every few seconds, so a ``ttl`` under that costs pollers nothing they could see; a
cancel through this process forgets the entry at once.
"""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy.orm import Session, sessionmaker

from infra.records import Tenant
from schemas.api import EvaluationPublic
from service.errors import NotFound
from service.shared_reads import BatchedReads


class StatusReads:
    def __init__(
        self, sessions: sessionmaker[Session], ttl: float,
        owned_publics: Callable[[Session, list[str]], list[tuple[str, EvaluationPublic]]],
    ):
        self.sessions, self.owned_publics = sessions, owned_publics
        # id -> (tenant id, body)
        self._reads: BatchedReads[tuple[str, bytes]] = BatchedReads(ttl, self._read_now, _not_found)

    async def read(self, evaluation_id: str, tenant: Tenant) -> bytes:
        if len(evaluation_id) > 40 or "\x00" in evaluation_id:
            raise _not_found(evaluation_id)
        owner, body = await self._reads.get(evaluation_id)
        if owner != tenant.id:
            raise _not_found(evaluation_id)
        return body

    def forget(self, evaluation_id: str) -> None:
        self._reads.forget(evaluation_id)

    def _read_now(self, evaluation_ids: list[str]) -> dict[str, tuple[str, bytes]]:
        with self.sessions() as db:
            found = self.owned_publics(db, evaluation_ids)
        return {status.id: (owner, status.model_dump_json().encode()) for owner, status in found}


def _not_found(evaluation_id: str) -> NotFound:
    return NotFound(f"no evaluation with id {evaluation_id!r}")
