"""Read deadlines for slow clients: a request head within a time limit of its first byte, and a body after it.

aiohttp's server has no timeout for a request that has started to arrive: it
closes a connection that waits for a request longer than ``keepalive_timeout``
(75 s here), but a client may trickle a head for that long, and a body for
ever. So each connection's protocol is wrapped in :class:`HeaderDeadline`,
which starts a timer on the first byte of a request and stops it when aiohttp
has the whole head; at the deadline the client gets a 408 and the connection
is closed. The idle time before a request's first byte does not count (that
is ``keepalive_timeout``'s job), and each request on a kept-alive connection
gets its own deadline. The body deadline is plain aiohttp: ingest reads the
body under a timeout (relay.ingest), the admin app through :func:`body_deadline`.

aiohttp offers no hook to wrap a connection's protocol or to tell whether it
is waiting for a request, so this module, and only this module, uses aiohttp
internals (checked against aiohttp 3.14.5):

* ``RequestHandler._waiter``: the future the connection loop awaits while it
  waits for the next request head; aiohttp's own keep-alive close reads it so.
* ``BaseSite._runner``, ``_backlog`` and ``_server``: what every built-in site
  (TCPSite, SockSite, ...) uses; :class:`DeadlineSite` is TCPSite with a
  wrapped protocol factory, so the runner still lists and stops it.

:func:`check_aiohttp_internals` refuses to start the relay if they are gone,
and ``tests/test_slow_clients.py`` fails if they stop behaving as used.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web
from yarl import URL

from relay.keys import CONFIG

log = logging.getLogger(__name__)

_TIMEOUT_BODY = b'{"error": "request head not received in time"}'
# Written straight to the transport: no request was parsed, so there is no aiohttp response to use.
REQUEST_TIMEOUT = (
    b"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
    b"Connection: close\r\n\r\n%s" % (len(_TIMEOUT_BODY), _TIMEOUT_BODY)
)

_PRIVATE_SLOTS = ((web.RequestHandler, ("_waiter",)), (web.BaseSite, ("_runner", "_backlog", "_server")))


def check_aiohttp_internals() -> None:
    """Refuse to run on an aiohttp without the private attributes this module reads."""
    for cls, names in _PRIVATE_SLOTS:
        missing = [name for name in names if name not in getattr(cls, "__slots__", ())]
        if missing:
            raise RuntimeError(
                f"relay.deadline: aiohttp's {cls.__name__} no longer has {', '.join(missing)}; "
                "the request-head deadline must be ported to this aiohttp version"
            )


def awaiting_request(handler: web.RequestHandler) -> bool:
    """True while the connection waits for a request head; False while one is being served."""
    waiter = handler._waiter
    return waiter is not None and not waiter.done()


class HeaderDeadline(asyncio.Protocol):
    """One connection: aiohttp's protocol, plus a deadline for each request head.

    The timer starts when bytes arrive while aiohttp waits for a request and
    stops when aiohttp has parsed the head; body bytes, pipelined requests and
    idle keep-alive time never start it. (A partial head that arrived while an
    earlier request was being served starts it with its next byte; if none
    comes, the keep-alive timeout closes the connection, as for a silent client.)
    """

    __slots__ = ("_handler", "_timeout", "_loop", "_timer")

    def __init__(self, handler: web.RequestHandler, timeout: float, loop: asyncio.AbstractEventLoop) -> None:
        self._handler = handler
        self._timeout = timeout
        self._loop = loop
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._handler.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self._handler.data_received(data)
        if not awaiting_request(self._handler):
            self._disarm()
        elif data and self._timer is None:
            self._timer = self._loop.call_later(self._timeout, self._expire)

    def eof_received(self) -> None:
        self._handler.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self._handler.connection_lost(exc)

    def pause_writing(self) -> None:
        self._handler.pause_writing()

    def resume_writing(self) -> None:
        self._handler.resume_writing()

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self) -> None:
        self._timer = None
        transport = self._handler.transport
        if transport is None or not awaiting_request(self._handler):
            return
        log.debug("closing a connection from %s: no complete request head within %g s", self._peer(), self._timeout)
        transport.write(REQUEST_TIMEOUT)
        if transport.get_write_buffer_size():
            transport.abort()  # the client is not reading either: do not wait to flush the answer
        self._handler.force_close()

    def _peer(self) -> object:
        transport = self._handler.transport
        return transport.get_extra_info("peername") if transport is not None else None


class DeadlineSite(web.BaseSite):
    """A TCP site like ``web.TCPSite`` whose connections have a request-head deadline."""

    __slots__ = ("_host", "_port", "_header_timeout")

    def __init__(
        self, runner: web.BaseRunner, host: str, port: int, *, header_timeout: float, backlog: int = 128
    ) -> None:
        check_aiohttp_internals()
        super().__init__(runner, backlog=backlog)
        self._host = host
        self._port = port
        self._header_timeout = header_timeout

    @property
    def name(self) -> str:
        return str(URL.build(scheme="http", host=self._host, port=self._port))

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        server = self._runner.server
        assert server is not None  # BaseSite.__init__ refuses a runner that was not set up
        timeout = self._header_timeout

        def protocol() -> HeaderDeadline:
            return HeaderDeadline(server(), timeout, loop)

        self._server = await loop.create_server(protocol, self._host, self._port, backlog=self._backlog)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def body_deadline(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Read a body that is still arriving under ``body_timeout_seconds``, so no handler waits on a slow client.

    The handlers then get it from aiohttp's cache (``request.read``, ``json``,
    ``post``). Bodies that arrived with their head, and requests without one,
    pass straight through.
    """
    if not request.content.is_eof():
        try:
            async with asyncio.timeout(request.app[CONFIG].relay.body_timeout_seconds):
                # post() keeps a multipart form, which read() would consume before the handler's post().
                await (request.post() if request.content_type == "multipart/form-data" else request.read())
        except TimeoutError:
            raise web.HTTPRequestTimeout() from None
    return await handler(request)
