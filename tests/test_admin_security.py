"""Admin-side security against real relays on real sockets (SPEC §6).

Token auth on every route, browser login with a hardened cookie and no open
redirect, DNS-rebinding defence without a token, CSRF defences on
state-changing requests, stored and reflected XSS in every page, security
headers, and secrets that never leave the process.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import subprocess
import sys
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from relay.admin import create_admin_app
from relay.config import Config, ConfigError, parse_config
from relay.lifecycle import encode
from relay.service import Relay

from support import SECRET, free_port, lifecycle_bodies, make_config, raw_request, signed, wait_until

TOKEN = "s3cret-token"
INGEST_PATH = "/webhooks/replicate"
PUBLIC = ("/healthz", "/login", "/static")
XSS_SCRIPT = "<script>alert(1)</script>"
XSS_IMG = '"><img src=x onerror=alert(1)>'
XSS_ID = "<svg onload=alert(1)><script>alert(1)"  # no '/': it must fit in one path segment


def token_config(database: str, *, upstreams: list[dict[str, Any]] | None = None, **relay: Any) -> Config:
    """make_config's shape, with ui_token_env resolved from an explicit environment."""
    raw = {
        "relay": {
            "database": database,
            "ingest_listen": "127.0.0.1:0",
            "ui_listen": "127.0.0.1:0",
            "ui_token_env": "TOK",
            **relay,
        },
        "sources": [{"name": "replicate", "path": INGEST_PATH, "secret": SECRET}],
        "upstreams": [
            {"name": f"up{i}", "source": "replicate", "retry_base_seconds": 0.05, "retry_max_seconds": 0.2, **u}
            for i, u in enumerate(upstreams or [])
        ],
    }
    return parse_config(raw, env={"TOK": TOKEN})


async def ingest(
    http: aiohttp.ClientSession, relay: Relay, body: bytes, headers: dict[str, str], query: str = ""
) -> int:
    assert relay.bound is not None
    url = relay.bound.ingest_url + INGEST_PATH + (f"?{query}" if query else "")
    async with http.post(url, data=body, headers=headers) as resp:
        assert resp.status in (200, 400), await resp.text()
        return int((await resp.json())["delivery"])


def admin(relay: Relay) -> str:
    assert relay.bound is not None
    return relay.bound.admin_url


def port(relay: Relay) -> int:
    return int(admin(relay).rsplit(":", 1)[1])


# --- start-up refusal ---------------------------------------------------------------------------


@pytest.mark.parametrize("listen", ["0.0.0.0:8081", "[::]:8081", "192.0.2.10:8081", "relay.example.com:8081"])
def test_non_loopback_ui_without_token_is_refused(tmp_path: Path, listen: str) -> None:
    with pytest.raises(ConfigError, match=r"relay\.ui_listen"):
        make_config(str(tmp_path / "r.db"), relay={"ui_listen": listen})
    # Naming a token variable that is unset or blank is no token at all.
    for env in ({}, {"TOK": "   "}):
        raw = {"relay": {"database": str(tmp_path / "r.db"), "ui_listen": listen, "ui_token_env": "TOK"}}
        with pytest.raises(ConfigError, match=r"relay\.ui_listen"):
            parse_config(raw, env=env)
    # Loopback needs no token.
    assert make_config(str(tmp_path / "r.db"), relay={"ui_listen": "localhost:0"}).relay.ui_token is None


def test_relay_serve_refuses_to_start_on_a_public_address_without_token(tmp_path: Path) -> None:
    config = tmp_path / "relay.toml"
    config.write_text(
        f'[relay]\ndatabase = "{tmp_path / "r.db"}"\ningest_listen = "127.0.0.1:{free_port()}"\n'
        f'ui_listen = "0.0.0.0:{free_port()}"\n\n[[sources]]\nname = "replicate"\npath = "/webhooks/replicate"\n'
    )
    result = subprocess.run(
        [sys.executable, "-m", "relay", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
    )
    assert result.returncode != 0
    assert "relay.ui_listen" in result.stderr
    assert not (tmp_path / "r.db").exists()


async def test_public_address_with_token_starts_and_demands_the_token(
    relay_factory: Any, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    relay = await relay_factory(token_config(str(tmp_path / "r.db"), ui_listen="0.0.0.0:0"))
    base = f"http://127.0.0.1:{port(relay)}"
    async with http.get(base + "/api/deliveries") as resp:
        assert resp.status == 401
    async with http.get(base + "/api/deliveries", headers={"Authorization": f"Bearer {TOKEN}"}) as resp:
        assert resp.status == 200


# --- token authentication on every route ----------------------------------------------------------


def route_table(relay: Relay) -> list[tuple[str, str]]:
    """(method, path template) of every admin route, from an app built by the relay's own factory."""
    assert relay.store is not None and relay.client is not None
    app = create_admin_app(relay.config, relay.store, relay.metrics, relay.events, relay.clock, relay.client)
    table = []
    for route in app.router.routes():
        canonical = route.resource.canonical if route.resource is not None else ""
        table.append((route.method, canonical))
    return table


def fill(template: str, delivery: int, prediction: str) -> str:
    if "{" not in template:
        return template
    value = prediction if "predictions/" in template else str(delivery)
    return re.sub(r"\{[^}]+\}", value, template)


async def head(url: str, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    """HEAD on a socket of its own, reading only the status line and headers.

    (A HEAD answer that wrongly carries a body is test_api's concern; here only the auth decision counts.)
    """
    from yarl import URL

    target = URL(url)
    reader, writer = await asyncio.open_connection(target.host, target.port)
    try:
        lines = [f"HEAD {target.raw_path_qs} HTTP/1.1", f"Host: {target.host}:{target.port}", "Connection: close"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    finally:
        writer.close()
        await writer.wait_closed()
    status_line, *header_lines = raw.decode("latin-1").split("\r\n")
    parsed = dict(line.split(": ", 1) for line in header_lines if ": " in line)
    return int(status_line.split(" ")[1]), parsed, b""


async def call(
    http: aiohttp.ClientSession, method: str, url: str, headers: dict[str, str]
) -> tuple[int, dict[str, str], bytes]:
    if method == "HEAD":
        return await head(url, headers)
    kwargs: dict[str, Any] = {"headers": dict(headers), "allow_redirects": False}
    if method != "GET":
        kwargs["headers"]["Content-Type"] = "application/json"
        kwargs["data"] = b"{}"
    async with http.request(method, url, **kwargs) as resp:
        if resp.content_type == "text/event-stream":
            return resp.status, dict(resp.headers), b""
        return resp.status, dict(resp.headers), await resp.read()


async def test_every_route_but_the_public_ones_needs_the_token(
    relay_factory: Any, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    relay = await relay_factory(token_config(str(tmp_path / "r.db")))
    bodies = lifecycle_bodies("authpred")
    delivery = 0
    for body in bodies:
        delivery = await ingest(http, relay, body, signed(body))
    table = route_table(relay)
    templates = {t for _, t in table}
    for needed in (
        "/",
        "/deliveries/{id}",
        "/predictions/{id}",
        "/api/deliveries",
        "/api/deliveries/{id}",
        "/api/deliveries/{id}/raw",
        "/api/predictions/{id}",
        "/api/events",
        "/metrics",
        "/logout",
    ):
        assert needed in templates, needed
    # A fresh connection per request: one misbehaving stream must not desync the next answer.
    fresh = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))
    try:
        await walk(fresh, relay, table, delivery)
    finally:
        await fresh.close()


async def walk(http: aiohttp.ClientSession, relay: Relay, table: list[tuple[str, str]], delivery: int) -> None:
    checked = 0
    for method, template in table:
        if template.startswith(PUBLIC):
            continue
        url = admin(relay) + fill(template, delivery, "authpred")
        is_api = template.startswith("/api/") or template == "/metrics"
        for headers in ({}, {"Authorization": "Bearer wrong-token"}, {"Authorization": f"Basic {TOKEN}"}):
            status, resp_headers, body = await call(http, method, url, headers)
            if is_api or method not in ("GET", "HEAD"):
                assert status == 401, (method, template, headers, status)
                assert resp_headers.get("WWW-Authenticate", "").startswith("Bearer")
                if method != "HEAD":
                    assert "error" in json.loads(body), (method, template)
            else:
                assert status == 303, (method, template, headers, status)
                assert resp_headers["Location"].startswith("/login?next=/"), resp_headers["Location"]
        # With the token: answered on the merits (200, or 400/404 for the placeholder values), never refused.
        status, _, _ = await call(http, method, url, {"Authorization": f"Bearer {TOKEN}"})
        assert status not in (401, 403, 415) and status < 500, (method, template, status)
        if template in ("/", "/api/deliveries", "/metrics", "/deliveries/{id}", "/api/deliveries/{id}"):
            assert status == 200, (method, template, status)
        checked += 1
    assert checked >= 15
    # The public ones really are public.
    for path in ("/healthz", "/login", "/static/app.js", "/static/style.css"):
        async with http.get(admin(relay) + path, allow_redirects=False) as resp:
            assert resp.status == 200, path


async def test_browser_login_sets_a_hardened_cookie_and_never_redirects_off_site(
    relay_factory: Any, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    relay = await relay_factory(token_config(str(tmp_path / "r.db")))
    body = lifecycle_bodies("loginpred")[0]
    delivery = await ingest(http, relay, body, signed(body))
    base = admin(relay)

    async with http.get(base + f"/deliveries/{delivery}", allow_redirects=False) as resp:
        assert resp.status == 303
        login_url = resp.headers["Location"]
    assert login_url == f"/login?next=/deliveries/{delivery}"
    async with http.get(base + login_url) as resp:
        assert resp.status == 200
        page = await resp.text()
    assert f'name="next" value="/deliveries/{delivery}"' in page

    async def login(token: str, next_: str, **headers: str) -> aiohttp.ClientResponse:
        resp = await http.post(
            base + "/login", data={"token": token, "next": next_}, headers=headers, allow_redirects=False
        )
        await resp.read()
        resp.release()
        return resp

    resp = await login(TOKEN, f"/deliveries/{delivery}")
    assert resp.status == 303 and resp.headers["Location"] == f"/deliveries/{delivery}"
    set_cookie = resp.headers["Set-Cookie"]
    cookie = SimpleCookie()
    cookie.load(set_cookie)
    assert list(cookie) == ["relay_session"]
    morsel = cookie["relay_session"]
    assert morsel["httponly"] is True
    assert morsel["samesite"].lower() == "strict"
    assert morsel["path"] == "/"
    assert morsel.value and TOKEN not in morsel.value
    jar = {"Cookie": f"relay_session={morsel.value}"}
    for path in ("/", f"/deliveries/{delivery}", "/predictions/loginpred", "/api/deliveries", "/metrics"):
        async with http.get(base + path, headers=jar, allow_redirects=False) as resp:
            assert resp.status == 200, path
    async with http.get(base + "/api/deliveries", headers={"Cookie": "relay_session=forged"}) as resp:
        assert resp.status == 401

    wrong = await http.post(base + "/login", data={"token": "not-it", "next": "/"}, allow_redirects=False)
    assert wrong.status == 401 and "Set-Cookie" not in wrong.headers
    assert wrong.content_type == "text/html" and "not right" in await wrong.text()
    wrong.release()

    for evil in ("//evil.example", "https://evil.example/", "/\\evil.example", "\\\\evil.example", "evil.example"):
        resp = await login(TOKEN, evil)
        assert resp.status == 303 and resp.headers["Location"] == "/", (evil, resp.headers["Location"])
        async with http.get(base + "/login", params={"next": evil}) as page_resp:
            assert 'name="next" value="/"' in await page_resp.text()

    # Login is itself protected against cross-site form posts.
    resp = await login(TOKEN, "/", Origin="http://evil.example")
    assert resp.status == 403 and "Set-Cookie" not in resp.headers


# --- DNS rebinding and CSRF ----------------------------------------------------------------------------


async def test_foreign_host_header_is_refused_without_a_token(relay_factory: Any, http: aiohttp.ClientSession) -> None:
    relay = await relay_factory()
    p = port(relay)
    for host in ("evil.example:8081", "evil.example", f"evil.example:{p}", f"127.0.0.1.evil.example:{p}"):
        for path in ("/api/deliveries", "/", "/metrics", "/api/events"):
            async with http.get(admin(relay) + path, headers={"Host": host}, allow_redirects=False) as resp:
                assert resp.status == 403, (host, path, resp.status)
    for host in (f"localhost:{p}", f"127.0.0.1:{p}", "localhost", f"[::1]:{p}"):
        for path in ("/api/deliveries", "/", "/metrics"):
            async with http.get(admin(relay) + path, headers={"Host": host}, allow_redirects=False) as resp:
                assert resp.status == 200, (host, path, resp.status)


async def test_state_changing_requests_need_json_and_same_origin(
    relay_factory: Any, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    for relay, auth in (
        (await relay_factory(), {}),
        (await relay_factory(token_config(str(tmp_path / "t.db"))), {"Authorization": f"Bearer {TOKEN}"}),
    ):
        own = f"http://127.0.0.1:{port(relay)}"
        url = admin(relay) + "/logout"

        async def post(
            data: bytes, content_type: str, extra: dict[str, str], url: str = url, auth: dict[str, str] = auth
        ) -> int:
            headers = {**auth, "Content-Type": content_type, **extra}
            async with http.post(url, data=data, headers=headers, allow_redirects=False) as resp:
                if resp.status in (403, 415):
                    assert "error" in await resp.json()
                return resp.status

        json_ = "application/json"
        assert await post(b"{}", json_, {"Origin": "http://evil.example"}) == 403
        assert await post(b"{}", json_, {"Origin": f"http://evil.example:{port(relay)}"}) == 403
        assert await post(b"{}", json_, {"Origin": "null"}) == 403
        assert await post(b"{}", json_, {"Referer": "http://evil.example/page"}) == 403
        for form in ("application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "text/plain"):
            assert await post(b"a=1", form, {}) == 415, form
            assert await post(b"a=1", form, {"Origin": own}) == 415, form
        assert await post(b"{}", json_, {"Origin": own}) == 200
        assert await post(b"{}", json_, {}) == 200
        assert await post(b"{}", "application/json; charset=utf-8", {"Referer": own + "/"}) == 200


# --- stored and reflected XSS ---------------------------------------------------------------------------


def check_html(path: str, text: str, headers: Any) -> None:
    assert headers.get("Content-Type", "").startswith("text/html"), (path, headers.get("Content-Type"))
    csp = headers.get("Content-Security-Policy", "")
    directives = {d.strip().split(" ", 1)[0]: d.strip() for d in csp.split(";") if d.strip()}
    script_src = directives.get("script-src") or directives.get("default-src")
    assert script_src, (path, csp)
    assert "'unsafe-inline'" not in script_src and "'unsafe-eval'" not in script_src, (path, csp)
    assert headers.get("X-Content-Type-Options") == "nosniff", path
    lowered = text.lower()
    scripts = re.findall(r"<script\b[^>]*>", lowered)
    assert all(re.search(r'src="/static/app\.js(\?[^"]*)?"', s) for s in scripts), (path, scripts)
    assert "<img" not in lowered and "<svg" not in lowered, path
    assert "onerror=alert(1)>" not in lowered.replace("onerror=alert(1)&gt;", ""), path


async def test_payloads_in_bodies_headers_queries_and_ids_are_escaped_everywhere(
    relay_factory: Any, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    relay = await relay_factory()
    ids: dict[str, int] = {}
    prediction_body = encode(
        {
            "id": XSS_ID,
            "status": XSS_IMG,
            "model": XSS_SCRIPT,
            "version": XSS_IMG,
            "input": {"prompt": XSS_SCRIPT},
            "logs": XSS_IMG,
            "created_at": XSS_SCRIPT,
            "metrics": {"predict_time": XSS_IMG},
        }
    )
    ids["prediction"] = await ingest(http, relay, prediction_body, signed(prediction_body))
    second = encode({"id": XSS_ID, "status": "succeeded", "output": [XSS_IMG]})
    ids["prediction2"] = await ingest(http, relay, second, signed(second))
    img_body = encode({"id": XSS_IMG, "status": "starting", "note": XSS_IMG})
    ids["img"] = await ingest(http, relay, img_body, signed(img_body))
    html_body = f"{XSS_SCRIPT}{XSS_IMG}".encode()
    ids["html"] = await ingest(http, relay, html_body, {**signed(html_body), "Content-Type": "text/html"})
    header_body = b'{"id": "hdr", "status": "starting"}'
    ids["header"] = await ingest(http, relay, header_body, {**signed(header_body), "X-Evil": XSS_SCRIPT + XSS_IMG})
    webhook_id_body = b'{"id": "wid", "status": "starting"}'
    ids["webhook_id"] = await ingest(
        http, relay, webhook_id_body, signed(webhook_id_body, msg_id=XSS_SCRIPT), query="a=1"
    )
    # A raw query string with markup in it, written on the wire as is.
    query_body = b'{"id": "qry", "status": "starting"}'
    head = (
        f'POST {INGEST_PATH}?x={XSS_SCRIPT}&y="><img/src=x/onerror=alert(1)> HTTP/1.1\r\nHost: relay.test\r\n'.encode()
        + b"".join(f"{k}: {v}\r\n".encode() for k, v in signed(query_body).items())
        + f"Content-Length: {len(query_body)}\r\nConnection: close\r\n\r\n".encode()
    )
    status, payload = await raw_request(relay.bound.ingest_url, head, query_body)
    assert status == 200, payload
    ids["query"] = json.loads(payload)["delivery"]
    stored = await relay.store.get_delivery(ids["query"])
    assert XSS_SCRIPT in stored.query

    base = admin(relay)
    pages = [
        ("/", True),
        ("/?q=alert", True),
        (f"/?status={XSS_IMG}", True),
        (f"/?verdict={XSS_SCRIPT}", True),  # a reflected filter error
        (f"/?prediction={XSS_SCRIPT}", True),
        ("/ui/rows", True),
        *[(f"/deliveries/{i}", name != "img") for name, i in ids.items()],
        (f"/predictions/{XSS_ID}", True),
        (f"/predictions/{XSS_IMG}", False),
        (f"/deliveries/{XSS_ID}", True),  # reflected in the 404 page
        (f"/predictions/{XSS_ID}nope", True),
    ]
    for path, shows_script in pages:
        async with http.get(base + path, allow_redirects=False) as resp:
            text = await resp.text()
            assert resp.status in (200, 400, 404), (path, resp.status)
            if path.startswith("/ui/rows"):
                assert resp.headers.get("X-Content-Type-Options") == "nosniff"
                assert not re.search(r"<(script|img|svg)", text.lower()), path
            else:
                check_html(path, text, resp.headers)
            if shows_script:
                assert "&lt;script&gt;" in text, path
            elif resp.status == 200:
                assert "&lt;img src=x onerror=alert(1)&gt;" in text, path
    # The delivery page shows each payload escaped, where it came from.
    for name in ("header", "html", "query", "webhook_id", "prediction"):
        async with http.get(f"{base}/deliveries/{ids[name]}") as resp:
            assert "&lt;script&gt;alert(1)&lt;/script&gt;" in await resp.text(), name
    # The raw body is a sandboxed download even when the sender called it HTML.
    async with http.get(f"{base}/api/deliveries/{ids['html']}/raw") as resp:
        assert await resp.read() == html_body
        assert resp.headers["Content-Disposition"].startswith("attachment")
        assert "sandbox" in resp.headers["Content-Security-Policy"]
        assert resp.headers["X-Content-Type-Options"] == "nosniff"
    # The JSON API is JSON, never HTML.
    for path in (f"/api/deliveries/{ids['html']}", "/api/deliveries", f"/api/deliveries/{XSS_SCRIPT}"):
        async with http.get(base + path) as resp:
            assert resp.content_type == "application/json", path
            assert resp.headers["X-Content-Type-Options"] == "nosniff"


# --- secrets never leave -------------------------------------------------------------------------------


async def test_source_secret_and_ui_token_never_appear_in_answers_pages_metrics_or_logs(
    relay_factory: Any, upstream_factory: Any, http: aiohttp.ClientSession, tmp_path: Path, caplog: Any
) -> None:
    caplog.set_level(logging.DEBUG)
    plain = await upstream_factory(script=[503], then=200)
    resigning = await upstream_factory(then=400)
    db = tmp_path / "r.db"
    relay = await relay_factory(
        token_config(str(db), upstreams=[{"url": plain.url}, {"url": resigning.url, "resign": True}])
    )
    secret_parts = (SECRET, SECRET.removeprefix("whsec_"), TOKEN)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    ids = []
    for body in lifecycle_bodies("secretpred"):
        ids.append(await ingest(http, relay, body, signed(body)))
    wrong = b'{"id": "secret-wrong", "status": "failed"}'
    ids.append(await ingest(http, relay, wrong, signed(wrong, key=b"another key")))
    unsigned = b'{"id": "secret-unsigned", "status": "starting"}'
    ids.append(await ingest(http, relay, unsigned, signed(unsigned, key=None)))

    async def settled() -> bool:
        return "pending" not in await relay.store.outbox_states()

    await wait_until(settled, timeout=15)
    assert len(resigning.received) == 4 and len(plain.received) == 5

    base = admin(relay)
    seen: list[tuple[str, str]] = []

    async def fetch(method: str, path: str, **kwargs: Any) -> None:
        async with http.request(method, base + path, allow_redirects=False, **kwargs) as resp:
            text = await resp.text(errors="replace")
            seen.append((path, f"{resp.status} {dict(resp.headers)}\n{text}"))

    for path in ("/", "/?q=secretpred", "/ui/rows", "/predictions/secretpred", "/metrics", "/login", "/healthz"):
        await fetch("GET", path, headers=auth)
    for did in ids:
        for path in (f"/deliveries/{did}", f"/api/deliveries/{did}", f"/api/deliveries/{did}/raw"):
            await fetch("GET", path, headers=auth)
    for path in ("/api/deliveries", "/api/deliveries?limit=500", "/api/predictions/secretpred", "/api/deliveries/999"):
        await fetch("GET", path, headers=auth)
    await fetch("GET", "/api/deliveries")  # 401
    await fetch("GET", "/")  # 303
    await fetch("POST", "/login", data={"token": "s3cret-token-but-wrong", "next": "/"})
    await fetch("POST", "/login", data={"token": TOKEN, "next": "/"})
    await fetch("POST", "/logout", headers={**auth, "Content-Type": "application/json"}, data=b"{}")
    async with http.get(base + "/api/events", headers=auth) as resp:
        first = await asyncio.wait_for(resp.content.readline(), 5)
        seen.append(("/api/events", first.decode()))
    # What the relay sent onwards: re-signed with the key, never carrying it.
    for upstream in (plain, resigning):
        for received in upstream.received:
            seen.append(("upstream", f"{received.headers}\n{received.body!r}"))

    leaks = [(where, part) for where, text in seen for part in secret_parts if part in text]
    assert not leaks, leaks
    assert len(seen) > 30
    log_text = caplog.text + "\n".join(r.getMessage() for r in caplog.records)
    assert caplog.records, "nothing was logged at all"
    assert not [part for part in secret_parts if part in log_text]
    # Nor are they written to the database.
    await relay.stop()
    for path in tmp_path.glob("r.db*"):
        data = path.read_bytes()
        assert not [part for part in secret_parts if part.encode() in data], path


async def test_token_is_compared_exactly(relay_factory: Any, http: aiohttp.ClientSession, tmp_path: Path) -> None:
    relay = await relay_factory(token_config(str(tmp_path / "r.db")))
    url = admin(relay) + "/api/deliveries"
    for presented in (TOKEN[:-1], TOKEN + "x", TOKEN.upper(), "", " ", f"{TOKEN} {TOKEN}", "s3cret"):
        async with http.get(url, headers={"Authorization": f"Bearer {presented}"}) as resp:
            assert resp.status == 401, presented
    async with http.get(url, headers={"Authorization": f"Bearer {TOKEN}"}) as resp:
        assert resp.status == 200


async def test_login_without_a_token_configured_just_goes_home(relay_factory: Any, http: aiohttp.ClientSession) -> None:
    relay = await relay_factory()
    async with http.get(admin(relay) + "/login", allow_redirects=False) as resp:
        assert resp.status == 303 and resp.headers["Location"] == "/"
    async with http.post(admin(relay) + "/login", data={"token": "x"}, allow_redirects=False) as resp:
        assert resp.status == 303 and "Set-Cookie" not in resp.headers
