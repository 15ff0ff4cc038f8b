"""Group commit: one task owns the write connection and commits many requests at once.

A commit with ``synchronous=FULL`` costs an fsync. Committing each webhook on
its own caps the relay near a thousand requests per second; queueing the
writes of concurrent requests and committing them as one transaction keeps
the durability (nobody is answered before their row is on disk) at many
times the rate.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import aiosqlite

log = logging.getLogger(__name__)

T = TypeVar("T")

MAX_BATCH = 512


class StoreUnavailable(RuntimeError):
    """A write could not be committed (disk full, database locked, read-only...)."""


@dataclass
class WriteOp(Generic[T]):
    """A unit of work for the writer.

    ``rows`` are (sql, params) statements run with ``executemany`` alongside
    the same statements of other ops. ``with_id``, when given, is handed a
    fresh delivery id inside the transaction and returns the rows; that id is
    the op's result. ``run`` is called with the connection inside the
    transaction for rare work that needs results back.
    """

    rows: Sequence[tuple[str, Sequence[Any]]] = ()
    with_id: Callable[[int], Sequence[tuple[str, Sequence[Any]]]] | None = None
    run: Callable[[aiosqlite.Connection], Awaitable[T]] | None = None
    result: T | None = None
    future: asyncio.Future[T | None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class Writer:
    """Drains a queue of WriteOps into transactions, one commit per batch."""

    def __init__(
        self,
        conn: aiosqlite.Connection,
        next_id: Callable[[aiosqlite.Connection], Awaitable[int]],
        on_commit: Callable[[], None] | None = None,
    ) -> None:
        self._conn = conn
        self._next_id = next_id
        self._queue: asyncio.Queue[WriteOp[Any]] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._on_commit: list[Callable[[], None]] = [on_commit] if on_commit else []
        self.failing: str | None = None  # the last commit error, until a commit succeeds

    def add_commit_listener(self, listener: Callable[[], None]) -> None:
        self._on_commit.append(listener)

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="relay-writer")

    async def stop(self) -> None:
        """Commit what is queued, then stop."""
        if self._task is None:
            return
        await self._queue.join()
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        self._task = None

    async def submit(self, op: WriteOp[T]) -> T | None:
        """Queue an op and wait until its transaction is committed."""
        if self._task is None:
            raise StoreUnavailable("the writer is not running")
        self._queue.put_nowait(op)
        return await op.future

    async def _loop(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < MAX_BATCH and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                await self._commit(batch)
            except Exception as exc:
                await self._rollback()
                self.failing = f"{type(exc).__name__}: {exc}"
                log.error("commit of %d write(s) failed: %s", len(batch), self.failing)
                error = StoreUnavailable(self.failing)
                for op in batch:
                    if not op.future.done():
                        op.future.set_exception(error)
            else:
                self.failing = None
                for op in batch:
                    if not op.future.done():
                        op.future.set_result(op.result)
                for listener in self._on_commit:
                    listener()
            finally:
                for _ in batch:
                    self._queue.task_done()

    async def _commit(self, batch: list[WriteOp[Any]]) -> None:
        conn = self._conn
        await conn.execute("BEGIN IMMEDIATE")
        if any(op.with_id for op in batch):
            # Ids are taken inside the transaction so that rows can be inserted
            # with executemany and still be known to the caller.
            next_id = await self._next_id(conn)
            for op in batch:
                if op.with_id:
                    op.rows = op.with_id(next_id)
                    op.result = next_id
                    next_id += 1
        grouped: dict[str, list[Sequence[Any]]] = {}
        for op in batch:
            for sql, params in op.rows:
                grouped.setdefault(sql, []).append(params)
        for sql, params_list in grouped.items():
            await conn.executemany(sql, params_list)
        for op in batch:
            if op.run:
                op.result = await op.run(conn)
        await conn.commit()

    async def _rollback(self) -> None:
        try:
            if self._conn.in_transaction:
                await self._conn.rollback()
        except Exception as exc:  # the connection may itself be broken; keep serving
            log.error("rollback failed: %s", exc)
