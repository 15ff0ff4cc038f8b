"""The admin listener: JSON API, browser UI and metrics, behind the checks of relay.auth."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web

from relay import api, ui
from relay.auth import is_api_path, security, set_security_headers
from relay.config import Config
from relay.deadline import body_deadline
from relay.events import EventBus
from relay.filters import FilterError
from relay.http_client import HttpClient
from relay.ingest import healthz
from relay.keys import BULK, CLOCK, CONFIG, EVENTS, HTTP_CLIENT, METRICS, STORE, Clock
from relay.metrics import Metrics
from relay.replay import BulkReplays, ReplayError
from relay.store import NotFound, Store, StoreUnavailable

log = logging.getLogger(__name__)


@web.middleware
async def errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """The one place domain errors become answers: JSON for the API, a page for the UI."""
    try:
        return await handler(request)
    except NotFound as exc:
        status, message, extra = 404, str(exc), {}
    except FilterError as exc:
        status, message, extra = 400, str(exc), {"param": exc.param}
    except ReplayError as exc:
        status, message, extra = 400, str(exc), {}
    except StoreUnavailable as exc:
        log.error("admin %s %s: database unavailable: %s", request.method, request.path, exc)
        status, message, extra = 503, "database unavailable", {}
    except web.HTTPException as exc:
        if exc.status < 400 or not is_api_path(request.path):
            raise
        if exc.content_type == "application/json":
            raise
        status, message, extra = exc.status, exc.reason.lower(), {}
    if is_api_path(request.path):
        return web.json_response({"error": message, **extra}, status=status)
    return ui.render_page(request, "error.html", {"status": status, "message": message}, status)


async def bulk_replays(app: web.Application) -> AsyncIterator[None]:
    """Bulk replay jobs live as long as the admin app; cancelled at shutdown."""
    app[BULK] = BulkReplays(app[STORE], app[HTTP_CLIENT], app[CONFIG], app[CLOCK], app[EVENTS])
    yield
    await app[BULK].close()


def create_admin_app(
    config: Config, store: Store, metrics: Metrics, events: EventBus, clock: Clock, client: HttpClient
) -> web.Application:
    """The admin listener's app; every part is passed in, nothing is global."""
    # body_deadline last: a slow body is waited for only after the security checks pass.
    app = web.Application(middlewares=[security, errors, body_deadline])
    app[CONFIG] = config
    app[STORE] = store
    app[METRICS] = metrics
    app[EVENTS] = events
    app[CLOCK] = clock
    app[HTTP_CLIENT] = client
    app.on_response_prepare.append(set_security_headers)
    app.cleanup_ctx.append(bulk_replays)
    app.router.add_get("/healthz", healthz)
    api.add_routes(app)
    ui.add_routes(app)
    return app
