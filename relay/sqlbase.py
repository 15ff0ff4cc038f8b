"""What the SQLite and PostgreSQL stores share: the reads, the row mapping, the common statements.

Both schemas have the same tables and columns, and most queries are plain
SQL that runs on either. They are written once here with ``?`` placeholders;
the PostgreSQL store numbers them (``$1``...) in its ``_fetchall``. Only what
truly differs between the engines (ids, full-text search, string
aggregation, claiming outbox rows) lives in each backend.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

from relay.filters import DeliveryFilter
from relay.model import (
    Attempt,
    Capture,
    Delivery,
    DeliverySummary,
    Forwarding,
    OutboxItem,
    PredictionInfo,
    headers_from_json,
    headers_to_json,
)
from relay.verify import Verdict

INSERT_OUTBOX = """
INSERT INTO outbox (delivery_id, upstream, state, order_key, next_attempt_at, updated_at, note)
VALUES (?, ?, ?, ?, ?, ?, ?)
"""
INSERT_ATTEMPT = """
INSERT INTO attempts (delivery_id, upstream, kind, target, started_at, duration_ms, status,
    response_headers, response_body, response_truncated, error, outcome, request_headers,
    request_body)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
"""
# Earlier pending rows of the same prediction to the same upstream hold a row back
# (per-prediction ordering); shared by the due and next-due queries of both backends.
ORDER_CLEAR = """(o.order_key IS NULL OR NOT EXISTS (
      SELECT 1 FROM outbox o2 WHERE o2.upstream = o.upstream AND o2.order_key = o.order_key
        AND o2.state = 'pending' AND o2.id < o.id))"""
# The earlier copy of a duplicate that this upstream already acknowledged, if any. Looked up
# from the copies (the webhook-id index), then their row for this upstream: driven from the
# outbox's state index instead (which "|| ''" rules out), SQLite scanned every delivered row
# for each due row.
ALREADY_DELIVERED_AS = """CASE WHEN d.duplicate_of IS NULL THEN NULL ELSE
      (SELECT d3.id FROM deliveries d3 JOIN outbox o3 ON o3.delivery_id = d3.id AND o3.upstream = o.upstream
        WHERE d3.webhook_id = d.webhook_id AND d3.body_sha256 = d.body_sha256 AND d3.id < d.id
          AND o3.state || '' = 'delivered' LIMIT 1) END"""
OUTBOX_ITEM_COLUMNS = f"""o.id, o.delivery_id, o.upstream, o.attempts, d.method, d.query, d.headers, d.body,
    d.peer, d.webhook_id, {ALREADY_DELIVERED_AS}"""
MARK_DELIVERED_BY_REPLAY = """
UPDATE outbox SET state = 'delivered', next_attempt_at = NULL, updated_at = ?, note = ?
WHERE delivery_id = ? AND upstream = ? AND state IN ('dead', 'failed', 'skipped')
"""
DELIVERY_COLUMNS = """id, received_at, source, method, path, query, headers, body, size, peer,
    verdict, verdict_detail, body_sha256, webhook_id, body_format, prediction_id, status, model,
    version, kind, duplicate_of"""
ATTEMPT_COLUMNS = """id, delivery_id, upstream, kind, target, started_at, duration_ms, status,
    response_headers, response_body, response_truncated, error, outcome, request_headers, request_body"""
SUMMARY_COLUMNS = """d.id, d.received_at, d.source, d.verdict, d.verdict_detail, d.prediction_id, d.status,
    d.model, d.version, d.kind, d.size, d.body_format, d.duplicate_of, d.webhook_id"""
FORWARDING_SEPARATOR = "\x1f"


class NotFound(LookupError):
    """No row with that id."""


def attempt_params(attempt: Attempt) -> tuple[Any, ...]:
    """Parameters of INSERT_ATTEMPT."""
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


def delivery_params(c: Capture, delivery_id: int) -> tuple[Any, ...]:
    """The columns of a new delivery row, in the order both backends' INSERT lists them."""
    p = c.prediction
    return (
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
    )


def outbox_item_from_row(r: Any) -> OutboxItem:
    """An OutboxItem from a row of OUTBOX_ITEM_COLUMNS (a sqlite3.Row or an asyncpg Record)."""
    return OutboxItem(
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


def attempt_from_row(row: Sequence[Any]) -> Attempt:
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


def delivery_from_row(row: Sequence[Any]) -> Delivery:
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


class SqlReads(ABC):
    """The read queries, identical on both engines; a backend supplies ``_fetchall`` and the dialect bits."""

    #: SQL aggregating "upstream=state" of a delivery's outbox rows, joined by FORWARDING_SEPARATOR.
    forwarding_aggregate: str

    @abstractmethod
    async def _fetchall(self, sql: str, params: Sequence[Any] = ()) -> Sequence[Any]:
        """Run a read (``?`` placeholders); raises StoreUnavailable when the database cannot answer."""

    @abstractmethod
    def _fts_clause(self) -> str:
        """A condition on ``d`` matching the body against one bound full-text query."""

    @abstractmethod
    def _fts_param(self, q: str) -> Any:
        """The bound value for ``_fts_clause`` from the user's search text."""

    @abstractmethod
    async def catch_up_index(self) -> None:
        """Make every committed body searchable before a search runs."""

    def _filter_sql(self, f: DeliveryFilter) -> tuple[str, list[Any]]:
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
            clauses.append(self._fts_clause())
            params.append(self._fts_param(f.q))
        return " AND ".join(clauses), params

    async def get_delivery(self, delivery_id: int) -> Delivery:
        rows = await self._fetchall(f"SELECT {DELIVERY_COLUMNS} FROM deliveries WHERE id = ?", (delivery_id,))
        if not rows:
            raise NotFound(f"no delivery {delivery_id}")
        delivery = delivery_from_row(rows[0])
        outbox = await self._fetchall(
            "SELECT upstream, state, attempts, next_attempt_at, note FROM outbox WHERE delivery_id = ? ORDER BY id",
            (delivery_id,),
        )
        attempt_rows = await self._fetchall(
            f"SELECT {ATTEMPT_COLUMNS} FROM attempts WHERE delivery_id = ? ORDER BY id", (delivery_id,)
        )
        attempts = [attempt_from_row(r) for r in attempt_rows]
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
        where, params = self._filter_sql(f)
        rows = await self._fetchall(
            f"""SELECT {SUMMARY_COLUMNS}, ({self.forwarding_aggregate})
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
                forwarding=tuple(tuple(x.split("=", 1)) for x in (r[14] or "").split(FORWARDING_SEPARATOR) if x),
            )
            for r in rows[: f.limit]
        ]
        return page, (page[-1].id if len(rows) > f.limit else None)

    async def delivery_ids(self, f: DeliveryFilter, cap: int) -> list[int]:
        """Ids matching a filter, oldest first (bulk replay keeps the original order)."""
        if f.q:
            await self.catch_up_index()
        where, params = self._filter_sql(f)
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
        rows = await self._fetchall(f"SELECT {ATTEMPT_COLUMNS} FROM attempts WHERE id = ?", (attempt_id,))
        if not rows:
            raise NotFound(f"no attempt {attempt_id}")
        return attempt_from_row(rows[0])

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
