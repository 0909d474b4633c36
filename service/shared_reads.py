"""Reads that many concurrent requests share: a value read in a worker thread (with a
database session of its own) is kept for ``ttl`` seconds, and the requests that miss it while
it is being read wait for that one read instead of queueing reads of their own. A read that
raises is shared with its waiters and not kept."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

from starlette.concurrency import run_in_threadpool

V = TypeVar("V")


class SharedReads(Generic[V]):
    def __init__(self, ttl: float, max_entries: int = 100_000):
        self.ttl, self.max_entries = ttl, max_entries
        self._kept: dict[Hashable, tuple[float, V]] = {}
        self._reading: dict[Hashable, asyncio.Future[V]] = {}

    async def get(self, key: Hashable, read: Callable[[], V]) -> V:
        kept = self._kept.get(key)
        if kept is not None and kept[0] >= time.monotonic():
            return kept[1]
        pending = self._reading.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        pending = asyncio.get_running_loop().create_future()
        self._reading[key] = pending
        try:
            value = await run_in_threadpool(read)
        except BaseException as exc:
            pending.set_exception(exc)
            pending.exception()  # retrieved: a failed read nobody else waited for logs nothing
            raise
        finally:
            del self._reading[key]
        pending.set_result(value)
        if self.ttl > 0:
            self._keep(key, value)
        return value

    def forget(self, key: Hashable) -> None:
        self._kept.pop(key, None)

    def _keep(self, key: Hashable, value: V) -> None:
        if len(self._kept) >= self.max_entries:
            now = time.monotonic()
            self._kept = {k: v for k, v in self._kept.items() if v[0] >= now}
            if len(self._kept) >= self.max_entries:
                self._kept.clear()
        self._kept[key] = (time.monotonic() + self.ttl, value)


class BatchedReads(Generic[V]):
    """Like SharedReads, for values read many at once: the keys missed while one batch is being
    read are read together by the next, in one thread and one query. Under load the batches
    grow and the cost per key falls; alone, a miss is read at once. ``read_many`` returns the
    values of the keys it found; a key it did not find raises ``missing(key)``."""

    MAX_BATCH = 500

    def __init__(self, ttl: float, read_many: Callable[[list[str]], dict[str, V]],
                 missing: Callable[[str], Exception], max_entries: int = 100_000):
        self.ttl, self.max_entries = ttl, max_entries
        self.read_many, self.missing = read_many, missing
        self._kept: dict[str, tuple[float, V]] = {}
        self._waiting: dict[str, asyncio.Future[V]] = {}  # to be read by the next batch
        self._reading: dict[str, asyncio.Future[V]] = {}  # in the batch being read
        self._reader: asyncio.Task | None = None

    async def get(self, key: str) -> V:
        kept = self._kept.get(key)
        if kept is not None and kept[0] >= time.monotonic():
            return kept[1]
        pending = self._reading.get(key) or self._waiting.get(key)
        if pending is None:
            pending = self._waiting[key] = asyncio.get_running_loop().create_future()
            if self._reader is None or self._reader.done():
                self._reader = asyncio.get_running_loop().create_task(self._read_batches())
        return await asyncio.shield(pending)

    def forget(self, key: str) -> None:
        self._kept.pop(key, None)

    async def _read_batches(self) -> None:
        while self._waiting:
            keys = list(self._waiting)[: self.MAX_BATCH]
            self._reading = {k: self._waiting.pop(k) for k in keys}
            try:
                values = await run_in_threadpool(self.read_many, keys)
            except Exception as exc:  # every waiter of this batch gets the error; the next batch reads anew
                for future in self._reading.values():
                    future.set_exception(exc)
                    future.exception()
            else:
                expires = time.monotonic() + self.ttl
                for key, future in self._reading.items():
                    if key in values:
                        future.set_result(values[key])
                        if self.ttl > 0:
                            self._keep(key, values[key], expires)
                    else:
                        future.set_exception(self.missing(key))
                        future.exception()
            finally:
                self._reading = {}

    def _keep(self, key: str, value: V, expires: float) -> None:
        if len(self._kept) >= self.max_entries:
            now = time.monotonic()
            self._kept = {k: v for k, v in self._kept.items() if v[0] >= now}
            if len(self._kept) >= self.max_entries:
                self._kept.clear()
        self._kept[key] = (expires, value)
