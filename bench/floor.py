"""The floor: the least work a durable verify-store-forward relay must do, with nothing else.

    python3 bench/floor.py PORT SINK_PORT DATABASE SECRET   # SINK_PORT 0: store only, no forwarder

Issue 5 asks the relay for half the ceiling's rate. This program answers whether
that is possible at all on the benchmark's machine with the project's stack
(aiohttp, SQLite with ``synchronous = FULL``, a forwarder in a second process).
It does exactly what every webhook needs, in the cheapest way we know:

* ingest (this process): read the body, check the HMAC, parse the JSON for the
  prediction's fields, and insert the delivery and its outbox row into the
  relay's own schema (``relay.schema``: the same tables and list indexes), many
  requests per transaction, answering 200 after the commit;
* forwarding (a spawned process): read pending rows with their bodies, POST
  each to the sink over 32 keep-alive connections, and record an attempt and
  the outbox state per row, one transaction per batch.

It commits the way the relay does (``relay.sqlite_store.open_writer``: the
relay's write connection and schema; ``relay.writer``: the write lock polled
for, multi-row INSERTs; ``relay.checkpoint``: the log copied off the commit path).
Everything else the relay does is left out: the full-text index, duplicate
detection, the timestamp tolerance, refusing bad signatures (it forwards them
too), retries and their policy, per-prediction ordering, response capture,
limits and deadlines, metrics, live events, the UI. It keeps the relay's
schema, list indexes included. So the relay can only be slower; the gap is
what those features and the relay's structure cost. The floor is a measuring
instrument, not a relay: it trusts its input, a failed commit answers 500 and
nothing is retried, and ids come from memory (one ingest process).
Hand-written for that reason; no library does it.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import multiprocessing
import os
import sqlite3
import sys
import time
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from aiohttp import web  # noqa: E402

from relay.checkpoint import Checkpointer  # noqa: E402
from relay.runtime import event_loop_factory  # noqa: E402
from relay.sqlite_store import open_writer  # noqa: E402
from relay.verify import decode_secret  # noqa: E402
from relay.writer import begin_immediate, execute_rows  # noqa: E402

CHECKPOINTER = web.AppKey("checkpointer", Checkpointer)
Waiting = tuple[tuple[Any, ...], asyncio.Future[None]]  # a delivery's row and its request's wait for the commit

CONNECTIONS = 32
BATCH = 256
BUSY_SECONDS = 5.0
INSERT_DELIVERY = (
    "INSERT INTO deliveries (id, received_at, source, method, path, query, headers, body, size, body_sha256, "
    "body_format, peer, verdict, verdict_detail, webhook_id, prediction_id, status, model, version, kind) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
INSERT_OUTBOX = (
    "INSERT INTO outbox (delivery_id, upstream, state, attempts, next_attempt_at, updated_at) VALUES (?, ?, ?, ?, ?, ?)"
)
SETTLE_OUTBOX = "UPDATE outbox SET state = ?, attempts = 1, updated_at = ? WHERE id = ?"
INSERT_ATTEMPT = (
    "INSERT INTO attempts (delivery_id, upstream, kind, target, started_at, duration_ms, status, response_headers, "
    "response_body, response_truncated, outcome, request_headers) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


def transaction(conn: sqlite3.Connection, statements: Sequence[tuple[str, Sequence[Sequence[Any]]]]) -> None:
    """One transaction, as the relay's writer runs a batch: rolled back whole if any part fails."""
    begin_immediate(conn, BUSY_SECONDS)
    try:
        for sql, rows in statements:
            execute_rows(conn, sql, rows)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


class Ingest:
    """Group commit: requests that arrive while a transaction commits go into the next one."""

    def __init__(self, conn: sqlite3.Connection, key: bytes, forwarding: bool, checkpointer: Checkpointer) -> None:
        self.conn = conn
        self.key = key
        self.checkpointer = checkpointer
        self.thread = ThreadPoolExecutor(1)
        self.forwarding = forwarding
        self.pending: list[Waiting] = []
        self.committing = False
        self.next_id = 1

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        headers = request.headers
        msg_id = headers.get("webhook-id", "")
        timestamp = headers.get("webhook-timestamp", "")
        signed = msg_id.encode() + b"." + timestamp.encode() + b"." + body
        expected = base64.b64encode(hmac.digest(self.key, signed, "sha256")).decode()
        offered = (entry.partition(",")[2] for entry in headers.get("webhook-signature", "").split())
        verified = any(hmac.compare_digest(candidate, expected) for candidate in offered)
        document = json.loads(body)
        row = (
            time.time(),
            "replicate",
            request.method,
            request.path,
            "",
            json.dumps(list(headers.items())),
            body,
            len(body),
            hashlib.sha256(body).hexdigest(),
            "json",
            request.remote,
            "verified" if verified else "invalid_signature",
            "",
            msg_id,
            document.get("id"),
            document.get("status"),
            document.get("model"),
            document.get("version"),
            "prediction",
        )
        done = asyncio.get_running_loop().create_future()
        self.pending.append((row, done))
        if not self.committing:
            self.commit_pending()
        await done
        return web.Response(body=b'{"received": true}', content_type="application/json")

    def commit_pending(self) -> None:
        batch, self.pending = self.pending, []
        self.committing = True
        first, self.next_id = self.next_id, self.next_id + len(batch)
        rows = [(first + i, *row) for i, (row, _) in enumerate(batch)]
        future = asyncio.get_running_loop().run_in_executor(self.thread, self.commit, rows)
        future.add_done_callback(lambda result: self.committed(batch, result))

    def committed(self, batch: list[Waiting], result: asyncio.Future[None]) -> None:
        error = result.exception()
        for _, done in batch:
            if error is None:
                done.set_result(None)
            else:
                done.set_exception(error)  # the handler raises: aiohttp answers 500
        self.committing = False
        self.checkpointer.committed()
        if self.pending:
            self.commit_pending()

    def commit(self, rows: list[tuple[Any, ...]]) -> None:
        statements: list[tuple[str, Sequence[Sequence[Any]]]] = [(INSERT_DELIVERY, rows)]
        if self.forwarding:
            now = time.time()
            statements.append((INSERT_OUTBOX, [(row[0], "app", "pending", 0, now, now) for row in rows]))
        transaction(self.conn, statements)


class Upstream(asyncio.Protocol):
    """One keep-alive connection to the sink, one request at a time; reads Content-Length answers."""

    def __init__(self) -> None:
        self.buffer = b""
        self.answer: asyncio.Future[int] | None = None
        self.transport: asyncio.WriteTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        if self.answer is not None and not self.answer.done():
            self.answer.set_exception(ConnectionError("the sink closed the connection"))

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = self.buffer[:end].lower()
        at = head.find(b"content-length:")
        length = int(head[at + 15 :].split(b"\r\n", 1)[0]) if at >= 0 else 0
        if len(self.buffer) < end + 4 + length:
            return
        self.buffer = self.buffer[end + 4 + length :]
        if self.answer is not None:
            self.answer.set_result(int(head[9:12]))
            self.answer = None

    def send(self, request: bytes) -> asyncio.Future[int]:
        assert self.transport is not None
        self.answer = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        return self.answer


async def forward(path: str, sink_port: int, parent: int) -> None:
    conn = open_writer(path)  # the relay's write connection: its pragmas, its lock polling
    loop = asyncio.get_running_loop()
    upstreams = [(await loop.create_connection(Upstream, "127.0.0.1", sink_port))[1] for _ in range(CONNECTIONS)]
    after = 0
    while os.getppid() == parent:  # the ingest process is gone (even by SIGKILL): stop, do not poll on
        rows = conn.execute(
            "SELECT o.id, o.delivery_id, d.headers, d.body FROM outbox o JOIN deliveries d ON d.id = o.delivery_id "
            "WHERE o.id > ? AND o.state = 'pending' ORDER BY o.id LIMIT ?",
            (after, BATCH),
        ).fetchall()
        if not rows:
            await asyncio.sleep(0.002)  # polling: the cheapest wake-up there is for a floor
            continue
        after = rows[-1][0]
        attempts: list[tuple[Any, ...]] = []
        settled: list[tuple[Any, ...]] = []
        for start in range(0, len(rows), CONNECTIONS):
            chunk = rows[start : start + CONNECTIONS]
            started = time.time()
            answers = []
            for upstream, (_, _, headers, body) in zip(upstreams, chunk, strict=False):
                signature = "".join(f"{k}: {v}\r\n" for k, v in json.loads(headers) if k.startswith("webhook-"))
                head = (
                    f"POST /webhooks HTTP/1.1\r\nHost: 127.0.0.1:{sink_port}\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(body)}\r\n{signature}\r\n"
                )
                answers.append(upstream.send(head.encode() + body))
            statuses = await asyncio.gather(*answers)
            took = (time.time() - started) * 1000
            for (outbox_id, delivery_id, _, _), status in zip(chunk, statuses, strict=True):
                outcome = "delivered" if 200 <= status < 300 else "failed"
                attempts.append(
                    (delivery_id, "app", "forward", "sink", started, took, status, "[]", b"", 0, outcome, "[]")
                )
                settled.append((outcome, time.time(), outbox_id))
        transaction(conn, [(INSERT_ATTEMPT, attempts), (SETTLE_OUTBOX, settled)])


def forwarder_main(path: str, sink_port: int, parent: int) -> None:
    with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
        runner.run(forward(path, sink_port, parent))


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def checkpoints(app: web.Application) -> AsyncIterator[None]:
    await app[CHECKPOINTER].start()
    yield
    await app[CHECKPOINTER].stop()


def main() -> None:
    port, sink_port, path, secret = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    conn = open_writer(path)  # creates the relay's schema, before the forwarder opens the file
    if sink_port:
        args = (path, sink_port, os.getpid())
        multiprocessing.get_context("spawn").Process(target=forwarder_main, args=args, daemon=True).start()
    checkpointer = Checkpointer(path)
    ingest = Ingest(conn, decode_secret(secret), bool(sink_port), checkpointer)
    app = web.Application()
    app[CHECKPOINTER] = checkpointer
    app.cleanup_ctx.append(checkpoints)
    app.router.add_post("/webhooks/replicate", ingest.handle)
    app.router.add_get("/healthz", healthz)
    factory = event_loop_factory()  # uvloop, as the relay uses
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None, loop=factory() if factory else None)


if __name__ == "__main__":
    main()
