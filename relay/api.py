"""The JSON API of the admin listener. Handlers parse, make one call, render."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from aiohttp import web

from relay.events import Event
from relay.filters import parse_filter
from relay.keys import CLOCK, EVENTS, METRICS, STORE
from relay.render import delivery_json, summary_json, timeline_json
from relay.store import NotFound

log = logging.getLogger(__name__)

SSE_HEARTBEAT_SECONDS = 15.0


def delivery_id(request: web.Request, name: str = "id") -> int:
    text = request.match_info[name]
    if not (text.isascii() and text.isdigit()):
        raise NotFound(f"no delivery {text!r}")
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
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store", "X-Accel-Buffering": "no"}
    )
    await response.prepare(request)
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
    return response


async def metrics(request: web.Request) -> web.Response:
    registry = request.app[METRICS]
    for state, count in (await request.app[STORE].outbox_states()).items():
        registry.outbox_depth.labels(state).set(count)
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


def add_routes(app: web.Application) -> None:
    app.router.add_get("/api/deliveries", list_deliveries)
    app.router.add_get("/api/deliveries/{id}", get_delivery)
    app.router.add_get("/api/deliveries/{id}/raw", get_raw)
    app.router.add_get("/api/predictions/{id}", get_prediction)
    app.router.add_get("/api/events", events)
    app.router.add_get("/metrics", metrics)
