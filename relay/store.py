"""The storage interface: every query the relay needs, by intention, and how to open one.

Two backends implement it: :class:`~relay.sqlite_store.SqliteStore` (the
embedded default, one relay per file) and :class:`~relay.pg_store.PgStore`
(PostgreSQL, several relays sharing one outbox). The rest of the relay only
sees this protocol; no SQL lives outside the storage modules.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection, Iterable
from typing import Any, Protocol

from relay.filters import DeliveryFilter
from relay.model import Attempt, Capture, Delivery, DeliverySummary, OutboxItem, PlannedForward
from relay.pg_store import PgStore
from relay.sqlbase import NotFound
from relay.sqlite_store import SqliteStore
from relay.writer import CommitTimeout, StoreUnavailable

__all__ = ["CommitTimeout", "NotFound", "Store", "StoreUnavailable", "is_postgres_url", "open_store"]

EventListener = Callable[[str, dict[str, Any]], None]


class Store(Protocol):
    #: How often an idle forwarder looks for due rows anyway: other relays on a shared
    #: database commit rows this one is not told about (None: only when woken or due).
    idle_poll_seconds: float | None

    # --- lifecycle and notifications
    async def close(self) -> None: ...

    def add_commit_listener(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` after each commit of new work (wakes the forwarder and the indexer)."""

    def share_event(self, kind: str, data: dict[str, Any]) -> None:
        """Pass a live-page event to the other relays on this database (nothing to do with SQLite)."""

    def add_event_listener(self, listener: EventListener) -> None:
        """Call ``listener(kind, data)`` for events shared by the other relays."""

    # --- writes
    def enqueue_delivery(self, capture: Capture, forwards: Iterable[PlannedForward]) -> asyncio.Future[int | None]:
        """Queue a delivery with its outbox rows; the future gives its id once durably committed."""

    async def record_delivery(self, capture: Capture, forwards: Iterable[PlannedForward]) -> int: ...

    async def finish_attempt(
        self, outbox_id: int, attempt: Attempt, state: str, next_attempt_at: float | None, note: str | None
    ) -> None:
        """Record a forwarding attempt and move its (still pending) outbox row on, in one commit."""

    async def settle_outbox(self, outbox_id: int, state: str, note: str, now: float) -> None: ...

    async def record_attempt(self, attempt: Attempt) -> int: ...

    async def mark_delivered_by_replay(self, delivery_id: int, upstream: str, attempt_id: int, now: float) -> None: ...

    async def prune(self, older_than: float, batch: int = 500, compact: bool = False) -> int: ...

    async def index_bodies(self, limit: int = 500) -> int: ...

    async def unindexed(self) -> int: ...

    async def tidy_index(self) -> None: ...

    async def catch_up_index(self) -> None: ...

    async def check_writable(self, now: float) -> None:
        """Commit a heartbeat; raises StoreUnavailable when the database refuses writes."""

    # --- the outbox
    async def due_outbox(
        self, now: float, upstreams: tuple[str, ...], limit: int, exclude: Collection[int] = ()
    ) -> list[OutboxItem]:
        """Take up to ``limit`` due rows, not in ``exclude`` (this relay's attempts in flight),
        whose earlier events to the same upstream are settled.

        With several relays on one database the rows are claimed (leased) so
        no other relay sends them while this one's attempt runs.
        """

    async def next_due_after(self, now: float, upstreams: tuple[str, ...]) -> float | None: ...

    # --- reads
    async def get_delivery(self, delivery_id: int) -> Delivery: ...

    async def list_deliveries(self, f: DeliveryFilter) -> tuple[list[DeliverySummary], int | None]: ...

    async def delivery_ids(self, f: DeliveryFilter, cap: int) -> list[int]: ...

    async def prediction_deliveries(self, prediction_id: str, cap: int = 1000) -> list[Delivery]: ...

    async def previous_of_prediction(self, delivery: Delivery) -> int | None: ...

    async def get_attempt(self, attempt_id: int) -> Attempt: ...

    async def previous_attempt(self, attempt: Attempt) -> int | None: ...

    async def count_deliveries(self) -> int: ...

    async def outbox_states(self) -> dict[str, int]: ...


def is_postgres_url(database: str) -> bool:
    return database.startswith(("postgresql://", "postgres://"))


async def open_store(database: str, commit_timeout: float = 10.0, lease_seconds: float = 60.0) -> Store:
    """Open the backend that ``database`` names: a PostgreSQL URL, else a SQLite file path.

    ``lease_seconds``: how long a PostgreSQL relay holds an outbox row it is
    sending before another relay may take it over (longer than any attempt).
    """
    if is_postgres_url(database):
        return await PgStore.open(database, commit_timeout, lease_seconds)
    return await SqliteStore.open(database, commit_timeout)
