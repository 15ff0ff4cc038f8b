"""The floor: the least work a durable verify-store-forward relay must do, with nothing else.

    python3 bench/floor.py PORT SINK_PORT DATABASE   # SINK_PORT 0: store only, no forwarder

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

Everything the relay does besides is left out: the full-text index, duplicate
detection, retry policy, response capture, limits and deadlines, metrics, live
events, the UI. So the relay can only be slower; the gap between the two is
what those features and the relay's structure cost. The floor is a measuring
instrument, not a relay: it trusts its input, has no error handling, and gives
ids from memory (one process). Hand-written for that reason; no library does it.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import multiprocessing
import sqlite3
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from aiohttp import web  # noqa: E402

from relay.runtime import event_loop_factory  # noqa: E402
from relay.schema import MIGRATIONS, PRAGMAS, split_statements  # noqa: E402
from relay.verify import decode_secret  # noqa: E402

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"  # bench/run.py signs with this
KEY = decode_secret(SECRET)
CONNECTIONS = 32
BATCH = 256
ROWS_PER_INSERT = 32
DELIVERY_COLUMNS = (
    "id, received_at, source, method, path, query, headers, body, size, body_sha256, body_format, peer, "
    "verdict, verdict_detail, webhook_id, prediction_id, status, model, version, kind"
)
OUTBOX_COLUMNS = "delivery_id, upstream, state, attempts, next_attempt_at, updated_at"
ATTEMPT_COLUMNS = (
    "delivery_id, upstream, kind, target, started_at, duration_ms, status, response_headers, response_body, "
    "response_truncated, outcome, request_headers"
)


def connect(path: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    for pragma in PRAGMAS:  # WAL, synchronous = FULL: the relay's durability
        conn.execute(pragma)
    conn.execute("PRAGMA busy_timeout = 5000")
    return conn


def create(path: str) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA auto_vacuum = INCREMENTAL")  # as the relay's new databases (before the first table)
    for pragma in PRAGMAS:
        conn.execute(pragma)
    for migration in MIGRATIONS:
        for statement in split_statements(migration):
            conn.execute(statement)
    conn.close()


def insert(conn: sqlite3.Connection, table: str, columns: str, rows: Sequence[tuple[Any, ...]]) -> None:
    """Multi-row INSERTs: one SQLite call per 32 rows (binding row by row costs the GIL each time)."""
    one = "(" + ",".join("?" * len(rows[0])) + ")"
    for start in range(0, len(rows), ROWS_PER_INSERT):
        chunk = rows[start : start + ROWS_PER_INSERT]
        sql = f"INSERT INTO {table} ({columns}) VALUES " + ",".join([one] * len(chunk))
        conn.execute(sql, [value for row in chunk for value in row])


class Ingest:
    """Group commit: requests that arrive while a transaction commits go into the next one."""

    def __init__(self, path: str, forwarding: bool) -> None:
        self.conn = connect(path)
        self.thread = ThreadPoolExecutor(1)
        self.forwarding = forwarding
        self.pending: list[tuple[tuple[Any, ...], asyncio.Future[None]]] = []
        self.committing = False
        self.next_id = 1

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        headers = request.headers
        msg_id = headers.get("webhook-id", "")
        timestamp = headers.get("webhook-timestamp", "")
        signed = msg_id.encode() + b"." + timestamp.encode() + b"." + body
        expected = base64.b64encode(hmac.digest(KEY, signed, "sha256")).decode()
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
        future.add_done_callback(lambda _: self.committed(batch))

    def committed(self, batch: list[tuple[tuple[Any, ...], asyncio.Future[None]]]) -> None:
        for _, done in batch:
            done.set_result(None)
        self.committing = False
        if self.pending:
            self.commit_pending()

    def commit(self, rows: list[tuple[Any, ...]]) -> None:
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        insert(conn, "deliveries", DELIVERY_COLUMNS, rows)
        if self.forwarding:
            now = time.time()
            insert(conn, "outbox", OUTBOX_COLUMNS, [(row[0], "app", "pending", 0, now, now) for row in rows])
        conn.execute("COMMIT")


class Upstream(asyncio.Protocol):
    """One keep-alive connection to the sink, one request at a time; reads Content-Length answers."""

    def __init__(self) -> None:
        self.buffer = b""
        self.answer: asyncio.Future[int] | None = None
        self.transport: asyncio.WriteTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

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


async def forward(path: str, sink_port: int) -> None:
    conn = connect(path)
    loop = asyncio.get_running_loop()
    upstreams = [(await loop.create_connection(Upstream, "127.0.0.1", sink_port))[1] for _ in range(CONNECTIONS)]
    after = 0
    while True:
        rows = conn.execute(
            "SELECT o.id, o.delivery_id, d.headers, d.body FROM outbox o JOIN deliveries d ON d.id = o.delivery_id "
            "WHERE o.id > ? AND o.state = 'pending' ORDER BY o.id LIMIT ?",
            (after, BATCH),
        ).fetchall()
        if not rows:
            await asyncio.sleep(0.002)  # polling: the cheapest wake-up there is for a floor
            continue
        after = rows[-1][0]
        attempts = []
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
            for (_, delivery_id, _, _), status in zip(chunk, statuses, strict=True):
                attempts.append(
                    (delivery_id, "app", "forward", "sink", started, took, status, "[]", b"", 0, "delivered", "[]")
                )
        conn.execute("BEGIN IMMEDIATE")
        insert(conn, "attempts", ATTEMPT_COLUMNS, attempts)
        ids = [row[0] for row in rows]
        marks = ",".join("?" * len(ids))
        sql = f"UPDATE outbox SET state = 'delivered', attempts = 1, updated_at = ? WHERE id IN ({marks})"
        conn.execute(sql, [time.time(), *ids])
        conn.execute("COMMIT")


def forwarder_main(path: str, sink_port: int) -> None:
    with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
        runner.run(forward(path, sink_port))


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok")


def main() -> None:
    port, sink_port, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    create(path)
    if sink_port:
        multiprocessing.get_context("spawn").Process(target=forwarder_main, args=(path, sink_port), daemon=True).start()
    ingest = Ingest(path, forwarding=bool(sink_port))
    app = web.Application()
    app.router.add_post("/webhooks/replicate", ingest.handle)
    app.router.add_get("/healthz", healthz)
    factory = event_loop_factory()  # uvloop, as the relay uses
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None, loop=factory() if factory else None)


if __name__ == "__main__":
    main()
