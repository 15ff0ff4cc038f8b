"""Test helpers in one place: signing, configs, scripted upstreams, waiting on conditions."""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from playwright.async_api import Browser, BrowserContext, Page
from replicate.webhook import Webhooks, WebhookSigningSecret
from yarl import URL

from relay.config import Config, parse_config
from relay.lifecycle import encode, prediction_lifecycle, signed_headers
from relay.service import Relay
from relay.verify import decode_secret

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
OTHER_SECRET = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD"
KEY = decode_secret(SECRET)
INGEST_PATH = "/webhooks/replicate"

# Debian's Chromium, headless in a container (the browser tests and scripts/screenshots.py).
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
TIMEOUT_MS = 10_000  # every Playwright wait in the browser tests


@dataclass
class UI:
    """One browser context and page, plus what is needed to explain a failure afterwards."""

    browser: Browser
    context: BrowserContext
    page: Page
    shots: Path
    checkpoints: list[tuple[str, bytes]] = field(default_factory=list)
    js_errors: list[str] = field(default_factory=list)

    async def open(self, relay: Relay, path: str) -> Page:
        assert relay.bound is not None
        await self.page.goto(relay.bound.admin_url + path)
        return self.page

    async def checkpoint(self, name: str) -> None:
        """Remember how a page looked at a step; written to disk only if the test fails."""
        self.checkpoints.append((name, await self.page.screenshot(full_page=True)))

    async def save_failure(self) -> list[Path]:
        self.shots.mkdir(parents=True, exist_ok=True)
        written = []
        for i, (name, png) in enumerate(self.checkpoints, 1):
            path = self.shots / f"{i:02d}-{name}.png"
            path.write_bytes(png)
            written.append(path)
        for i, page in enumerate(self.context.pages):
            stem = f"failure-{i}-{_slug(page.url)}"
            try:
                await page.screenshot(path=str(self.shots / f"{stem}.png"), full_page=True, timeout=5_000)
                (self.shots / f"{stem}.html").write_text(await page.content())
                written.append(self.shots / f"{stem}.png")
            except Exception as exc:  # a page that cannot be captured must not hide the test's own failure
                (self.shots / f"{stem}.error.txt").write_text(repr(exc))
        return written

    def assert_no_js_errors(self) -> None:
        assert self.js_errors == [], f"uncaught errors in the page: {self.js_errors}"


def _slug(url: str) -> str:
    path = re.sub(r"^https?://[^/]+", "", url) or "blank"
    return re.sub(r"[^A-Za-z0-9]+", "_", path).strip("_")[:60] or "root"


def make_config(
    database: str,
    *,
    upstreams: list[dict[str, Any]] | None = None,
    source: dict[str, Any] | None = None,
    relay: dict[str, Any] | None = None,
) -> Config:
    """A config on ephemeral ports; the source is signed with SECRET unless overridden."""
    src = {"name": "replicate", "path": "/webhooks/replicate", "secret": SECRET, **(source or {})}
    src = {k: v for k, v in src.items() if v is not None}
    ups = [
        {"name": f"up{i}", "source": "replicate", "retry_base_seconds": 0.05, "retry_max_seconds": 0.2, **u}
        for i, u in enumerate(upstreams or [])
    ]
    # In-process relays forward inline unless a test module asks for the child process
    # (RELAY_TEST_FORWARDER, set by test_forward.py's fixture); `relay serve` defaults to it.
    relay_table = {
        "database": database,
        "ingest_listen": "127.0.0.1:0",
        "ui_listen": "127.0.0.1:0",
        "forwarder": os.environ.get("RELAY_TEST_FORWARDER", "inline"),
        **(relay or {}),
    }
    return parse_config({"relay": relay_table, "sources": [src], "upstreams": ups}, env={})


def signed(
    body: bytes, *, key: bytes | None = KEY, msg_id: str | None = None, timestamp: int | None = None
) -> dict[str, str]:
    return signed_headers(key, body, msg_id=msg_id, timestamp=timestamp)


async def ingest(
    http: aiohttp.ClientSession,
    relay: Relay,
    body: Any,
    headers: Mapping[str, str],
    query: str = "",
    expect: int = 200,
) -> int:
    """POST to the relay's ingest path; check the status and return the delivery id from the answer."""
    assert relay.bound is not None
    url = relay.bound.ingest_url + INGEST_PATH + (f"?{query}" if query else "")
    # encoded=True: send the query exactly as written (yarl would otherwise normalise %2F to /).
    async with http.post(URL(url, encoded=True), data=body, headers=headers) as resp:
        text = await resp.text()
        assert resp.status == expect, text
        return int(json.loads(text)["delivery"])


def lifecycle_bodies(prediction_id: str = "pred123", url: str = "http://relay/webhooks/replicate") -> list[bytes]:
    return [encode(doc) for doc in prediction_lifecycle(prediction_id, url, now=1_700_000_000)]


async def wait_until(
    condition: Callable[[], Awaitable[bool]] | Callable[[], bool], timeout: float = 10.0, interval: float = 0.02
) -> None:
    """Poll a condition until it holds or the deadline passes (then fail loudly)."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(interval)


def raw_headers(request: web.Request) -> list[tuple[str, str]]:
    """The request's headers as they came on the wire: order, case and repeats kept."""
    return [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.raw_headers]


def replicate_validate(headers: Mapping[str, str], body: bytes, secret: str = SECRET, tolerance: int = 300) -> None:
    """Verify like a user's handler would, with the ``replicate`` package (raises when invalid)."""
    Webhooks.validate(
        headers=dict(headers), body=body.decode(), secret=WebhookSigningSecret(key=secret), tolerance=tolerance
    )


def replicate_verdict(headers: Mapping[str, str], body: bytes, secret: str = SECRET, tolerance: int = 300) -> str:
    """``"ok"`` when the ``replicate`` package's validator accepts the request, else what it raised."""
    try:
        replicate_validate(headers, body, secret, tolerance)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return "ok"


def catch_all(handle: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.Application:
    """An app that answers every method on every path with ``handle``."""
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


@dataclass
class Received:
    method: str
    path_qs: str
    headers: list[tuple[str, str]]
    body: bytes
    at: float


@dataclass
class ScriptedUpstream:
    """A real aiohttp server whose answers follow a script; it records every request.

    ``script`` items are a status code, a (status, headers) pair, or an async
    callable taking the request and returning a response. After the script
    runs out, ``then`` is answered.
    """

    script: list[Any] = field(default_factory=list)
    then: int = 200
    received: list[Received] = field(default_factory=list)
    url: str = ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.received.append(
            Received(
                request.method,
                request.path_qs,
                raw_headers(request),
                body,
                time.time(),
            )
        )
        step = self.script.pop(0) if self.script else self.then
        if callable(step):
            return await step(request)
        if isinstance(step, tuple):
            return web.Response(status=step[0], headers=step[1], text="scripted")
        return web.Response(status=step, text=f"answer {step}")

    def app(self) -> web.Application:
        return catch_all(self.handle)


@dataclass
class Arrival:
    """One request as a user's handler got it, with the replicate validator's verdict on it."""

    path_qs: str
    raw_headers: list[tuple[str, str]]  # as on the wire
    headers: dict[str, str]  # lower-cased names
    body: bytes
    verdict: str


@dataclass
class UserHandler:
    """A user's webhook handler: the replicate validator with a 300 s tolerance, 400 when it raises.

    It records every request and answers ``handler: <verdict>``.
    """

    arrivals: list[Arrival] = field(default_factory=list)
    url: str = ""

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        verdict = replicate_verdict(request.headers, body)
        headers = {k.lower(): v for k, v in request.headers.items()}
        self.arrivals.append(Arrival(request.path_qs, raw_headers(request), headers, body, verdict))
        return web.Response(status=200 if verdict == "ok" else 400, text=f"handler: {verdict}")

    def app(self) -> web.Application:
        return catch_all(self.handle)


async def raw_request(base_url: str, raw_head: bytes, body: bytes = b"") -> tuple[int, bytes]:
    """Send bytes as written (duplicate headers, odd case) and return (status, response body).

    Client libraries normalise headers; the relay's promise is about what
    arrives on the wire, so some tests must write the wire themselves.
    """
    url = URL(base_url)
    reader, writer = await asyncio.open_connection(url.host, url.port)
    try:
        writer.write(raw_head + body)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, payload = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), payload


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response with a Content-Length, read off a connection that may stay open."""
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
    lines = head.split("\r\n")
    headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return int(lines[0].split(" ", 2)[1]), headers, body


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def relay_command(*args: str) -> list[str]:
    """The real CLI, as a user runs it (the installed console script's module)."""
    import sys

    return [sys.executable, "-m", "relay", *args]
