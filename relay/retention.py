"""Deleting deliveries older than ``retention_days`` while the relay runs (hourly, in small batches)."""

from __future__ import annotations

import asyncio
import logging

from relay.model import Clock
from relay.store import Store, StoreUnavailable
from relay.tasks import cancel_and_wait

log = logging.getLogger(__name__)

INTERVAL_SECONDS = 3600.0


class Retention:
    def __init__(self, store: Store, retention_days: int, clock: Clock, interval: float = INTERVAL_SECONDS) -> None:
        self._store = store
        self._max_age = retention_days * 86400.0
        self._clock = clock
        self._interval = interval
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="relay-retention")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    async def run_once(self) -> int:
        deleted = await self._store.prune(self._clock() - self._max_age)
        if deleted:
            log.info("retention: deleted %d deliveries older than %g days", deleted, self._max_age / 86400)
        return deleted

    async def _loop(self) -> None:
        while True:
            try:
                await self.run_once()
            except StoreUnavailable as exc:
                log.error("retention: prune failed, will retry: %s", exc)
            await asyncio.sleep(self._interval)
