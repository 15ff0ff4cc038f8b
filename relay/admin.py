"""The admin listener: JSON API, UI and metrics (loopback by default)."""

from __future__ import annotations

import aiohttp
from aiohttp import web

from relay.config import Config
from relay.events import EventBus
from relay.ingest import healthz
from relay.keys import CLOCK, CONFIG, EVENTS, METRICS, SESSION, STORE, Clock
from relay.metrics import Metrics
from relay.store import Store


async def metrics_handler(request: web.Request) -> web.Response:
    metrics = request.app[METRICS]
    for state, count in (await request.app[STORE].outbox_states()).items():
        metrics.outbox_depth.labels(state).set(count)
    return web.Response(body=metrics.render(), content_type="text/plain", charset="utf-8")


def create_admin_app(
    config: Config, store: Store, metrics: Metrics, events: EventBus, clock: Clock, session: aiohttp.ClientSession
) -> web.Application:
    app = web.Application()
    app[CONFIG] = config
    app[STORE] = store
    app[METRICS] = metrics
    app[EVENTS] = events
    app[CLOCK] = clock
    app[SESSION] = session
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics_handler)
    return app
