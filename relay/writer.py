"""Group commit: one thread owns the write connection and commits many requests at once.

A commit with ``synchronous=FULL`` costs an fsync. Committing each webhook on
its own caps the relay near a thousand requests per second; queueing the
writes of concurrent requests and committing them as one transaction keeps
the durability (nobody is answered before their row is on disk) at many
times the rate.

Why not aiosqlite here: every aiosqlite call is a hop to its thread and back
(BEGIN, each executemany, COMMIT), and those hops, not SQLite, were the cost
(profiled: a batch took 10 ms through aiosqlite against 4 ms in one call). This
writer runs a whole batch as one function on its own thread: one hop per
batch, and SQLite releases the GIL while it works, so the event loop keeps
parsing the next requests meanwhile. Reads still use aiosqlite.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from relay.tasks import cancel_and_wait

log = logging.getLogger(__name__)

T = TypeVar("T")

MAX_BATCH = 1024
BUSY_POLL_SECONDS = 0.0005
MAX_ROWS_PER_INSERT = 256
Rows = Sequence[tuple[str, Sequence[Any]]]


class StoreUnavailable(RuntimeError):
    """A write could not be committed (disk full, database locked, read-only...)."""


class CommitTimeout(StoreUnavailable, TimeoutError):
    """A write was not committed within the deadline (it may still commit later)."""


@dataclass
class WriteOp(Generic[T]):
    """A unit of work for the writer, run inside the batch's transaction.

    ``rows`` are (sql, params) statements run with ``executemany`` alongside
    the same statements of other ops. ``with_id``, when given, is handed a
    fresh delivery id and returns the rows; that id is the op's result.
    ``run`` is called with the connection (on the writer thread) for rare work
    that needs a result back.
    """

    rows: Rows = ()
    with_id: Callable[[int], Rows] | None = None
    run: Callable[[sqlite3.Connection], T] | None = None
    result: T | None = None
    future: asyncio.Future[T | None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    enqueued_at: float = 0.0


class Writer:
    """Drains a queue of WriteOps into transactions on its own thread, one commit per batch."""

    def __init__(
        self,
        conn: sqlite3.Connection,
        executor: ThreadPoolExecutor,
        deadline_seconds: float = 10.0,
        busy_seconds: float = 5.0,
        after_ids: Callable[[sqlite3.Connection, int, int], None] | None = None,
    ) -> None:
        self._conn = conn
        self._after_ids = after_ids  # run in each transaction that gave ids, with the first and last
        self.busy_seconds = busy_seconds  # how long a commit waits for the other writer's lock
        self._executor = executor
        self.deadline_seconds = deadline_seconds
        self._queue: asyncio.Queue[WriteOp[Any]] = asyncio.Queue()
        self._waiting: collections.deque[WriteOp[Any]] = collections.deque()
        self._task: asyncio.Task[None] | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._on_commit: list[Callable[[], None]] = []
        self.failing: str | None = None  # the last commit error, until a commit succeeds

    def add_commit_listener(self, listener: Callable[[], None]) -> None:
        self._on_commit.append(listener)

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="relay-writer")
        self._watchdog = asyncio.create_task(self._expire(), name="relay-writer-deadline")

    async def stop(self) -> None:
        """Commit what is queued, then stop."""
        if self._task is None:
            return
        try:
            await self._queue.join()
        finally:  # cancelled or not, the tasks end here (the store closes the connection next)
            await cancel_and_wait(self._watchdog)
            self._watchdog = None
            await cancel_and_wait(self._task)
            self._task = None

    def enqueue(self, op: WriteOp[T]) -> asyncio.Future[T | None]:
        """Queue an op; the returned future resolves once its transaction is committed."""
        if self._task is None:
            raise StoreUnavailable("the writer is not running")
        op.enqueued_at = op.future.get_loop().time()
        self._queue.put_nowait(op)
        self._waiting.append(op)
        return op.future

    async def submit(self, op: WriteOp[T]) -> T | None:
        return await self.enqueue(op)

    async def _expire(self) -> None:
        """Fail the waiters of writes older than the deadline (one timer, not one per request).

        The write itself stays queued and may still commit: the caller answers
        503, the sender retries, and the retry is recognised as a duplicate.
        """
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(min(0.25, self.deadline_seconds / 4))
            cutoff = loop.time() - self.deadline_seconds
            while self._waiting and (self._waiting[0].future.done() or self._waiting[0].enqueued_at < cutoff):
                op = self._waiting.popleft()
                if not op.future.done():
                    op.future.set_exception(CommitTimeout(f"commit did not finish within {self.deadline_seconds:g} s"))

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            while len(batch) < MAX_BATCH and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                try:
                    await loop.run_in_executor(self._executor, self._commit, batch)
                except sqlite3.OperationalError:
                    raise  # the database (disk, lock): every write would fail alike
                except Exception:
                    if len(batch) == 1:
                        raise
                    # One write the database refuses (a value it cannot hold) must not sink the
                    # deliveries committed beside it: commit each on its own instead.
                    log.exception("a batch of %d writes failed; committing them one by one", len(batch))
                    await self._one_by_one(batch)
                    continue
            except Exception as exc:
                self.failing = f"{type(exc).__name__}: {exc}"
                log.error("commit of %d write(s) failed: %s", len(batch), self.failing)
                _fail(batch, StoreUnavailable(self.failing))
            else:
                self.failing = None
                self._settled(batch)
            finally:
                for _ in batch:
                    self._queue.task_done()

    async def _one_by_one(self, batch: list[WriteOp[Any]]) -> None:
        loop = asyncio.get_running_loop()
        for op in batch:
            try:
                await loop.run_in_executor(self._executor, self._commit, [op])
            except Exception as exc:
                log.error("a write was refused on its own: %s: %s", type(exc).__name__, exc)
                _fail([op], StoreUnavailable(f"{type(exc).__name__}: {exc}"))
            else:
                self._settled([op])

    def _settled(self, batch: list[WriteOp[Any]]) -> None:
        for op in batch:
            if not op.future.done():
                op.future.set_result(op.result)
        for listener in self._on_commit:
            listener()

    def _commit(self, batch: list[WriteOp[Any]]) -> None:
        """Runs on the writer thread: one transaction for the whole batch."""
        conn = self._conn
        first_id: int | None = None
        next_id = 0
        try:
            begin_immediate(conn, self.busy_seconds)
            if any(op.with_id for op in batch):
                # Ids are taken inside the transaction so that rows can be inserted
                # many at once and still be known to the caller.
                # meta.delivery_seq remembers the highest id ever given, so ids are never
                # reused after prune deletes the newest rows (links and logs name them).
                next_id = conn.execute(
                    "SELECT MAX(COALESCE((SELECT MAX(id) FROM deliveries), 0), "
                    "COALESCE((SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'delivery_seq'), 0)) + 1"
                ).fetchone()[0]
                first_id = next_id
                for op in batch:
                    if op.with_id:
                        op.rows = op.with_id(next_id)
                        op.result = next_id
                        next_id += 1
                conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('delivery_seq', ?)", (str(next_id - 1),))
            grouped: dict[str, list[Sequence[Any]]] = {}
            for op in batch:
                for sql, params in op.rows:
                    grouped.setdefault(sql, []).append(params)
            for sql, params_list in grouped.items():
                execute_rows(conn, sql, params_list)
            if self._after_ids is not None and first_id is not None:
                self._after_ids(conn, first_id, next_id - 1)
            for op in batch:
                if op.run:
                    op.result = op.run(conn)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error as exc:  # the connection may itself be broken; report the first error
                    log.error("rollback failed: %s", exc)
            raise


def execute_rows(conn: sqlite3.Connection, sql: str, params_list: Sequence[Sequence[Any]]) -> None:
    """Run one statement for many parameter rows; an INSERT ... VALUES (...) as multi-row INSERTs.

    Why not executemany alone: it takes the interpreter lock back for every row
    (to bind it) after SQLite ran the previous one without it. With the event loop
    thread busy, each take waits up to the switch interval (5 ms): measured, 32-row
    batches of deliveries took 10-30 ms and capped ingest, and a microbenchmark with
    one busy thread beside the writer fell from 23,000 to 105 rows/s. One multi-row
    statement binds everything at once and runs in one SQLite call.

    Statements hold a power-of-two number of rows (a 37-row batch is 32 + 4 + 1), so
    a handful of texts is prepared and cached rather than one per batch size (which
    filled the statement cache with large statements: +150 MB, found in review), and
    never more than the connection's limit on variables (999 in SQLite before 3.32).
    """
    head, keyword, values = sql.partition("VALUES")
    values = values.strip()
    if (
        len(params_list) == 1
        or not keyword
        or not head.lstrip().upper().startswith("INSERT")
        or not values.startswith("(")
    ):
        conn.executemany(sql, params_list)
        return
    width = max(len(params_list[0]), 1)
    largest = 1
    while largest * 2 <= min(MAX_ROWS_PER_INSERT, conn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) // width):
        largest *= 2
    start = 0
    while start < len(params_list):
        size = largest
        while size > len(params_list) - start:
            size //= 2
        chunk = params_list[start : start + size]
        conn.execute(f"{head}VALUES {', '.join([values] * size)}", [p for row in chunk for p in row])
        start += size


def begin_immediate(conn: sqlite3.Connection, busy_seconds: float) -> None:
    """BEGIN IMMEDIATE, waiting for the other writer (the forwarder process) in short steps.

    SQLite's own busy handler sleeps 1, 2, 5, 10... up to 100 ms between tries: with
    the forwarder process committing its attempts about a hundred times a second, the
    relay's commits waited 10-20 ms on average for a lock held for 2 ms (measured).
    The connection's busy timeout is 0 and this loop polls every half millisecond.
    """
    deadline = time.monotonic() + busy_seconds
    while True:
        try:
            conn.execute("BEGIN IMMEDIATE")
            return
        except sqlite3.OperationalError as exc:
            # The primary code: SQLITE_BUSY_RECOVERY (another process recovering the WAL) too.
            if exc.sqlite_errorcode & 0xFF != sqlite3.SQLITE_BUSY or time.monotonic() >= deadline:
                raise
        time.sleep(BUSY_POLL_SECONDS)


def _fail(batch: list[WriteOp[Any]], error: BaseException) -> None:
    for op in batch:
        if not op.future.done():
            op.future.set_exception(error)
