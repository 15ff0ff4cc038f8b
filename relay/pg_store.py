"""PostgreSQL storage: several relays behind a load balancer sharing one database and one outbox.

What differs from SQLite, and why:

- Outbox rows are *claimed*: ``FOR UPDATE SKIP LOCKED`` picks due rows no
  other relay is taking at that moment, and a lease (``lease_until``) keeps
  them this relay's while its attempt runs. A relay that dies mid-attempt
  holds its rows only until the lease runs out; then any relay sends them
  (at-least-once, like a crash with SQLite).
- Per-prediction ordering holds across relays because a row is only due when
  every earlier row with its order key is settled, whoever holds it.
- Ingest still group-commits: concurrent deliveries go to PostgreSQL as one
  transaction (one round of statements, one fsync) before any of them is
  answered 200.
- Live-page events cross relays with LISTEN/NOTIFY, so a UI served by any
  relay shows deliveries that arrived at another.
- Search uses a ``tsvector`` column filled at insert (``simple`` configuration:
  no stemming, like SQLite's tokenizer), with a GIN index.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import json
import logging
import os
import socket
import uuid
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from relay.filters import search_words
from relay.model import Attempt, Capture, OutboxItem, PlannedForward
from relay.pg_schema import MIGRATIONS
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
from relay.tasks import cancel_and_wait
from relay.writer import MAX_BATCH, CommitTimeout, StoreUnavailable

log = logging.getLogger(__name__)

__all__ = ["PgStore"]

CHANNEL = "replicate_relay_events"
MIGRATION_LOCK = 0x7265_6C61_7921  # pg_advisory_xact_lock key: "relay!" in ASCII
NOTIFY_LIMIT = 7900  # PostgreSQL refuses NOTIFY payloads of 8000 bytes and more
FTS_MAX_CHARS = 200_000  # a tsvector is capped at 1 MB; index the start of huge bodies
IDLE_POLL_SECONDS = 1.0
LISTEN_RETRY_SECONDS = 2.0
LISTEN_READY_SECONDS = 5.0
# Errors meaning "the database cannot do this now" (down, full, read-only, refused), as
# opposed to a bug in a query: the relay answers 503 and retries, as with SQLite.
UNAVAILABLE = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.InsufficientResourcesError,
    asyncpg.OperatorInterventionError,
    asyncpg.ReadOnlySQLTransactionError,
    asyncpg.CannotConnectNowError,
    asyncpg.DiskFullError,
    asyncpg.LockNotAvailableError,
)
DATABASE_ERRORS = (*UNAVAILABLE, asyncpg.PostgresError)  # anything the database said or did not

_INSERT_DELIVERY = """
INSERT INTO deliveries (id, received_at, source, method, path, query, headers, body, size,
    body_sha256, body_format, peer, verdict, verdict_detail, webhook_id, prediction_id, status,
    model, version, kind, duplicate_of, body_tsv)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20,
    (SELECT MIN(id) FROM deliveries WHERE webhook_id = $15 AND body_sha256 = $10),
    to_tsvector('simple', $21))
"""
_NEW_IDS = "SELECT nextval(pg_get_serial_sequence('deliveries', 'id')) FROM generate_series(1, $1)"
# A lease already run out counts as no lease: its relay died or lost the database mid-attempt.
_CLAIM = f"""
WITH due AS (
    SELECT o.id FROM outbox o
    WHERE o.state = 'pending' AND o.next_attempt_at <= $1 AND o.upstream = ANY($2::text[])
      AND (o.lease_until IS NULL OR o.lease_until <= $1) AND {ORDER_CLEAR}
      AND NOT (o.id = ANY($6::bigint[]))
    ORDER BY o.next_attempt_at, o.id
    LIMIT $3
    FOR UPDATE OF o SKIP LOCKED
)
UPDATE outbox SET lease_until = $4, leased_by = $5 FROM due WHERE outbox.id = due.id
RETURNING outbox.id
"""
_CLAIMED = f"""
SELECT {OUTBOX_ITEM_COLUMNS}
FROM outbox o JOIN deliveries d ON d.id = o.delivery_id
WHERE o.id = ANY($1::bigint[])
ORDER BY o.next_attempt_at, o.id
"""
# The next retry coming due, or the next lease running out: two index range scans
# (one expression over both columns made it a scan of every pending row).
_NEXT_DUE = f"""
SELECT LEAST(
    (SELECT MIN(o.next_attempt_at) FROM outbox o
     WHERE o.state = 'pending' AND o.next_attempt_at > $1 AND o.upstream = ANY($2::text[]) AND {ORDER_CLEAR}),
    (SELECT MIN(o.lease_until) FROM outbox o
     WHERE o.state = 'pending' AND o.lease_until > $1 AND o.upstream = ANY($2::text[])))
"""
# "AND state = 'pending'": a settled row is never moved back by a late or repeated result.
# "leased_by": a relay whose lease ran out (another took the row over) settles nothing;
# its attempt is still recorded.
_UPDATE_OUTBOX = """
UPDATE outbox SET state = $1, attempts = attempts + $2, next_attempt_at = $3, updated_at = $4, note = $5,
    lease_until = NULL, leased_by = NULL
WHERE id = $6 AND state = 'pending' AND (leased_by IS NULL OR leased_by = $7)
"""
_SYNCHRONOUS = "SELECT set_config('synchronous_commit', 'on', true) WHERE current_setting('synchronous_commit') = 'off'"
_ORDER_LOCKS = """
SELECT pg_advisory_xact_lock(h) FROM (
    SELECT DISTINCT hashtextextended(k, 0) AS h FROM unnest($1::text[]) AS k ORDER BY h) AS keys
"""


@functools.lru_cache(maxsize=256)
def numbered(sql: str) -> str:
    """Turn the shared queries' ``?`` placeholders into PostgreSQL's ``$1, $2...``.

    Hand-written because asyncpg takes only numbered placeholders; safe here
    because no shared query has a ``?`` inside a literal. Cached: the same few
    statements are numbered on every write and read.
    """
    parts = sql.split("?")
    out = [parts[0]]
    for number, part in enumerate(parts[1:], start=1):
        out.append(f"${number}{part}")
    return "".join(out)


def _clean(value: Any) -> Any:
    """PostgreSQL text cannot hold NUL; a webhook may carry one (e.g. "\\u0000" in a JSON id)."""
    return value.replace("\x00", "\ufffd") if isinstance(value, str) else value


def _search_text(body: bytes | None) -> str:
    if body is None:
        return ""
    return search_words(body[: FTS_MAX_CHARS * 4].decode("utf-8", "replace")[:FTS_MAX_CHARS])


def _unavailable(exc: BaseException) -> StoreUnavailable:
    return StoreUnavailable(f"{type(exc).__name__}: {exc}")


@dataclass
class _Op:
    """A unit of work for the group commit: a new delivery, or statements (``rows`` run with
    ``executemany`` beside the same statements of other ops; ``returning`` gives the op's result)."""

    capture: Capture | None = None
    forwards: tuple[PlannedForward, ...] = ()
    rows: Sequence[tuple[str, Sequence[Any]]] = ()
    returning: tuple[str, Sequence[Any]] | None = None
    future: asyncio.Future[Any] = field(init=False)
    enqueued_at: float = 0.0


def _delivery_params(c: Capture, delivery_id: int) -> tuple[Any, ...]:
    return tuple(_clean(v) for v in delivery_params(c, delivery_id)) + (_search_text(c.body),)


class PgStore(SqlReads):
    """PostgreSQL storage for deliveries, the shared outbox and attempts."""

    forwarding_aggregate = (
        "SELECT string_agg(o.upstream || '=' || o.state, chr(31) ORDER BY o.id) FROM outbox o "
        "WHERE o.delivery_id = d.id"
    )
    idle_poll_seconds: float | None = IDLE_POLL_SECONDS

    def __init__(
        self,
        dsn: str,
        pool: asyncpg.Pool,
        write_pool: asyncpg.Pool,
        commit_timeout: float,
        lease_seconds: float,
    ) -> None:
        self._dsn = dsn
        self._pool = pool
        # The group commit has connections of its own: slow reads (a big API query) holding
        # every pooled connection must not keep deliveries from being stored.
        self._write_pool = write_pool
        self._commit_timeout = commit_timeout
        self._lease_seconds = lease_seconds
        self.instance = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._queue: collections.deque[_Op] = collections.deque()
        self._queued = asyncio.Event()
        self._commit_listeners: list[Callable[[], None]] = []
        self._event_listeners: list[Callable[[str, dict[str, Any]], None]] = []
        self._outgoing: asyncio.Queue[str] = asyncio.Queue(maxsize=10_000)
        self._closing = False
        self._tasks: list[asyncio.Task[None]] = []
        self._listening = asyncio.Event()
        self._committing: list[_Op] = []
        self._healthz_key = f"healthz:{self.instance}"  # one row per relay: no lock shared between relays

    @classmethod
    async def open(cls, dsn: str, commit_timeout: float = 10.0, lease_seconds: float = 60.0) -> PgStore:
        """Connect, migrate (once, even with several relays starting together) and start the writer."""
        settings = {
            # The relay's queries are short; compiling them cost more than running them (22 ms
            # of JIT on a 60 ms claim, measured with a 15k backlog).
            "jit": "off",
            # Never wait on another session's lock past the commit deadline, and end a
            # transaction left open by a relay that hung or lost its network.
            "lock_timeout": str(int(commit_timeout * 1000)),
            "idle_in_transaction_session_timeout": "60000",
        }
        try:
            pool = await asyncpg.create_pool(
                dsn, min_size=1, max_size=10, command_timeout=commit_timeout * 3, server_settings=settings
            )
            write_pool = await asyncpg.create_pool(
                dsn, min_size=1, max_size=2, command_timeout=commit_timeout * 3, server_settings=settings
            )
        except DATABASE_ERRORS as exc:
            raise StoreUnavailable(f"cannot connect to PostgreSQL: {type(exc).__name__}: {exc}") from exc
        try:
            async with pool.acquire() as conn, conn.transaction():
                await _migrate(conn)
                fsync = await conn.fetchval("SELECT current_setting('fsync')")
        except BaseException:
            await pool.close()
            await write_pool.close()
            raise
        if fsync == "off":
            log.warning(
                "PostgreSQL runs with fsync = off: if its machine crashes, deliveries already "
                "answered 200 can be lost; turn fsync on for production"
            )
        store = cls(dsn, pool, write_pool, commit_timeout, lease_seconds)
        store._tasks = [
            asyncio.create_task(store._write_loop(), name="relay-pg-writer"),
            asyncio.create_task(store._expire(), name="relay-pg-deadline"),
            asyncio.create_task(store._listen_loop(), name="relay-pg-listen"),
            asyncio.create_task(store._notify_loop(), name="relay-pg-notify"),
        ]
        try:  # so a page opened right after start-up sees other relays' events
            async with asyncio.timeout(LISTEN_READY_SECONDS):
                await store._listening.wait()
        except TimeoutError:
            log.warning("not yet listening for other relays' events; retrying in the background")
        return store

    async def close(self) -> None:
        """Commit what is queued, then stop the background tasks and the pools."""
        try:
            await self._write([("DELETE FROM meta WHERE key = $1", (self._healthz_key,))])
        except StoreUnavailable as exc:
            log.warning("could not remove this relay's health row: %s", exc)
        self._closing = True
        self._queued.set()
        writer, *others = self._tasks
        await writer  # ends once the queue is empty
        for task in others:
            await cancel_and_wait(task)
        self._tasks = []
        await self._pool.close()
        await self._write_pool.close()

    # --- notifications -------------------------------------------------------------

    def add_commit_listener(self, listener: Callable[[], None]) -> None:
        self._commit_listeners.append(listener)

    def add_event_listener(self, listener: Callable[[str, dict[str, Any]], None]) -> None:
        self._event_listeners.append(listener)

    def share_event(self, kind: str, data: dict[str, Any]) -> None:
        """Queue a NOTIFY for the other relays; sent in order by one task, never blocking the caller."""
        payload = json.dumps({"from": self.instance, "kind": kind, "data": data}, separators=(",", ":"))
        if len(payload.encode()) > NOTIFY_LIMIT:
            log.warning("event %s for delivery %s too large to share with other relays", kind, data.get("id"))
            return
        try:
            self._outgoing.put_nowait(payload)
        except asyncio.QueueFull:
            log.warning("event queue to other relays is full; dropping a %s event", kind)

    def _committed(self) -> None:
        for listener in self._commit_listeners:
            listener()

    async def _notify_loop(self) -> None:
        """Send queued events, all that are waiting in one transaction.

        One NOTIFY per event would be one commit per webhook; live events are
        also not worth an fsync (a page that misses one catches up from the list API).
        """
        while True:
            payloads = [await self._outgoing.get()]
            while not self._outgoing.empty() and len(payloads) < MAX_BATCH:
                payloads.append(self._outgoing.get_nowait())
            try:
                async with self._pool.acquire() as conn, conn.transaction():
                    await conn.execute("SET LOCAL synchronous_commit = off")
                    await conn.execute("SELECT pg_notify($1, p) FROM unnest($2::text[]) AS p", CHANNEL, payloads)
            except DATABASE_ERRORS as exc:
                log.warning("could not share %d live events with other relays: %s", len(payloads), exc)
            except Exception:
                log.exception("sharing %d live events with other relays failed unexpectedly", len(payloads))

    async def _listen_loop(self) -> None:
        """Hold a LISTEN connection open, reconnecting if the database goes away."""
        while True:
            lost = asyncio.Event()
            conn: asyncpg.Connection | None = None
            try:
                conn = await asyncpg.connect(self._dsn)
                conn.add_termination_listener(lambda _conn, lost=lost: lost.set())
                await conn.add_listener(CHANNEL, self._on_notify)
                self._listening.set()
                await lost.wait()
                self._listening.clear()
                log.warning("lost the LISTEN connection to PostgreSQL; reconnecting")
            except DATABASE_ERRORS as exc:
                log.warning("cannot LISTEN for other relays' events: %s", exc)
            except Exception:
                log.exception("LISTEN for other relays' events failed unexpectedly; retrying")
            finally:
                if conn is not None and not conn.is_closed():
                    await conn.close()
            await asyncio.sleep(LISTEN_RETRY_SECONDS)

    def _on_notify(self, _conn: object, _pid: int, _channel: str, payload: object) -> None:
        try:
            message = json.loads(str(payload))
        except ValueError:
            log.warning("ignoring a malformed notification on %s", CHANNEL)
            return
        if message.get("from") == self.instance:
            return
        for listener in self._event_listeners:
            listener(message["kind"], message["data"])

    # --- writes ----------------------------------------------------------------------

    def enqueue_delivery(self, capture: Capture, forwards: Iterable[PlannedForward]) -> asyncio.Future[int | None]:
        """Queue a delivery for the next group commit; the future gives its id once committed."""
        return self._enqueue(_Op(capture=capture, forwards=tuple(forwards)))

    async def record_delivery(self, capture: Capture, forwards: Iterable[PlannedForward]) -> int:
        result = await self.enqueue_delivery(capture, forwards)
        assert result is not None
        return result

    def _enqueue(self, op: _Op) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        op.future = loop.create_future()
        op.enqueued_at = loop.time()
        if self._closing:
            op.future.set_exception(StoreUnavailable("the store is closing"))
        else:
            self._queue.append(op)
            self._queued.set()
        return op.future

    async def _write(
        self, rows: Sequence[tuple[str, Sequence[Any]]] = (), returning: str = "", params: Sequence[Any] = ()
    ) -> Any:
        """Commit statements with the next group commit; returns the first value of ``returning``, if given."""
        return await self._enqueue(_Op(rows=rows, returning=(returning, params) if returning else None))

    async def _write_loop(self) -> None:
        while True:
            await self._queued.wait()
            self._queued.clear()
            while self._queue:
                batch = [self._queue.popleft() for _ in range(min(MAX_BATCH, len(self._queue)))]
                # A write whose waiter gave up (the watchdog answered it) is still committed:
                # its caller answered 503, and the sender's retry is recognised as a duplicate.
                self._committing = batch
                try:
                    await self._commit_batch(batch)
                finally:
                    self._committing = []
            if self._closing:
                return

    async def _expire(self) -> None:
        """Fail waiters older than commit_timeout, queued or in the batch being committed, so no
        request waits longer than promised (one timer for all, as in the SQLite writer)."""
        loop = asyncio.get_running_loop()
        error = CommitTimeout(f"not committed within {self._commit_timeout:g} s")
        while True:
            await asyncio.sleep(min(0.25, self._commit_timeout / 4))
            cutoff = loop.time() - self._commit_timeout
            for op in (*self._committing, *self._queue):
                if op.enqueued_at < cutoff:
                    _fail(op.future, error)

    async def _commit_batch(self, batch: list[_Op]) -> None:
        try:
            async with asyncio.timeout(self._commit_timeout):
                results = await self._run_batch(batch)
        except TimeoutError:
            error: StoreUnavailable = CommitTimeout("PostgreSQL did not commit within commit_timeout_seconds")
        except UNAVAILABLE as exc:
            error = _unavailable(exc)
            log.error("could not commit %d writes: %s", len(batch), error)
        except Exception as exc:
            if len(batch) > 1:
                # One write the database refuses (a value it cannot hold, a bug) must not sink
                # the deliveries committed beside it: commit each on its own instead.
                log.exception("a batch of %d writes failed; committing them one by one", len(batch))
                for op in batch:
                    await self._commit_batch([op])
                return
            error = _unavailable(exc)
            log.error("a write was refused: %s", error)
        else:
            for op, result in zip(batch, results, strict=True):
                if not op.future.done():
                    op.future.set_result(result)
            self._committed()
            return
        for op in batch:
            _fail(op.future, error)

    async def _run_batch(self, batch: list[_Op]) -> list[Any]:
        """One transaction for the whole batch: new deliveries, then the other writes grouped by statement."""
        results: list[Any] = [None] * len(batch)
        async with self._write_pool.acquire() as conn, conn.transaction():
            # A 200 promises the delivery is on disk: on a server set (now or by a later reload)
            # to synchronous_commit = off it would not be, so this commit asks for it.
            await conn.execute(_SYNCHRONOUS)
            arriving = [(i, op) for i, op in enumerate(batch) if op.capture is not None]
            keys = sorted({f.order_key for _, op in arriving for f in op.forwards if f.order_key is not None})
            if keys:
                # Outbox ids decide the order of a prediction's events. Relays committing events
                # of one prediction at once take turns here, so ids follow commit order.
                await conn.execute(_ORDER_LOCKS, keys)
            if arriving:
                ids = [int(r[0]) for r in await conn.fetch(_NEW_IDS, len(arriving))]
                deliveries, outbox = [], []
                for (i, op), delivery_id in zip(arriving, ids, strict=True):
                    results[i] = delivery_id
                    c = op.capture
                    assert c is not None
                    deliveries.append(_delivery_params(c, delivery_id))
                    for f in op.forwards:
                        due = c.received_at if f.state == "pending" else None
                        outbox.append((delivery_id, f.upstream, f.state, f.order_key, due, c.received_at, f.note))
                await conn.executemany(_INSERT_DELIVERY, deliveries)
                if outbox:
                    await conn.executemany(numbered(INSERT_OUTBOX), outbox)
            grouped: dict[str, list[Sequence[Any]]] = {}
            for op in batch:
                for sql, params in op.rows:
                    grouped.setdefault(sql, []).append(tuple(_clean(v) for v in params))
            for sql, many in grouped.items():
                await conn.executemany(sql, many)
            for i, op in enumerate(batch):
                if op.returning is not None:
                    sql, params = op.returning
                    results[i] = await conn.fetchval(sql, *(_clean(v) for v in params))
        return results

    async def finish_attempt(
        self, outbox_id: int, attempt: Attempt, state: str, next_attempt_at: float | None, note: str | None
    ) -> None:
        await self._write(
            [
                (numbered(INSERT_ATTEMPT), attempt_params(attempt)),
                (_UPDATE_OUTBOX, (state, 1, next_attempt_at, attempt.started_at, note, outbox_id, self.instance)),
            ]
        )

    async def settle_outbox(self, outbox_id: int, state: str, note: str, now: float) -> None:
        await self._write([(_UPDATE_OUTBOX, (state, 0, None, now, note, outbox_id, self.instance))])

    async def record_attempt(self, attempt: Attempt) -> int:
        attempt_id = await self._write(
            returning=numbered(INSERT_ATTEMPT) + " RETURNING id", params=attempt_params(attempt)
        )
        return int(attempt_id)

    async def mark_delivered_by_replay(self, delivery_id: int, upstream: str, attempt_id: int, now: float) -> None:
        note = f"delivered by replay (attempt {attempt_id})"
        await self._write([(numbered(MARK_DELIVERED_BY_REPLAY), (now, note, delivery_id, upstream))])

    async def prune(self, older_than: float, batch: int = 500, compact: bool = False) -> int:
        """Delete old deliveries (attempts and outbox rows cascade) in small transactions.

        PostgreSQL's autovacuum makes the space reusable; ``compact`` runs a
        VACUUM at once (not VACUUM FULL, which would lock out ingest).
        """
        total = 0
        while True:
            deleted = int(
                await self._write(
                    # SKIP LOCKED: relays pruning at the same hour take turns instead of deadlocking.
                    returning="WITH gone AS (DELETE FROM deliveries WHERE id IN (SELECT id FROM deliveries "
                    "WHERE received_at < $1 ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED) RETURNING 1) "
                    "SELECT COUNT(*) FROM gone",
                    params=(older_than, batch),
                )
            )
            total += deleted
            if deleted < batch:
                break
        if total and compact:
            try:
                await self._pool.execute("VACUUM (ANALYZE) deliveries, outbox, attempts")
            except DATABASE_ERRORS as exc:
                raise _unavailable(exc) from exc
        return total

    async def index_bodies(self, limit: int = 500) -> int:
        """Bodies are indexed as they are stored; nothing waits."""
        return 0

    async def unindexed(self) -> int:
        return 0

    async def tidy_index(self) -> None:
        """The GIN index needs no merging from here (PostgreSQL's autovacuum cleans it)."""

    async def catch_up_index(self) -> None:
        """Bodies are indexed as they are stored; nothing to catch up."""

    async def check_writable(self, now: float) -> None:
        await self._write(
            [
                (
                    "INSERT INTO meta (key, value) VALUES ($1, $2) "
                    "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    (self._healthz_key, str(now)),
                )
            ]
        )

    # --- the shared outbox -----------------------------------------------------------

    async def due_outbox(
        self, now: float, upstreams: tuple[str, ...], limit: int, exclude: Collection[int] = ()
    ) -> list[OutboxItem]:
        """Claim up to ``limit`` due rows for this relay, leased for ``lease_seconds``.

        Rows this relay is sending are leased, so already left out; ``exclude``
        is honoured all the same.
        """
        if not upstreams:
            return []
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                # A lease is coordination, not data: if the database crashes before this commit
                # reaches its disk, the row is merely unleased again (at worst sent twice, as
                # at-least-once allows), so the claim does not wait for an fsync.
                # enable_sort off: walk the due index in order and stop at the limit. Without
                # fresh statistics (a new or fast-growing table) the planner sorted every pending
                # row instead: 60 ms a claim at 15k pending, against 5 ms.
                await conn.execute("SET LOCAL synchronous_commit = off; SET LOCAL enable_sort = off")
                claimed = [
                    r[0]
                    for r in await conn.fetch(
                        _CLAIM, now, list(upstreams), limit, now + self._lease_seconds, self.instance, list(exclude)
                    )
                ]
                rows = await conn.fetch(_CLAIMED, claimed) if claimed else []
        except DATABASE_ERRORS as exc:
            raise _unavailable(exc) from exc
        return [outbox_item_from_row(r) for r in rows]

    async def next_due_after(self, now: float, upstreams: tuple[str, ...]) -> float | None:
        """When the next row becomes sendable: its retry time, or its lease running out."""
        if not upstreams:
            return None
        rows = await self._fetch(_NEXT_DUE, (now, list(upstreams)))
        return rows[0][0] if rows and rows[0][0] is not None else None

    # --- reads -----------------------------------------------------------------------

    def _fts_clause(self) -> str:
        return "d.body_tsv @@ phraseto_tsquery('simple', ?)"

    def _fts_param(self, q: str) -> str:
        return search_words(q)

    async def _fetchall(self, sql: str, params: Sequence[Any] = ()) -> Sequence[Any]:
        return await self._fetch(numbered(sql), params)

    async def _fetch(self, sql: str, params: Sequence[Any]) -> Sequence[Any]:
        try:
            return await self._pool.fetch(sql, *(_clean(v) for v in params))
        except DATABASE_ERRORS as exc:
            raise _unavailable(exc) from exc


def _fail(future: asyncio.Future[Any], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)


async def _migrate(conn: asyncpg.pool.PoolConnectionProxy[Any]) -> None:
    """Apply missing migrations; the advisory lock makes relays starting together take turns."""
    await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
    await conn.execute("CREATE TABLE IF NOT EXISTS relay_schema (version INTEGER NOT NULL)")
    version = await conn.fetchval("SELECT MAX(version) FROM relay_schema") or 0
    if version > len(MIGRATIONS):
        raise RuntimeError(
            f"database schema version {version} is newer than this relay knows ({len(MIGRATIONS)}); "
            "upgrade replicate-relay"
        )
    for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
        log.info("migrating PostgreSQL schema to version %d", number)
        await conn.execute(script)
        await conn.execute("INSERT INTO relay_schema (version) VALUES ($1)", number)
