"""Publish/subscribe of new deliveries and attempts, for live pages (SSE).

Events published here go to this process's subscribers and, when a shared
database links several relays (PostgreSQL), to the other relays too, whose
events come back in through :meth:`EventBus.receive`.

Each subscriber gets its own bounded queue: a slow browser tab drops old
events (and is told so) instead of holding memory or slowing ingest down.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

QUEUE_SIZE = 1000


@dataclass(frozen=True)
class Event:
    id: int
    kind: str  # "delivery" or "attempt"
    data: dict[str, Any] = field(default_factory=dict)


class EventBus:
    def __init__(self) -> None:
        self._subscribers: set[asyncio.Queue[Event | None]] = set()
        self._ids = itertools.count(1)
        self._share: Callable[[str, dict[str, Any]], None] | None = None

    def share_with(self, share: Callable[[str, dict[str, Any]], None]) -> None:
        """Also hand every event published here to ``share`` (e.g. the store's NOTIFY)."""
        self._share = share

    def publish(self, kind: str, data: dict[str, Any]) -> None:
        """An event of this relay: to local subscribers and to the other relays."""
        self.receive(kind, data)
        if self._share is not None:
            self._share(kind, data)

    def receive(self, kind: str, data: dict[str, Any]) -> None:
        """An event for local subscribers only (one of ours, or one another relay shared)."""
        event = Event(next(self._ids), kind, data)
        for queue in self._subscribers:
            if queue.full():
                try:
                    queue.get_nowait()
                except asyncio.QueueEmpty:
                    pass
            queue.put_nowait(event)

    @asynccontextmanager
    async def subscribe(self) -> AsyncIterator[asyncio.Queue[Event | None]]:
        queue: asyncio.Queue[Event | None] = asyncio.Queue(QUEUE_SIZE)
        self._subscribers.add(queue)
        try:
            yield queue
        finally:
            self._subscribers.discard(queue)

    def close(self) -> None:
        """Wake every subscriber with ``None`` so streams end at shutdown."""
        for queue in self._subscribers:
            if queue.full():
                queue.get_nowait()
            queue.put_nowait(None)
