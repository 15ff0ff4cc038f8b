"""The one class that owns the SQLite database: every query the relay needs, by intention.

Writes go through the group-commit :class:`~relay.writer.Writer` on one
connection; reads use a second connection, which WAL lets run beside it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
from collections.abc import Callable, Collection, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import aiosqlite

from relay.checkpoint import Checkpointer
from relay.filters import fts_phrase
from relay.model import Attempt, Capture, OutboxItem, PlannedForward
from relay.schema import MIGRATIONS, PRAGMAS, split_statements
from relay.sqlbase import (
    INSERT_ATTEMPT,
    INSERT_OUTBOX,
    MARK_DELIVERED_BY_REPLAY,
    ORDER_CLEAR,
    OUTBOX_ITEM_COLUMNS,
    SqlReads,
    attempt_params,
    delivery_params,
    outbox_item_from_row,
)
from relay.writer import StoreUnavailable, WriteOp, Writer

log = logging.getLogger(__name__)

__all__ = ["SqliteStore"]

BUSY_TIMEOUT_SECONDS = 5.0
FTS_MERGE_PAGES = 32  # index pages merged in one step of tidy_index (open_writer says why)
MAX_TIDY_STEPS = 10_000  # a bound, not an expectation: merging stops when there is nothing left
_FTS_MERGE = "INSERT INTO deliveries_fts (deliveries_fts, rank) VALUES ('merge', ?)"
WAL_SIZE_LIMIT = 64 * 1024 * 1024  # the log file is cut back to this when it starts over

_INSERT_DELIVERY = """
INSERT INTO deliveries (id, received_at, source, method, path, query, headers, body, size,
    body_sha256, body_format, peer, verdict, verdict_detail, webhook_id, prediction_id, status,
    model, version, kind, duplicate_of)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, NULL)
"""
# After each batch of inserts (writer.execute_rows makes them one multi-row INSERT, whose
# subqueries would not see the rows of the same statement): a delivery whose webhook-id and
# body came before, in this batch or earlier, is a duplicate of the first of them.
_MARK_DUPLICATES = """
UPDATE deliveries SET duplicate_of = (
    SELECT MIN(d2.id) FROM deliveries d2
    WHERE d2.webhook_id = deliveries.webhook_id AND d2.body_sha256 = deliveries.body_sha256 AND d2.id < deliveries.id)
WHERE id BETWEEN ? AND ? AND webhook_id IS NOT NULL AND EXISTS (
    SELECT 1 FROM deliveries d2
    WHERE d2.webhook_id = deliveries.webhook_id AND d2.body_sha256 = deliveries.body_sha256 AND d2.id < deliveries.id)
"""
# "AND state = 'pending'": a settled row is never moved back by a late or repeated result.
_UPDATE_OUTBOX = """
UPDATE outbox SET state = ?, attempts = attempts + ?, next_attempt_at = ?, updated_at = ?, note = ?
WHERE id = ? AND state = 'pending'
"""
# INDEXED BY: the planner preferred the state index and sorted every pending row for each
# query (19 ms with a backlog of 14k); the due index yields rows in order and LIMIT stops early.
_DUE = f"""
SELECT {OUTBOX_ITEM_COLUMNS}
FROM outbox o INDEXED BY outbox_due JOIN deliveries d ON d.id = o.delivery_id
WHERE o.state = 'pending' AND o.next_attempt_at <= ? AND o.upstream IN ({{upstreams}}) AND {ORDER_CLEAR}
  AND o.id NOT IN (SELECT value FROM json_each(?))
ORDER BY o.next_attempt_at, o.id
LIMIT ?
"""
_NEXT_DUE = f"""
SELECT MIN(o.next_attempt_at) FROM outbox o INDEXED BY outbox_due
WHERE o.state = 'pending' AND o.next_attempt_at > ? AND o.upstream IN ({{upstreams}}) AND {ORDER_CLEAR}
"""


def _mark_duplicates(conn: sqlite3.Connection, first_id: int, last_id: int) -> None:
    conn.execute(_MARK_DUPLICATES, (first_id, last_id))


def _migrate(conn: sqlite3.Connection) -> None:
    version = int(conn.execute("PRAGMA user_version").fetchone()[0])
    if version > len(MIGRATIONS):
        raise RuntimeError(
            f"database schema version {version} is newer than this relay knows "
            f"({len(MIGRATIONS)}); upgrade replicate-relay"
        )
    if version == 0:
        # Must precede the first table: lets prune give pages back to the disk.
        conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
    for pragma in PRAGMAS:
        conn.execute(pragma)
    for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
        log.info("migrating database to schema version %d", number)
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in split_statements(script):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {number}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise


def open_writer(path: str) -> sqlite3.Connection:
    """The write connection, opened and migrated on the writer thread that will own it."""
    conn = sqlite3.connect(path, isolation_level=None, timeout=BUSY_TIMEOUT_SECONDS, check_same_thread=False)
    try:
        _migrate(conn)
        # FTS5's automerge merged whole levels of the index inside one indexing transaction,
        # holding the write lock 20-30 ms (p99 of 32-row chunks, measured; ingest commits queue
        # behind it). Off, and the indexer merges in short steps instead (index_bodies,
        # tidy_index): p99 4.5 ms a chunk for the same total work. A setting of the database,
        # not a migration, so that an older relay can still open the file.
        if conn.execute("SELECT v FROM deliveries_fts_config WHERE k = 'automerge'").fetchone() != (0,):
            conn.execute("INSERT INTO deliveries_fts (deliveries_fts, rank) VALUES ('automerge', 0)")
        conn.execute("PRAGMA busy_timeout = 0")  # the writer waits for the lock itself (writer.begin_immediate)
        conn.execute("PRAGMA wal_autocheckpoint = 0")  # relay.checkpoint copies the log instead, off the commit path
        conn.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT}")  # give the disk back after a burst
    except BaseException:
        conn.close()
        raise
    return conn


class SqliteStore(SqlReads):
    """SQLite storage for deliveries, the outbox and attempts (the embedded default).

    One relay per database file: the outbox is claimed in the memory of the one
    forwarder (inline or in the relay's forwarder process), not with leases (see
    PgStore for several relays on one database). The relay and its forwarder
    process each hold a write connection; WAL lets them take turns (relay.writer polls for the lock).
    """

    idle_poll_seconds: float | None = None
    # The inner ORDER BY: group_concat takes rows in the order the subquery yields them
    # (SQLite before 3.44 has no ORDER BY inside an aggregate).
    forwarding_aggregate = (
        "SELECT group_concat(x, char(31)) FROM (SELECT o.upstream || '=' || o.state AS x FROM outbox o "
        "WHERE o.delivery_id = d.id ORDER BY o.id)"
    )

    def __init__(
        self,
        path: str,
        wconn: sqlite3.Connection,
        executor: ThreadPoolExecutor,
        reader: aiosqlite.Connection,
        commit_timeout: float = 10.0,
    ) -> None:
        self.path = path
        self._wconn = wconn
        self._executor = executor
        self._reader = reader
        self.writer = Writer(wconn, executor, commit_timeout, BUSY_TIMEOUT_SECONDS, _mark_duplicates)
        self._checkpointer = Checkpointer(path)
        self.writer.add_commit_listener(self._checkpointer.committed)

    @classmethod
    async def open(cls, path: str | Path, commit_timeout: float = 10.0) -> SqliteStore:
        """Open (creating or migrating) the database and start the writer.

        ``commit_timeout``: a write not committed by then fails its waiter with TimeoutError.
        """
        path = str(path)
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="relay-writer")
        loop = asyncio.get_running_loop()
        try:
            wconn = await loop.run_in_executor(executor, open_writer, path)
        except BaseException:
            executor.shutdown(wait=False)
            raise
        try:
            reader = await aiosqlite.connect(path, isolation_level=None, timeout=BUSY_TIMEOUT_SECONDS)
        except BaseException:
            await loop.run_in_executor(executor, wconn.close)
            executor.shutdown(wait=False)
            raise
        store = cls(path, wconn, executor, reader, commit_timeout)
        try:
            await reader.execute("PRAGMA query_only = ON")
            await store._checkpointer.start()
        except BaseException:
            await store.close()
            raise
        store.writer.start()
        return store

    async def close(self) -> None:
        """Commit what is queued, then close every connection: each step runs even if one before failed."""
        loop = asyncio.get_running_loop()
        async with contextlib.AsyncExitStack() as stack:  # (its callbacks run last first)
            stack.callback(self._executor.shutdown, wait=True)
            stack.push_async_callback(loop.run_in_executor, self._executor, self._wconn.close)
            stack.push_async_callback(self._reader.close)
            stack.push_async_callback(self._checkpointer.stop)
            await self.writer.stop()

    # --- writes -------------------------------------------------------------------

    def enqueue_delivery(self, capture: Capture, forwards: Iterable[PlannedForward]) -> asyncio.Future[int | None]:
        """Queue a delivery with its outbox rows; the future gives its id once committed.

        A plain future (not a coroutine) so the ingest hot path can wait on it
        with a deadline without creating a task per request.
        """
        forwards = tuple(forwards)
        c = capture

        def rows(delivery_id: int) -> list[tuple[str, Sequence[Any]]]:
            out: list[tuple[str, Sequence[Any]]] = [(_INSERT_DELIVERY, delivery_params(c, delivery_id))]
            for f in forwards:
                due = c.received_at if f.state == "pending" else None
                out.append((INSERT_OUTBOX, (delivery_id, f.upstream, f.state, f.order_key, due, c.received_at, f.note)))
            return out

        return self.writer.enqueue(WriteOp[int](with_id=rows))

    async def record_delivery(self, capture: Capture, forwards: Iterable[PlannedForward]) -> int:
        """Store a delivery with its outbox rows; returns its id once committed."""
        result = await self.enqueue_delivery(capture, forwards)
        assert result is not None
        return result

    async def finish_attempt(
        self, outbox_id: int, attempt: Attempt, state: str, next_attempt_at: float | None, note: str | None
    ) -> None:
        """Record a forwarding attempt and move its outbox row on, in one commit."""
        await self.writer.submit(
            WriteOp[None](
                rows=[
                    (INSERT_ATTEMPT, attempt_params(attempt)),
                    (_UPDATE_OUTBOX, (state, 1, next_attempt_at, attempt.started_at, note, outbox_id)),
                ]
            )
        )

    async def settle_outbox(self, outbox_id: int, state: str, note: str, now: float) -> None:
        """Close an outbox row without an attempt (e.g. a duplicate already delivered)."""
        await self.writer.submit(WriteOp[None](rows=[(_UPDATE_OUTBOX, (state, 0, None, now, note, outbox_id))]))

    async def record_attempt(self, attempt: Attempt) -> int:
        """Record an attempt outside the outbox (replay, connect); returns its id."""

        def run(conn: sqlite3.Connection) -> int:
            return int(conn.execute(INSERT_ATTEMPT, attempt_params(attempt)).lastrowid or 0)

        result = await self.writer.submit(WriteOp[int](run=run))
        assert result is not None
        return result

    async def mark_delivered_by_replay(self, delivery_id: int, upstream: str, attempt_id: int, now: float) -> None:
        """A successful replay to an upstream settles its dead/failed outbox row as delivered."""
        note = f"delivered by replay (attempt {attempt_id})"
        await self.writer.submit(WriteOp[None](rows=[(MARK_DELIVERED_BY_REPLAY, (now, note, delivery_id, upstream))]))

    async def prune(self, older_than: float, batch: int = 500, compact: bool = False) -> int:
        """Delete deliveries received before ``older_than`` (with their outbox rows and attempts).

        Small batches, each its own commit through the writer, so ingest
        keeps committing in between; then give the freed pages back to the disk.
        ``compact`` also rewrites the full-text index without the deleted bodies
        (work proportional to the index: ``relay prune`` does it, the hourly prune does not).
        """
        total = 0
        while True:

            def run(conn: sqlite3.Connection) -> int:
                cursor = conn.execute(
                    "DELETE FROM deliveries WHERE id IN "
                    "(SELECT id FROM deliveries WHERE received_at < ? ORDER BY id LIMIT ?)",
                    (older_than, batch),
                )
                return int(cursor.rowcount)

            deleted = await self.writer.submit(WriteOp[int](run=run)) or 0
            total += deleted
            if deleted < batch:
                break
        if total:
            if not compact:  # ('optimize' below merges everything at once)
                await self.tidy_index()

            def vacuum(conn: sqlite3.Connection) -> None:
                if compact:  # drop the index's delete markers, so its pages free up too
                    conn.execute("INSERT INTO deliveries_fts (deliveries_fts) VALUES ('optimize')")
                # Each step of the pragma frees one page and Python steps a result-less
                # statement only once, so step it once per free page.
                for _ in range(conn.execute("PRAGMA freelist_count").fetchone()[0]):
                    conn.execute("PRAGMA incremental_vacuum(1)")

            await self.writer.submit(WriteOp[None](run=vacuum))
        return total

    async def index_bodies(self, limit: int = 500) -> int:
        """Add up to ``limit`` not yet indexed deliveries to the full-text index; returns how many."""

        def run(conn: sqlite3.Connection) -> int:
            row = conn.execute("SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'fts_indexed'").fetchone()
            mark = int(row[0]) if row else 0
            upto, text_bytes = conn.execute(
                "SELECT MAX(id), SUM(COALESCE(length(body), 0)) FROM "
                "(SELECT id, body FROM deliveries WHERE id > ? ORDER BY id LIMIT ?)",
                (mark, limit),
            ).fetchone()
            if upto is None:
                return 0
            conn.execute(
                "INSERT INTO deliveries_fts (rowid, body) SELECT id, CAST(body AS TEXT) FROM deliveries "
                "WHERE id > ? AND id <= ? AND body IS NOT NULL",
                (mark, upto),
            )
            conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('fts_indexed', ?)", (str(upto),))
            # Merge about as many index pages as the chunk added (one per 2.5-3.5 KB of text,
            # measured): a fixed budget fell behind on long bodies, and whole-level merges of
            # 170 ms came back (found in review); sized so, 1,000-word bodies stay under 35 ms.
            conn.execute(_FTS_MERGE, (max(FTS_MERGE_PAGES, int(text_bytes) // 2048),))
            return int(upto) - mark

        return await self.writer.submit(WriteOp[int](run=run)) or 0

    async def tidy_index(self) -> None:
        """Merge the full-text index's segments, a short transaction at a time, until FTS5 finds no level to merge.

        Indexing merges as it goes, but prune's deletions and a search's catch-up add
        segments too; merged, they keep searches fast and crisis merges (a whole
        level in one transaction) away.
        """

        def step(conn: sqlite3.Connection) -> bool:
            before = conn.total_changes
            conn.execute(_FTS_MERGE, (FTS_MERGE_PAGES,))
            return conn.total_changes - before > 1  # FTS5's own test: it wrote something, so more may be left

        for _ in range(MAX_TIDY_STEPS):
            if not await self.writer.submit(WriteOp[bool](run=step)):
                return

    async def unindexed(self) -> int:
        """How many deliveries wait for the full-text index."""
        rows = await self._fetchall(
            "SELECT COUNT(*) FROM deliveries WHERE id > "
            "COALESCE((SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'fts_indexed'), 0)"
        )
        return int(rows[0][0])

    async def check_writable(self, now: float) -> None:
        """Commit a heartbeat row; raises StoreUnavailable when the disk refuses it."""
        await self.writer.submit(
            WriteOp[None](rows=[("INSERT OR REPLACE INTO meta (key, value) VALUES ('healthz', ?)", (str(now),))])
        )

    # --- reads ----------------------------------------------------------------------

    def add_commit_listener(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` after each commit (the forwarder and indexer wake on it)."""
        self.writer.add_commit_listener(listener)

    def share_event(self, kind: str, data: dict[str, Any]) -> None:
        """One relay per SQLite file: there is nobody to tell."""

    def add_event_listener(self, listener: Callable[[str, dict[str, Any]], None]) -> None:
        """One relay per SQLite file: no events come from elsewhere."""

    def _fts_clause(self) -> str:
        return "d.id IN (SELECT rowid FROM deliveries_fts WHERE deliveries_fts MATCH ?)"

    def _fts_param(self, q: str) -> str:
        return fts_phrase(q)

    async def _fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        try:
            return list(await self._reader.execute_fetchall(sql, params))
        except sqlite3.OperationalError as exc:
            raise StoreUnavailable(str(exc)) from exc

    async def due_outbox(
        self, now: float, upstreams: Sequence[str], limit: int, exclude: Collection[int] = ()
    ) -> list[OutboxItem]:
        """Pending rows due by ``now``, not in ``exclude``, whose earlier events to the same upstream are settled."""
        if not upstreams:
            return []
        sql = _DUE.format(upstreams=", ".join("?" * len(upstreams)))
        rows = await self._fetchall(sql, (now, *upstreams, json.dumps(sorted(exclude)), limit))
        return [outbox_item_from_row(r) for r in rows]

    async def next_due_after(self, now: float, upstreams: Sequence[str]) -> float | None:
        """When the next sendable row (not held back by ordering) becomes due after ``now``."""
        if not upstreams:
            return None
        sql = _NEXT_DUE.format(upstreams=", ".join("?" * len(upstreams)))
        rows = await self._fetchall(sql, (now, *upstreams))
        return rows[0][0] if rows and rows[0][0] is not None else None

    async def catch_up_index(self) -> None:
        """Index everything committed so far, so a search never misses a stored delivery."""
        # 256 a transaction: a search's catch-up shares the writer with ingest, whose commits
        # queue behind each transaction (~15 ms of tokenising at this size).
        while await self.index_bodies(256):
            pass
