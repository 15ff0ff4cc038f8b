"""Admin-side protection: token auth, browser login, DNS-rebinding and CSRF defences, security headers.

Rules, in order:
* Without a token (loopback only, enforced at start-up) the ``Host`` header
  must name a loopback address, so a DNS-rebinding page cannot read the API.
* With a token, every route but ``/healthz``, ``/login`` and ``/static`` needs
  ``Authorization: Bearer <token>`` or the session cookie set by ``/login``.
* A state-changing request must be JSON (which a cross-site form cannot send
  without a CORS preflight we never grant), except the login form; and its
  ``Origin`` (or ``Referer``), when present, must be this very host.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from collections.abc import Awaitable, Callable
from urllib.parse import quote, urlsplit

from aiohttp import web

from relay.config import Config
from relay.keys import CONFIG

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
SESSION_COOKIE = "relay_session"
PUBLIC_PREFIXES = ("/healthz", "/login", "/static/")
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)


def session_value(token: str) -> str:
    """The cookie value: derived from the token, so the token itself never sits in a cookie."""
    return hmac.new(token.encode(), b"replicate-relay ui session v1", hashlib.sha256).hexdigest()


def token_matches(config: Config, presented: str) -> bool:
    token = config.relay.ui_token
    return token is not None and hmac.compare_digest(presented.encode(), token.text.encode())


def is_authenticated(request: web.Request) -> bool:
    config = request.app[CONFIG]
    token = config.relay.ui_token
    if token is None:
        return True
    header = request.headers.get("Authorization", "")
    if header.startswith("Bearer ") and token_matches(config, header[7:].strip()):
        return True
    cookie = request.cookies.get(SESSION_COOKIE, "")
    return bool(cookie) and hmac.compare_digest(cookie.encode(), session_value(token.text).encode())


def _host_is_loopback(host_header: str) -> bool:
    host = urlsplit(f"//{host_header}").hostname or ""
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _same_origin(request: web.Request) -> bool:
    """Origin, or failing that Referer, when sent, must point at the host this request names."""
    source = request.headers.get("Origin") or request.headers.get("Referer")
    if not source:
        return True
    if source == "null":
        return False
    return urlsplit(source).netloc.lower() == request.host.lower()


def is_api_path(path: str) -> bool:
    return path.startswith("/api/") or path == "/metrics"


def refuse(request: web.Request, status: int, message: str) -> web.Response:
    if is_api_path(request.path) or request.method not in SAFE_METHODS:
        return web.json_response({"error": message}, status=status)
    return web.Response(status=status, text=message, content_type="text/plain")


@web.middleware
async def security(request: web.Request, handler: Handler) -> web.StreamResponse:
    config = request.app[CONFIG]
    if config.relay.ui_token is None and not _host_is_loopback(request.host):
        return refuse(request, 403, "foreign Host header refused")
    if request.method not in SAFE_METHODS:
        if not _same_origin(request):
            return refuse(request, 403, "cross-origin request refused")
        if request.path != "/login" and request.content_type != "application/json":
            return refuse(request, 415, "state-changing requests must be JSON")
    public = request.path.startswith(PUBLIC_PREFIXES)
    if not public and not is_authenticated(request):
        if is_api_path(request.path) or request.method not in SAFE_METHODS:
            return web.json_response(
                {"error": "authentication required"}, status=401, headers={"WWW-Authenticate": "Bearer"}
            )
        raise web.HTTPSeeOther("/login?next=" + quote(request.rel_url.raw_path_qs, safe="/"))
    response = await handler(request)
    return response


async def set_security_headers(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare hook: headers every admin response carries."""
    headers = response.headers
    headers.setdefault("Content-Security-Policy", CSP)
    headers.setdefault("X-Content-Type-Options", "nosniff")
    # same-origin, not no-referrer: under no-referrer Chromium sends "Origin: null" on form
    # posts, which the same-origin check must refuse, and the login form would never work.
    headers.setdefault("Referrer-Policy", "same-origin")
    headers.setdefault("X-Frame-Options", "DENY")
    headers.setdefault("Cross-Origin-Resource-Policy", "same-origin")
    if not request.path.startswith("/static/"):
        headers.setdefault("Cache-Control", "no-store")
