"""WAL checkpoints on their own connection, so that no commit waits for a long one.

By default SQLite checkpoints inside the COMMIT that takes the log past 1,000
pages: that commit copies every page into the database file and fsyncs it
before it returns. Measured at ~500 webhooks/s, one batch of requests in
every half second waited 10-20 ms for it, enough to set the p99 latency.
The write connections therefore set ``wal_autocheckpoint = 0`` and this task
runs PASSIVE checkpoints beside them: a passive checkpoint takes no write lock,
so commits go on while it copies.

A passive checkpoint alone never lets the log start over under steady
writes: SQLite rewinds the log only when it has all been copied and no other
connection is using it, and new commits (of this relay or its forwarder
process) land while the copy runs. So once the log is long and nearly all
copied, the writer is asked to run a RESTART checkpoint before its next
transaction (:meth:`relay.writer.Writer.want_log_restart`): it holds the write
lock, copies the few frames written since, and rewinds the log. It is asked
again at every batch until the log is short, and never while much is left to
copy (a reader holding an old snapshot stops passive copying; that copy must
not land on the commit path).
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

from relay.tasks import cancel_and_wait

log = logging.getLogger(__name__)

INTERVAL_SECONDS = 0.25  # at most this often; each run copies what the commits since the last one wrote
RESTART_FRAMES = 4096  # a log this long (16 MB of 4 KB pages) is started over...
TAIL_FRAMES = 256  # ...once no more than this is left to copy on the commit path


def wal_checkpoint(conn: sqlite3.Connection, mode: Literal["PASSIVE", "RESTART"]) -> tuple[bool, int, int]:
    """One checkpoint; returns (blocked, frames in the log, frames copied), as SQLite reports them.

    ``blocked`` is true when another checkpoint, a writer or a reader stopped it
    from finishing; SQLite reports that in the result, it does not raise.
    """
    busy, frames, copied = conn.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()
    return bool(busy), int(frames), int(copied)


class Checkpointer:
    """Copies the write-ahead log into the database file after commits, off the commit path."""

    def __init__(self, path: str, want_log_restart: Callable[[bool], None]) -> None:
        self._path = path
        self._want_log_restart = want_log_restart
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="relay-checkpoint")
        self._conn: sqlite3.Connection | None = None
        self._pending = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._conn = await asyncio.get_running_loop().run_in_executor(self._executor, self._connect)
        self._task = asyncio.create_task(self._loop(), name="relay-checkpoint")
        self._task.add_done_callback(_report_end)

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        # FULL: the database file is fsynced before SQLite counts frames as copied, so a
        # log rewound after this checkpoint never held the only copy of a page.
        conn.execute("PRAGMA synchronous = FULL")
        return conn

    def committed(self) -> None:
        """A commit listener: the log has grown."""
        self._pending.set()

    async def stop(self) -> None:
        try:
            await cancel_and_wait(self._task)
        finally:
            self._task = None
            conn, self._conn = self._conn, None
            if conn is not None:
                await asyncio.get_running_loop().run_in_executor(self._executor, conn.close)
            self._executor.shutdown(wait=True)

    async def checkpoint(self) -> tuple[bool, int, int]:
        """One passive checkpoint (see :func:`wal_checkpoint`)."""
        assert self._conn is not None
        return await asyncio.get_running_loop().run_in_executor(self._executor, wal_checkpoint, self._conn, "PASSIVE")

    async def _loop(self) -> None:
        while True:
            await self._pending.wait()
            self._pending.clear()
            try:
                _blocked, frames, copied = await self.checkpoint()
            except Exception:
                # Not fatal: the log keeps the data, and grows until a later checkpoint succeeds.
                log.exception("WAL checkpoint of %s failed (will retry)", self._path)
            else:
                if frames >= 0:  # -1: another connection was checkpointing; it reports nothing
                    self._want_log_restart(frames >= RESTART_FRAMES and frames - copied <= TAIL_FRAMES)
            await asyncio.sleep(INTERVAL_SECONDS)


def _report_end(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("WAL checkpoints stopped: %r; the log now grows until the relay restarts", task.exception())
