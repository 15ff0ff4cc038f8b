"""Forwarding end to end: a real relay on real sockets, on both storage backends (a SQLite file in
tmp_path, a fresh PostgreSQL database), real scripted upstreams.

Nothing of the project is mocked; every wait is a condition with a deadline
(``wait_until``), and "nothing more arrived" is checked against a later event
that has been delivered, never against a sleep.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from relay.model import Forwarding
from relay.sender import RESPONSE_BODY_CAP
from relay.service import Relay

from support import (
    INGEST_PATH,
    OTHER_SECRET,
    SECRET,
    Received,
    ScriptedUpstream,
    free_port,
    ingest,
    lifecycle_bodies,
    make_config,
    replicate_validate,
    replicate_verdict,
    signed,
    wait_until,
)

# --- helpers ---------------------------------------------------------------------------


async def forwarding(relay: Relay, delivery_id: int, upstream: str = "up0") -> Forwarding:
    assert relay.store is not None
    delivery = await relay.store.get_delivery(delivery_id)
    matches = [f for f in delivery.forwarding if f.upstream == upstream]
    assert len(matches) == 1, delivery.forwarding
    return matches[0]


async def wait_state(relay: Relay, delivery_id: int, state: str, upstream: str = "up0", timeout: float = 10.0) -> None:
    last: list[Forwarding] = []

    async def reached() -> bool:
        fw = await forwarding(relay, delivery_id, upstream)
        last[:] = [fw]
        return fw.state == state

    try:
        await wait_until(reached, timeout=timeout)
    except AssertionError as exc:
        raise AssertionError(f"delivery {delivery_id} to {upstream} never became {state!r}: {last}") from exc


def values(received: Received, name: str) -> list[str]:
    wanted = name.lower()
    return [v for k, v in received.headers if k.lower() == wanted]


def one(received: Received, name: str) -> str:
    found = values(received, name)
    assert len(found) == 1, (name, received.headers)
    return found[0]


@pytest.fixture(autouse=True, params=["inline", "process"])
def forwarder_mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every forwarding test runs with the forwarder inline and in its own process (the default of
    ``relay serve``)."""
    monkeypatch.setenv("RELAY_TEST_FORWARDER", request.param)
    return str(request.param)


def relay_id(received: Received) -> int:
    return int(one(received, "X-Relay-Delivery"))


def validating_step(results: list[str], secret: str = SECRET) -> Callable[[web.Request], Any]:
    """A scripted step: 200 when the replicate package's validator accepts the request, else 401.

    The verdict (``"ok"`` or what the validator raised) is appended to ``results``.
    """

    async def step(request: web.Request) -> web.Response:
        verdict = replicate_verdict(request.headers, await request.read(), secret)
        results.append(verdict)
        if verdict != "ok":
            return web.Response(status=401, text="signature rejected")
        return web.Response(status=200, text="ok")

    return step


async def post_last_event(
    http: aiohttp.ClientSession, relay: Relay, prediction: str, state: str
) -> tuple[bytes, Forwarding]:
    """Post the last event of a prediction's lifecycle, signed; wait until its forward to up0 is ``state``."""
    body = lifecycle_bodies(prediction)[-1]
    did = await ingest(http, relay, body, signed(body))
    await wait_state(relay, did, state)
    return body, await forwarding(relay, did)


# --- the upstream's own verification, query string, body bytes -------------------------


async def test_replicate_validator_accepts_every_forwarded_delivery(relay_factory, upstream_factory, http, database):
    results: list[str] = []
    bodies = lifecycle_bodies("predvalidate")
    up = await upstream_factory(script=[validating_step(results) for _ in bodies])
    relay = await relay_factory(make_config(database, upstreams=[{"url": up.url}]))

    sent = []
    for body in bodies:
        headers = signed(body)
        did = await ingest(http, relay, body, headers, query="userId=123&jobId=456")
        sent.append((did, body, headers))

    for did, _, _ in sent:
        await wait_state(relay, did, "delivered")
    assert len(up.received) == len(bodies), [relay_id(r) for r in up.received]
    assert results == ["ok"] * len(bodies)
    by_id = {relay_id(r): r for r in up.received}
    assert sorted(by_id) == [did for did, _, _ in sent]
    for did, body, headers in sent:
        got = by_id[did]
        assert got.method == "POST"
        assert got.path_qs == "/hook?userId=123&jobId=456"
        assert got.body == body
        for name in ("webhook-id", "webhook-timestamp", "webhook-signature"):
            assert one(got, name) == headers[name]
        fw = await forwarding(relay, did)
        assert fw.attempts_made == 1
        assert [a.status for a in fw.attempts] == [200]
        assert fw.attempts[0].target == up.url + "?userId=123&jobId=456"


async def test_query_string_is_appended_raw_to_an_upstream_url_with_its_own_query(
    relay_factory, upstream_factory, http, database
):
    up = await upstream_factory()
    relay = await relay_factory(make_config(database, upstreams=[{"url": up.url + "?app=1"}]))
    body = lifecycle_bodies("predquery")[0]
    query = "userId=123&jobId=456&note=a%20b%2Fc&empty=&flag"
    did = await ingest(http, relay, body, signed(body), query=query)
    await wait_state(relay, did, "delivered")
    assert [r.path_qs for r in up.received] == [f"/hook?app=1&{query}"]


async def test_binary_body_is_forwarded_byte_for_byte(relay_factory, upstream_factory, http, database):
    up = await upstream_factory()
    relay = await relay_factory(
        make_config(
            database,
            source={"secret": None, "on_invalid": "accept"},
            upstreams=[{"url": up.url}],
        )
    )
    body = b"\xff\xfe\x00\x80not utf-8\xc3\x28" + bytes(range(256)) * 8 + b"\r\n\x00"
    with pytest.raises(UnicodeDecodeError):
        body.decode("utf-8")
    did = await ingest(http, relay, body, {"Content-Type": "application/octet-stream"}, query="userId=123&jobId=456")
    await wait_state(relay, did, "delivered")
    assert len(up.received) == 1
    got = up.received[0]
    assert got.body == body
    assert got.path_qs == "/hook?userId=123&jobId=456"
    assert one(got, "Content-Type") == "application/octet-stream"
    assert int(one(got, "Content-Length")) == len(body)


# --- headers ---------------------------------------------------------------------------


async def test_forwarded_headers(relay_factory, upstream_factory, http, database):
    up = await upstream_factory()
    relay = await relay_factory(make_config(database, upstreams=[{"url": up.url}]))
    body = lifecycle_bodies("predheaders")[0]
    headers = {
        **signed(body),
        "X-Custom-Thing": "Some Value",
        "x-lower-case": "kept",
        "Connection": "keep-alive, X-Hop-Named",
        "X-Hop-Named": "must not pass",
        "Keep-Alive": "timeout=5, max=100",
        "X-Forwarded-For": "203.0.113.7",
        "X-Relay-Delivery": "999999",  # a spoofed relay header must not survive
    }
    did = await ingest(http, relay, body, headers, query="userId=123&jobId=456")
    await wait_state(relay, did, "delivered")
    assert len(up.received) == 1
    got = up.received[0]
    names = [k for k, _ in got.headers]

    # Original headers keep their case and value.
    assert "X-Custom-Thing" in names and one(got, "X-Custom-Thing") == "Some Value"
    assert "x-lower-case" in names and one(got, "x-lower-case") == "kept"
    assert one(got, "User-Agent") == headers["User-Agent"]
    assert one(got, "Content-Type") == "application/json"
    for name in ("webhook-id", "webhook-timestamp", "webhook-signature"):
        assert name in names
        assert one(got, name) == headers[name]

    # Hop-by-hop ones are dropped; Host is the upstream's own.
    lower = [n.lower() for n in names]
    assert "x-hop-named" not in lower
    assert "keep-alive" not in lower
    assert "transfer-encoding" not in lower
    assert "keep-alive" not in [v.lower() for v in values(got, "Connection")]
    assert values(got, "Host") == [up.url.split("/")[2]]
    assert int(one(got, "Content-Length")) == len(body)

    # The relay's own headers.
    forwarded_for = one(got, "X-Forwarded-For")
    assert "127.0.0.1" in forwarded_for
    assert forwarded_for.startswith("203.0.113.7")
    assert one(got, "X-Forwarded-Proto") in ("http", "https")
    assert relay_id(got) == did
    assert got.body == body


async def test_chunked_request_is_forwarded_without_transfer_encoding(relay_factory, upstream_factory, http, database):
    up = await upstream_factory()
    relay = await relay_factory(make_config(database, upstreams=[{"url": up.url}]))
    body = lifecycle_bodies("predchunked")[-1]
    headers = signed(body)

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(body), 100):
            yield body[i : i + 100]

    assert relay.bound is not None
    async with http.post(relay.bound.ingest_url + INGEST_PATH, data=chunks(), headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        did = int((await resp.json())["delivery"])
    assert relay.store is not None
    stored = await relay.store.get_delivery(did)
    assert "chunked" in [v.lower() for k, v in stored.headers if k.lower() == "transfer-encoding"]

    await wait_state(relay, did, "delivered")
    got = up.received[0]
    assert got.body == body
    assert values(got, "Transfer-Encoding") == []
    assert int(one(got, "Content-Length")) == len(body)
    replicate_validate(dict(got.headers), got.body)


# --- retries ---------------------------------------------------------------------------


async def test_upstream_503_twice_then_up_is_retried_and_delivered(relay_factory, upstream_factory, http, database):
    up = await upstream_factory(script=[503, 503], then=200)
    relay = await relay_factory(make_config(database, upstreams=[{"url": up.url}]))
    body, fw = await post_last_event(http, relay, "predretry", "delivered")

    assert fw.attempts_made == 3
    assert [a.status for a in fw.attempts] == [503, 503, 200]
    assert [a.outcome for a in fw.attempts] == ["retry", "retry", "delivered"]
    assert all(a.error is None for a in fw.attempts)
    assert all(a.duration_ms >= 0 for a in fw.attempts)
    assert fw.attempts[0].response_body == b"answer 503"
    assert fw.note is None
    assert fw.next_attempt_at is None
    assert len(up.received) == 3
    assert all(r.body == body for r in up.received)
    # Each retry comes after the previous answer, not all at once.
    assert up.received[0].at <= up.received[1].at <= up.received[2].at


async def test_connection_refused_then_upstream_comes_up(relay_factory, http, database, serve):
    port = free_port()
    url = f"http://127.0.0.1:{port}/hook"
    relay = await relay_factory(make_config(database, upstreams=[{"url": url, "max_attempts": 1000}]))
    body = lifecycle_bodies("predrefused")[-1]
    did = await ingest(http, relay, body, signed(body), query="userId=123")

    async def refused_twice() -> bool:
        return (await forwarding(relay, did)).attempts_made >= 2

    await wait_until(refused_twice)
    fw = await forwarding(relay, did)
    assert fw.state == "pending"
    for attempt in fw.attempts:
        assert attempt.status is None
        assert attempt.outcome == "retry"
        assert attempt.error, attempt
        assert attempt.target == url + "?userId=123"
    assert "retrying" in (fw.note or "")

    up = ScriptedUpstream()
    await serve(up.app(), "/hook", port=port)

    await wait_state(relay, did, "delivered")
    fw = await forwarding(relay, did)
    assert fw.attempts[-1].status == 200
    assert fw.attempts[-1].outcome == "delivered"
    assert fw.attempts[-1].error is None
    assert all(a.status is None and a.error for a in fw.attempts[:-1])
    assert fw.attempts_made == len(fw.attempts) >= 3
    assert len(up.received) == 1
    assert up.received[0].body == body
    assert up.received[0].path_qs == "/hook?userId=123"


@pytest.mark.parametrize("status", [408, 429, 500, 502, 504])
async def test_retryable_statuses_are_retried(relay_factory, upstream_factory, http, database, status):
    up = await upstream_factory(script=[status], then=200)
    relay = await relay_factory(make_config(database, upstreams=[{"url": up.url}]))
    _, fw = await post_last_event(http, relay, f"predstatus{status}", "delivered")
    assert [(a.status, a.outcome) for a in fw.attempts] == [(status, "retry"), (200, "delivered")]
    assert len(up.received) == 2


@pytest.mark.parametrize("status", [301, 401, 404, 410, 422])
async def test_other_answers_are_final(relay_factory, upstream_factory, http, database, status):
    up = await upstream_factory(script=[(status, {"Location": "http://127.0.0.1:1/elsewhere"})], then=200)
    relay = await relay_factory(make_config(database, upstreams=[{"url": up.url}]))
    _, fw = await post_last_event(http, relay, f"predstatus{status}", "failed")
    assert [(a.status, a.outcome) for a in fw.attempts] == [(status, "failed")]
    assert len(up.received) == 1  # a redirect is not followed either


async def test_timeout_is_retried(relay_factory, upstream_factory, http, database):
    stall = asyncio.Event()  # never set: the first request hangs past the timeout

    async def hang(request: web.Request) -> web.Response:
        await stall.wait()
        return web.Response(status=200)

    up = await upstream_factory(script=[hang], then=200)
    relay = await relay_factory(make_config(database, upstreams=[{"url": up.url, "timeout_seconds": 0.3}]))
    _, fw = await post_last_event(http, relay, "predtimeout", "delivered")
    assert [(a.status, a.outcome) for a in fw.attempts] == [(None, "retry"), (200, "delivered")]
    first = fw.attempts[0]
    assert "timed out" in (first.error or "")
    assert 250 <= first.duration_ms < 5000
    assert len(up.received) == 2


async def test_400_is_final_and_never_retried(relay_factory, upstream_factory, http, database):
    up = await upstream_factory(script=[400], then=200)
    relay = await relay_factory(make_config(database, upstreams=[{"url": up.url}]))
    first = lifecycle_bodies("predfinal")[0]
    first_id = await ingest(http, relay, first, signed(first))
    await wait_state(relay, first_id, "failed")
    fw = await forwarding(relay, first_id)
    assert fw.attempts_made == 1
    assert [(a.status, a.outcome) for a in fw.attempts] == [(400, "failed")]
    assert fw.next_attempt_at is None
    assert "400" in (fw.note or "") and "final" in (fw.note or "")

    # Barrier: a later delivery to the same upstream goes through; the failed one was not sent again.
    later = lifecycle_bodies("predfinal-later")[0]
    later_id = await ingest(http, relay, later, signed(later))
    await wait_state(relay, later_id, "delivered")
    fw = await forwarding(relay, first_id)
    assert fw.state == "failed"
    assert fw.attempts_made == 1 and len(fw.attempts) == 1
    assert [relay_id(r) for r in up.received] == [first_id, later_id]


async def test_429_retry_after_is_honoured(relay_factory, upstream_factory, http, database):
    up = await upstream_factory(script=[(429, {"Retry-After": "1"})], then=200)
    relay = await relay_factory(make_config(database, upstreams=[{"url": up.url}]))
    _, fw = await post_last_event(http, relay, "pred429", "delivered")
    assert len(up.received) == 2
    gap = up.received[1].at - up.received[0].at
    assert gap >= 0.95, f"retried {gap:.3f} s after a 429 with Retry-After: 1"
    assert [(a.status, a.outcome) for a in fw.attempts] == [(429, "retry"), (200, "delivered")]
    assert ("Retry-After", "1") in fw.attempts[0].response_headers


async def test_max_attempts_then_dead(relay_factory, upstream_factory, http, database):
    up = await upstream_factory(then=500)
    relay = await relay_factory(make_config(database, upstreams=[{"url": up.url, "max_attempts": 3}]))
    _, fw = await post_last_event(http, relay, "preddead", "dead")
    assert fw.attempts_made == 3
    assert [a.status for a in fw.attempts] == [500, 500, 500]
    assert [a.outcome for a in fw.attempts] == ["retry", "retry", "dead"]
    assert "gave up" in (fw.note or "") and "3" in (fw.note or "")
    assert fw.next_attempt_at is None
    assert len(up.received) == 3


# --- ordering --------------------------------------------------------------------------


class PredictionAwareUpstream:
    """Answers per request body: fails chosen (prediction, status) events, logs every receipt."""

    def __init__(self, fail: Callable[[str, str, int], bool]) -> None:
        self.fail = fail
        self.log: list[tuple[str, int, int]] = []  # (prediction id, delivery id, status answered)
        self.seen: dict[int, int] = {}

    async def __call__(self, request: web.Request) -> web.Response:
        doc = json.loads(await request.read())
        did = int(request.headers["X-Relay-Delivery"])
        tries = self.seen[did] = self.seen.get(did, 0) + 1
        status = 500 if self.fail(doc["id"], doc["status"], tries) else 200
        self.log.append((doc["id"], did, status))
        return web.Response(status=status, text=f"answer {status}")

    def received_for(self, prediction: str) -> list[int]:
        return [did for pred, did, _ in self.log if pred == prediction]

    def delivered_for(self, prediction: str) -> list[int]:
        order: list[int] = []
        for pred, did, status in self.log:
            if pred == prediction and status == 200 and did not in order:
                order.append(did)
        return order


async def test_ordered_upstream_gets_each_predictions_events_in_ingest_order(
    relay_factory, upstream_factory, http, database
):
    # The first event of every prediction is refused twice; the three after it must wait for it.
    upstream = PredictionAwareUpstream(lambda pred, status, tries: status == "starting" and tries <= 2)
    up = await upstream_factory(then=upstream)
    relay = await relay_factory(make_config(database, upstreams=[{"url": up.url}]))
    predictions = [f"predorder{i}" for i in range(4)]
    ids: dict[str, list[int]] = {}

    async def post_lifecycle(pred: str) -> None:
        ids[pred] = []
        for body in lifecycle_bodies(pred):
            ids[pred].append(await ingest(http, relay, body, signed(body)))

    await asyncio.gather(*(post_lifecycle(p) for p in predictions))

    all_ids = [did for pred in predictions for did in ids[pred]]
    assert len(set(all_ids)) == 16
    for did in all_ids:
        await wait_state(relay, did, "delivered")

    for pred in predictions:
        first, *rest = ids[pred]
        assert ids[pred] == sorted(ids[pred])
        assert upstream.delivered_for(pred) == ids[pred], (pred, upstream.log)
        # Nothing later was even tried while the first was still failing.
        assert upstream.received_for(pred) == [first, first, first, *rest], (pred, upstream.log)
        fw = await forwarding(relay, first)
        assert [a.status for a in fw.attempts] == [500, 500, 200]


async def test_a_hanging_upstream_does_not_hold_back_another_upstreams_deliveries(
    relay_factory, upstream_factory, http, database
):
    # up0 never answers while the test runs; up1 answers at once. Without a share of the
    # attempt slots per upstream, up0's hung attempts take all 64 and up1 waits for its timeout.
    release = asyncio.Event()

    async def hang(request: web.Request) -> web.Response:
        await release.wait()
        return web.Response(status=200)

    stuck = await upstream_factory(then=hang)
    healthy = await upstream_factory(then=200)
    relay = await relay_factory(
        make_config(database, upstreams=[{"url": stuck.url, "timeout_seconds": 30}, {"url": healthy.url}])
    )
    try:
        ids = []
        for i in range(100):
            body = lifecycle_bodies(f"predshare{i}")[-1]
            ids.append(await ingest(http, relay, body, signed(body)))
        await wait_until(lambda: len(healthy.received) >= len(ids), timeout=10.0)
        assert sorted(relay_id(r) for r in healthy.received) == ids
        # up0 got no more than its share of the slots, and its rows wait their turn, not lost.
        assert 0 < len(stuck.received) <= 32
        assert (await forwarding(relay, ids[-1], "up0")).state == "pending"
    finally:
        release.set()  # let the hung attempts finish so the relay stops promptly


async def test_a_due_retry_goes_out_while_a_hanging_upstream_refills_its_share(
    relay_factory, upstream_factory, http, database
):
    # up0 answers its first 32 requests once `gate` opens and hangs on the rest; up1 answers its
    # first request 500 (retried about 6 s later) and the rest 200. When the gate opens, each of
    # up0's answers frees a slot that its backlog refills with a hanging attempt; up1's retry,
    # due meanwhile, must still go out on time, not when up0's attempts time out (30 s).
    gate, release = asyncio.Event(), asyncio.Event()

    async def gated(request: web.Request) -> web.Response:
        await (gate if len(stuck.received) <= 32 else release).wait()
        return web.Response(status=200)

    stuck = await upstream_factory(then=gated)
    flaky = await upstream_factory(script=[500], then=200)
    relay = await relay_factory(
        make_config(
            database,
            upstreams=[
                {"url": stuck.url, "timeout_seconds": 30},
                {"url": flaky.url, "retry_base_seconds": 6, "retry_max_seconds": 6},
            ],
        )
    )
    try:
        for i in range(80):
            body = lifecycle_bodies(f"predretry{i}")[-1]
            await ingest(http, relay, body, signed(body))
        await wait_until(lambda: len(flaky.received) >= 80 and len(stuck.received) >= 32)
        retried = relay_id(flaky.received[0])
        assert (await forwarding(relay, retried, "up1")).attempts_made == 1  # its retry is not due yet
        gate.set()
        await wait_until(lambda: len(stuck.received) >= 64)  # up0's share is full again, of hanging attempts
        await wait_state(relay, retried, "delivered", "up1", timeout=15.0)
    finally:
        gate.set()
        release.set()  # let the hung attempts finish so the relay stops promptly


async def test_unordered_upstream_does_not_hold_later_events_back(relay_factory, upstream_factory, http, database):
    release = asyncio.Event()
    upstream = PredictionAwareUpstream(lambda pred, status, tries: status == "starting" and not release.is_set())
    up = await upstream_factory(then=upstream)
    relay = await relay_factory(
        make_config(database, upstreams=[{"url": up.url, "ordered": False, "max_attempts": 1000}])
    )
    ids = []
    for body in lifecycle_bodies("predunordered"):
        ids.append(await ingest(http, relay, body, signed(body)))
    first, *rest = ids
    for did in rest:
        await wait_state(relay, did, "delivered")
    fw = await forwarding(relay, first)
    assert fw.state == "pending"
    assert fw.attempts_made >= 1 and all(a.status == 500 for a in fw.attempts)
    assert set(upstream.delivered_for("predunordered")) == set(rest)

    release.set()
    await wait_state(relay, first, "delivered")
    assert sorted(upstream.delivered_for("predunordered")) == ids


# --- duplicates ------------------------------------------------------------------------


async def test_duplicate_is_skipped_once_the_original_is_delivered(relay_factory, upstream_factory, http, database):
    gate = asyncio.Event()

    async def held_503(request: web.Request) -> web.Response:
        await gate.wait()
        return web.Response(status=503, text="busy")

    up = await upstream_factory(script=[held_503, 503], then=200)
    relay = await relay_factory(make_config(database, upstreams=[{"url": up.url}]))
    body = lifecycle_bodies("preddup")[-1]
    now = int(time.time())
    first_id = await ingest(http, relay, body, signed(body, msg_id="msg_dup_1", timestamp=now - 20))
    # The original's first attempt is in flight (held by the upstream) when Replicate retries.
    await wait_until(lambda: len(up.received) == 1)
    retry_headers = signed(body, msg_id="msg_dup_1", timestamp=now)
    second_id = await ingest(http, relay, body, retry_headers)
    assert second_id > first_id

    assert relay.store is not None
    second = await relay.store.get_delivery(second_id)
    assert second.duplicate_of == first_id
    assert (await relay.store.get_delivery(first_id)).duplicate_of is None
    assert (await forwarding(relay, second_id)).state == "pending"

    gate.set()
    await wait_state(relay, first_id, "delivered")
    await wait_state(relay, second_id, "skipped")
    fw = await forwarding(relay, second_id)
    assert str(first_id) in (fw.note or "")
    assert "duplicate" in (fw.note or "")
    assert fw.attempts_made == 0 and fw.attempts == ()
    assert [a.status for a in (await forwarding(relay, first_id)).attempts] == [503, 503, 200]
    assert {relay_id(r) for r in up.received} == {first_id}
    assert sum(1 for r in up.received if values(r, "webhook-id") == ["msg_dup_1"]) == 3


async def test_duplicate_of_a_failed_original_is_sent(relay_factory, upstream_factory, http, database):
    up = await upstream_factory(script=[400], then=200)
    relay = await relay_factory(make_config(database, upstreams=[{"url": up.url}]))
    body = lifecycle_bodies("preddupfailed")[-1]
    first_id = await ingest(http, relay, body, signed(body, msg_id="msg_dup_2"))
    await wait_state(relay, first_id, "failed")

    retry_headers = signed(body, msg_id="msg_dup_2", timestamp=int(time.time()) + 1)
    second_id = await ingest(http, relay, body, retry_headers)
    assert relay.store is not None
    assert (await relay.store.get_delivery(second_id)).duplicate_of == first_id
    await wait_state(relay, second_id, "delivered")
    assert [relay_id(r) for r in up.received] == [first_id, second_id]
    got = up.received[1]
    assert got.body == body
    assert one(got, "webhook-timestamp") == retry_headers["webhook-timestamp"]
    assert one(got, "webhook-signature") == retry_headers["webhook-signature"]
    assert (await forwarding(relay, first_id)).attempts_made == 1


async def test_same_webhook_id_with_a_different_body_is_not_a_duplicate(
    relay_factory, upstream_factory, http, database
):
    up = await upstream_factory()
    relay = await relay_factory(make_config(database, upstreams=[{"url": up.url}]))
    a, b = lifecycle_bodies("preddupbody")[:2]
    first_id = await ingest(http, relay, a, signed(a, msg_id="msg_dup_3"))
    second_id = await ingest(http, relay, b, signed(b, msg_id="msg_dup_3"))
    await wait_state(relay, first_id, "delivered")
    await wait_state(relay, second_id, "delivered")
    assert relay.store is not None
    assert (await relay.store.get_delivery(second_id)).duplicate_of is None
    assert [relay_id(r) for r in up.received] == [first_id, second_id]


# --- re-signing ------------------------------------------------------------------------


async def test_resign_with_the_upstreams_own_secret(relay_factory, upstream_factory, http, database):
    results: list[str] = []
    up = await upstream_factory(script=[validating_step(results, OTHER_SECRET)])
    relay = await relay_factory(
        make_config(database, upstreams=[{"url": up.url, "resign": True, "secret": OTHER_SECRET}])
    )
    body = lifecycle_bodies("predresign")[-1]
    original_ts = int(time.time()) - 120
    headers = signed(body, msg_id="msg_resign", timestamp=original_ts)
    before = int(time.time())
    did = await ingest(http, relay, body, headers)
    await wait_state(relay, did, "delivered")
    after = int(time.time())

    assert results == ["ok"]
    got = up.received[0]
    assert got.body == body
    assert one(got, "webhook-id") == "msg_resign"
    fresh_ts = int(one(got, "webhook-timestamp"))
    assert fresh_ts != original_ts
    assert before <= fresh_ts <= after
    assert one(got, "webhook-signature") != headers["webhook-signature"]
    fresh = {
        "webhook-id": "msg_resign",
        "webhook-timestamp": str(fresh_ts),
        "webhook-signature": one(got, "webhook-signature"),
    }
    replicate_validate(fresh, body, OTHER_SECRET)
    with pytest.raises(Exception, match="invalid"):
        replicate_validate(fresh, body, SECRET)
    assert relay_id(got) == did


async def test_resign_without_own_secret_uses_the_sources(relay_factory, upstream_factory, http, database):
    results: list[str] = []
    up = await upstream_factory(script=[validating_step(results, SECRET)])
    relay = await relay_factory(make_config(database, upstreams=[{"url": up.url, "resign": True}]))
    body = lifecycle_bodies("predresign2")[-1]
    original_ts = int(time.time()) - 250
    did = await ingest(http, relay, body, signed(body, timestamp=original_ts))
    await wait_state(relay, did, "delivered")
    assert results == ["ok"]
    assert int(one(up.received[0], "webhook-timestamp")) > original_ts + 200


# --- invalid signatures ----------------------------------------------------------------


async def test_invalid_signature_is_not_forwarded_by_default(relay_factory, upstream_factory, http, database):
    up = await upstream_factory()
    relay = await relay_factory(make_config(database, upstreams=[{"url": up.url}]))
    bad = lifecycle_bodies("predinvalid")[0]
    bad_headers = signed(bad, key=b"not the right key")
    bad_id = await ingest(http, relay, bad, bad_headers, expect=400)
    fw = await forwarding(relay, bad_id)
    assert fw.state == "skipped"
    assert "invalid_signature" in (fw.note or "")
    assert fw.attempts == ()

    # Barrier: a good delivery afterwards goes through; the bad one never did.
    good = lifecycle_bodies("predinvalid-good")[0]
    good_id = await ingest(http, relay, good, signed(good))
    await wait_state(relay, good_id, "delivered")
    assert [relay_id(r) for r in up.received] == [good_id]
    assert (await forwarding(relay, bad_id)).state == "skipped"


async def test_invalid_signature_is_forwarded_with_forward_invalid(relay_factory, upstream_factory, http, database):
    up = await upstream_factory()
    relay = await relay_factory(
        make_config(
            database,
            source={"on_invalid": "accept", "forward_invalid": True},
            upstreams=[{"url": up.url}],
        )
    )
    bad = lifecycle_bodies("predinvalidfwd")[0]
    bad_headers = signed(bad, key=b"not the right key")
    bad_id = await ingest(http, relay, bad, bad_headers, query="userId=1")
    assert relay.store is not None
    assert (await relay.store.get_delivery(bad_id)).verdict.value == "invalid_signature"
    await wait_state(relay, bad_id, "delivered")
    got = up.received[0]
    assert relay_id(got) == bad_id
    assert got.body == bad
    assert got.path_qs == "/hook?userId=1"
    assert one(got, "webhook-signature") == bad_headers["webhook-signature"]


# --- restart ---------------------------------------------------------------------------


async def test_restart_mid_backlog_loses_nothing(relay_factory, upstream_factory, http, database):
    down = await upstream_factory(then=503)
    relay = await relay_factory(
        make_config(database, upstreams=[{"name": "app", "url": down.url, "max_attempts": 1000}])
    )
    predictions = ["predrestart0", "predrestart1"]
    ids: dict[str, list[int]] = {}
    for pred in predictions:
        ids[pred] = [await ingest(http, relay, body, signed(body)) for body in lifecycle_bodies(pred)]
    all_ids = sorted(did for pred in predictions for did in ids[pred])

    # Each prediction's first event has been refused at least once; everything is still pending.
    async def both_tried() -> bool:
        tried = [(await forwarding(relay, ids[p][0], "app")).attempts_made for p in predictions]
        return all(n >= 1 for n in tried)

    await wait_until(both_tried)
    await relay.stop()

    up = await upstream_factory()
    again = await relay_factory(make_config(database, upstreams=[{"name": "app", "url": up.url, "max_attempts": 1000}]))
    assert again.store is not None
    states = await again.store.outbox_states()
    assert states.get("pending") == len(all_ids), states

    for did in all_ids:
        await wait_state(again, did, "delivered", "app")
    assert sorted(relay_id(r) for r in up.received) == all_ids
    for pred in predictions:
        got = [relay_id(r) for r in up.received if json.loads(r.body)["id"] == pred]
        assert got == ids[pred]
    for did in all_ids:
        fw = await forwarding(again, did, "app")
        assert fw.attempts[-1].status == 200
        assert fw.attempts[-1].target == up.url
        assert all(a.status == 503 and a.target == down.url for a in fw.attempts[:-1])
    assert {relay_id(r) for r in down.received} <= {ids[p][0] for p in predictions}


# --- response capture ------------------------------------------------------------------


async def test_response_body_is_capped(relay_factory, upstream_factory, http, database):
    big = b"0123456789abcdef" * (1024 * 1024 // 16)

    async def huge(request: web.Request) -> web.Response:
        return web.Response(status=200, body=big, headers={"X-Big": "yes"})

    up = await upstream_factory(script=[huge])
    relay = await relay_factory(make_config(database, upstreams=[{"url": up.url}]))
    _, fw = await post_last_event(http, relay, "predbig", "delivered")
    assert len(fw.attempts) == 1
    attempt = fw.attempts[0]
    assert RESPONSE_BODY_CAP == 64 * 1024
    assert len(attempt.response_body) == 64 * 1024
    assert attempt.response_body == big[: 64 * 1024]
    assert attempt.response_truncated is True
    assert attempt.status == 200
    assert ("X-Big", "yes") in attempt.response_headers


async def test_small_response_body_is_kept_whole(relay_factory, upstream_factory, http, database):
    up = await upstream_factory(script=[(202, {"X-Answer": "yes"})])
    relay = await relay_factory(make_config(database, upstreams=[{"url": up.url}]))
    _, fw = await post_last_event(http, relay, "predsmall", "delivered")
    attempt = fw.attempts[0]
    assert attempt.status == 202
    assert attempt.response_body == b"scripted"
    assert attempt.response_truncated is False
    assert ("X-Answer", "yes") in attempt.response_headers


# --- under load ------------------------------------------------------------------------


async def test_final_answers_are_not_sent_again_under_load(relay_factory, upstream_factory, http, database, caplog):
    """A backlog drained by a few workers: every delivery is sent once and its 400 is final.

    1200 deliveries pile up while the upstream holds the first requests, then it
    answers 400 (final, SPEC §4) after a short delay that varies per delivery,
    so attempts finish while the forwarder is looking for due rows.
    """
    caplog.set_level(logging.ERROR, logger="relay")  # 1200 "attempt failed" warnings would drown a failure
    gate = asyncio.Event()

    async def refuse(request: web.Request) -> web.Response:
        await gate.wait()
        await asyncio.sleep((int(request.headers["X-Relay-Delivery"]) % 7) * 0.001)
        return web.Response(status=400, text="bad request")

    up = await upstream_factory(then=refuse)
    relay = await relay_factory(make_config(database, upstreams=[{"url": up.url, "ordered": False}]), concurrency=8)

    async def post_lifecycle(pred: str) -> list[int]:
        return [await ingest(http, relay, body, signed(body)) for body in lifecycle_bodies(pred)]

    posted = await asyncio.gather(*(post_lifecycle(f"predload{i}") for i in range(300)))
    all_ids = sorted(did for ids in posted for did in ids)
    assert len(set(all_ids)) == 1200
    gate.set()

    assert relay.store is not None
    store = relay.store

    async def all_settled() -> bool:
        return (await store.outbox_states()).get("pending", 0) == 0

    await wait_until(all_settled, timeout=30)
    states = await store.outbox_states()
    sends = collections.Counter(relay_id(r) for r in up.received)
    sent_twice = sorted(did for did, n in sends.items() if n > 1)
    assert sorted(sends) == all_ids
    assert sent_twice == [], f"{len(sent_twice)} deliveries answered 400 were sent again, e.g. {sent_twice[:5]}"
    assert states == {"failed": 1200}, states
    for did in all_ids[::50]:
        fw = await forwarding(relay, did)
        assert fw.attempts_made == 1 and [a.status for a in fw.attempts] == [400]


async def test_the_main_process_sees_each_attempt_live_and_in_its_metrics(
    relay_factory, upstream_factory, http, database
):
    """Wherever the forwarder runs, a page's event stream gets the attempt and /metrics counts it."""
    up = await upstream_factory()
    relay = await relay_factory(make_config(database, upstreams=[{"url": up.url}]))
    assert relay.bound is not None
    events: list[tuple[str, dict[str, Any]]] = []
    connected = asyncio.Event()

    async def listen() -> None:
        async with http.get(relay.bound.admin_url + "/api/events") as resp:
            kind = ""
            async for line in resp.content:
                if line.startswith(b": connected"):
                    connected.set()
                elif line.startswith(b"event:"):
                    kind = line[6:].strip().decode()
                elif line.startswith(b"data:"):
                    events.append((kind, json.loads(line[5:])))

    listening = asyncio.create_task(listen())
    try:
        await asyncio.wait_for(connected.wait(), 10)
        body = lifecycle_bodies("live")[0]
        delivery_id = await ingest(http, relay, body, signed(body))

        def attempt_seen() -> bool:
            return any(
                k == "attempt" and d["delivery"] == delivery_id and d["outcome"] == "delivered" for k, d in events
            )

        await wait_until(attempt_seen, timeout=15)
    finally:
        listening.cancel()
    async with http.get(relay.bound.admin_url + "/metrics") as resp:
        text = await resp.text()
    assert 'relay_attempts_total{kind="forward",outcome="delivered",upstream="up0"} 1.0' in text, text[:2000]
    assert 'relay_attempt_seconds_count{upstream="up0"} 1.0' in text
