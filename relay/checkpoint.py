"""WAL checkpoints on their own connection and thread, so that no commit waits for one.

By default SQLite checkpoints inside the COMMIT that takes the log past 1,000
pages: that commit copies every page into the database file and fsyncs it
before it returns. Measured at ~500 webhooks/s, one batch of requests in
every half second waited 10-20 ms for it, enough to set the p99 latency.
The write connections therefore set ``wal_autocheckpoint = 0`` and this task
runs PASSIVE checkpoints beside them: a passive checkpoint takes no write lock,
so commits go on while it copies.

A passive checkpoint alone never lets the log start over under steady
writes: SQLite rewinds the log only when a writer begins after every frame
was copied and while no reader uses the log, and new commits (of this relay
or its forwarder process) land while the copy runs. So once the log is long
and nearly all copied, this task runs RESTART checkpoints: each takes the
write lock, copies the few frames written since and waits for no one (busy
timeout 0), so the next commit, whoever makes it, starts the log over. The
write lock is polled for briefly, as the writers poll for it
(``relay.writer.begin_immediate``); a commit waits only for the copy of that short tail.
A log that is long because a reader held old frames is not restarted until
the passive copy has caught up, so that copy never happens under the lock.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

from relay.tasks import cancel_and_wait
from relay.writer import BUSY_POLL_SECONDS

log = logging.getLogger(__name__)

INTERVAL_SECONDS = 0.25  # at most this often; each run copies what the commits since the last one wrote
RESTART_FRAMES = 4096  # a log this long (16 MB of 4 KB pages) is started over...
TAIL_FRAMES = 256  # ...once no more than this is left to copy under the write lock
RESTART_TRIES = 40  # RESTART attempts per run, BUSY_POLL_SECONDS apart, as the writers poll for the lock


def wal_checkpoint(conn: sqlite3.Connection, mode: Literal["PASSIVE", "RESTART"]) -> tuple[bool, int, int]:
    """One checkpoint; returns (blocked, frames in the log, frames copied), as SQLite reports them.

    ``blocked`` is true when another checkpoint, a writer or a reader stopped it
    from finishing; SQLite reports that in the result, it does not raise.
    """
    busy, frames, copied = conn.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()
    return bool(busy), int(frames), int(copied)


def checkpoint_and_restart(conn: sqlite3.Connection) -> int:
    """Copy the log; when it is long and nearly all copied, start it over.

    Returns the log's length in frames as the passive copy found it; -1 when
    another connection's checkpoint was running (nothing was decided then).
    """
    _blocked, frames, copied = wal_checkpoint(conn, "PASSIVE")
    if frames < RESTART_FRAMES or frames - copied > TAIL_FRAMES:
        return frames
    for _ in range(RESTART_TRIES):
        if not wal_checkpoint(conn, "RESTART")[0]:
            break
        time.sleep(BUSY_POLL_SECONDS)
    return frames


class Checkpointer:
    """Copies the write-ahead log into the database file after commits, off the commit path."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="relay-checkpoint")
        self._conn: sqlite3.Connection | None = None
        self._pending = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.failing: str | None = None  # the last checkpoint error, until one succeeds

    async def start(self) -> None:
        self._conn = await asyncio.get_running_loop().run_in_executor(self._executor, self._connect)
        self._task = asyncio.create_task(self._loop(), name="relay-checkpoint")
        self._task.add_done_callback(_report_end)

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        try:
            # 0: a RESTART must never hold the write lock while it waits for readers; this
            # task polls for the lock itself and tries again at its next run.
            conn.execute("PRAGMA busy_timeout = 0")
            # Not the build's default: with synchronous OFF a checkpoint would not fsync the
            # database file before the log that holds the only other copy is started over.
            conn.execute("PRAGMA synchronous = FULL")
        except BaseException:
            conn.close()
            raise
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

    async def checkpoint(self) -> int:
        """One run (see :func:`checkpoint_and_restart`)."""
        assert self._conn is not None
        return await asyncio.get_running_loop().run_in_executor(self._executor, checkpoint_and_restart, self._conn)

    async def _loop(self) -> None:
        while True:
            await self._pending.wait()
            self._pending.clear()
            try:
                frames = await self.checkpoint()
            except Exception as exc:
                # Not fatal: the log keeps the data, and grows until a later checkpoint succeeds.
                # Said once per failure, not four times a second (a full disk can last).
                failing = f"{type(exc).__name__}: {exc}"
                if failing != self.failing:
                    log.error("WAL checkpoint of %s failed (retrying): %s", self._path, failing)
                self.failing = failing
                self._pending.set()  # again after the pause, commits or not (a relay gone quiet too)
            else:
                if frames < 0:  # the other process's checkpointer was copying: it decides nothing
                    self._pending.set()
                elif self.failing is not None:
                    log.info("WAL checkpoints of %s succeed again", self._path)
                    self.failing = None
            await asyncio.sleep(INTERVAL_SECONDS)


def _report_end(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("WAL checkpoints stopped: %r; the log now grows until the relay restarts", task.exception())
