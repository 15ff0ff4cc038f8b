"""Slow clients (Slowloris) against a real relay on real sockets, on both listeners.

A request head must arrive within ``header_timeout_seconds`` of its first
byte (408, then the connection is closed), a body within
``body_timeout_seconds`` (408, nothing stored); the idle time before a
request does not count, so keep-alive, pipelining and fast clients are
unaffected. The deadlines are set short here (1 s and 2 s) to keep the tests
fast; the defaults are 10 s and 30 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from yarl import URL

from relay.config import Config
from relay.deadline import check_aiohttp_internals
from relay.service import Relay

from support import INGEST_PATH, ingest, lifecycle_bodies, make_config, read_response, signed

HEADER_TIMEOUT = 1.0
BODY_TIMEOUT = 2.0
MARGIN = 1.5  # scheduling slack on a loaded machine; a missing deadline would take 75 s (keep-alive) or for ever
EARLY = 0.05  # the client's clock starts a moment before the relay's

# A head that is never finished: 400 bytes at one byte every 0.3 s would take two minutes.
SLOW_HEAD = b"POST " + INGEST_PATH.encode() + b" HTTP/1.1\r\nHost: relay.test\r\nX-Slow: " + b"a" * 400
HEAD_TIMEOUT_ANSWER = {"error": "request head not received in time"}


def slow_config(tmp_path: Path, header: float = HEADER_TIMEOUT, body: float = BODY_TIMEOUT) -> Config:
    return make_config(
        str(tmp_path / "relay.db"), relay={"header_timeout_seconds": header, "body_timeout_seconds": body}
    )


async def hang_up(sender: asyncio.Task[None], writer: asyncio.StreamWriter) -> None:
    """Stop a trickling sender and close its connection, whatever state either is in."""
    sender.cancel()
    with contextlib.suppress(asyncio.CancelledError, ConnectionError):
        await sender
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


@dataclass
class Trickled:
    answer: bytes  # everything the relay sent before it closed the connection
    closed_after: float | None  # seconds from the first byte sent to the close; None if still open at the limit


async def read_to_eof(reader: asyncio.StreamReader) -> bytes:
    data = b""
    with contextlib.suppress(ConnectionResetError):  # a reset is a close too
        while chunk := await reader.read(65536):
            data += chunk
    return data


async def trickle(
    base_url: str,
    payload: bytes,
    *,
    every: float = 0.3,
    limit: float = 15.0,
    started: asyncio.Event | None = None,
) -> Trickled:
    """Send ``payload`` one byte every ``every`` seconds until the relay closes the connection (or ``limit``)."""
    url = URL(base_url)
    reader, writer = await asyncio.open_connection(url.host, url.port)

    async def send() -> None:
        for i in range(len(payload)):
            writer.write(payload[i : i + 1])
            await writer.drain()
            if started is not None:
                started.set()
            await asyncio.sleep(every)

    first = time.monotonic()
    sender = asyncio.create_task(send())
    try:
        answer = await asyncio.wait_for(read_to_eof(reader), limit)
        closed_after: float | None = time.monotonic() - first
    except TimeoutError:
        answer, closed_after = b"", None
    finally:
        await hang_up(sender, writer)
    return Trickled(answer, closed_after)


def post_head(body: bytes, headers: dict[str, str] | None = None, path: str = INGEST_PATH) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1"]
    lines += [f"{name}: {value}" for name, value in {"Content-Type": "application/json", **(headers or {})}.items()]
    lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def stored_deliveries(http: aiohttp.ClientSession, relay: Relay) -> list[Any]:
    assert relay.bound is not None
    async with http.get(relay.bound.admin_url + "/api/deliveries") as resp:
        assert resp.status == 200
        return list((await resp.json())["deliveries"])


async def healthz(http: aiohttp.ClientSession, base_url: str) -> int:
    async with http.get(base_url + "/healthz") as resp:
        return resp.status


def assert_closed_at_the_head_deadline(result: Trickled, deadline: float = HEADER_TIMEOUT) -> None:
    assert result.closed_after is not None, "the relay kept a trickling client's connection open"
    assert deadline - EARLY <= result.closed_after < deadline + MARGIN, result.closed_after
    head, _, body = result.answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 ") and b"Connection: close" in head, result.answer
    assert json.loads(body) == HEAD_TIMEOUT_ANSWER


# --- the request head ---------------------------------------------------------------------------


async def test_a_client_trickling_its_head_gets_408_and_is_closed_at_the_deadline(relay_factory, http, tmp_path):
    relay = await relay_factory(slow_config(tmp_path))
    result = await trickle(relay.bound.ingest_url, SLOW_HEAD, every=0.3)
    assert_closed_at_the_head_deadline(result)
    assert await stored_deliveries(http, relay) == []


async def test_fifty_trickling_clients_do_not_delay_a_normal_delivery(relay_factory, http, tmp_path):
    header_timeout = 4.0  # long enough that all fifty are surely still open while the delivery is sent
    relay = await relay_factory(slow_config(tmp_path, header=header_timeout))
    started = [asyncio.Event() for _ in range(50)]
    slow = [asyncio.create_task(trickle(relay.bound.ingest_url, SLOW_HEAD, started=event)) for event in started]
    await asyncio.wait_for(asyncio.gather(*(event.wait() for event in started)), 10)

    body = lifecycle_bodies()[0]
    began = time.monotonic()
    delivery = await ingest(http, relay, body, signed(body))  # answered 200
    took = time.monotonic() - began
    assert not any(task.done() for task in slow), "a slow client was closed before the delivery was answered"
    assert took < 1.0, f"a normal delivery took {took:.2f} s beside fifty slow clients"

    for result in await asyncio.gather(*slow):
        assert_closed_at_the_head_deadline(result, header_timeout)
    assert [d["id"] for d in await stored_deliveries(http, relay)] == [delivery]


async def test_a_head_that_arrives_in_pieces_within_the_deadline_is_served(relay_factory, http, tmp_path):
    relay = await relay_factory(slow_config(tmp_path))
    body = lifecycle_bodies()[0]
    request = post_head(body, {**signed(body), "Connection": "close"}) + body
    url = URL(relay.bound.ingest_url)
    reader, writer = await asyncio.open_connection(url.host, url.port)
    try:
        step = len(request) // 4 + 1
        for i in range(0, len(request), step):  # four pieces over 0.6 s: well within the 1 s deadline
            writer.write(request[i : i + step])
            await writer.drain()
            await asyncio.sleep(0.2)
        status, _, answer = await asyncio.wait_for(read_response(reader), 5)
    finally:
        writer.close()
        await writer.wait_closed()
    assert status == 200, answer
    assert len(await stored_deliveries(http, relay)) == 1


# --- keep-alive and pipelining ------------------------------------------------------------------


async def test_each_request_on_a_kept_alive_connection_gets_its_own_head_deadline(relay_factory, http, tmp_path):
    """The idle gap before a request's first byte is keep-alive time (75 s), not head time: two
    requests, each trickled over 0.6 s, with 1.5 s of silence between them, on one connection."""
    relay = await relay_factory(slow_config(tmp_path))
    url = URL(relay.bound.ingest_url)
    reader, writer = await asyncio.open_connection(url.host, url.port)
    try:
        for n, body in enumerate(lifecycle_bodies()[:2]):
            if n:
                await asyncio.sleep(HEADER_TIMEOUT + 0.5)  # silence on the kept-alive connection
            request = post_head(body, signed(body)) + body
            step = len(request) // 4 + 1
            for i in range(0, len(request), step):
                writer.write(request[i : i + step])
                await writer.drain()
                await asyncio.sleep(0.2)
            status, headers, answer = await asyncio.wait_for(read_response(reader), 5)
            assert status == 200, answer
            assert headers.get("connection", "keep-alive").lower() != "close"
    finally:
        writer.close()
        await writer.wait_closed()
    assert len(await stored_deliveries(http, relay)) == 2


async def test_pipelined_requests_in_one_write_are_all_answered_in_order(relay_factory, http, tmp_path):
    relay = await relay_factory(slow_config(tmp_path))
    bodies = lifecycle_bodies()[:3]
    url = URL(relay.bound.ingest_url)
    reader, writer = await asyncio.open_connection(url.host, url.port)
    try:
        writer.write(b"".join(post_head(body, signed(body)) + body for body in bodies))
        await writer.drain()
        answers = [await asyncio.wait_for(read_response(reader), 5) for _ in bodies]
        # The connection is still usable afterwards, past the head deadline.
        await asyncio.sleep(HEADER_TIMEOUT + 0.5)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        await writer.drain()
        health = await asyncio.wait_for(read_response(reader), 5)
    finally:
        writer.close()
        await writer.wait_closed()
    assert [status for status, _, _ in answers] == [200, 200, 200]
    ids = [json.loads(answer)["delivery"] for _, _, answer in answers]
    assert ids == sorted(ids)
    assert health[0] == 200


# --- the request body ---------------------------------------------------------------------------


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_a_client_trickling_its_body_gets_408_and_nothing_is_stored(relay_factory, http, tmp_path, framing):
    relay = await relay_factory(slow_config(tmp_path))
    body = b'{"id": "slowbody", "status": "starting", "pad": "' + b"x" * 1950 + b'"}'
    if framing == "content-length":
        head = post_head(body, signed(body))
        payload = body
    else:
        head = post_head(body, signed(body)).replace(
            f"Content-Length: {len(body)}".encode(), b"Transfer-Encoding: chunked"
        )
        payload = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    url = URL(relay.bound.ingest_url)
    reader, writer = await asyncio.open_connection(url.host, url.port)

    async def send_slowly() -> None:  # 100 bytes a second: twenty seconds for the whole body
        for i in range(0, len(payload), 10):
            writer.write(payload[i : i + 10])
            await writer.drain()
            await asyncio.sleep(0.1)

    writer.write(head)
    await writer.drain()
    began = time.monotonic()
    sender = asyncio.create_task(send_slowly())
    try:
        status, headers, answer = await asyncio.wait_for(read_response(reader), BODY_TIMEOUT + MARGIN)
        took = time.monotonic() - began
    finally:
        await hang_up(sender, writer)

    assert status == 408, answer
    assert json.loads(answer) == {"error": "request body not received in time"}
    assert headers["connection"].lower() == "close"
    # The body deadline, not the head deadline (1 s), ended it: body bytes never start the head timer.
    assert took >= BODY_TIMEOUT - EARLY, took
    assert await stored_deliveries(http, relay) == []
    async with http.get(relay.bound.admin_url + "/metrics") as resp:
        assert 'relay_ingest_refused_total{reason="slow_body",source="replicate"} 1.0' in await resp.text()
    assert await healthz(http, relay.bound.ingest_url) == 200
    assert await healthz(http, relay.bound.admin_url) == 200


# --- the admin listener -------------------------------------------------------------------------


async def test_the_admin_listener_has_the_same_deadlines(relay_factory, http, tmp_path):
    relay = await relay_factory(slow_config(tmp_path))
    admin = relay.bound.admin_url
    result = await trickle(admin, b"GET /api/deliveries HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 400)
    assert_closed_at_the_head_deadline(result)

    body = b'{"secret": "' + b"x" * 2000 + b'"}'
    url = URL(admin)
    reader, writer = await asyncio.open_connection(url.host, url.port)
    try:
        writer.write(post_head(body, path="/api/deliveries/1/verify") + body[:10])
        await writer.drain()
        began = time.monotonic()
        status, _, answer = await asyncio.wait_for(read_response(reader), BODY_TIMEOUT + MARGIN)
        took = time.monotonic() - began
    finally:
        writer.close()
        await writer.wait_closed()
    assert status == 408, answer
    assert json.loads(answer) == {"error": "request timeout"}
    assert took >= BODY_TIMEOUT - EARLY, took
    assert await healthz(http, admin) == 200


# --- what relay/deadline.py borrows from aiohttp ----------------------------------------------


def test_the_aiohttp_internals_relay_deadline_reads_are_still_there():
    """relay/deadline.py reads private aiohttp attributes (checked against 3.14.5); this fails first
    when an upgrade removes one. The tests above fail if they stop meaning what the module assumes:
    a head that never ends would stay open (test 1), or body bytes would end a request at the head
    deadline (the body test)."""
    check_aiohttp_internals()


async def test_stopping_the_relay_closes_both_listening_sockets(tmp_path):
    relay = Relay(slow_config(tmp_path))
    bound = await relay.start()
    await relay.stop()
    for base in (bound.ingest_url, bound.admin_url):
        url = URL(base)
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection(url.host, url.port)
