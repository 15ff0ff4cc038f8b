"""Full-text indexing of bodies, off the ingest path.

Tokenising a body took 40 % of an ingest commit, so bodies are indexed in
chunks when ingest pauses (or when the backlog grows past a bound), and a
search first indexes whatever is still missing: results are always complete,
and a burst of webhooks is answered at full speed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from relay.store import Store, StoreUnavailable

log = logging.getLogger(__name__)

QUIET_SECONDS = 0.25  # index once ingest has been quiet this long
MAX_DEFER_SECONDS = 5.0  # ...but never leave new bodies unindexed longer than this
CHUNK = 500


class Indexer:
    def __init__(self, store: Store) -> None:
        self._store = store
        self._activity = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def touch(self) -> None:
        """Called after each commit: there may be new bodies, and the writer is busy."""
        self._activity.set()

    def start(self) -> None:
        self._store.writer.add_commit_listener(self.touch)
        self._task = asyncio.create_task(self._loop(), name="relay-indexer")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._activity.wait()
            deadline = loop.time() + MAX_DEFER_SECONDS
            while loop.time() < deadline:  # wait for a quiet moment
                self._activity.clear()
                try:
                    await asyncio.wait_for(self._activity.wait(), QUIET_SECONDS)
                except TimeoutError:
                    break
            self._activity.clear()
            try:
                if await self._store.unindexed() == 0:
                    continue  # (our own commits wake us once more; nothing to do then)
                while await self._store.index_bodies(CHUNK) == CHUNK:
                    await asyncio.sleep(0)  # let ingest batches interleave with the chunks
            except StoreUnavailable as exc:
                log.error("full-text indexing paused: %s", exc)
