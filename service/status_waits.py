"""Long polls: ``GET /v1/evaluations/{id}?wait=S`` answers when the evaluation's state changes
(it starts, succeeds, fails or is cancelled) or after ``S`` seconds, whichever is first.

A CI client then learns that its job ended within ``interval`` seconds instead of a poll
period, with one request per ``S`` seconds instead of one per poll. One watcher task per
gateway process reads the states of every evaluation someone waits on with one indexed query
per ``interval`` (in a worker thread, with a short session: no connection is held across an
await), wakes the waiters whose state changed, and drops the status cache entry of that
evaluation so the answer is read fresh. Past ``max_waiters`` a request is answered at once,
as a plain poll; closing wakes every waiter, so a shutdown never waits on a long poll.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from infra.records import Job

_CHUNK = 500  # ids per query


class StatusWaits:
    def __init__(self, sessions: sessionmaker[Session], interval: float, max_waiters: int,
                 on_change: Callable[[str], None]):
        self.sessions, self.interval, self.max_waiters = sessions, interval, max_waiters
        self.on_change = on_change
        self._waiters: dict[str, list[tuple[str, asyncio.Future[bool]]]] = {}
        self._count = 0
        self._watcher: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    async def until_changed(self, evaluation_id: str, seen_state: str, timeout: float) -> bool:
        """Wait until ``evaluation_id`` is no longer in ``seen_state``, at most ``timeout``
        seconds; whether it changed (False: the time ran out, or nobody may wait now)."""
        if self._closed or self._count >= self.max_waiters or timeout <= 0:
            return False
        self._loop = asyncio.get_running_loop()
        changed = self._loop.create_future()
        entry = (seen_state, changed)
        self._waiters.setdefault(evaluation_id, []).append(entry)
        self._count += 1
        if self._watcher is None or self._watcher.done():
            self._watcher = self._loop.create_task(self._watch())
        try:
            await asyncio.wait_for(asyncio.shield(changed), timeout)
        except TimeoutError:
            return False
        finally:
            self._remove(evaluation_id, entry)
        return changed.result()

    def close(self) -> None:
        """Answer every waiter now (unchanged) and take no new ones."""
        self._closed = True
        for entries in self._waiters.values():
            for _, future in entries:
                if not future.done():
                    future.set_result(False)

    def close_from_signal(self) -> None:
        """`close` from a signal handler (the server is stopping)."""
        self._closed = True
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self.close)

    def _remove(self, evaluation_id: str, entry) -> None:
        entries = self._waiters.get(evaluation_id)
        if entries is not None and entry in entries:
            entries.remove(entry)
            self._count -= 1
            if not entries:
                del self._waiters[evaluation_id]

    async def _watch(self) -> None:
        while self._waiters and not self._closed:
            await asyncio.sleep(self.interval)
            ids = list(self._waiters)
            try:
                states = await run_in_threadpool(self._states, ids)
            except Exception:  # a database hiccup: the waiters time out as plain polls would
                continue
            for evaluation_id in ids:
                state = states.get(evaluation_id)  # None: deleted since; the re-read says so
                woken = False
                for seen, future in self._waiters.get(evaluation_id, []):
                    if state != seen and not future.done():
                        future.set_result(True)
                        woken = True
                if woken:
                    self.on_change(evaluation_id)

    def _states(self, ids: list[str]) -> dict[str, str]:
        states: dict[str, str] = {}
        with self.sessions() as db:
            for start in range(0, len(ids), _CHUNK):
                rows = db.execute(select(Job.id, Job.state).where(Job.id.in_(ids[start:start + _CHUNK])))
                states.update((job_id, state) for job_id, state in rows)
        return states
