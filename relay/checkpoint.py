"""WAL checkpoints on their own connection, so that no commit waits for one.

By default SQLite checkpoints inside the COMMIT that takes the log past 1,000
pages: that commit copies every page into the database file and fsyncs it
before it returns. Measured at ~500 webhooks/s, one batch of requests in
every half second waited 10-20 ms for it, enough to set the p99 latency.
The write connections therefore set ``wal_autocheckpoint = 0`` and this task
runs PASSIVE checkpoints beside them: a passive checkpoint takes no write lock,
so ingest commits go on while it copies.

A passive checkpoint alone never lets the log start over under steady
writes: SQLite rewinds the log only when a write transaction begins with
every frame already copied, and new commits land while the copy runs. So once
the log is long, the writer is asked to checkpoint the short tail itself
before its next BEGIN (relay.writer.Writer.restart_log); the bulk has been
copied here, so that costs the commit path a few frames, not the whole log.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Callable

import aiosqlite

from relay.tasks import cancel_and_wait

log = logging.getLogger(__name__)

INTERVAL_SECONDS = 0.25  # at most this often; each run copies what the commits since the last one wrote
RESTART_FRAMES = 4096  # a log this long (16 MB of 4 KB pages) is started over


class Checkpointer:
    """Copies the write-ahead log into the database file after commits, off the commit path."""

    def __init__(self, path: str, busy_seconds: float, restart_log: Callable[[], None]) -> None:
        self._path = path
        self._restart_log = restart_log
        self._busy_seconds = busy_seconds
        self._conn: aiosqlite.Connection | None = None
        self._pending = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._conn = await aiosqlite.connect(self._path, isolation_level=None, timeout=self._busy_seconds)
        self._task = asyncio.create_task(self._loop(), name="relay-checkpoint")

    def committed(self) -> None:
        """A commit listener: the log has grown."""
        self._pending.set()

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None
        if self._conn is not None:
            await self._conn.close()  # the last connection to close checkpoints the rest
            self._conn = None

    async def checkpoint(self) -> tuple[int, int]:
        """One passive checkpoint; returns (pages in the log, pages copied)."""
        assert self._conn is not None
        async with self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)") as cursor:
            row = await cursor.fetchone()
        assert row is not None
        return int(row[1]), int(row[2])

    async def _loop(self) -> None:
        while True:
            await self._pending.wait()
            self._pending.clear()
            try:
                frames, _copied = await self.checkpoint()
                if frames >= RESTART_FRAMES:
                    self._restart_log()
            except sqlite3.Error as exc:
                # Not fatal: the log keeps the data, and grows until a later checkpoint succeeds.
                log.warning("WAL checkpoint of %s failed (will retry): %s", self._path, exc)
            await asyncio.sleep(INTERVAL_SECONDS)
