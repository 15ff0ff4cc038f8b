"""The public ingest listener: capture, verify, commit, then answer.

Replicate does not follow redirects and retries only the final webhook, so
every answer here is final and deliberate: 200 after a commit, 400 for a bad
signature (stored all the same), 408 for a body that does not arrive in time
(not stored), 413, 503 when the commit failed, never 3xx.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from relay.config import Config, SourceConfig, UpstreamConfig
from relay.events import EventBus
from relay.keys import CLOCK, CONFIG, EVENTS, METRICS, STORE, Clock
from relay.metrics import Metrics
from relay.model import Capture, decode_header_bytes, display_text
from relay.policy import plan_forwards
from relay.prediction import extract, parse_body
from relay.store import Store, StoreUnavailable
from relay.verify import HEADER_ID, Verdict, header_value, verify

log = logging.getLogger(__name__)

CHUNK = 64 * 1024
# How far past the limit an over-size body is read (to report its size) before giving up.
OVERSIZE_DRAIN = 16 * 1024 * 1024
MAX_RECORDED_SIZE = 2**62
SOURCE_KEY = web.AppKey("source_by_path", dict[str, SourceConfig])


class SlowBody(Exception):
    """The client did not send the whole body within ``body_timeout_seconds``."""


async def read_body(request: web.Request, limit: int, timeout: float) -> tuple[bytes | None, int]:
    """Read at most ``limit`` bytes within ``timeout`` seconds; return (body or None when over, size seen)."""
    if request.content.is_eof():
        # The usual case: the body came with the head, so there is nothing to wait for (and no timer to pay for).
        return await _read_body(request, limit)
    try:
        async with asyncio.timeout(timeout):
            return await _read_body(request, limit)
    except TimeoutError:
        raise SlowBody from None


async def _read_body(request: web.Request, limit: int) -> tuple[bytes | None, int]:
    declared = request.content_length
    if declared is not None and declared > limit:
        # Only a claim (the body is not read): capped so an absurd one still fits a 64-bit column.
        return None, min(declared, MAX_RECORDED_SIZE)
    if declared is not None:
        body = await request.content.readexactly(declared) if declared else b""
        return body, len(body)
    chunks: list[bytes] = []
    total = 0
    async for chunk in request.content.iter_chunked(CHUNK):
        total += len(chunk)
        if total > limit:
            chunks.clear()
            if total > limit + OVERSIZE_DRAIN:
                break
            continue
        chunks.append(chunk)
    if total > limit:
        return None, total
    return b"".join(chunks), total


def json_error(status: int, message: str, **extra: object) -> web.Response:
    return web.json_response({"error": message, **extra}, status=status)


async def capture(request: web.Request, source: SourceConfig, config: Config, now: float) -> Capture:
    """Turn a request into a Capture with its verdict; pure apart from reading the body."""
    headers = tuple((decode_header_bytes(k), decode_header_bytes(v)) for k, v in request.raw_headers)
    body, size = await read_body(request, config.relay.max_body_bytes, config.relay.body_timeout_seconds)
    key = source.secret.key if source.secret else None
    if body is None:
        # The signature covers the body we refused to keep, so it cannot be checked.
        result = verify(headers, b"", key, source.tolerance_seconds, now)
        verdict, detail = result.verdict, result.detail
        if verdict in (Verdict.VERIFIED, Verdict.INVALID_SIGNATURE):
            verdict = Verdict.INVALID_SIGNATURE
            detail = (
                f"not checked: the body ({size} bytes or more) is over max_body_bytes "
                f"({config.relay.max_body_bytes}) and was not kept"
            )
    else:
        result = verify(headers, body, key, source.tolerance_seconds, now)
        verdict, detail = result.verdict, result.detail
    document, body_format = parse_body(body)
    return Capture(
        received_at=now,
        source=source.name,
        method=request.method,
        path=request.path,
        query=request.raw_path.partition("?")[2].partition("#")[0],  # raw, not decoded
        headers=headers,
        body=body,
        size=size,
        peer=request.remote,
        verdict=verdict,
        verdict_detail=display_text(detail),
        body_sha256=hashlib.sha256(body or b"").hexdigest(),
        webhook_id=display_text((header_value(headers, HEADER_ID) or "").strip()) or None,
        body_format=body_format,
        prediction=extract(document),
    )


def make_handler(
    source: SourceConfig, upstreams: tuple[UpstreamConfig, ...]
) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handle(request: web.Request) -> web.StreamResponse:
        if request.method != "POST":
            return web.json_response({"error": "method not allowed"}, status=405, headers={"Allow": "POST"})
        app = request.app
        config, store, metrics, events = app[CONFIG], app[STORE], app[METRICS], app[EVENTS]
        clock: Clock = app[CLOCK]
        started = asyncio.get_running_loop().time()
        try:
            cap = await capture(request, source, config, clock())
        except SlowBody:
            # Nothing is stored: there is no whole delivery, and the sender will send it again.
            metrics.ingest_refused.labels(source.name, "slow_body").inc()
            response = json_error(408, "request body not received in time")
            response.force_close()
            return response
        plans = plan_forwards(source, upstreams, cap.verdict, cap.body is not None, cap.prediction.id)
        try:
            # The writer fails this wait after commit_timeout_seconds (TimeoutError); the
            # write stays queued and nothing is half-written either way.
            committed = await store.enqueue_delivery(cap, plans)
        except (StoreUnavailable, TimeoutError) as exc:
            log.error("ingest on %s: delivery not stored, answering 503: %s", source.path, exc or "commit timed out")
            metrics.ingest_refused.labels(source.name, "unavailable").inc()
            return web.json_response(
                {"error": "delivery could not be stored; retry later"}, status=503, headers={"Retry-After": "5"}
            )
        delivery_id = int(committed or 0)
        metrics.delivery_recorded(source.name, cap.verdict.value, asyncio.get_running_loop().time() - started)
        events.publish("delivery", {"id": delivery_id, "verdict": cap.verdict.value, "source": source.name})
        if cap.body is None:
            metrics.ingest_refused.labels(source.name, "too_large").inc()
            return json_error(413, "body too large", delivery=delivery_id, max_body_bytes=config.relay.max_body_bytes)
        if cap.verdict.accepted or source.on_invalid == "accept":
            # Built by hand: this answer is sent for every webhook, and json.dumps shows in the profile.
            return web.Response(
                body=b'{"received": true, "delivery": %d}' % delivery_id, content_type="application/json"
            )
        return json_error(400, "invalid signature", delivery=delivery_id)

    return handle


async def healthz(request: web.Request) -> web.Response:
    """200 when the database takes a commit, 503 otherwise (disk full, locked, read-only)."""
    try:
        await asyncio.wait_for(request.app[STORE].check_writable(request.app[CLOCK]()), 5.0)
    except (StoreUnavailable, TimeoutError) as exc:
        return web.json_response({"ok": False, "error": str(exc) or "database did not answer"}, status=503)
    return web.json_response({"ok": True})


async def not_found(request: web.Request) -> web.Response:
    """Unknown paths: 404 as JSON, like every other ingest answer (and nothing stored)."""
    return web.json_response({"error": "not found"}, status=404)


def create_ingest_app(
    config: Config, store: Store, metrics: Metrics, events: EventBus, clock: Clock
) -> web.Application:
    """The public listener's app; every part is passed in, nothing is global."""
    app = web.Application()
    app[CONFIG] = config
    app[STORE] = store
    app[METRICS] = metrics
    app[EVENTS] = events
    app[CLOCK] = clock
    for source in config.sources:
        app.router.add_route("*", source.path, make_handler(source, config.upstreams_of(source.name)))
    app.router.add_get("/healthz", healthz)
    app.router.add_route("*", "/{tail:.*}", not_found)
    return app
