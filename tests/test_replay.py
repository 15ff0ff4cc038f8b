"""Replay (single and bulk) and re-verify through the admin API of a real relay (SPEC §5, §6).

The receiving end is a real aiohttp handler that checks signatures with the
``replicate`` package's own validator and a 300 s tolerance, answering 400
when it raises: what a user's app does. Nothing of the project is mocked and
every wait is a condition with a deadline.
"""

from __future__ import annotations

import asyncio
import collections
import json
import sqlite3
import time
from typing import Any

import aiohttp
import pytest

from relay.service import Relay
from relay.verify import verify

from support import (
    OTHER_SECRET,
    SECRET,
    Received,
    UserHandler,
    ingest,
    lifecycle_bodies,
    make_config,
    signed,
    wait_until,
)

QUERY = "userId=123&jobId=456"


# --- a user's webhook handler ------------------------------------------------------------


@pytest.fixture
async def handler(user_handler_factory: Any) -> UserHandler:
    return await user_handler_factory("/app/webhook")


# --- helpers ---------------------------------------------------------------------------


async def api(
    http: aiohttp.ClientSession, relay: Relay, method: str, path: str, payload: Any = None, *, data: str | None = None
) -> tuple[int, Any]:
    """Call the admin API with a JSON content type (state-changing requests must be JSON)."""
    assert relay.bound is not None
    if payload is not None:
        data = json.dumps(payload)
    async with http.request(
        method, relay.bound.admin_url + path, data=data, headers={"Content-Type": "application/json"}
    ) as resp:
        return resp.status, await resp.json()


async def delivery(http: aiohttp.ClientSession, relay: Relay, delivery_id: int) -> dict[str, Any]:
    status, record = await api(http, relay, "GET", f"/api/deliveries/{delivery_id}")
    assert status == 200, record
    return record


async def wait_state(http: aiohttp.ClientSession, relay: Relay, delivery_id: int, state: str) -> None:
    async def reached() -> bool:
        return (await delivery(http, relay, delivery_id))["forwarding"]["up0"]["state"] == state

    await wait_until(reached, timeout=10)


def expired_relay_config(tmp_path: Any, **kwargs: Any) -> Any:
    """A source that answers 200 to failed verdicts, so an hour-old delivery is stored like Replicate sent it."""
    return make_config(str(tmp_path / "relay.db"), source={"on_invalid": "accept"}, **kwargs)


async def hour_old_delivery(http: aiohttp.ClientSession, relay: Relay) -> tuple[int, bytes, dict[str, str]]:
    body = lifecycle_bodies("pred_hour_old")[3]
    headers = signed(body, msg_id="msg_hour_old", timestamp=int(time.time()) - 3600)
    delivery_id = await ingest(http, relay, body, headers, query=QUERY)
    return delivery_id, body, headers


# --- single replay ---------------------------------------------------------------------


async def test_hour_old_delivery_is_rejected_with_its_signature_kept_and_accepted_resigned(
    relay_factory, http, tmp_path, handler
):
    relay = await relay_factory(expired_relay_config(tmp_path))
    did, body, original = await hour_old_delivery(http, relay)
    record = await delivery(http, relay, did)
    assert record["verdict"] == "expired"
    assert "older than the 300 s tolerance" in record["verdict_detail"]

    status, kept = await api(
        http, relay, "POST", f"/api/deliveries/{did}/replay", {"url": handler.url, "resign": False}
    )
    assert status == 200, kept
    attempt = kept["attempt"]
    assert (attempt["kind"], attempt["status"], attempt["outcome"]) == ("replay", 400, "failed")
    assert "InvalidTimestampError" in attempt["response_body"]
    assert attempt["target"] == f"{handler.url}?{QUERY}"
    assert len(handler.arrivals) == 1
    got = handler.arrivals[0]
    assert got.verdict.startswith("InvalidTimestampError")
    assert got.body == body
    assert got.path_qs == f"/app/webhook?{QUERY}"
    for name in ("webhook-id", "webhook-timestamp", "webhook-signature"):
        assert got.headers[name] == original[name]
    assert got.headers["x-relay-delivery"] == str(did)

    status, fresh = await api(http, relay, "POST", f"/api/deliveries/{did}/replay", {"url": handler.url})
    assert status == 200, fresh
    attempt = fresh["attempt"]
    assert (attempt["kind"], attempt["status"], attempt["outcome"]) == ("replay", 200, "delivered")
    assert attempt["response_body"] == "handler: ok"
    assert attempt["duration_ms"] >= 0
    assert len(handler.arrivals) == 2
    got = handler.arrivals[1]
    assert got.verdict == "ok"
    assert got.body == body
    assert got.path_qs == f"/app/webhook?{QUERY}"
    assert got.headers["webhook-id"] == "msg_hour_old"  # the same message, a fresh timestamp
    assert abs(int(got.headers["webhook-timestamp"]) - time.time()) <= 10
    assert got.headers["webhook-signature"] != original["webhook-signature"]

    record = await delivery(http, relay, did)
    assert record["verdict"] == "expired"  # a replay never rewrites the stored verdict
    replays = record["replays"]
    assert [(r["id"], r["kind"], r["status"], r["outcome"]) for r in replays] == [
        (kept["attempt"]["id"], "replay", 400, "failed"),
        (fresh["attempt"]["id"], "replay", 200, "delivered"),
    ]
    assert "InvalidTimestampError" in replays[0]["response_body"]
    assert replays[1]["response_body"] == "handler: ok"
    assert replays[1]["request_body_edited"] is False


async def test_edited_body_is_resigned_even_when_asked_to_keep_and_arrives_byte_exact(
    relay_factory, http, tmp_path, handler
):
    relay = await relay_factory(expired_relay_config(tmp_path))
    did, body, _ = await hour_old_delivery(http, relay)
    edited = '{"id":"pred_hour_old","status":"failed","error":"it\'s \\"edited\\" — ünïcødé ✓","output":null}\n'

    status, answer = await api(
        http, relay, "POST", f"/api/deliveries/{did}/replay", {"url": handler.url, "body": edited, "resign": False}
    )
    assert status == 200, answer
    assert answer["attempt"]["status"] == 200
    assert answer["attempt"]["request_body_edited"] is True
    got = handler.arrivals[-1]
    assert got.verdict == "ok"
    assert got.body == edited.encode("utf-8")
    assert abs(int(got.headers["webhook-timestamp"]) - time.time()) <= 10

    record = await delivery(http, relay, did)
    assert record["body"] == body.decode()  # the stored delivery is untouched
    assert [r["request_body_edited"] for r in record["replays"]] == [True]


async def test_replay_to_a_configured_upstream_by_name_turns_dead_into_delivered(
    relay_factory, upstream_factory, http, tmp_path
):
    upstream = await upstream_factory(then=503)
    relay = await relay_factory(
        make_config(str(tmp_path / "relay.db"), upstreams=[{"url": upstream.url, "max_attempts": 1}])
    )
    body = lifecycle_bodies("pred_dead")[3]
    did = await ingest(http, relay, body, signed(body), query=QUERY)
    await wait_state(http, relay, did, "dead")
    assert len(upstream.received) == 1

    # Still down: the replay is recorded as failed and the row stays dead.
    status, answer = await api(http, relay, "POST", f"/api/deliveries/{did}/replay", {"upstream": "up0"})
    assert status == 200, answer
    assert (answer["attempt"]["status"], answer["attempt"]["outcome"]) == (503, "failed")
    assert (await delivery(http, relay, did))["forwarding"]["up0"]["state"] == "dead"

    upstream.then = 200
    status, answer = await api(http, relay, "POST", f"/api/deliveries/{did}/replay", {"upstream": "up0"})
    assert status == 200, answer
    attempt = answer["attempt"]
    assert (attempt["upstream"], attempt["status"], attempt["outcome"]) == ("up0", 200, "delivered")
    assert attempt["target"] == f"{upstream.url}?{QUERY}"
    assert len(upstream.received) == 3
    last = upstream.received[-1]
    assert last.body == body
    assert last.path_qs == f"/hook?{QUERY}"
    assert relay_id(last) == str(did)

    record = await delivery(http, relay, did)
    fwd = record["forwarding"]["up0"]
    assert fwd["state"] == "delivered"
    assert f"attempt {attempt['id']}" in fwd["note"]
    assert [a["status"] for a in fwd["attempts"]] == [503]  # the forward attempt is kept as it was
    assert [(r["kind"], r["status"]) for r in record["replays"]] == [("replay", 503), ("replay", 200)]
    assert await relay.store.outbox_states() == {"delivered": 1}


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"upstream": "nope"}, "no upstream named 'nope'"),
        ({"url": "ftp://127.0.0.1/x"}, "url: expected an http:// or https:// URL"),
        ({"url": "not a url"}, "url: expected an http:// or https:// URL"),
        ({"upstream": "up0", "url": "http://127.0.0.1:9/"}, "give exactly one of upstream or url"),
        ({}, "give exactly one of upstream or url"),
        ({"url": "http://127.0.0.1:9/", "resign": "yes"}, "resign: expected true or false"),
        ({"url": "http://127.0.0.1:9/", "body": {"id": 1}}, "body: expected a string"),
    ],
)
async def test_bad_replay_requests_are_400_json_naming_the_problem(relay_factory, http, tmp_path, payload, message):
    relay = await relay_factory(
        make_config(str(tmp_path / "relay.db"), upstreams=[{"url": "http://127.0.0.1:9/never", "max_attempts": 1}])
    )
    body = lifecycle_bodies()[0]
    did = await ingest(http, relay, body, signed(body))
    status, answer = await api(http, relay, "POST", f"/api/deliveries/{did}/replay", payload)
    assert status == 400
    assert message in answer["error"], answer
    assert (await delivery(http, relay, did))["replays"] == []


async def test_replay_of_unknown_delivery_is_404_and_non_json_is_refused(relay_factory, http, handler):
    relay = await relay_factory()
    status, answer = await api(http, relay, "POST", "/api/deliveries/999/replay", {"url": handler.url})
    assert (status, answer) == (404, {"error": "no delivery 999"})
    status, answer = await api(http, relay, "POST", "/api/deliveries/abc/replay", {"url": handler.url})
    assert status == 404 and "no delivery" in answer["error"]
    status, answer = await api(http, relay, "POST", "/api/deliveries/1/replay", data="{not json")
    assert status == 400 and answer["error"] == "body is not valid JSON"
    assert handler.arrivals == []


# --- bulk replay -----------------------------------------------------------------------


async def post_many(http: aiohttp.ClientSession, relay: Relay, count: int, prefix: str) -> list[int]:
    """``count`` verified deliveries, one prediction each, sent 20 at a time."""
    gate = asyncio.Semaphore(20)

    async def one(i: int) -> int:
        body = json.dumps({"id": f"{prefix}{i:04d}", "status": "succeeded", "output": [i]}).encode()
        async with gate:
            return await ingest(http, relay, body, signed(body))

    return list(await asyncio.gather(*(one(i) for i in range(count))))


def forward_attempts(tmp_path: Any) -> int:
    db = sqlite3.connect(tmp_path / "relay.db")
    try:
        return int(db.execute("SELECT COUNT(*) FROM attempts WHERE kind = 'forward'").fetchone()[0])
    finally:
        db.close()


def relay_id(received: Received) -> str:
    return dict((k.lower(), v) for k, v in received.headers)["x-relay-delivery"]


async def test_bulk_replay_of_200_dead_deliveries_to_a_recovered_upstream(
    relay_factory, upstream_factory, http, tmp_path
):
    upstream = await upstream_factory(then=503)
    relay = await relay_factory(
        make_config(str(tmp_path / "relay.db"), upstreams=[{"url": upstream.url, "max_attempts": 1}])
    )
    ids = await post_many(http, relay, 200, "pred_bulk_")
    assert len(set(ids)) == 200

    async def all_dead_and_recorded() -> bool:
        # Every request the upstream saw is a recorded forward attempt: no send is still in flight.
        # (The count is not asserted to be 200: sending a row twice is the forwarder's race,
        # covered by test_forward.py::test_final_answers_are_not_sent_again_under_load.)
        return await relay.store.outbox_states() == {"dead": 200} and forward_attempts(tmp_path) == len(
            upstream.received
        )

    await wait_until(all_dead_and_recorded, timeout=30)
    before = len(upstream.received)
    assert {relay_id(r) for r in upstream.received} == {str(i) for i in ids}
    upstream.then = 200

    status, queued = await api(http, relay, "POST", "/api/replay", {"filter": {"state": "dead"}, "upstream": "up0"})
    assert status == 202, queued
    assert queued["queued"] == 200
    job = queued["job"]

    progress: dict[str, Any] = {}

    async def finished() -> bool:
        code, body = await api(http, relay, "GET", f"/api/replay/{job}")
        assert code == 200, body
        progress.update(body)
        return bool(body["finished"])

    await wait_until(finished, timeout=30, interval=0.05)
    assert progress == {"job": job, "total": 200, "done": 200, "ok": 200, "failed": 0, "finished": True}

    replayed = collections.Counter(relay_id(r) for r in upstream.received[before:])
    assert replayed == collections.Counter({str(i): 1 for i in ids})
    assert await relay.store.outbox_states() == {"delivered": 200}
    status, page = await api(http, relay, "GET", "/api/deliveries?state=dead")
    assert (status, page["deliveries"]) == (200, [])

    # Nothing is dead any more: the same request now queues nothing and finishes at once.
    status, again = await api(http, relay, "POST", "/api/replay", {"filter": {"state": "dead"}, "upstream": "up0"})
    assert status == 202 and again["queued"] == 0 and again["job"] != job
    await wait_until(lambda: relay_job_finished(http, relay, again["job"]), timeout=10)
    assert len(upstream.received) == before + 200


async def relay_job_finished(http: aiohttp.ClientSession, relay: Relay, job: int) -> bool:
    status, body = await api(http, relay, "GET", f"/api/replay/{job}")
    return status == 200 and body["finished"] and body["done"] == body["total"]


async def test_bulk_replay_by_ids_counts_each_once_and_reports_failures(relay_factory, http, tmp_path, handler):
    relay = await relay_factory(expired_relay_config(tmp_path))
    good = lifecycle_bodies("pred_ids")[0]
    ok_id = await ingest(http, relay, good, signed(good))
    old_id, _, _ = await hour_old_delivery(http, relay)

    # Kept signatures: the fresh one passes the handler, the hour-old one does not.
    status, queued = await api(
        http, relay, "POST", "/api/replay", {"ids": [ok_id, old_id, ok_id, 999], "url": handler.url, "resign": False}
    )
    assert status == 202, queued
    assert queued["queued"] == 3  # duplicates collapse; an unknown id is counted as failed
    await wait_until(lambda: relay_job_finished(http, relay, queued["job"]), timeout=10)
    _, progress = await api(http, relay, "GET", f"/api/replay/{queued['job']}")
    assert (progress["total"], progress["done"], progress["ok"], progress["failed"]) == (3, 3, 1, 2)
    assert sorted(s.verdict.split(":")[0] for s in handler.arrivals) == ["InvalidTimestampError", "ok"]
    assert [r["status"] for r in (await delivery(http, relay, old_id))["replays"]] == [400]
    assert [r["status"] for r in (await delivery(http, relay, ok_id))["replays"]] == [200]


async def test_bulk_replay_of_dead_to_an_upstream_means_dead_for_that_upstream(
    relay_factory, upstream_factory, http, tmp_path
):
    """Like ``relay replay --state dead --upstream NAME``: never re-send what that upstream acknowledged."""
    down = await upstream_factory(then=503)
    fine = await upstream_factory(then=200)
    relay = await relay_factory(
        make_config(
            str(tmp_path / "relay.db"),
            upstreams=[{"url": down.url, "max_attempts": 1}, {"url": fine.url, "max_attempts": 1}],
        )
    )
    ids = await post_many(http, relay, 3, "pred_two_up_")

    async def settled() -> bool:
        return await relay.store.outbox_states() == {"dead": 3, "delivered": 3}

    await wait_until(settled, timeout=10)
    assert sorted(relay_id(r) for r in fine.received) == sorted(str(i) for i in ids)

    status, queued = await api(http, relay, "POST", "/api/replay", {"filter": {"state": "dead"}, "upstream": "up1"})
    assert status == 202, queued
    await wait_until(lambda: relay_job_finished(http, relay, queued["job"]), timeout=10)
    assert queued["queued"] == 0, "deliveries dead only for up0 were replayed to up1, which had acknowledged them"
    assert len(fine.received) == 3


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"filter": {"state": "zombie"}, "upstream": "up0"}, "state: unknown state 'zombie'"),
        ({"filter": {"state": "dead"}, "upstream": "nope"}, "no upstream named 'nope'"),
        ({"filter": {"state": "dead"}}, "give exactly one of upstream or url"),
        ({"ids": "1,2", "upstream": "up0"}, "ids: expected a list of delivery ids"),
        ({"upstream": "up0"}, "give ids or a filter"),
    ],
)
async def test_bad_bulk_requests_are_400(relay_factory, http, tmp_path, payload, message):
    relay = await relay_factory(
        make_config(str(tmp_path / "relay.db"), upstreams=[{"url": "http://127.0.0.1:9/never", "max_attempts": 1}])
    )
    status, answer = await api(http, relay, "POST", "/api/replay", payload)
    assert status == 400
    assert message in answer["error"], answer


async def test_unknown_replay_job_is_404(relay_factory, http):
    relay = await relay_factory()
    status, answer = await api(http, relay, "GET", "/api/replay/42")
    assert status == 404 and "no replay job" in answer["error"]


# --- re-verify -------------------------------------------------------------------------

T0 = 1_700_000_000.0  # the relay's clock at receive time, long ago


async def test_reverify_uses_the_receive_time_and_the_configured_or_given_secret(relay_factory, http, tmp_path):
    relay = await relay_factory(make_config(str(tmp_path / "relay.db")), clock=lambda: T0)
    body = lifecycle_bodies("pred_verify")[3]
    headers = signed(body, timestamp=int(T0))
    did = await ingest(http, relay, body, headers)
    # Checked against today's clock, this signature is years out of tolerance...
    assert verify(tuple(headers.items()), body, relay.config.sources[0].secret.key, 300, time.time()).verdict == (
        "expired"
    )

    # ...but re-verifying judges it at the time it was received.
    status, result = await api(http, relay, "POST", f"/api/deliveries/{did}/verify")
    assert status == 200, result
    assert (result["verdict"], result["secret"], result["stored_verdict"]) == ("verified", "configured", "verified")
    assert "signature matched" in result["detail"]

    status, result = await api(http, relay, "POST", f"/api/deliveries/{did}/verify", {"secret": SECRET})
    assert (status, result["verdict"], result["secret"]) == (200, "verified", "given")

    status, result = await api(http, relay, "POST", f"/api/deliveries/{did}/verify", {"secret": OTHER_SECRET})
    assert status == 200
    assert (result["verdict"], result["secret"], result["stored_verdict"]) == (
        "invalid_signature",
        "given",
        "verified",
    )
    assert "none of the 1 signature(s) offered matched" in result["detail"]

    status, result = await api(http, relay, "POST", f"/api/deliveries/{did}/verify", {"secret": "whsec_%%%not-base64"})
    assert status == 200
    assert result["verdict"] == "bad_secret"
    assert "base64" in result["detail"]

    status, result = await api(http, relay, "POST", f"/api/deliveries/{did}/verify", {"secret": 42})
    assert status == 400 and "secret: expected a string" in result["error"]
    status, result = await api(http, relay, "POST", "/api/deliveries/999/verify")
    assert (status, result) == (404, {"error": "no delivery 999"})
    assert (await delivery(http, relay, did))["verdict"] == "verified"  # never rewritten


async def test_reverify_an_expired_delivery_stays_expired_and_unsigned_source_takes_a_given_secret(
    relay_factory, http, tmp_path
):
    relay = await relay_factory(expired_relay_config(tmp_path))
    did, _, _ = await hour_old_delivery(http, relay)
    status, result = await api(http, relay, "POST", f"/api/deliveries/{did}/verify")
    assert status == 200
    assert result["verdict"] == "expired"
    assert "older than the 300 s tolerance" in result["detail"]
    assert "the signature itself matches" in result["detail"]

    unsigned = await relay_factory(make_config(str(tmp_path / "unsigned.db"), source={"secret": None}))
    body = lifecycle_bodies("pred_unsigned")[1]
    uid = await ingest(http, unsigned, body, signed(body))
    status, result = await api(http, unsigned, "POST", f"/api/deliveries/{uid}/verify")
    assert (status, result["verdict"], result["secret"]) == (200, "unsigned", "none")
    status, result = await api(http, unsigned, "POST", f"/api/deliveries/{uid}/verify", {"secret": SECRET})
    assert (status, result["verdict"], result["stored_verdict"]) == (200, "verified", "unsigned")
