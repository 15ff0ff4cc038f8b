"""The JSON API of the admin listener. Handlers parse, make one call, render."""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
from dataclasses import replace
from typing import Any

from aiohttp import web

from relay.compare import Comparison, compare_attempts, compare_deliveries
from relay.events import Event
from relay.export import original_curl
from relay.filters import STATES, FilterError, parse_filter
from relay.keys import BULK, CLOCK, CONFIG, EVENTS, HTTP_CLIENT, METRICS, STORE
from relay.model import Attempt
from relay.render import attempt_event, attempt_json, delivery_json, summary_json, timeline_json
from relay.replay import ReplayError, ReplayRequest, bulk_filter, check_target, replay
from relay.reverify import reverify
from relay.sender import RESPONSE_BODY_CAP
from relay.store import NotFound

log = logging.getLogger(__name__)

SSE_HEARTBEAT_SECONDS = 15.0
MAX_ID = 2**63 - 1  # SQLite INTEGER range


def delivery_id(request: web.Request, name: str = "id") -> int:
    text = request.match_info[name]
    if not (text.isascii() and text.isdigit()) or int(text) > MAX_ID:
        raise NotFound(f"no delivery {text[:40]!r}")
    return int(text)


async def list_deliveries(request: web.Request) -> web.Response:
    f = parse_filter(request.query, request.app[CLOCK]())
    page, cursor = await request.app[STORE].list_deliveries(f)
    return web.json_response({"deliveries": [summary_json(s) for s in page], "next": cursor})


async def get_delivery(request: web.Request) -> web.Response:
    delivery = await request.app[STORE].get_delivery(delivery_id(request))
    return web.json_response(delivery_json(delivery))


async def get_raw(request: web.Request) -> web.Response:
    """The raw body, as a download, in a sandbox: it must never run as a page of this origin."""
    delivery = await request.app[STORE].get_delivery(delivery_id(request))
    if delivery.body is None:
        raise NotFound(f"delivery {delivery.id} has no stored body (it was over max_body_bytes)")
    content_type = next((v for k, v in delivery.headers if k.lower() == "content-type"), "application/octet-stream")
    return web.Response(
        body=delivery.body,
        headers={
            "Content-Type": content_type,
            "Content-Disposition": f'attachment; filename="delivery-{delivery.id}.body"',
            "Content-Security-Policy": "sandbox; default-src 'none'",
        },
    )


async def get_prediction(request: web.Request) -> web.Response:
    prediction_id = request.match_info["id"]
    deliveries = await request.app[STORE].prediction_deliveries(prediction_id)
    if not deliveries:
        raise NotFound(f"no deliveries for prediction {prediction_id!r}")
    return web.json_response(timeline_json(prediction_id, deliveries))


def sse_frame(event: Event) -> bytes:
    return f"id: {event.id}\nevent: {event.kind}\ndata: {json.dumps(event.data)}\n\n".encode()


async def events(request: web.Request) -> web.StreamResponse:
    """Server-Sent Events: one ``delivery`` or ``attempt`` event per change, with heartbeats."""
    headers = {"Content-Type": "text/event-stream", "Cache-Control": "no-store", "X-Accel-Buffering": "no"}
    if request.method == "HEAD":
        return web.Response(headers=headers)
    response = web.StreamResponse(headers=headers)
    await response.prepare(request)
    try:
        await response.write(b"retry: 2000\n: connected\n\n")
        async with request.app[EVENTS].subscribe() as queue:
            while True:
                try:
                    event = await asyncio.wait_for(queue.get(), SSE_HEARTBEAT_SECONDS)
                except TimeoutError:
                    await response.write(b": heartbeat\n\n")
                    continue
                if event is None:
                    break
                await response.write(sse_frame(event))
    except ConnectionResetError:
        log.debug("event stream client went away")  # the normal end of a browser tab
    return response


async def metrics(request: web.Request) -> web.Response:
    registry = request.app[METRICS]
    counts = await request.app[STORE].outbox_states()
    for state in STATES:
        registry.outbox_depth.labels(state).set(counts.get(state, 0))
    return web.Response(body=registry.render(), content_type="text/plain", charset="utf-8")


async def read_json(request: web.Request) -> dict[str, Any]:
    """A JSON object body, or a 400 that says what is wrong."""
    if not request.body_exists:
        return {}
    try:
        data = await request.json()
    except ValueError:
        raise web.HTTPBadRequest(
            text=json.dumps({"error": "body is not valid JSON"}), content_type="application/json"
        ) from None
    if not isinstance(data, dict):
        raise web.HTTPBadRequest(text=json.dumps({"error": "expected a JSON object"}), content_type="application/json")
    return data


def replay_request(data: dict[str, Any], kind: str = "replay") -> ReplayRequest:
    """Validate the JSON of a replay request (single or bulk)."""
    upstream, url, body, secret, webhook_id = (data.get(k) for k in ("upstream", "url", "body", "secret", "webhook_id"))
    for name, value in (
        ("upstream", upstream),
        ("url", url),
        ("body", body),
        ("secret", secret),
        ("webhook_id", webhook_id),
    ):
        if value is not None and not isinstance(value, str):
            raise ReplayError(f"{name}: expected a string")
    resign = data.get("resign", True)
    if not isinstance(resign, bool):
        raise ReplayError("resign: expected true or false")
    return ReplayRequest(
        upstream=upstream or None,
        url=url or None,
        resign=resign,
        body=body.encode("utf-8") if isinstance(body, str) else None,
        webhook_id=webhook_id or None,
        secret=secret or None,
        kind=kind,
    )


async def replay_one(request: web.Request) -> web.Response:
    req = replay_request(await read_json(request))
    app = request.app
    attempt = await replay(app[STORE], app[HTTP_CLIENT], app[CONFIG], app[CLOCK], delivery_id(request), req)
    app[EVENTS].publish("attempt", attempt_event(attempt))
    return web.json_response({"attempt": attempt_json(attempt)})


BULK_CAP = 10_000


async def replay_bulk(request: web.Request) -> web.Response:
    """Queue a replay of ids or of every delivery matching a filter; progress via /api/replay/{job}."""
    data = await read_json(request)
    app = request.app
    ids = data.pop("ids", None)
    raw_filter = data.pop("filter", None)
    req = replay_request(data)
    check_target(app[CONFIG], req)
    if ids is not None:
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise ReplayError("ids: expected a list of delivery ids")
        selected = list(dict.fromkeys(ids))
    else:
        if not isinstance(raw_filter, dict):
            raise ReplayError("give ids or a filter")
        params = bulk_filter({str(k): str(v) for k, v in raw_filter.items()}, req)
        f = parse_filter(params, app[CLOCK]())
        selected = await app[STORE].delivery_ids(f, BULK_CAP)
    progress = app[BULK].start(selected, req)
    return web.json_response({"queued": len(selected), "job": progress.job}, status=202)


async def replay_job(request: web.Request) -> web.Response:
    text = request.match_info["job"]
    progress = request.app[BULK].get(int(text)) if text.isascii() and text.isdigit() else None
    if progress is None:
        raise NotFound(f"no replay job {text!r}")
    return web.json_response(progress.as_json())


async def verify_delivery(request: web.Request) -> web.Response:
    data = await read_json(request)
    secret = data.get("secret")
    if secret is not None and not isinstance(secret, str):
        raise ReplayError("secret: expected a string")
    delivery = await request.app[STORE].get_delivery(delivery_id(request))
    return web.json_response(reverify(request.app[CONFIG], delivery, secret or None))


def _int_param(request: web.Request, name: str) -> int | None:
    text = request.query.get(name)
    if text is None or text == "":
        return None
    if not (text.isascii() and text.isdigit()) or int(text) > MAX_ID:
        raise FilterError(name, f"expected an id, got {text[:40]!r}")
    return int(text)


async def diff(request: web.Request) -> web.Response:
    return web.json_response((await compute_diff(request)).result)


async def compute_diff(request: web.Request) -> Comparison:
    """Parse the diff parameters (shared by GET /api/diff and the /diff page) and compare."""
    store = request.app[STORE]
    attempt_b = _int_param(request, "attempt_b")
    if attempt_b is not None:
        return await compare_attempts(store, _int_param(request, "attempt_a"), attempt_b)
    b = _int_param(request, "b")
    if b is None:
        raise FilterError("b", "required (a delivery id)")
    return await compare_deliveries(store, _int_param(request, "a"), b)


async def export(request: web.Request) -> web.Response:
    """``?format=curl`` (default) or ``json``: the delivery as a reproducible request."""
    delivery = await request.app[STORE].get_delivery(delivery_id(request))
    fmt = request.query.get("format", "curl")
    if fmt == "json":
        return web.json_response(delivery_json(delivery))
    if fmt != "curl":
        raise FilterError("format", "expected curl or json")
    return web.Response(text=original_curl(delivery), content_type="text/plain")


async def record_client_attempt(request: web.Request) -> web.Response:
    """Record an attempt made elsewhere (``relay connect`` on a laptop), so the team sees it."""
    data = await read_json(request)
    store = request.app[STORE]
    delivery = await store.get_delivery(delivery_id(request))
    try:
        if data.get("kind") != "connect":
            raise ValueError("kind: only 'connect' attempts are recorded this way")
        status = data.get("status")
        if status is not None and (not isinstance(status, int) or isinstance(status, bool)):
            raise ValueError("status: expected an integer or null")
        attempt = Attempt(
            delivery_id=delivery.id,
            kind="connect",
            target=str(data["target"])[:2000],
            started_at=float(data["started_at"]),
            duration_ms=float(data["duration_ms"]),
            status=status,
            response_headers=tuple((str(k), str(v)) for k, v in data.get("response_headers", [])),
            response_body=base64.b64decode(str(data.get("response_body_base64", "")))[:RESPONSE_BODY_CAP],
            response_truncated=bool(data.get("response_truncated", False)),
            error=None if data.get("error") is None else str(data["error"])[:2000],
            outcome="error" if status is None else ("delivered" if 200 <= status <= 299 else "failed"),
        )
    except (KeyError, TypeError, ValueError, binascii.Error) as exc:
        raise ReplayError(f"bad attempt record: {exc}") from None
    attempt_id = await store.record_attempt(attempt)
    request.app[EVENTS].publish("attempt", attempt_event(replace(attempt, id=attempt_id)))
    return web.json_response({"attempt": attempt_id}, status=201)


def add_routes(app: web.Application) -> None:
    app.router.add_get("/api/deliveries", list_deliveries)
    app.router.add_get("/api/deliveries/{id}", get_delivery)
    app.router.add_get("/api/deliveries/{id}/raw", get_raw)
    app.router.add_get("/api/deliveries/{id}/export", export)
    app.router.add_post("/api/deliveries/{id}/replay", replay_one)
    app.router.add_post("/api/deliveries/{id}/verify", verify_delivery)
    app.router.add_post("/api/deliveries/{id}/attempts", record_client_attempt)
    app.router.add_post("/api/replay", replay_bulk)
    app.router.add_get("/api/replay/{job}", replay_job)
    app.router.add_get("/api/diff", diff)
    app.router.add_get("/api/predictions/{id}", get_prediction)
    app.router.add_get("/api/events", events)
    app.router.add_get("/metrics", metrics)
