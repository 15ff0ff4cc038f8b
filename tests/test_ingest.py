"""The public ingest listener against a real relay: every answer of SPEC §3 and what gets stored."""

from __future__ import annotations

import asyncio
import hashlib
import json
import sqlite3
import time
from pathlib import Path

import aiohttp
import pytest
from yarl import URL

from relay.service import Relay
from relay.verify import sign

from support import KEY, OTHER_SECRET, SECRET, lifecycle_bodies, make_config, raw_request, read_response, signed

VECTOR_BODY = b'{"test": 2432232314}'
VECTOR_HEADERS = {
    "webhook-id": "msg_p5jXN8AQM9LWM0D4loKWxJek",
    "webhook-timestamp": "1614265330",
    "webhook-signature": "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
}


async def post(http: aiohttp.ClientSession, relay: Relay, body: bytes, headers, path: str = "/webhooks/replicate"):
    assert relay.bound is not None
    async with http.post(relay.bound.ingest_url + path, data=body, headers=headers) as resp:
        return resp.status, await resp.json(), resp.headers


async def stored(relay: Relay, delivery_id: int):
    assert relay.store is not None
    return await relay.store.get_delivery(delivery_id)


async def test_published_vector_verifies_with_the_clock_at_its_timestamp(relay_factory, http, tmp_path):
    relay = await relay_factory(make_config(str(tmp_path / "r.db")), clock=lambda: 1614265330.0)
    status, answer, _ = await post(http, relay, VECTOR_BODY, VECTOR_HEADERS)
    assert (status, answer) == (200, {"received": True, "delivery": 1})
    delivery = await stored(relay, 1)
    assert delivery.verdict == "verified"
    assert delivery.body == VECTOR_BODY


async def test_same_vector_a_day_later_is_expired_and_refused_with_400(relay_factory, http, tmp_path):
    relay = await relay_factory(make_config(str(tmp_path / "r.db")), clock=lambda: 1614265330.0 + 86400)
    status, answer, _ = await post(http, relay, VECTOR_BODY, VECTOR_HEADERS)
    assert status == 400
    assert answer == {"error": "invalid signature", "delivery": 1}  # no detail leaks to the sender
    delivery = await stored(relay, 1)
    assert delivery.verdict == "expired"
    assert "86400 s older than the 300 s tolerance" in delivery.verdict_detail


async def test_capture_is_byte_exact_with_headers_in_order_case_and_duplicates(relay_factory):
    relay = await relay_factory()
    body = lifecycle_bodies()[0]
    head = (
        b"POST /webhooks/replicate?userId=123&jobId=456&x=%20a+b HTTP/1.1\r\nHost: relay.test\r\n"
        + b"".join(f"{k}: {v}\r\n".encode() for k, v in signed(body).items())
        + b"X-Dup: first\r\nx-dup: second\r\nX-CamelCase-Thing: v\r\n"
        + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
    )
    status, payload = await raw_request(relay.bound.ingest_url, head, body)
    assert status == 200
    d = await stored(relay, json.loads(payload)["delivery"])
    assert d.body == body
    assert d.query == "userId=123&jobId=456&x=%20a+b"
    assert d.method == "POST" and d.path == "/webhooks/replicate"
    assert d.peer == "127.0.0.1"
    names = [name for name, _ in d.headers]
    assert names[:2] == ["Host", "Content-Type"]
    assert names.index("X-Dup") + 1 == names.index("x-dup") == names.index("X-CamelCase-Thing") - 1
    assert ("X-Dup", "first") in d.headers and ("x-dup", "second") in d.headers
    assert d.prediction.id == "pred123" and d.prediction.status == "starting"
    assert d.prediction.model == "black-forest-labs/flux-schnell"
    assert d.body_format == "json"
    assert d.body_sha256 == hashlib.sha256(body).hexdigest()


@pytest.mark.parametrize(
    ("drop", "expected"),
    [
        (["webhook-id"], "webhook-id"),
        (["webhook-timestamp", "webhook-signature"], "webhook-timestamp, webhook-signature"),
    ],
)
async def test_missing_headers_are_named(relay_factory, http, drop, expected):
    relay = await relay_factory()
    body = lifecycle_bodies()[0]
    headers = {k: v for k, v in signed(body).items() if k not in drop}
    status, answer, _ = await post(http, relay, body, headers)
    assert status == 400 and answer["error"] == "invalid signature"
    d = await stored(relay, answer["delivery"])
    assert d.verdict == "missing_headers"
    assert d.verdict_detail.endswith(expected)


async def test_empty_header_value_counts_as_missing(relay_factory, http):
    relay = await relay_factory()
    body = b"{}"
    headers = {**signed(body), "webhook-signature": ""}
    status, answer, _ = await post(http, relay, body, headers)
    assert status == 400
    assert (await stored(relay, answer["delivery"])).verdict == "missing_headers"


async def test_wrong_secret_is_invalid_signature_with_counts(relay_factory, http, tmp_path):
    relay = await relay_factory(make_config(str(tmp_path / "r.db"), source={"secret": OTHER_SECRET}))
    body = lifecycle_bodies()[1]
    status, answer, _ = await post(http, relay, body, signed(body))
    assert status == 400
    d = await stored(relay, answer["delivery"])
    assert d.verdict == "invalid_signature"
    assert "1 signature(s)" in d.verdict_detail and "v1" in d.verdict_detail


async def test_bad_timestamp_and_future(relay_factory, http):
    relay = await relay_factory()
    body = b"{}"
    status, answer, _ = await post(http, relay, body, {**signed(body), "webhook-timestamp": "soon"})
    assert status == 400 and (await stored(relay, answer["delivery"])).verdict == "bad_timestamp"
    future = int(time.time()) + 3600
    status, answer, _ = await post(http, relay, body, signed(body, timestamp=future))
    d = await stored(relay, answer["delivery"])
    assert status == 400 and d.verdict == "future"
    assert "in the future" in d.verdict_detail


async def test_unsigned_source_accepts_anything_and_says_so(relay_factory, http, tmp_path):
    relay = await relay_factory(make_config(str(tmp_path / "r.db"), source={"secret": None}))
    status, answer, _ = await post(http, relay, b"not json at all", {"Content-Type": "text/plain"})
    assert status == 200
    d = await stored(relay, answer["delivery"])
    assert d.verdict == "unsigned" and d.body_format == "non_json" and d.prediction.id is None


async def test_on_invalid_accept_answers_200_but_records_the_verdict(relay_factory, http, tmp_path):
    relay = await relay_factory(make_config(str(tmp_path / "r.db"), source={"on_invalid": "accept"}))
    body = b'{"id": "p1", "status": "weird-new-status"}'
    status, answer, _ = await post(http, relay, body, signed(body, key=b"wrong key"))
    assert status == 200 and answer["received"] is True
    d = await stored(relay, answer["delivery"])
    assert d.verdict == "invalid_signature"
    assert d.prediction.status == "weird-new-status"  # unknown statuses are kept, never rejected


async def test_empty_and_non_utf8_bodies_are_stored_exactly(relay_factory, http):
    relay = await relay_factory()
    for body, fmt in ((b"", "empty"), (b"\xff\xfe\x00binary\x80", "non_json")):
        status, answer, _ = await post(http, relay, body, signed(body))
        assert status == 200, answer
        d = await stored(relay, answer["delivery"])
        assert d.body == body and d.body_format == fmt and d.verdict == "verified"


async def test_lone_surrogate_escapes_in_json_are_stored_on_both_backends(relay_factory, http, database):
    """JSON may escape a lone surrogate ("\\ud800"), which no text column can hold: the delivery
    is stored all the same (it was answered 503 forever), its body byte for byte, the id shown with U+FFFD."""
    relay = await relay_factory(make_config(database))
    body = b'{"id": "pred\\ud800x", "status": "succeeded", "model": "\\udfff"}'
    status, answer, _ = await post(http, relay, body, signed(body))
    assert status == 200, answer
    d = await stored(relay, answer["delivery"])
    assert d.body == body and d.verdict == "verified"
    assert d.prediction.id is not None and d.prediction.id.startswith("pred") and d.prediction.id.endswith("x")
    assert "\ufffd" in d.prediction.id and d.prediction.status == "succeeded"


async def test_webhook_id_with_a_stray_byte_verifies_over_the_bytes_sent(relay_factory, database):
    """A webhook-id header holding a non-UTF-8 byte: signed over those exact bytes, it verifies and
    is stored (it was a 500), shown with U+FFFD, and its headers keep the byte."""
    relay = await relay_factory(make_config(database))
    assert relay.bound is not None
    body = b'{"id": "p1", "status": "starting"}'
    msg_id = b"msg_\xffraw"
    timestamp = str(int(time.time()))
    signature = sign(KEY, msg_id.decode("utf-8", "surrogateescape"), timestamp, body)
    head = (
        b"POST /webhooks/replicate HTTP/1.1\r\nHost: relay\r\nContent-Type: application/json\r\n"
        b"webhook-id: " + msg_id + b"\r\nwebhook-timestamp: " + timestamp.encode() + b"\r\n"
        b"webhook-signature: " + signature.encode() + b"\r\n"
        b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
    )
    status, answer = await raw_request(relay.bound.ingest_url, head, body)
    assert status == 200, answer
    d = await stored(relay, json.loads(answer)["delivery"])
    assert d.verdict == "verified" and d.webhook_id == "msg_\ufffdraw"
    assert ("webhook-id", msg_id.decode("utf-8", "surrogateescape")) in d.headers


async def test_body_over_limit_is_413_with_headers_and_size_recorded(relay_factory, http, tmp_path):
    relay = await relay_factory(make_config(str(tmp_path / "r.db"), relay={"max_body_bytes": 1000}))
    body = b'{"x": "' + b"a" * 2000 + b'"}'
    status, answer, _ = await post(http, relay, body, signed(body))
    assert status == 413 and answer["max_body_bytes"] == 1000
    d = await stored(relay, answer["delivery"])
    assert d.body is None and d.size == len(body) and d.body_format == "too_large"
    assert any(name.lower() == "webhook-id" for name, _ in d.headers)
    assert "max_body_bytes" in d.verdict_detail
    # Exactly at the limit is fine.
    ok = b"x" * 1000
    status, answer, _ = await post(http, relay, ok, signed(ok))
    assert status == 200


async def test_an_absurd_declared_length_is_recorded_and_sinks_no_other_delivery(relay_factory, http, database):
    """Content-Length: 3000000000 (past a 32-bit column) among real webhooks: it gets 413 with the
    declared size recorded, and every webhook committed beside it gets its 200."""
    relay = await relay_factory(make_config(database, relay={"max_body_bytes": 1000}))
    assert relay.bound is not None
    head = (
        b"POST /webhooks/replicate HTTP/1.1\r\nHost: relay\r\nContent-Type: application/json\r\n"
        b"Content-Length: 3000000000\r\nConnection: close\r\n\r\n"
    )
    bodies = [b'{"id": "p%d", "status": "starting"}' % i for i in range(20)]

    async def declare_only() -> tuple[int, bytes]:
        """Send the head, never the body; read the answer (the relay keeps the socket open a while)."""
        url = URL(relay.bound.ingest_url)
        reader, writer = await asyncio.open_connection(url.host, url.port)
        try:
            writer.write(head)
            status, _, answer = await asyncio.wait_for(read_response(reader), 10)
            return status, answer
        finally:
            writer.close()

    results = await asyncio.gather(declare_only(), *(post(http, relay, body, signed(body)) for body in bodies))
    (status, answer), normal = results[0], results[1:]
    assert status == 413, answer
    assert [r[0] for r in normal] == [200] * 20
    d = await stored(relay, json.loads(answer)["delivery"])
    assert d.body is None and d.size == 3_000_000_000


async def test_chunked_body_over_limit_is_413(relay_factory, http, tmp_path):
    relay = await relay_factory(make_config(str(tmp_path / "r.db"), relay={"max_body_bytes": 1000}))

    async def chunks():
        for _ in range(10):
            yield b"z" * 500

    async with http.post(relay.bound.ingest_url + "/webhooks/replicate", data=chunks()) as resp:
        assert resp.status == 413
        delivery_id = (await resp.json())["delivery"]
    d = await stored(relay, delivery_id)
    assert d.body is None and d.size > 1000


async def test_other_methods_405_and_unknown_paths_404_are_not_stored(relay_factory, http):
    relay = await relay_factory()
    async with http.get(relay.bound.ingest_url + "/webhooks/replicate") as resp:
        assert resp.status == 405 and resp.headers["Allow"] == "POST"
        assert (await resp.json())["error"]
    async with http.post(relay.bound.ingest_url + "/elsewhere", data=b"{}") as resp:
        assert resp.status == 404 and (await resp.json()) == {"error": "not found"}
    assert await relay.store.count_deliveries() == 0


async def test_never_a_redirect_on_the_ingest_path(relay_factory, http):
    relay = await relay_factory()
    async with http.post(relay.bound.ingest_url + "/webhooks/replicate/", data=b"{}", allow_redirects=False) as resp:
        assert resp.status == 404


async def test_locked_database_gives_503_never_200_and_recovers(relay_factory, http, tmp_path):
    db = tmp_path / "r.db"
    relay = await relay_factory(make_config(str(db), relay={"commit_timeout_seconds": 0.5}))
    body = lifecycle_bodies()[0]
    status, first, _ = await post(http, relay, body, signed(body))
    assert status == 200
    blocker = sqlite3.connect(db, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        status, answer, headers = await post(http, relay, body, signed(body))
        assert status == 503 and "retry" in answer["error"] and headers["Retry-After"]
        async with http.get(relay.bound.ingest_url + "/healthz") as resp:
            assert resp.status == 503
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    # The fault cleared: the relay takes deliveries again without a restart.
    for _ in range(50):
        status, answer, _ = await post(http, relay, body, signed(body))
        if status == 200:
            break
        await asyncio.sleep(0.1)
    assert status == 200
    async with http.get(relay.bound.ingest_url + "/healthz") as resp:
        assert resp.status == 200 and (await resp.json()) == {"ok": True}
    assert (await stored(relay, first["delivery"])).body == body


async def test_acknowledged_deliveries_survive_a_restart(relay_factory, http, tmp_path):
    db = str(tmp_path / "r.db")
    relay = await relay_factory(make_config(db))
    ids = []
    bodies = lifecycle_bodies("persist")
    for body in bodies:
        status, answer, _ = await post(http, relay, body, signed(body))
        assert status == 200
        ids.append(answer["delivery"])
    await relay.stop()
    check = sqlite3.connect(db)
    rows = check.execute("SELECT id, body FROM deliveries ORDER BY id").fetchall()
    assert check.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    check.close()
    assert [(i, b) for i, b in rows] == list(zip(ids, bodies, strict=True))


async def test_concurrent_ingest_is_group_committed_with_unique_ids(relay_factory, http):
    relay = await relay_factory()
    bodies = [json.dumps({"id": f"p{i}", "status": "starting"}).encode() for i in range(200)]
    results = await asyncio.gather(*(post(http, relay, b, signed(b)) for b in bodies))
    ids = [answer["delivery"] for status, answer, _ in results if status == 200]
    assert len(ids) == 200 and len(set(ids)) == 200
    for body, (_, answer, _) in zip(bodies, results, strict=True):
        assert (await stored(relay, answer["delivery"])).body == body


async def test_healthz_on_both_listeners(relay_factory, http):
    relay = await relay_factory()
    for base in (relay.bound.ingest_url, relay.bound.admin_url):
        async with http.get(base + "/healthz") as resp:
            assert resp.status == 200


def test_secret_constants_are_consistent():
    from relay.verify import decode_secret

    assert decode_secret(SECRET) == KEY and Path(__file__).exists()
