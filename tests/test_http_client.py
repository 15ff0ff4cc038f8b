"""The onward HTTP client (relay.http_client) against real servers on loopback sockets.

Raw asyncio servers where the bytes on the wire matter or the server misbehaves, aiohttp
where a plain app will do. Failures go through relay.sender.send, as in the relay: it must
report them in ``error`` and never raise.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import hashlib
import logging
import random
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web

from relay.http_client import KEEPALIVE_SECONDS, HttpClient
from relay.model import HeaderPairs, decode_header_bytes
from relay.outgoing import OutgoingRequest
from relay.sender import SendResult, send

from support import free_port, wait_until

DEADLINE = 1.0  # for exchanges that should succeed; failures must come well before it
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


# --- raw servers ------------------------------------------------------------------------------


async def read_request(reader: asyncio.StreamReader) -> bytes | None:
    """One request (head, then a Content-Length body) as the bytes that came; None at EOF."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        return head + await reader.readexactly(length)
    except (asyncio.IncompleteReadError, ConnectionError):
        return None


def target_of(request: bytes) -> bytes:
    return request.split(b" ", 2)[1]


@dataclass
class Peer:
    """One accepted connection, as the server sees it."""

    index: int
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    server: RawServer
    requests: list[bytes] = field(default_factory=list)
    client_closed: asyncio.Event = field(default_factory=asyncio.Event)  # the client hung up (EOF seen)

    async def next_request(self) -> bytes | None:
        request = await read_request(self.reader)
        if request is not None:
            self.requests.append(request)
            self.server.requests.append(request)
        return request

    async def answer(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()


Handler = Callable[[Peer], Awaitable[None]]


@dataclass
class RawServer:
    """An ``asyncio.start_server`` server; it counts connections and keeps every request's bytes."""

    host: str
    port: int = 0
    peers: list[Peer] = field(default_factory=list)
    requests: list[bytes] = field(default_factory=list)  # across all connections, in arrival order
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        shown = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{shown}:{self.port}"

    @property
    def connections(self) -> int:
        return len(self.peers)


StartServer = Callable[..., Awaitable[RawServer]]


@pytest.fixture
async def raw_server() -> AsyncIterator[StartServer]:
    """``await raw_server(handler, host=..., port=..., tls=...)``: ``handler(peer)`` runs per connection.

    When the handler returns with the connection still open, the server reads until the client
    hangs up and then sets ``peer.client_closed``.
    """
    started: list[RawServer] = []

    async def start(
        handler: Handler, host: str = "127.0.0.1", port: int = 0, tls: ssl.SSLContext | None = None
    ) -> RawServer:
        raw = RawServer(host)

        async def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            raw.tasks.add(task)
            peer = Peer(len(raw.peers), reader, writer, raw)
            raw.peers.append(peer)
            try:
                await handler(peer)
                if not writer.is_closing():
                    while await reader.read(65536):
                        pass
                    peer.client_closed.set()
            except ConnectionError:
                peer.client_closed.set()
            finally:
                writer.close()

        raw.server = await asyncio.start_server(accepted, host, port, ssl=tls)
        raw.port = raw.server.sockets[0].getsockname()[1]
        started.append(raw)
        return raw

    yield start
    for raw in started:
        assert raw.server is not None
        raw.server.close()
        for task in raw.tasks:
            task.cancel()
        await asyncio.gather(*raw.tasks, return_exceptions=True)
        await raw.server.wait_closed()


def keep_answering(answer: bytes | Callable[[bytes], bytes]) -> Handler:
    """A keep-alive server: every request on the connection gets ``answer`` (or ``answer(request)``)."""

    async def handle(peer: Peer) -> None:
        while (request := await peer.next_request()) is not None:
            await peer.answer(answer(request) if callable(answer) else answer)

    return handle


async def first_connection_never_answers(peer: Peer) -> None:
    """The first connection takes a request and never answers it; later ones answer ``OK``."""
    if peer.index > 0:
        await keep_answering(OK)(peer)
    else:
        await peer.next_request()  # then the wrapper waits for the client to hang up


def echo_target(request: bytes) -> bytes:
    target = target_of(request)
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(target), target)


# --- the client ---------------------------------------------------------------------------------


@pytest.fixture
async def make_client() -> AsyncIterator[Callable[..., HttpClient]]:
    clients: list[HttpClient] = []

    def make(ssl_context: ssl.SSLContext | None = None, keepalive_seconds: float = KEEPALIVE_SECONDS) -> HttpClient:
        clients.append(HttpClient(ssl_context=ssl_context, keepalive_seconds=keepalive_seconds))
        return clients[-1]

    yield make
    for made in clients:
        await made.close()


@pytest.fixture
def client(make_client: Callable[..., HttpClient]) -> HttpClient:
    return make_client()


async def post(
    client: HttpClient,
    url: str,
    headers: HeaderPairs = (),
    body: bytes = b"",
    *,
    method: str = "POST",
    timeout: float = DEADLINE,
    body_cap: int = 64 * 1024,
) -> SendResult:
    return await send(client, OutgoingRequest(method, url, headers, body), timeout, body_cap=body_cap)


def answered(result: SendResult) -> SendResult:
    assert result.error is None, result.error
    return result


async def closed_by_client(peer: Peer) -> None:
    await asyncio.wait_for(peer.client_closed.wait(), DEADLINE)


def assert_no_lost_exceptions(caplog: pytest.LogCaptureFixture) -> None:
    gc.collect()  # a future or task dropped with an exception set logs when it is collected
    lost = [record.getMessage() for record in caplog.records if "never retrieved" in record.getMessage()]
    assert lost == []


# --- 1. the request on the wire -----------------------------------------------------------------


async def test_the_request_goes_on_the_wire_exactly_as_given(raw_server: StartServer, client: HttpClient) -> None:
    server = await raw_server(keep_answering(OK))
    headers = (
        ("Content-Type", "application/json"),
        ("webhook-id", "msg_1"),
        ("X-Dup", "1"),
        ("x-dup", "2"),
        ("X-Spaced", "a  b"),
    )
    body = b'{"a": "%2F"}\x00\xff\r\n'
    result = answered(await post(client, f"{server.url}/hook/./x//y?a=%2F&b=1&c=%7e+#fragment", headers, body))
    assert (result.status, result.body) == (200, b"ok")
    expected = (
        b"POST /hook/./x//y?a=%2F&b=1&c=%7e+ HTTP/1.1\r\n"
        + b"Host: 127.0.0.1:%d\r\n" % server.port
        + b"Content-Type: application/json\r\n"
        + b"webhook-id: msg_1\r\n"
        + b"X-Dup: 1\r\n"
        + b"x-dup: 2\r\n"
        + b"X-Spaced: a  b\r\n"
        + b"Content-Length: %d\r\n\r\n" % len(body)
        + body
    )
    assert server.requests == [expected]


async def test_header_bytes_kept_as_surrogates_are_sent_as_the_original_bytes(
    raw_server: StartServer, client: HttpClient
) -> None:
    server = await raw_server(keep_answering(OK))
    headers = (("X-Latin", decode_header_bytes(b"caf\xe9")), ("X-Utf8", decode_header_bytes("café".encode())))
    answered(await post(client, f"{server.url}/h", headers, b"x"))
    head = server.requests[0].split(b"\r\n\r\n")[0].split(b"\r\n")
    assert head[2:4] == [b"X-Latin: caf\xe9", b"X-Utf8: caf\xc3\xa9"]


@pytest.mark.parametrize(
    "header",
    [("X-Evil", "a\r\nInjected: 1"), ("X-Evil", "a\nInjected: 1"), ("X-Evil\r\nInjected", "1"), ("X-Evil", "a\0b")],
)
async def test_a_header_with_cr_lf_or_nul_is_refused_and_nothing_is_sent(
    raw_server: StartServer, client: HttpClient, header: tuple[str, str]
) -> None:
    server = await raw_server(keep_answering(OK))
    result = await post(client, f"{server.url}/evil", (header,), b"payload")
    assert result.status is None
    assert result.error is not None and result.error.startswith("ValueError: header contains CR, LF or NUL")
    # The next request is the first thing this server ever received, on its first connection.
    answered(await post(client, f"{server.url}/fine", (("X-Fine", "1"),), b"payload"))
    assert [[target_of(request) for request in peer.requests] for peer in server.peers] == [[b"/fine"]]
    assert b"Injected" not in b"".join(server.requests)


@pytest.mark.parametrize("path", ["/a b", "/a?q=x y", "/a\tb", "/a?x=\x7f"])
async def test_a_url_with_a_space_or_control_character_is_refused_and_nothing_is_sent(
    raw_server: StartServer, client: HttpClient, path: str
) -> None:
    server = await raw_server(keep_answering(OK))
    result = await post(client, f"{server.url}{path}", (), b"payload")
    assert result.status is None
    assert result.error is not None and result.error.startswith("ValueError: the URL holds a space")
    answered(await post(client, f"{server.url}/fine", (), b"payload"))
    assert [[target_of(request) for request in peer.requests] for peer in server.peers] == [[b"/fine"]]


async def test_a_large_body_arrives_complete(serve: Callable[..., Awaitable[str]], client: HttpClient) -> None:
    async def digest(request: web.Request) -> web.Response:
        body = await request.read()
        return web.Response(text=f"{len(body)} {hashlib.sha256(body).hexdigest()}")

    app = web.Application(client_max_size=16 * 1024 * 1024)
    app.router.add_post("/big", digest)
    url = await serve(app, "/big")
    body = random.Random(8).randbytes(8 * 1024 * 1024)
    result = answered(await post(client, url, (("Content-Type", "application/octet-stream"),), body, timeout=5))
    assert (result.status, result.body.decode()) == (200, f"{len(body)} {hashlib.sha256(body).hexdigest()}")


async def test_an_early_answer_to_a_large_body_is_reported(
    serve: Callable[..., Awaitable[str]], client: HttpClient, caplog: pytest.LogCaptureFixture
) -> None:
    """aiohttp's default 1 MiB limit: the upstream answers 413 before it has read the 8 MB body."""
    caplog.set_level(logging.ERROR, logger="asyncio")

    async def limited(request: web.Request) -> web.Response:
        await request.read()  # raises HTTPRequestEntityTooLarge past client_max_size
        return web.Response(text="read it all")

    app = web.Application()
    app.router.add_post("/small", limited)
    url = await serve(app, "/small")
    result = await post(client, url, (), random.Random(8).randbytes(8 * 1024 * 1024), timeout=5)
    assert (result.status, result.error) == (413, None)
    assert_no_lost_exceptions(caplog)


async def test_a_server_hanging_up_during_a_large_body_is_an_error(
    raw_server: StartServer, client: HttpClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="asyncio")

    async def hang_up_after_the_head(peer: Peer) -> None:
        await peer.reader.readuntil(b"\r\n\r\n")
        peer.writer.transport.abort()

    server = await raw_server(hang_up_after_the_head)
    result = await post(client, f"{server.url}/big", (), b"x" * (8 * 1024 * 1024), timeout=5)
    assert result.status is None and result.error
    assert not result.error.startswith("timed out")
    assert_no_lost_exceptions(caplog)


# --- 2. keep-alive --------------------------------------------------------------------------------


async def test_sequential_requests_reuse_one_connection(raw_server: StartServer, client: HttpClient) -> None:
    server = await raw_server(keep_answering(echo_target))
    bodies = [answered(await post(client, f"{server.url}/n/{i}")).body for i in range(5)]
    assert bodies == [f"/n/{i}".encode() for i in range(5)]
    assert (server.connections, len(server.requests)) == (1, 5)


async def test_concurrent_requests_use_separate_connections_each_with_its_own_answer(
    raw_server: StartServer, client: HttpClient
) -> None:
    all_in = asyncio.Event()

    async def answer_once_three_are_in(peer: Peer) -> None:
        while (request := await peer.next_request()) is not None:
            if len(server.requests) >= 3:
                all_in.set()
            await all_in.wait()  # three requests in flight at once, or the sends time out
            await peer.answer(echo_target(request))

    server = await raw_server(answer_once_three_are_in)
    for round_ in range(2):
        targets = [f"/r{round_}/{i}" for i in range(3)]
        results = await asyncio.gather(*(post(client, server.url + target) for target in targets))
        assert [answered(result).body for result in results] == [target.encode() for target in targets]
    # The second round ran on the three connections the first one left in the pool.
    assert (server.connections, len(server.requests)) == (3, 6)


async def test_an_idle_connection_older_than_keepalive_seconds_is_not_reused(
    raw_server: StartServer, make_client: Callable[..., HttpClient]
) -> None:
    client = make_client(keepalive_seconds=0.0)
    server = await raw_server(keep_answering(OK))
    answered(await post(client, f"{server.url}/1"))
    answered(await post(client, f"{server.url}/2"))
    assert server.connections == 2
    await closed_by_client(server.peers[0])


# --- 3. a pooled connection the server closed -----------------------------------------------------


async def test_a_pooled_connection_the_client_saw_closed_is_not_used(
    raw_server: StartServer, client: HttpClient
) -> None:
    async def answer_then_hang_up(peer: Peer) -> None:
        if await peer.next_request() is not None:
            await peer.answer(OK)  # a keep-alive answer...
            peer.writer.write_eof()  # ...then the server's idle timeout closes the connection

    server = await raw_server(answer_then_hang_up)
    answered(await post(client, f"{server.url}/first"))
    await closed_by_client(server.peers[0])  # the client has seen the close (and closed its end)
    result = answered(await post(client, f"{server.url}/second"))
    assert (result.status, result.body) == (200, b"ok")
    assert [[target_of(request) for request in peer.requests] for peer in server.peers] == [[b"/first"], [b"/second"]]


@pytest.mark.parametrize("method", ["POST", "PUT"])
async def test_a_request_racing_the_servers_close_of_a_pooled_connection(
    raw_server: StartServer, client: HttpClient, method: str
) -> None:
    """A POST is not sent again behind the caller's back (the upstream may have read it before
    hanging up, and the attempt would record one send for two): it fails, and the forwarder's own
    retry sends it, recorded. An idempotent PUT is sent once more on a new connection, as aiohttp does."""
    server = await raw_server(keep_answering(echo_target))
    answered(await post(client, f"{server.url}/first"))
    # The server's idle timeout fires: the socket is closed on the loop's next turn, after the
    # client (which has not seen anything yet) has written its next request on that connection.
    server.peers[0].writer.transport.abort()
    request = OutgoingRequest(method, f"{server.url}/second", (), b"payload")
    result = await send(client, request, DEADLINE)
    if method == "POST":
        assert result.status is None and result.error is not None
        answered(await post(client, f"{server.url}/third"))
        assert [[target_of(r) for r in peer.requests] for peer in server.peers] == [[b"/first"], [b"/third"]]
    else:
        assert (result.status, result.body) == (200, b"/second")
        assert [[target_of(r) for r in peer.requests] for peer in server.peers] == [[b"/first"], [b"/second"]]


# --- 4. responses ---------------------------------------------------------------------------------


async def test_a_chunked_answer_is_read_whole_and_the_connection_reused(
    raw_server: StartServer, client: HttpClient
) -> None:
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    server = await raw_server(keep_answering(chunked))
    for _ in range(2):
        result = answered(await post(client, f"{server.url}/c"))
        assert (result.status, result.body, result.truncated) == (200, b"hello world", False)
    assert server.connections == 1


async def test_an_answer_delimited_by_the_close_of_the_connection(raw_server: StartServer, client: HttpClient) -> None:
    async def http10(peer: Peer) -> None:
        if await peer.next_request() is not None:
            await peer.answer(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nfirst part, ")
            peer.writer.write(b"and the rest")
            peer.writer.close()

    server = await raw_server(http10)
    for _ in range(2):
        result = answered(await post(client, f"{server.url}/old"))
        assert (result.status, result.body) == (200, b"first part, and the rest")
        assert result.headers == (("Content-Type", "text/plain"),)
    assert server.connections == 2


async def test_a_204_has_no_body_and_does_not_wait_for_one(raw_server: StartServer, client: HttpClient) -> None:
    server = await raw_server(keep_answering(b"HTTP/1.1 204 No Content\r\nX-Request-Id: 7\r\n\r\n"))
    for _ in range(2):
        result = answered(await post(client, f"{server.url}/nothing"))
        assert (result.status, result.headers, result.body) == (204, (("X-Request-Id", "7"),), b"")
    assert server.connections == 1


async def test_interim_answers_are_skipped_for_the_final_one(raw_server: StartServer, client: HttpClient) -> None:
    async def interim_first(peer: Peer) -> None:
        while await peer.next_request() is not None:
            await peer.answer(b"HTTP/1.1 100 Continue\r\n\r\n")
            await peer.answer(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n")
            await peer.answer(b"HTTP/1.1 200 OK\r\nX-Final: yes\r\nContent-Length: 4\r\n\r\ndone")

    server = await raw_server(interim_first)
    for _ in range(2):
        result = answered(await post(client, f"{server.url}/continue", (), b"body"))
        assert (result.status, result.body) == (200, b"done")
        assert result.headers == (("X-Final", "yes"), ("Content-Length", "4"))
    assert server.connections == 1


async def test_answer_headers_come_back_in_order_with_case_and_repeats(
    raw_server: StartServer, client: HttpClient
) -> None:
    server = await raw_server(
        keep_answering(
            b"HTTP/1.1 201 Created\r\nX-B: 2\r\nx-a: 1\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\n"
            b"X-Latin: caf\xe9\r\nContent-Length: 0\r\n\r\n"
        )
    )
    result = answered(await post(client, f"{server.url}/h"))
    assert result.status == 201
    assert result.headers == (
        ("X-B", "2"),
        ("x-a", "1"),
        ("Set-Cookie", "a=1"),
        ("Set-Cookie", "b=2"),
        ("X-Latin", "café"),  # bytes beyond ASCII as latin-1, as the aiohttp-based sender recorded them
        ("Content-Length", "0"),
    )


async def test_a_connection_close_answer_is_not_reused(raw_server: StartServer, client: HttpClient) -> None:
    # The server says it will close but leaves the socket open: the client must not reuse it anyway.
    server = await raw_server(keep_answering(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 3\r\n\r\nbye"))
    for _ in range(2):
        assert answered(await post(client, f"{server.url}/x")).body == b"bye"
    assert server.connections == 2
    await closed_by_client(server.peers[0])


async def test_a_head_answer_ends_with_its_headers(raw_server: StartServer, client: HttpClient) -> None:
    server = await raw_server(keep_answering(b"HTTP/1.1 200 OK\r\nContent-Length: 123\r\n\r\n"))
    result = answered(await post(client, f"{server.url}/x", method="HEAD"))
    assert (result.status, result.headers, result.body) == (200, (("Content-Length", "123"),), b"")


async def test_bytes_after_the_end_of_an_answer_do_not_leak_into_the_next_one(
    raw_server: StartServer, client: HttpClient
) -> None:
    """An upstream sends more than its Content-Length says (here the start of a second answer),
    in the same segment as the answer: the next request must get its own answer."""
    count = 0

    def answer(request: bytes) -> bytes:
        nonlocal count
        count += 1
        stray = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab" if count == 1 else b""
        text = b"answer %d" % count
        return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s%s" % (len(text), text, stray)

    server = await raw_server(keep_answering(answer))
    first = answered(await post(client, f"{server.url}/1"))
    assert (first.status, first.body) == (200, b"answer 1")
    second = answered(await post(client, f"{server.url}/2"))
    assert (second.status, second.body) == (200, b"answer 2")


# --- 5. the body cap ------------------------------------------------------------------------------

CAPPED = bytes(range(100))


def content_length_answer(body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


def chunked_answer(body: bytes) -> bytes:
    chunks = [body[i : i + 30] for i in range(0, len(body), 30)]
    framed = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for chunk in chunks)
    return b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + framed + b"0\r\n\r\n"


@pytest.mark.parametrize("cap", [64, len(CAPPED) - 1])
@pytest.mark.parametrize("framing", [content_length_answer, chunked_answer], ids=["content-length", "chunked"])
async def test_an_answer_longer_than_the_cap_is_truncated_and_its_connection_dropped(
    raw_server: StartServer, client: HttpClient, framing: Callable[[bytes], bytes], cap: int
) -> None:
    server = await raw_server(keep_answering(framing(CAPPED)))
    result = answered(await post(client, f"{server.url}/big", body_cap=cap))
    assert (result.status, result.body, result.truncated) == (200, CAPPED[:cap], True)
    await closed_by_client(server.peers[0])
    answered(await post(client, f"{server.url}/again", body_cap=cap))
    assert server.connections == 2


@pytest.mark.parametrize("framing", [content_length_answer, chunked_answer], ids=["content-length", "chunked"])
async def test_an_answer_of_exactly_the_cap_is_whole(
    raw_server: StartServer, client: HttpClient, framing: Callable[[bytes], bytes]
) -> None:
    server = await raw_server(keep_answering(framing(CAPPED)))
    for _ in range(2):
        result = answered(await post(client, f"{server.url}/exact", body_cap=len(CAPPED)))
        assert (result.status, result.body, result.truncated) == (200, CAPPED, False)
    assert server.connections == 1


# --- 6. failures, as send reports them -----------------------------------------------------------


async def test_garbage_instead_of_http_is_an_invalid_answer(raw_server: StartServer, client: HttpClient) -> None:
    async def ssh(peer: Peer) -> None:
        if await peer.next_request() is not None:
            await peer.answer(b"SSH-2.0-OpenSSH_9.6\r\n")

    server = await raw_server(ssh)
    result = await post(client, f"{server.url}/x")
    assert result.status is None
    assert result.error is not None and result.error.startswith("invalid HTTP response")


async def test_a_server_closing_without_answering_is_an_error_and_not_retried_on_a_new_connection(
    raw_server: StartServer, client: HttpClient
) -> None:
    async def hang_up(peer: Peer) -> None:
        if await peer.next_request() is not None:
            peer.writer.close()

    server = await raw_server(hang_up)
    result = await post(client, f"{server.url}/x")
    assert (result.status, result.error) == (None, "the upstream closed the connection without answering")
    assert (server.connections, len(server.requests)) == (1, 1)


async def test_a_server_closing_in_the_middle_of_the_body_is_an_error(
    raw_server: StartServer, client: HttpClient
) -> None:
    async def short_body(peer: Peer) -> None:
        if await peer.next_request() is not None:
            await peer.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
            peer.writer.close()

    server = await raw_server(short_body)
    result = await post(client, f"{server.url}/x")
    assert (result.status, result.body) == (None, b"")
    assert result.error == "the upstream closed the connection in the middle of its answer"


async def test_a_server_that_never_answers_times_out_and_the_client_still_works(
    raw_server: StartServer, client: HttpClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="asyncio")

    server = await raw_server(first_connection_never_answers)
    loop = asyncio.get_running_loop()
    started = loop.time()
    result = await post(client, f"{server.url}/slow", timeout=0.5)
    elapsed = loop.time() - started
    assert (result.status, result.error) == (None, "timed out after 0.5 s")
    assert 0.5 <= elapsed < 0.9
    await closed_by_client(server.peers[0])  # the abandoned connection is closed, not left open
    assert_no_lost_exceptions(caplog)
    after = answered(await post(client, f"{server.url}/next"))
    assert (after.status, after.body) == (200, b"ok")
    assert server.connections == 2  # the abandoned connection was not reused


async def test_a_cancelled_send_closes_its_connection_and_loses_no_exception(
    raw_server: StartServer, client: HttpClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="asyncio")

    server = await raw_server(first_connection_never_answers)
    task = asyncio.create_task(post(client, f"{server.url}/slow", timeout=5))
    await wait_until(lambda: len(server.requests) == 1, timeout=DEADLINE)
    task.cancel()
    await asyncio.wait({task}, timeout=DEADLINE)
    assert task.cancelled()
    await closed_by_client(server.peers[0])
    assert_no_lost_exceptions(caplog)
    answered(await post(client, f"{server.url}/next"))
    assert server.connections == 2


async def test_a_refused_connection_is_named(client: HttpClient) -> None:
    result = await post(client, f"http://127.0.0.1:{free_port()}/x")
    assert result.status is None
    assert result.error is not None and result.error.startswith("ConnectionRefusedError")


# --- 9. URL details -------------------------------------------------------------------------------


async def test_credentials_in_the_url_become_basic_authorization(raw_server: StartServer, client: HttpClient) -> None:
    server = await raw_server(keep_answering(OK))
    url = f"http://user:p%40ss@127.0.0.1:{server.port}/x"
    answered(await post(client, url, (("X-A", "1"),)))
    answered(await post(client, url, (("authorization", "Bearer mine"),)))
    credentials = base64.b64encode(b"user:p@ss")
    host = b"Host: 127.0.0.1:%d\r\n" % server.port
    assert server.requests == [
        b"POST /x HTTP/1.1\r\n"
        + host
        + b"X-A: 1\r\nAuthorization: Basic "
        + credentials
        + b"\r\nContent-Length: 0\r\n\r\n",
        b"POST /x HTTP/1.1\r\n" + host + b"authorization: Bearer mine\r\nContent-Length: 0\r\n\r\n",
    ]


async def test_an_explicit_default_port_is_not_in_host(raw_server: StartServer, client: HttpClient) -> None:
    server, failure = None, None
    for host in ("127.0.80.80", "127.0.80.81", "127.0.80.82"):  # port 80 on a loopback address of its own
        try:
            server = await raw_server(keep_answering(OK), host=host, port=80)
            break
        except OSError as exc:
            failure = exc
    assert server is not None, f"this test binds port 80 (root, or ip_unprivileged_port_start <= 80): {failure}"
    answered(await post(client, f"http://{server.host}:80/x"))
    assert server.requests[0].split(b"\r\n")[1] == b"Host: " + server.host.encode()


async def test_an_ipv6_literal(raw_server: StartServer, client: HttpClient) -> None:
    server = await raw_server(keep_answering(echo_target), host="::1")
    result = answered(await post(client, f"http://[::1]:{server.port}/v6?x=1"))
    assert result.body == b"/v6?x=1"
    assert server.requests[0].split(b"\r\n")[1] == b"Host: [::1]:%d" % server.port


# --- 10. HTTPS ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Certificate:
    cert: Path
    key: Path


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> Certificate:
    """A self-signed certificate for 127.0.0.1, made by the openssl command."""
    openssl = shutil.which("openssl")
    assert openssl is not None, "the HTTPS tests need the openssl command"
    where = tmp_path_factory.mktemp("tls")
    made = Certificate(where / "cert.pem", where / "key.pem")
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
        + ["-keyout", str(made.key), "-out", str(made.cert), "-days", "2", "-subj", "/CN=127.0.0.1"]
        + ["-addext", "subjectAltName=IP:127.0.0.1"],
        check=True,
        capture_output=True,
        timeout=30,
    )
    return made


async def tls_server(raw_server: StartServer, certificate: Certificate) -> RawServer:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certificate.cert, certificate.key)
    return await raw_server(keep_answering(echo_target), tls=context)


async def test_https_with_a_context_that_trusts_the_certificate(
    raw_server: StartServer, make_client: Callable[..., HttpClient], certificate: Certificate
) -> None:
    server = await tls_server(raw_server, certificate)
    client = make_client(ssl_context=ssl.create_default_context(cafile=str(certificate.cert)))
    for path in ("/secure/1", "/secure/2"):
        result = answered(await post(client, f"https://127.0.0.1:{server.port}{path}", (), b"secret"))
        assert (result.status, result.body) == (200, path.encode())
    assert server.connections == 1
    assert server.requests[0].split(b"\r\n")[1] == b"Host: 127.0.0.1:%d" % server.port


async def test_https_to_an_untrusted_certificate_is_a_verification_error(
    raw_server: StartServer, client: HttpClient, certificate: Certificate
) -> None:
    server = await tls_server(raw_server, certificate)
    result = await post(client, f"https://127.0.0.1:{server.port}/secure", (), b"secret")
    assert result.status is None
    assert result.error is not None and result.error.startswith("SSLCertVerificationError")
    assert "CERTIFICATE_VERIFY_FAILED" in result.error
    assert server.requests == []


# --- 11. close ------------------------------------------------------------------------------------


async def test_close_hangs_up_idle_connections_and_later_requests_fail_cleanly(
    raw_server: StartServer, client: HttpClient
) -> None:
    server = await raw_server(keep_answering(OK))
    answered(await post(client, f"{server.url}/x"))
    await client.close()
    await closed_by_client(server.peers[0])
    result = await post(client, f"{server.url}/y")
    assert (result.status, result.error) == (None, "the client is closed")
    assert (server.connections, len(server.requests)) == (1, 1)


async def test_close_during_an_exchange_ends_it_with_an_error(raw_server: StartServer, client: HttpClient) -> None:
    async def never_answers(peer: Peer) -> None:
        await peer.next_request()

    server = await raw_server(never_answers)
    task = asyncio.create_task(post(client, f"{server.url}/slow", timeout=5))
    await wait_until(lambda: len(server.requests) == 1, timeout=DEADLINE)
    await client.close()
    done, _ = await asyncio.wait({task}, timeout=DEADLINE)
    assert done == {task}, "the exchange went on after close()"
    assert not task.cancelled(), "send was not cancelled, but close() made it raise CancelledError"
    result = task.result()
    assert result.status is None and result.error
    await closed_by_client(server.peers[0])


async def test_an_early_answer_is_taken_while_the_upstream_stops_reading_the_body(
    raw_server: StartServer, client: HttpClient
) -> None:
    """The upstream answers 413 after the head and then neither reads the rest nor hangs up: the
    answer is the result (not a timeout), and that connection is not used again."""
    stalled = asyncio.Event()

    async def refuse_big(peer: Peer) -> None:
        if peer.index > 0:
            await keep_answering(OK)(peer)
            return
        await peer.reader.readuntil(b"\r\n\r\n")
        await peer.answer(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 8\r\n\r\ntoo big!")
        stalled.set()
        await asyncio.Event().wait()  # held open, unread, until the test ends

    server = await raw_server(refuse_big)
    started = asyncio.get_running_loop().time()
    result = await post(client, f"{server.url}/big", (), b"x" * (32 * 1024 * 1024), timeout=5)
    assert (result.status, result.body, result.error) == (413, b"too big!", None)
    assert asyncio.get_running_loop().time() - started < 2
    answered(await post(client, f"{server.url}/next"))
    assert server.connections == 2 and stalled.is_set()


async def test_idle_connections_are_closed_after_keepalive_without_further_requests(
    raw_server: StartServer, make_client: Callable[..., HttpClient]
) -> None:
    client = make_client(keepalive_seconds=0.2)
    server = await raw_server(keep_answering(OK))
    await asyncio.gather(*(post(client, f"{server.url}/{n}") for n in range(3)))
    assert server.connections == 3
    # No request follows: the client itself hangs up every idle connection once keep-alive is past.
    await asyncio.wait_for(asyncio.gather(*(peer.client_closed.wait() for peer in server.peers)), 2)
