"""Full-text indexing of bodies, off the ingest path.

Tokenising a body took 40 % of an ingest commit, so bodies are indexed in
chunks when ingest pauses (or when the backlog grows past a bound), and a
search first indexes whatever is still missing: results are always complete,
and a burst of webhooks is answered at full speed.
"""

from __future__ import annotations

import asyncio
import logging

from relay.store import Store, StoreUnavailable
from relay.tasks import cancel_and_wait

log = logging.getLogger(__name__)

QUIET_SECONDS = 0.25  # index once ingest has been quiet this long
MAX_DEFER_SECONDS = 5.0  # ...but never leave new bodies unindexed longer than this
# A few ms a transaction (tokenising and a merge step of as many pages): ingest commits queued
# behind a chunk wait no longer than that (500-row chunks held the write lock ~30 ms and set the
# p99 latency at 500 webhooks/s).
CHUNK = 32


class Indexer:
    def __init__(self, store: Store) -> None:
        self._store = store
        self._activity = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    def touch(self) -> None:
        """Called after each commit: there may be new bodies, and the writer is busy."""
        self._activity.set()

    def start(self) -> None:
        self._store.add_commit_listener(self.touch)
        self._task = asyncio.create_task(self._loop(), name="relay-indexer")

    async def stop(self) -> None:
        # The flag as well as the cancel: on Python 3.11 asyncio.wait_for can swallow a
        # cancel that lands as its inner wait completes, and the loop must still end.
        self._stopping = True
        self._activity.set()
        await cancel_and_wait(self._task)
        self._task = None

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._stopping:
            await self._activity.wait()
            deadline = loop.time() + MAX_DEFER_SECONDS
            while loop.time() < deadline and not self._stopping:  # wait for a quiet moment
                self._activity.clear()
                try:
                    async with asyncio.timeout(QUIET_SECONDS):
                        await self._activity.wait()
                except TimeoutError:
                    break
            if self._stopping:
                return
            self._activity.clear()
            try:
                if await self._store.unindexed() == 0:
                    continue  # (our own commits wake us once more; nothing to do then)
                while await self._store.index_bodies(CHUNK) == CHUNK:
                    await asyncio.sleep(0)  # let ingest batches interleave with the chunks
                await self._store.tidy_index()
            except StoreUnavailable as exc:
                log.error("full-text indexing paused: %s", exc)
