"""The one class that owns the SQLite database: every query the relay needs, by intention.

Writes go through the group-commit :class:`~relay.writer.Writer` on one
connection; reads use a second connection, which WAL lets run beside it.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import aiosqlite

from relay.filters import DeliveryFilter, fts_phrase
from relay.model import (
    Attempt,
    Capture,
    Delivery,
    DeliverySummary,
    Forwarding,
    OutboxItem,
    PlannedForward,
    PredictionInfo,
    headers_from_json,
    headers_to_json,
)
from relay.schema import MIGRATIONS, PRAGMAS, split_statements
from relay.verify import Verdict
from relay.writer import StoreUnavailable, WriteOp, Writer

log = logging.getLogger(__name__)

__all__ = ["NotFound", "Store", "StoreUnavailable"]

BUSY_TIMEOUT_SECONDS = 5.0

_INSERT_DELIVERY = """
INSERT INTO deliveries (id, received_at, source, method, path, query, headers, body, size,
    body_sha256, body_format, peer, verdict, verdict_detail, webhook_id, prediction_id, status,
    model, version, kind, duplicate_of)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?,
    (SELECT MIN(id) FROM deliveries WHERE webhook_id = ? AND body_sha256 = ?))
"""
_INSERT_OUTBOX = """
INSERT INTO outbox (delivery_id, upstream, state, order_key, next_attempt_at, updated_at, note)
VALUES (?, ?, ?, ?, ?, ?, ?)
"""
_INSERT_ATTEMPT = """
INSERT INTO attempts (delivery_id, upstream, kind, target, started_at, duration_ms, status,
    response_headers, response_body, response_truncated, error, outcome, request_headers,
    request_body)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
"""
# "AND state = 'pending'": a settled row is never moved back by a late or repeated result.
_UPDATE_OUTBOX = """
UPDATE outbox SET state = ?, attempts = attempts + ?, next_attempt_at = ?, updated_at = ?, note = ?
WHERE id = ? AND state = 'pending'
"""
_DUE = """
SELECT o.id, o.delivery_id, o.upstream, o.attempts, d.method, d.query, d.headers, d.body,
    d.peer, d.webhook_id,
    (SELECT d3.id FROM deliveries d3 JOIN outbox o3 ON o3.delivery_id = d3.id
      WHERE d.duplicate_of IS NOT NULL AND d3.webhook_id = d.webhook_id
        AND d3.body_sha256 = d.body_sha256 AND d3.id < d.id
        AND o3.upstream = o.upstream AND o3.state = 'delivered' LIMIT 1)
FROM outbox o JOIN deliveries d ON d.id = o.delivery_id
WHERE o.state = 'pending' AND o.next_attempt_at <= ? AND o.upstream IN ({upstreams})
  AND (o.order_key IS NULL OR NOT EXISTS (
      SELECT 1 FROM outbox o2 WHERE o2.upstream = o.upstream AND o2.order_key = o.order_key
        AND o2.state = 'pending' AND o2.id < o.id))
ORDER BY o.next_attempt_at, o.id
LIMIT ?
"""
_NEXT_DUE = """
SELECT MIN(o.next_attempt_at) FROM outbox o
WHERE o.state = 'pending' AND o.next_attempt_at > ? AND o.upstream IN ({upstreams})
  AND (o.order_key IS NULL OR NOT EXISTS (
      SELECT 1 FROM outbox o2 WHERE o2.upstream = o.upstream AND o2.order_key = o.order_key
        AND o2.state = 'pending' AND o2.id < o.id))
"""
_DELIVERY_COLUMNS = """id, received_at, source, method, path, query, headers, body, size, peer,
    verdict, verdict_detail, body_sha256, webhook_id, body_format, prediction_id, status, model,
    version, kind, duplicate_of"""


_ATTEMPT_COLUMNS = """id, delivery_id, upstream, kind, target, started_at, duration_ms, status,
    response_headers, response_body, response_truncated, error, outcome, request_headers, request_body"""


def _filter_sql(f: DeliveryFilter) -> tuple[str, list[Any]]:
    """WHERE clause and parameters for a list filter (all values bound, never interpolated)."""
    clauses = ["1 = 1"]
    params: list[Any] = []
    for clause, value in (
        ("d.source = ?", f.source),
        ("d.verdict = ?", f.verdict),
        ("d.prediction_id = ?", f.prediction),
        ("d.status = ?", f.status),
        ("d.received_at >= ?", f.since),
        ("d.received_at <= ?", f.until),
        ("d.id < ?", f.before),
        ("d.id > ?", f.after),
    ):
        if value is not None:
            clauses.append(clause)
            params.append(value)
    if f.state is not None or f.upstream is not None:
        sub = "SELECT 1 FROM outbox o WHERE o.delivery_id = d.id"
        if f.state is not None:
            sub += " AND o.state = ?"
            params.append(f.state)
        if f.upstream is not None:
            sub += " AND o.upstream = ?"
            params.append(f.upstream)
        clauses.append(f"EXISTS ({sub})")
    if f.q:
        clauses.append("d.id IN (SELECT rowid FROM deliveries_fts WHERE deliveries_fts MATCH ?)")
        params.append(fts_phrase(f.q))
    return " AND ".join(clauses), params


class NotFound(LookupError):
    """No row with that id."""


def _attempt_params(attempt: Attempt) -> tuple[Any, ...]:
    return (
        attempt.delivery_id,
        attempt.upstream,
        attempt.kind,
        attempt.target,
        attempt.started_at,
        attempt.duration_ms,
        attempt.status,
        headers_to_json(attempt.response_headers),
        attempt.response_body,
        int(attempt.response_truncated),
        attempt.error,
        attempt.outcome,
        headers_to_json(attempt.request_headers),
        attempt.request_body,
    )


def _attempt_from_row(row: Sequence[Any]) -> Attempt:
    return Attempt(
        id=row[0],
        delivery_id=row[1],
        upstream=row[2],
        kind=row[3],
        target=row[4],
        started_at=row[5],
        duration_ms=row[6],
        status=row[7],
        response_headers=headers_from_json(row[8]),
        response_body=bytes(row[9]),
        response_truncated=bool(row[10]),
        error=row[11],
        outcome=row[12],
        request_headers=headers_from_json(row[13]),
        request_body=None if row[14] is None else bytes(row[14]),
    )


def _delivery_from_row(row: Sequence[Any]) -> Delivery:
    return Delivery(
        id=row[0],
        received_at=row[1],
        source=row[2],
        method=row[3],
        path=row[4],
        query=row[5],
        headers=headers_from_json(row[6]),
        body=None if row[7] is None else bytes(row[7]),
        size=row[8],
        peer=row[9],
        verdict=Verdict(row[10]),
        verdict_detail=row[11],
        body_sha256=row[12],
        webhook_id=row[13],
        body_format=row[14],
        prediction=PredictionInfo(id=row[15], status=row[16], model=row[17], version=row[18], kind=row[19]),
        duplicate_of=row[20],
    )


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


def _open_writer(path: str) -> sqlite3.Connection:
    """The write connection, opened and migrated on the writer thread that will own it."""
    conn = sqlite3.connect(path, isolation_level=None, timeout=BUSY_TIMEOUT_SECONDS, check_same_thread=False)
    try:
        _migrate(conn)
    except BaseException:
        conn.close()
        raise
    return conn


class Store:
    """SQLite storage for deliveries, the outbox and attempts."""

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
        self.writer = Writer(wconn, executor, commit_timeout)

    @classmethod
    async def open(cls, path: str | Path, commit_timeout: float = 10.0) -> Store:
        """Open (creating or migrating) the database and start the writer.

        ``commit_timeout``: a write not committed by then fails its waiter with TimeoutError.
        """
        path = str(path)
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="relay-writer")
        loop = asyncio.get_running_loop()
        try:
            wconn = await loop.run_in_executor(executor, _open_writer, path)
        except BaseException:
            executor.shutdown(wait=False)
            raise
        try:
            reader = await aiosqlite.connect(path, isolation_level=None, timeout=BUSY_TIMEOUT_SECONDS)
            await reader.execute("PRAGMA query_only = ON")
        except BaseException:
            await loop.run_in_executor(executor, wconn.close)
            executor.shutdown(wait=False)
            raise
        store = cls(path, wconn, executor, reader, commit_timeout)
        store.writer.start()
        return store

    async def close(self) -> None:
        await self.writer.stop()
        await self._reader.close()
        await asyncio.get_running_loop().run_in_executor(self._executor, self._wconn.close)
        self._executor.shutdown(wait=True)

    # --- writes -------------------------------------------------------------------

    def enqueue_delivery(self, capture: Capture, forwards: Iterable[PlannedForward]) -> asyncio.Future[int | None]:
        """Queue a delivery with its outbox rows; the future gives its id once committed.

        A plain future (not a coroutine) so the ingest hot path can wait on it
        with a deadline without creating a task per request.
        """
        forwards = tuple(forwards)
        c = capture
        p = c.prediction

        def rows(delivery_id: int) -> list[tuple[str, Sequence[Any]]]:
            out: list[tuple[str, Sequence[Any]]] = [
                (
                    _INSERT_DELIVERY,
                    (
                        delivery_id,
                        c.received_at,
                        c.source,
                        c.method,
                        c.path,
                        c.query,
                        headers_to_json(c.headers),
                        c.body,
                        c.size,
                        c.body_sha256,
                        c.body_format,
                        c.peer,
                        c.verdict.value,
                        c.verdict_detail,
                        c.webhook_id,
                        p.id,
                        p.status,
                        p.model,
                        p.version,
                        p.kind,
                        c.webhook_id,
                        c.body_sha256,
                    ),
                )
            ]
            for f in forwards:
                due = c.received_at if f.state == "pending" else None
                out.append(
                    (_INSERT_OUTBOX, (delivery_id, f.upstream, f.state, f.order_key, due, c.received_at, f.note))
                )
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
                    (_INSERT_ATTEMPT, _attempt_params(attempt)),
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
            return int(conn.execute(_INSERT_ATTEMPT, _attempt_params(attempt)).lastrowid or 0)

        result = await self.writer.submit(WriteOp[int](run=run))
        assert result is not None
        return result

    async def mark_delivered_by_replay(self, delivery_id: int, upstream: str, attempt_id: int, now: float) -> None:
        """A successful replay to an upstream settles its dead/failed outbox row as delivered."""
        note = f"delivered by replay (attempt {attempt_id})"
        await self.writer.submit(
            WriteOp[None](
                rows=[
                    (
                        "UPDATE outbox SET state = 'delivered', next_attempt_at = NULL, updated_at = ?, note = ? "
                        "WHERE delivery_id = ? AND upstream = ? AND state IN ('dead', 'failed', 'skipped')",
                        (now, note, delivery_id, upstream),
                    )
                ]
            )
        )

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
            upto = conn.execute(
                "SELECT MAX(id) FROM (SELECT id FROM deliveries WHERE id > ? ORDER BY id LIMIT ?)", (mark, limit)
            ).fetchone()[0]
            if upto is None:
                return 0
            conn.execute(
                "INSERT INTO deliveries_fts (rowid, body) SELECT id, CAST(body AS TEXT) FROM deliveries "
                "WHERE id > ? AND id <= ? AND body IS NOT NULL",
                (mark, upto),
            )
            conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('fts_indexed', ?)", (str(upto),))
            return int(upto) - mark

        return await self.writer.submit(WriteOp[int](run=run)) or 0

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

    async def _fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        try:
            return list(await self._reader.execute_fetchall(sql, params))
        except sqlite3.OperationalError as exc:
            raise StoreUnavailable(str(exc)) from exc

    async def due_outbox(self, now: float, upstreams: Sequence[str], limit: int) -> list[OutboxItem]:
        """Pending rows due by ``now`` whose earlier events to the same upstream are settled."""
        if not upstreams:
            return []
        sql = _DUE.format(upstreams=", ".join("?" * len(upstreams)))
        rows = await self._fetchall(sql, (now, *upstreams, limit))
        return [
            OutboxItem(
                outbox_id=r[0],
                delivery_id=r[1],
                upstream=r[2],
                attempts_made=r[3],
                method=r[4],
                query=r[5],
                headers=headers_from_json(r[6]),
                body=bytes(r[7] or b""),
                peer=r[8],
                webhook_id=r[9],
                already_delivered_as=r[10],
            )
            for r in rows
        ]

    async def next_due_after(self, now: float, upstreams: Sequence[str]) -> float | None:
        """When the next sendable row (not held back by ordering) becomes due after ``now``."""
        if not upstreams:
            return None
        sql = _NEXT_DUE.format(upstreams=", ".join("?" * len(upstreams)))
        rows = await self._fetchall(sql, (now, *upstreams))
        return rows[0][0] if rows and rows[0][0] is not None else None

    async def get_delivery(self, delivery_id: int) -> Delivery:
        rows = await self._fetchall(f"SELECT {_DELIVERY_COLUMNS} FROM deliveries WHERE id = ?", (delivery_id,))
        if not rows:
            raise NotFound(f"no delivery {delivery_id}")
        delivery = _delivery_from_row(rows[0])
        outbox = await self._fetchall(
            "SELECT upstream, state, attempts, next_attempt_at, note FROM outbox WHERE delivery_id = ? ORDER BY id",
            (delivery_id,),
        )
        attempt_rows = await self._fetchall(
            f"SELECT {_ATTEMPT_COLUMNS} FROM attempts WHERE delivery_id = ? ORDER BY id", (delivery_id,)
        )
        attempts = [_attempt_from_row(r) for r in attempt_rows]
        forwarding = tuple(
            Forwarding(
                upstream=r[0],
                state=r[1],
                attempts_made=r[2],
                next_attempt_at=r[3],
                note=r[4],
                attempts=tuple(a for a in attempts if a.kind == "forward" and a.upstream == r[0]),
            )
            for r in outbox
        )
        replays = tuple(a for a in attempts if a.kind != "forward")
        return Delivery(**{**delivery.__dict__, "forwarding": forwarding, "replays": replays})

    async def list_deliveries(self, f: DeliveryFilter) -> tuple[list[DeliverySummary], int | None]:
        """Newest first, keyset-paginated: returns the page and the ``before`` cursor of the next."""
        if f.q:
            await self.catch_up_index()
        where, params = _filter_sql(f)
        rows = await self._fetchall(
            f"""SELECT d.id, d.received_at, d.source, d.verdict, d.verdict_detail, d.prediction_id, d.status,
                d.model, d.version, d.kind, d.size, d.body_format, d.duplicate_of, d.webhook_id,
                (SELECT group_concat(o.upstream || '=' || o.state, char(31)) FROM outbox o
                  WHERE o.delivery_id = d.id)
            FROM deliveries d WHERE {where} ORDER BY d.id DESC LIMIT ?""",
            (*params, f.limit + 1),
        )
        page = [
            DeliverySummary(
                id=r[0],
                received_at=r[1],
                source=r[2],
                verdict=Verdict(r[3]),
                verdict_detail=r[4],
                prediction=PredictionInfo(id=r[5], status=r[6], model=r[7], version=r[8], kind=r[9]),
                size=r[10],
                body_format=r[11],
                duplicate_of=r[12],
                webhook_id=r[13],
                forwarding=tuple(tuple(x.split("=", 1)) for x in (r[14] or "").split("\x1f") if x),
            )
            for r in rows[: f.limit]
        ]
        return page, (page[-1].id if len(rows) > f.limit else None)

    async def catch_up_index(self) -> None:
        """Index everything committed so far, so a search never misses a stored delivery."""
        while await self.index_bodies(2000):
            pass

    async def delivery_ids(self, f: DeliveryFilter, cap: int) -> list[int]:
        """Ids matching a filter, oldest first (bulk replay keeps the original order)."""
        if f.q:
            await self.catch_up_index()
        where, params = _filter_sql(f)
        rows = await self._fetchall(
            f"SELECT d.id FROM deliveries d WHERE {where} ORDER BY d.id LIMIT ?", (*params, cap)
        )
        return [int(r[0]) for r in rows]

    async def prediction_deliveries(self, prediction_id: str, cap: int = 1000) -> list[Delivery]:
        """Every delivery of one prediction, in arrival order, with forwarding state."""
        rows = await self._fetchall(
            "SELECT id FROM deliveries WHERE prediction_id = ? ORDER BY id LIMIT ?", (prediction_id, cap)
        )
        return [await self.get_delivery(int(r[0])) for r in rows]

    async def previous_of_prediction(self, delivery: Delivery) -> int | None:
        """The delivery of the same prediction received just before this one."""
        if not delivery.prediction.id:
            return None
        rows = await self._fetchall(
            "SELECT MAX(id) FROM deliveries WHERE prediction_id = ? AND id < ?", (delivery.prediction.id, delivery.id)
        )
        return rows[0][0] if rows and rows[0][0] is not None else None

    async def get_attempt(self, attempt_id: int) -> Attempt:
        rows = await self._fetchall(f"SELECT {_ATTEMPT_COLUMNS} FROM attempts WHERE id = ?", (attempt_id,))
        if not rows:
            raise NotFound(f"no attempt {attempt_id}")
        return _attempt_from_row(rows[0])

    async def previous_attempt(self, attempt: Attempt) -> int | None:
        """The attempt made just before this one for the same delivery, of any kind (for response diffs)."""
        rows = await self._fetchall(
            "SELECT MAX(id) FROM attempts WHERE delivery_id = ? AND id < ?", (attempt.delivery_id, attempt.id)
        )
        return rows[0][0] if rows and rows[0][0] is not None else None

    async def count_deliveries(self) -> int:
        rows = await self._fetchall("SELECT COUNT(*) FROM deliveries")
        return int(rows[0][0])

    async def outbox_states(self) -> dict[str, int]:
        rows = await self._fetchall("SELECT state, COUNT(*) FROM outbox GROUP BY state")
        return {str(r[0]): int(r[1]) for r in rows}
