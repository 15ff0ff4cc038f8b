"""The browser UI: server-rendered pages (Jinja2, autoescaped) over the same store calls as the API."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp_jinja2
import jinja2
from aiohttp import web

from relay import __version__
from relay.api import compute_diff, delivery_id
from relay.auth import SESSION_COOKIE, session_value, token_matches
from relay.diff import side_by_side
from relay.export import original_curl
from relay.filters import STATES, DeliveryFilter, FilterError, parse_filter
from relay.keys import CLOCK, CONFIG, STORE
from relay.model import display_text
from relay.render import body_text, pretty_body, timeline_json
from relay.store import NotFound
from relay.verify import Verdict


def web_root() -> Path:
    """Where templates and static files are: ``relay/web`` in a wheel, ``web/`` in a checkout."""
    installed = Path(__file__).resolve().parent / "web"
    if (installed / "templates").is_dir():
        return installed
    return Path(__file__).resolve().parent.parent / "web"


def _when(ts: float | None) -> str:
    if ts is None:
        return ""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + " UTC"


def _size(n: int | None) -> str:
    if n is None:
        return ""
    for unit in ("B", "KiB", "MiB"):
        if n < 1024 or unit == "MiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n = n / 1024  # type: ignore[assignment]
    return str(n)


def setup_templates(app: web.Application) -> None:
    env = aiohttp_jinja2.setup(
        app,
        loader=jinja2.FileSystemLoader(str(web_root() / "templates")),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
    env.filters["when"] = _when
    env.filters["size"] = _size
    env.filters["text"] = display_text
    env.filters["json"] = lambda value: json.dumps(value, ensure_ascii=False)  # autoescaped afterwards
    env.globals["verdicts"] = [v.value for v in Verdict]
    env.globals["states"] = STATES
    env.globals["static"] = lambda name: f"/static/{name}?v={__version__}"


def render_page(request: web.Request, template: str, context: dict[str, Any], status: int = 200) -> web.Response:
    config = request.app[CONFIG]
    base = {
        "upstreams": [u.name for u in config.upstreams],
        "sources": [s.name for s in config.sources],
        "auth": config.relay.ui_token is not None,
    }
    response = aiohttp_jinja2.render_template(template, request, {**base, **context})
    response.set_status(status)
    return response


async def index(request: web.Request) -> web.Response:
    try:
        f = parse_filter(request.query, request.app[CLOCK]())
    except FilterError as exc:
        return render_page(request, "list.html", _list_context(request, DeliveryFilter(), [], None, str(exc)), 400)
    page, cursor = await request.app[STORE].list_deliveries(f)
    return render_page(request, "list.html", _list_context(request, f, page, cursor, None))


def _list_context(
    request: web.Request, f: DeliveryFilter, page: list[Any], cursor: int | None, error: str | None
) -> dict[str, Any]:
    raw = {k: v for k, v in request.query.items() if k not in ("before", "after")}
    return {"rows": page, "next": cursor, "filter": f, "params": raw, "error": error, "live": f.before is None}


async def rows_fragment(request: web.Request) -> web.Response:
    """Rows newer than ``after`` that match the page's filters, for live updates."""
    f = parse_filter(request.query, request.app[CLOCK]())
    page, _ = await request.app[STORE].list_deliveries(f)
    return render_page(request, "_rows.html", {"rows": page})


async def delivery_page(request: web.Request) -> web.Response:
    store = request.app[STORE]
    delivery = await store.get_delivery(delivery_id(request))
    forwards = [a for f in delivery.forwarding for a in f.attempts]
    attempts = sorted([*forwards, *delivery.replays], key=lambda a: a.id or 0)
    context = {
        "d": delivery,
        # "compare with previous response": each attempt against the one made just before it
        "previous_attempt": {b.id: a.id for a, b in zip(attempts, attempts[1:], strict=False)},
        "text": body_text(delivery.body),
        "pretty": pretty_body(delivery.body),
        "previous": await store.previous_of_prediction(delivery),
        "curl": original_curl(delivery) if delivery.body is not None else None,
    }
    return render_page(request, "delivery.html", context)


async def prediction_page(request: web.Request) -> web.Response:
    prediction_id = request.match_info["id"]
    deliveries = await request.app[STORE].prediction_deliveries(prediction_id)
    if not deliveries:
        raise NotFound(f"no deliveries for prediction {prediction_id!r}")
    return render_page(
        request, "prediction.html", {"t": timeline_json(prediction_id, deliveries), "deliveries": deliveries}
    )


async def diff_page(request: web.Request) -> web.Response:
    """Side by side: the same computation as GET /api/diff, plus aligned lines for display."""
    comparison = await compute_diff(request)
    rows = side_by_side(comparison.left, comparison.right)
    return render_page(request, "diff.html", {"r": comparison.result, "rows": rows})


def safe_next(target: str | None) -> str:
    """Only same-site relative paths after login (no open redirect)."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


async def login_page(request: web.Request) -> web.Response:
    if request.app[CONFIG].relay.ui_token is None:
        raise web.HTTPSeeOther("/")
    return render_page(request, "login.html", {"next": safe_next(request.query.get("next")), "error": None})


async def login_submit(request: web.Request) -> web.Response:
    config = request.app[CONFIG]
    token = config.relay.ui_token
    if token is None:
        raise web.HTTPSeeOther("/")
    form = await request.post()
    target = safe_next(str(form.get("next", "/")))
    if not token_matches(config, str(form.get("token", ""))):
        return render_page(request, "login.html", {"next": target, "error": "That token is not right."}, 401)
    response = web.Response(status=303, headers={"Location": target})
    response.set_cookie(
        SESSION_COOKIE, session_value(token.text), httponly=True, samesite="Strict", secure=request.secure, path="/"
    )
    return response


async def logout(request: web.Request) -> web.Response:
    response = web.json_response({"logged_out": True})
    response.del_cookie(SESSION_COOKIE, path="/")
    return response


def add_routes(app: web.Application) -> None:
    setup_templates(app)
    app.router.add_get("/", index)
    app.router.add_get("/ui/rows", rows_fragment)
    app.router.add_get("/deliveries/{id}", delivery_page)
    app.router.add_get("/predictions/{id}", prediction_page)
    app.router.add_get("/diff", diff_page)
    app.router.add_get("/login", login_page)
    app.router.add_post("/login", login_submit)
    app.router.add_post("/logout", logout)
    app.router.add_static("/static/", web_root() / "static")
