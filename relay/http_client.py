"""The HTTP/1.1 client that sends deliveries onwards (forwarding, replay, ``relay connect``).

Why not aiohttp's client, which the relay uses for everything else: profiled
under load, one ``ClientSession.request`` cost 100-175 us of CPU, the largest
single cost of a delivery on the benchmark's two cores (more than ingesting
it). Sending a delivery needs little of what that machinery offers: one
request whose body is already bytes, one response read up to a cap,
keep-alive connections per origin, TLS, a deadline. Responses are parsed by
httptools (llhttp, Node.js's parser); only the request framing and the
connection pool are written here.

What it does not do, on purpose: follow redirects (a webhook sender must not),
proxies from the environment, cookies, compression. Header names and values
with CR, LF or NUL are refused (no header injection from a stored request).
"""

from __future__ import annotations

import asyncio
import base64
import collections
import socket
import ssl
from dataclasses import dataclass
from itertools import chain
from urllib.parse import unquote, urlsplit

import aiohappyeyeballs
import httptools

from relay.model import HeaderPairs

DEFAULT_PORTS = {"http": 80, "https": 443}
KEEPALIVE_SECONDS = 15.0  # an idle connection older than this is closed, not reused
MAX_IDLE_PER_ORIGIN = 128
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
HAPPY_EYEBALLS_DELAY = 0.25  # as aiohttp: try the next address (IPv4 after IPv6) after this long
_FORBIDDEN = ("\r", "\n", "\0")


class HttpError(Exception):
    """The exchange failed: the connection broke or the answer was not HTTP."""


@dataclass(frozen=True)
class Response:
    status: int
    headers: HeaderPairs
    body: bytes
    truncated: bool  # the body was longer than the cap; the rest was not read


@dataclass(frozen=True)
class _Target:
    origin: tuple[str, str, int]  # scheme, host, port
    host_header: str
    path: str  # path and query, as given (already encoded)
    authorization: str | None


def _target(url: str) -> _Target:
    if not url.isprintable() or " " in url:  # (urlsplit would silently drop a tab or newline)
        raise ValueError(f"the URL holds a space or control character: {url!r}")
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise ValueError(f"unsupported URL scheme {parts.scheme!r} in {url!r}")
    host = parts.hostname
    if not host:
        raise ValueError(f"no host in URL {url!r}")
    port = parts.port or DEFAULT_PORTS[scheme]
    shown = f"[{host}]" if ":" in host else host
    host_header = shown if port == DEFAULT_PORTS[scheme] else f"{shown}:{port}"
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    authorization = None
    if parts.username is not None:
        credentials = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
        authorization = "Basic " + base64.b64encode(credentials).decode("ascii")
    return _Target((scheme, host, port), host_header, path, authorization)


def request_head(method: str, target: _Target, headers: HeaderPairs, body_length: int) -> bytes:
    """The request line and headers; Host and Content-Length are the client's, as in any HTTP client."""
    given = "".join(chain((method,), chain.from_iterable(headers)))
    for bad in _FORBIDDEN:
        if bad in given:
            raise ValueError(f"header contains CR, LF or NUL: {given[max(0, given.index(bad) - 40) :][:60]!r}")
    parts = [method, " ", target.path, " HTTP/1.1\r\nHost: ", target.host_header, "\r\n"]
    for name, value in headers:
        parts += (name, ": ", value, "\r\n")
    if target.authorization and not any(name.lower() == "authorization" for name, _ in headers):
        parts += ("Authorization: ", target.authorization, "\r\n")
    parts.append(f"Content-Length: {body_length}\r\n\r\n")
    # Stored headers keep stray bytes as surrogates (model.decode_header_bytes): send the original bytes.
    return "".join(parts).encode("utf-8", "surrogateescape")


class _Connection(asyncio.Protocol):
    """One connection, one exchange at a time; httptools calls the ``on_*`` methods."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.reusable = True
        self.idle_since = 0.0
        self._done: asyncio.Future[Response] | None = None
        self._head_only = False
        self._cap = 0
        self._status = 0
        self._headers: list[tuple[str, str]] = []
        self._body: list[bytes] = []
        self._size = 0
        self._framed = False  # the response says where its body ends (Content-Length or chunked)
        self._answered = False  # a byte of the answer arrived (a stale pooled connection gets none)
        self._writable: asyncio.Future[None] | None = None

    # --- the exchange ------------------------------------------------------------------

    async def exchange(self, head: bytes, body: bytes, cap: int, head_only: bool) -> Response:
        assert self.transport is not None
        if self.closed:
            raise HttpError("the connection was closed before the request was sent")
        # A local: the answer (an early 413, say) or a hang-up can settle it and clear
        # self._done while the body is still being written.
        done: asyncio.Future[Response] = asyncio.get_running_loop().create_future()
        self._done = done
        self._cap, self._head_only = cap, head_only
        self._status, self._headers, self._body, self._size = 0, [], [], 0
        self._framed = self._answered = False
        self.transport.write(head + body if len(body) < 65536 else head)
        if len(body) >= 65536:
            self.transport.write(body)
        while self._writable is not None and not done.done():
            # The body is still going out; the upstream may answer (413, say) before taking it all.
            await asyncio.wait((done, self._writable), return_when=asyncio.FIRST_COMPLETED)
        if self._writable is not None:
            self.reusable = False  # answered with part of the body unsent: this connection is spent
        return await done

    @property
    def answered(self) -> bool:
        return self._answered

    def _finish(self, truncated: bool = False) -> None:
        done = self._done
        if done is not None and not done.done():
            self._done = None
            done.set_result(Response(self._status, tuple(self._headers), b"".join(self._body), truncated))

    def abandon(self) -> None:
        """The caller gave up (deadline, cancel): close without failing a future nobody awaits."""
        self.reusable = False
        for waiter in (self._done, self._writable):
            if waiter is not None and not waiter.done():
                waiter.cancel()
        self._done = self._writable = None
        if self.transport is not None and not self.closed:
            self.transport.close()

    def fail(self, error: BaseException) -> None:
        self.reusable = False
        done = self._done
        if done is not None and not done.done():
            self._done = None
            done.set_exception(error)

    # --- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not asyncio.Transport

    def data_received(self, data: bytes) -> None:
        if self._done is None:
            # Bytes nobody asked for (or the rest of a capped body): this connection is not reusable.
            self.reusable = False
            if self.transport is not None:
                self.transport.close()
            return
        self._answered = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.fail(HttpError("the upstream switched protocols"))
        except httptools.HttpParserError as exc:
            self.fail(HttpError(f"invalid HTTP response: {exc}"))

    def eof_received(self) -> bool:
        self._ended(None)
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self._ended(exc)
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)

    def _ended(self, exc: Exception | None) -> None:
        self.closed = True
        self.reusable = False
        if self._done is None:
            return
        if self._status and not self._framed and not self._head_only and self._status >= 200:
            self._finish()  # a body delimited by the end of the connection (HTTP/1.0 style)
        elif self._status:
            self.fail(HttpError("the upstream closed the connection in the middle of its answer"))
        elif exc is not None:
            self.fail(HttpError(f"connection lost before an answer: {type(exc).__name__}: {exc}"))
        else:
            self.fail(HttpError("the upstream closed the connection without answering"))

    def pause_writing(self) -> None:
        self._writable = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)
        self._writable = None

    # --- httptools callbacks --------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._done is None:
            # A second answer in the same read as the end of the first: nobody asked for it,
            # and the parser would carry it into the next exchange.
            self.reusable = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        self._status = self.parser.get_status_code()
        names = {name.lower() for name, _ in self._headers}
        self._framed = "content-length" in names or "transfer-encoding" in names
        if self._status < 200:
            return
        if not self.parser.should_keep_alive():
            self.reusable = False
        if self._head_only:
            self.reusable = False  # llhttp would wait for a body a HEAD answer does not have
            self._finish()

    def on_body(self, chunk: bytes) -> None:
        if self._done is None:
            return
        room = self._cap + 1 - self._size
        if len(chunk) >= room:
            self._body.append(chunk[: self._cap - self._size])
            self._size = self._cap
            self.reusable = False  # the rest stays unread: drop the connection rather than read it
            self._finish(truncated=True)
            return
        self._body.append(chunk)
        self._size += len(chunk)

    def on_message_complete(self) -> None:
        if 100 <= self._status < 200:
            # An interim answer (100 Continue, 103 Early Hints): the real one follows.
            self._status, self._headers, self._body, self._size = 0, [], [], 0
            return
        self._finish()


class HttpClient:
    """Keep-alive connections per origin; one request at a time on each."""

    def __init__(self, ssl_context: ssl.SSLContext | None = None, keepalive_seconds: float = KEEPALIVE_SECONDS) -> None:
        self._ssl = ssl_context
        self._keepalive = keepalive_seconds
        self._idle: dict[tuple[str, str, int], collections.deque[_Connection]] = {}
        self._busy: set[_Connection] = set()
        self._closed = False
        self._sweep: asyncio.TimerHandle | None = None

    async def request(self, method: str, url: str, headers: HeaderPairs, body: bytes, *, body_cap: int) -> Response:
        """One exchange; raises HttpError or OSError (connect, TLS, DNS) or ValueError (bad URL or header).

        Callers bound it with a deadline (``asyncio.timeout``); a cancelled exchange's
        connection is closed, never reused.
        """
        target = _target(url)
        head = request_head(method, target, headers, len(body))
        head_only = method.upper() == "HEAD"
        conn, reused = self._idle_connection(target.origin), True
        if conn is None:
            conn, reused = await self._connect(target.origin), False
        try:
            response = await self._exchange(conn, head, body, body_cap, head_only)
        except HttpError:  # (_exchange has closed that connection)
            if not reused or conn.answered or method.upper() not in IDEMPOTENT:
                raise
            # The pooled connection may have been closed by the upstream while idle: once more
            # on a fresh one. Only for idempotent methods, as aiohttp does: a POST the upstream
            # read before hanging up would arrive twice within what is recorded as one attempt;
            # it fails instead, is recorded, and the forwarder's retry sends it again.
            conn = await self._connect(target.origin)
            response = await self._exchange(conn, head, body, body_cap, head_only)
        self._release(target.origin, conn)
        return response

    async def _exchange(self, conn: _Connection, head: bytes, body: bytes, cap: int, head_only: bool) -> Response:
        """The exchange on ``conn``; if it fails in any way (cancelled too), ``conn`` is closed."""
        self._busy.add(conn)
        try:
            return await conn.exchange(head, body, cap, head_only)
        except BaseException:
            self._discard(conn)
            raise

    def _idle_connection(self, origin: tuple[str, str, int]) -> _Connection | None:
        idle = self._idle.get(origin)
        now = asyncio.get_running_loop().time()
        while idle:
            conn = idle.pop()  # the most recently used: the least likely to have been closed
            if not conn.closed and now - conn.idle_since < self._keepalive:
                return conn
            self._discard(conn)
        return None

    async def _connect(self, origin: tuple[str, str, int]) -> _Connection:
        if self._closed:
            raise HttpError("the client is closed")
        scheme, host, port = origin
        context = None
        if scheme == "https":
            if self._ssl is None:
                self._ssl = ssl.create_default_context()
            context = self._ssl
        loop = asyncio.get_running_loop()
        addresses = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        # Happy Eyeballs (RFC 8305), as aiohttp connects: an address that does not answer (a
        # black-holed AAAA record, say) costs 250 ms, not the whole attempt.
        sock = await aiohappyeyeballs.start_connection(addresses, happy_eyeballs_delay=HAPPY_EYEBALLS_DELAY)
        try:
            _, conn = await loop.create_connection(
                _Connection, sock=sock, ssl=context, server_hostname=host if context else None
            )
        except BaseException:
            sock.close()
            raise
        return conn

    def _release(self, origin: tuple[str, str, int], conn: _Connection) -> None:
        self._busy.discard(conn)
        if not conn.reusable or conn.closed or self._closed:
            self._discard(conn)
            return
        loop = asyncio.get_running_loop()
        conn.idle_since = loop.time()
        idle = self._idle.setdefault(origin, collections.deque())
        idle.append(conn)
        while len(idle) > MAX_IDLE_PER_ORIGIN:
            self._discard(idle.popleft())
        if self._sweep is None:
            self._sweep = loop.call_later(self._keepalive, self._close_expired)

    def _close_expired(self) -> None:
        """Close connections idle past keep-alive (an upstream no longer sent to keeps none open)."""
        self._sweep = None
        loop = asyncio.get_running_loop()
        cutoff = loop.time() - self._keepalive
        for origin, idle in list(self._idle.items()):
            while idle and (idle[0].closed or idle[0].idle_since <= cutoff):  # oldest first
                self._discard(idle.popleft())
            if not idle:
                del self._idle[origin]
        if self._idle and not self._closed:
            oldest = min(idle[0].idle_since for idle in self._idle.values())
            self._sweep = loop.call_at(oldest + self._keepalive, self._close_expired)

    def _discard(self, conn: _Connection) -> None:
        self._busy.discard(conn)
        conn.abandon()

    async def close(self) -> None:
        """Close every connection (those in use are closed under their exchange)."""
        self._closed = True
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        for idle in self._idle.values():
            for conn in idle:
                self._discard(conn)
        self._idle.clear()
        for conn in list(self._busy):
            conn.fail(HttpError("the client is closed"))
            self._discard(conn)
        await asyncio.sleep(0)  # let the transports run their close callbacks
