"""The storage contract (relay/store.py), held by both backends: a SQLite file in tmp_path and a
fresh database on the private PostgreSQL server (the ``database`` fixture), opened with
``open_store`` exactly as the relay opens it.

Time is passed explicitly (``now``, ``received_at``), never read from a clock, so retry and
lease times are exact. The PostgreSQL-only tests at the end run several stores on one
database, as several relays behind a load balancer would.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import asyncpg
import pytest

from relay.filters import DeliveryFilter
from relay.model import Attempt, Capture, Delivery, OutboxItem, PlannedForward, PredictionInfo, decode_header_bytes
from relay.pg_schema import MIGRATIONS as PG_MIGRATIONS
from relay.store import NotFound, Store, StoreUnavailable, open_store
from relay.verify import Verdict

from pgcluster import PostgresCluster
from support import free_port, wait_until

T0 = 1_700_000_000.0
UP0 = ("up0",)


# --- helpers ---------------------------------------------------------------------------


def capture(
    received_at: float = T0,
    *,
    body: bytes | None = b'{"status": "succeeded"}',
    size: int | None = None,
    body_format: str | None = None,
    source: str = "replicate",
    verdict: Verdict = Verdict.VERIFIED,
    detail: str = "",
    webhook_id: str | None = None,
    prediction: PredictionInfo | None = None,
    headers: tuple[tuple[str, str], ...] = (("Content-Type", "application/json"),),
    query: str = "",
    peer: str | None = "127.0.0.1",
) -> Capture:
    if body_format is None:
        body_format = "too_large" if body is None else "empty" if body == b"" else "json"
    return Capture(
        received_at=received_at,
        source=source,
        method="POST",
        path="/webhooks/replicate",
        query=query,
        headers=headers,
        body=body,
        size=len(body) if size is None and body is not None else (size or 0),
        peer=peer,
        verdict=verdict,
        verdict_detail=detail,
        body_sha256=hashlib.sha256(body or b"").hexdigest(),
        webhook_id=webhook_id,
        body_format=body_format,
        prediction=prediction or PredictionInfo(),
    )


def pending(upstream: str = "up0", order_key: str | None = None) -> PlannedForward:
    return PlannedForward(upstream=upstream, state="pending", order_key=order_key)


def attempt(
    delivery_id: int,
    *,
    kind: str = "forward",
    upstream: str | None = "up0",
    started_at: float = T0 + 1,
    status: int | None = 200,
    outcome: str = "delivered",
    response_body: bytes = b"ok",
    request_body: bytes | None = None,
) -> Attempt:
    return Attempt(
        delivery_id=delivery_id,
        kind=kind,
        target=f"http://{upstream or 'elsewhere'}.example/hook?userId=1",
        started_at=started_at,
        duration_ms=12.5,
        status=status,
        response_headers=(("Content-Type", "text/plain"), ("Set-Cookie", "a=1"), ("set-cookie", "b=2")),
        response_body=response_body,
        response_truncated=False,
        error=None if status is not None else "ClientConnectorError: refused",
        outcome=outcome,
        upstream=upstream,
        request_headers=(("Content-Type", "application/json"), ("X-Relay-Delivery", str(delivery_id))),
        request_body=request_body,
    )


def stored_fields(capture: Capture) -> dict[str, Any]:
    return {f.name: getattr(capture, f.name) for f in fields(Capture)}


def fields_of(delivery: Delivery) -> dict[str, Any]:
    return {f.name: getattr(delivery, f.name) for f in fields(Capture)}


def by_delivery(items: Sequence[OutboxItem]) -> dict[int, OutboxItem]:
    return {item.delivery_id: item for item in items}


async def forwarding_of(store: Store, delivery_id: int, upstream: str = "up0") -> Any:
    delivery = await store.get_delivery(delivery_id)
    matches = [f for f in delivery.forwarding if f.upstream == upstream]
    assert len(matches) == 1, delivery.forwarding
    return matches[0]


async def listed_ids(store: Store, **filters: Any) -> list[int]:
    page, cursor = await store.list_deliveries(DeliveryFilter(limit=500, **filters))
    assert cursor is None
    return [s.id for s in page]


@pytest.fixture
async def store(database: str) -> AsyncIterator[Store]:
    opened = await open_store(database)
    try:
        yield opened
    finally:
        await opened.close()


# --- 1. what is stored is what was received ------------------------------------------


async def test_delivery_round_trip_is_exact(store):
    binary = b'\x00\x01\xff\xfe{"id": "x"}\x00\xc3\x28 not utf-8' + bytes(range(256))
    with pytest.raises(UnicodeDecodeError):
        binary.decode("utf-8")
    headers = (
        ("Content-Type", "application/octet-stream"),
        ("X-Dup", "one"),
        ("x-dup", "Two"),
        ("X-DUP", "three"),
        ("webhook-id", "msg_2a"),
        ("X-Raw-Bytes", decode_header_bytes(b"caf\xe9 \xff")),  # not UTF-8 on the wire
        ("x-EMPTY", ""),
    )
    query = "a=1&b=%2F%20&c=%ZZ&d=caf%C3%A9&&e==&f=;g?h&plus=+&uni=ü&pct=%00&q='\"<>"
    captures = [
        capture(
            T0 + 0.123456,
            body=binary,
            body_format="non_json",
            headers=headers,
            query=query,
            peer="2001:db8::7",
            verdict=Verdict.INVALID_SIGNATURE,
            detail="no signature matched (v1,AbC+/=)",
            webhook_id="msg_2a",
            prediction=PredictionInfo(
                id="ufawqhfynnddngldkgtslldrkq",
                status="succeeded",
                model="stability-ai/sdxl",
                version="39ed52f2a78e934b3ba6e2a89f5b1c712de7dfea535525255b1aa35c5565e08b",
                kind="prediction",
            ),
        ),
        capture(T0 + 1, body=b"", headers=(), peer=None, verdict=Verdict.UNSIGNED),
        capture(T0 + 2, body=None, size=5_000_001, detail="body over max_body_bytes", source="other"),
    ]
    ids = [await store.record_delivery(c, []) for c in captures]
    for delivery_id, sent in zip(ids, captures, strict=True):
        got = await store.get_delivery(delivery_id)
        assert got.id == delivery_id
        assert fields_of(got) == stored_fields(sent)
        assert got.duplicate_of is None
        assert got.forwarding == ()
        assert got.replays == ()
    assert (await store.get_delivery(ids[1])).body == b""  # empty, not "not kept"
    assert (await store.get_delivery(ids[2])).body is None


async def test_forwarded_request_carries_the_stored_bytes(store):
    body = b'\x00\xff{"a": 1}\x00\xc3\x28'
    headers = (("Content-Type", "application/json"), ("X-A", "1"), ("x-a", "2"), ("webhook-id", "msg_fw"))
    sent = capture(body=body, headers=headers, query="x=%2F&y=ü&&z", peer="203.0.113.9", webhook_id="msg_fw")
    delivery_id = await store.record_delivery(sent, [pending()])
    (item,) = await store.due_outbox(T0, UP0, 10)
    assert (item.delivery_id, item.upstream, item.attempts_made) == (delivery_id, "up0", 0)
    assert (item.method, item.query, item.headers, item.body) == ("POST", sent.query, headers, body)
    assert (item.peer, item.webhook_id, item.already_delivered_as) == ("203.0.113.9", "msg_fw", None)


async def test_prediction_id_with_nul_is_stored(store):
    """PostgreSQL text cannot hold NUL: the id may come back with U+FFFD there, the body never changes."""
    odd_id = "pred\x00nul"
    body = b'{"id": "pred\\u0000nul", "raw": "\x00"}'
    delivery_id = await store.record_delivery(
        capture(body=body, prediction=PredictionInfo(id=odd_id, status="starting")), [pending()]
    )
    got = await store.get_delivery(delivery_id)
    assert got.body == body
    assert got.prediction.id in (odd_id, odd_id.replace("\x00", "\ufffd"))
    assert got.prediction.status == "starting"
    # The id as stored finds the delivery again (links in the UI and the API are made from it).
    assert await listed_ids(store, prediction=got.prediction.id) == [delivery_id]
    assert [d.id for d in await store.prediction_deliveries(got.prediction.id)] == [delivery_id]
    (item,) = await store.due_outbox(T0, UP0, 10)
    assert item.body == body


async def test_prediction_id_with_nul_as_sent_finds_the_delivery(store):
    """The id as Replicate sent it (a filter typed in, or ``?prediction=pred%00nul``) is a query, not a
    database failure (a 503 "database unavailable")."""
    odd_id = "pred\x00nul"
    delivery_id = await store.record_delivery(capture(prediction=PredictionInfo(id=odd_id)), [])
    assert await listed_ids(store, prediction=odd_id) == [delivery_id]
    assert [d.id for d in await store.prediction_deliveries(odd_id)] == [delivery_id]


# --- 2. ids ----------------------------------------------------------------------------


async def test_ids_strictly_increase_and_are_never_reused_after_prune(database):
    store = await open_store(database)
    try:
        # Received out of order: the newest ids are the oldest by time, so prune takes them.
        first = await store.record_delivery(capture(T0 + 1000), [])
        newest = [await store.record_delivery(capture(T0 + i), [pending()]) for i in range(3)]
        together = await asyncio.gather(*(store.record_delivery(capture(T0 + 200 + i), []) for i in range(20)))
        assert [first, *newest] == sorted(set([first, *newest]))
        assert len(set(together)) == 20 and min(together) > newest[-1]
        assert await store.prune(older_than=T0 + 50) == 3
        assert await store.prune(older_than=T0 + 250, compact=True) == 20  # the newest ids, again
        after = await store.record_delivery(capture(T0 + 300), [])
        assert after > max(together)
    finally:
        await store.close()
    store = await open_store(database)  # and not after a restart either
    try:
        assert await store.prune(older_than=T0 + 2000) == 2  # every row gone, ids included
        again = await store.record_delivery(capture(T0 + 400), [])
        assert again > after
        assert [d.id for d in (await store.list_deliveries(DeliveryFilter()))[0]] == [again]
    finally:
        await store.close()


# --- 3. listing, filtering, paging, search --------------------------------------------


@dataclass
class Row:
    id: int
    received_at: float
    source: str
    verdict: Verdict
    prediction: str
    status: str
    states: dict[str, str]


async def listing_dataset(store: Store) -> list[Row]:
    """40 deliveries of varied source, verdict, prediction, status and forwarding state."""
    rows = []
    for i in range(40):
        c = capture(
            T0 + 10 * i,
            source="replicate" if i % 3 else "other",
            verdict=Verdict.VERIFIED if i % 4 else Verdict.INVALID_SIGNATURE,
            prediction=PredictionInfo(id=f"pred{i % 5}", status=("starting", "processing", "succeeded")[i % 3]),
        )
        forwards = [pending("up0"), pending("up1") if i % 2 else PlannedForward("up1", "skipped", None, "filtered")]
        delivery_id = await store.record_delivery(c, forwards)
        states = {"up0": "pending", "up1": "pending" if i % 2 else "skipped"}
        p = c.prediction
        rows.append(Row(delivery_id, c.received_at, c.source, c.verdict, p.id or "", p.status or "", states))
    items = await store.due_outbox(T0 + 10_000, ("up0", "up1"), 1000)
    assert len(items) == 40 + 20
    by_key = {(item.delivery_id, item.upstream): item.outbox_id for item in items}
    for i, row in enumerate(rows):
        settle = []
        if i % 5 == 0:
            settle.append(("up0", "delivered"))
        elif i % 5 == 1:
            settle.append(("up0", "dead"))
        if i % 2 and i % 7 == 0:
            settle.append(("up1", "failed"))
        for upstream, state in settle:
            await store.settle_outbox(by_key[(row.id, upstream)], state, f"test {state}", T0 + 10_000)
            row.states[upstream] = state
    return rows


def newest_first(rows: list[Row], keep: Any) -> list[int]:
    return [r.id for r in sorted(rows, key=lambda r: -r.id) if keep(r)]


async def test_list_filters_newest_first(store):
    rows = await listing_dataset(store)
    everything = newest_first(rows, lambda r: True)
    assert await listed_ids(store) == everything
    cases: list[tuple[dict[str, Any], Any]] = [
        ({"source": "other"}, lambda r: r.source == "other"),
        ({"verdict": "invalid_signature"}, lambda r: r.verdict is Verdict.INVALID_SIGNATURE),
        ({"state": "delivered"}, lambda r: "delivered" in r.states.values()),
        ({"state": "dead"}, lambda r: "dead" in r.states.values()),
        ({"state": "skipped"}, lambda r: "skipped" in r.states.values()),
        ({"state": "failed"}, lambda r: "failed" in r.states.values()),
        ({"state": "pending"}, lambda r: "pending" in r.states.values()),
        ({"upstream": "up1"}, lambda r: "up1" in r.states),
        # Both on the same outbox row: up1 failed, not "up0 something and anything failed".
        ({"upstream": "up1", "state": "failed"}, lambda r: r.states["up1"] == "failed"),
        ({"upstream": "up0", "state": "failed"}, lambda r: r.states["up0"] == "failed"),
        ({"prediction": "pred3"}, lambda r: r.prediction == "pred3"),
        ({"status": "succeeded"}, lambda r: r.status == "succeeded"),
        ({"since": T0 + 100, "until": T0 + 200}, lambda r: T0 + 100 <= r.received_at <= T0 + 200),
        ({"since": T0 + 385}, lambda r: r.received_at >= T0 + 385),
        ({"until": T0 + 5}, lambda r: r.received_at <= T0 + 5),
        (
            {"source": "replicate", "verdict": "verified", "status": "processing"},
            lambda r: r.source == "replicate" and r.verdict is Verdict.VERIFIED and r.status == "processing",
        ),
        ({"source": "nobody"}, lambda r: False),
        ({"upstream": "up9"}, lambda r: False),
    ]
    for filters, keep in cases:
        expected = newest_first(rows, keep)
        assert await listed_ids(store, **filters) == expected, filters
    assert await listed_ids(store, upstream="up0", state="failed") == []
    assert await listed_ids(store, upstream="up1", state="failed") != []


async def test_list_summary_shows_forwarding_per_upstream(store):
    rows = await listing_dataset(store)
    page, _ = await store.list_deliveries(DeliveryFilter(limit=500))
    summaries = {s.id: s for s in page}
    for row in rows:
        summary = summaries[row.id]
        assert summary.forwarding == (("up0", row.states["up0"]), ("up1", row.states["up1"]))
        assert (summary.source, summary.verdict, summary.received_at) == (row.source, row.verdict, row.received_at)
        assert (summary.prediction.id, summary.prediction.status) == (row.prediction, row.status)
        assert (summary.body_format, summary.size) == ("json", len(b'{"status": "succeeded"}'))
    lone = await store.record_delivery(capture(T0 + 999), [])
    assert (await store.list_deliveries(DeliveryFilter(limit=1)))[0][0].forwarding == ()
    assert (await store.list_deliveries(DeliveryFilter(limit=1)))[0][0].id == lone


async def test_list_summary_names_upstreams_in_the_order_of_the_delivery(store):
    """The list shows a delivery's upstreams in the same order as its own page (the configured order)."""
    delivery_id = await store.record_delivery(capture(), [pending("zeta"), pending("alpha"), pending("mid")])
    detail = await store.get_delivery(delivery_id)
    assert [f.upstream for f in detail.forwarding] == ["zeta", "alpha", "mid"]
    (summary,), _ = await store.list_deliveries(DeliveryFilter())
    assert summary.forwarding == (("zeta", "pending"), ("alpha", "pending"), ("mid", "pending"))


async def test_keyset_pagination_visits_every_row_once(store):
    ids = [await store.record_delivery(capture(T0 + i, source="odd" if i % 2 else "even"), []) for i in range(120)]
    for filters, expected in (({}, ids), ({"source": "odd"}, ids[1::2])):
        seen: list[int] = []
        sizes = []
        cursor = None
        for _ in range(20):
            page, cursor = await store.list_deliveries(DeliveryFilter(limit=25, before=cursor, **filters))
            seen += [s.id for s in page]
            sizes.append(len(page))
            if cursor is None:
                break
        assert seen == sorted(expected, reverse=True), filters
        full, rest = divmod(len(expected), 25)
        assert sizes == [25] * full + ([rest] if rest else []), filters
    # A last page that is exactly full has no next cursor.
    page, cursor = await store.list_deliveries(DeliveryFilter(limit=20, before=ids[20]))
    assert [s.id for s in page] == ids[19::-1]
    assert cursor is None


async def test_delivery_ids_oldest_first_with_cap(store):
    ids = [await store.record_delivery(capture(T0 + i, source="a" if i % 3 else "b"), []) for i in range(30)]
    assert await store.delivery_ids(DeliveryFilter(), cap=1000) == ids
    assert await store.delivery_ids(DeliveryFilter(), cap=7) == ids[:7]
    assert await store.delivery_ids(DeliveryFilter(source="b"), cap=4) == ids[0::3][:4]
    assert await store.delivery_ids(DeliveryFilter(source="a", before=ids[10]), cap=100) == [
        i for n, i in enumerate(ids[:10]) if n % 3
    ]


def prediction_body(prompt: str) -> bytes:
    return json.dumps(  # UTF-8 as sent, not \u escapes
        {
            "id": "ufawqhfynnddngldkgtslldrkq",
            "status": "succeeded",
            "input": {"prompt": prompt, "seed": 42},
            "logs": "Using seed: 42\nloading weights",
        },
        ensure_ascii=False,
    ).encode()


async def test_full_text_search_finds_words_in_bodies(store):
    astronaut = await store.record_delivery(capture(T0, body=prediction_body("an astronaut riding a horse")), [])
    cafe = await store.record_delivery(capture(T0 + 1, body=prediction_body("un café à Paris, s'il vous plaît")), [])
    await store.record_delivery(capture(T0 + 2, body=None), [])
    await store.record_delivery(capture(T0 + 3, body=b""), [])
    binary = await store.record_delivery(capture(T0 + 4, body=b"\xff\x00 zebra \xfe", body_format="non_json"), [])
    assert await listed_ids(store, q="astronaut") == [astronaut]
    assert await listed_ids(store, q="ASTRONAUT") == [astronaut]
    assert await listed_ids(store, q="astronaut riding") == [astronaut]  # a phrase
    assert await listed_ids(store, q="riding astronaut") == []
    assert await listed_ids(store, q="café") == [cafe]
    assert await listed_ids(store, q="succeeded") == [cafe, astronaut]
    assert await listed_ids(store, q="zebra") == [binary]
    assert await listed_ids(store, q="unicorn") == []
    assert await listed_ids(store, q="astronaut", source="other") == []
    assert await store.delivery_ids(DeliveryFilter(q="succeeded"), cap=10) == [astronaut, cafe]
    assert await listed_ids(store, q='"astronaut"') == [astronaut]


async def test_search_text_is_never_query_syntax(store):
    """Whatever a user types in the search box is a phrase to look for: nothing may fail
    (the API and UI would answer 503 "database unavailable")."""
    astronaut = await store.record_delivery(capture(T0, body=prediction_body("an astronaut riding a horse")), [])
    texts = ('"', '""', 'a"b', "'", "foo:bar", "(", ")", "*", "NOT", "AND OR", "-astronaut", "a^b", "\\", "%_",
             "NEAR(a b)", "{x}", "ünïcødé 🚀", "猫が好き", "<->", "!", "&", "|", ":*", " ",
             "\x01", "\x00", "a\x00b")  # fmt: skip
    failed = []
    for text in texts:
        try:
            page, _ = await store.list_deliveries(DeliveryFilter(q=text))
        except StoreUnavailable as exc:
            failed.append((text, str(exc)))
            continue
        assert [s.id for s in page] in ([], [astronaut]), text
    assert failed == []


async def test_full_text_search_finds_words_in_model_names_and_urls(store):
    body = json.dumps(
        {
            "model": "stability-ai/sdxl",
            "output": ["https://replicate.delivery/pbxt/abc/out-0.png"],
            "urls": {"get": "https://api.replicate.com/v1/predictions/ufawq"},
        }
    ).encode()
    delivery_id = await store.record_delivery(capture(body=body), [])
    words = ("stability", "sdxl", "replicate", "delivery", "png", "predictions")
    missed = [word for word in words if await listed_ids(store, q=word) != [delivery_id]]
    assert missed == []


# --- 4. the outbox -----------------------------------------------------------------------


async def test_due_outbox_takes_due_pending_rows_within_limit_and_exclude(store):
    sent = [capture(T0 + i, body=f'{{"n": {i}}}'.encode(), query=f"n={i}") for i in range(5)]
    ids = [await store.record_delivery(c, [pending()]) for c in sent]
    later = await store.record_delivery(capture(T0 + 100), [pending()])
    await store.record_delivery(capture(T0), [PlannedForward("up0", "skipped", None, "source mismatch")])
    elsewhere = await store.record_delivery(capture(T0), [pending("up9")])

    first = await store.due_outbox(T0 + 10, UP0, 2)
    assert [i.delivery_id for i in first] == ids[:2]  # oldest first
    assert [(i.body, i.query) for i in first] == [(c.body, c.query) for c in sent[:2]]
    outbox = {i.delivery_id: i.outbox_id for i in first}
    # exclude: the rows this relay is sending (the forwarder's attempts in flight).
    rest = await store.due_outbox(T0 + 10, UP0, 10, exclude=set(outbox.values()))
    assert [i.delivery_id for i in rest] == ids[2:]
    outbox |= {i.delivery_id: i.outbox_id for i in rest}
    assert await store.due_outbox(T0 + 10, (), 10) == []

    # The third comes back for a retry that is due at once; while excluded it is not taken.
    third = ids[2]
    retry = attempt(third, status=503, outcome="retry")
    await store.finish_attempt(outbox[third], retry, "pending", T0 + 5, "retrying")
    assert await store.due_outbox(T0 + 10, UP0, 10, exclude=set(outbox.values())) == []
    others = {o for d, o in outbox.items() if d != third}
    (again,) = await store.due_outbox(T0 + 10, UP0, 10, exclude=others)
    assert (again.delivery_id, again.attempts_made) == (third, 1)

    for delivery_id in ids:
        await store.finish_attempt(outbox[delivery_id], attempt(delivery_id), "delivered", None, None)
    assert await store.due_outbox(T0 + 10, UP0, 10) == []
    assert await store.next_due_after(T0 + 10, UP0) == T0 + 100
    assert await store.next_due_after(T0 + 10, ("up7",)) is None
    assert [i.delivery_id for i in await store.due_outbox(T0 + 100, UP0, 10)] == [later]
    assert [i.delivery_id for i in await store.due_outbox(T0 + 100, ("up9",), 10)] == [elsewhere]


async def test_events_of_one_prediction_go_out_in_order(store):
    events = [
        await store.record_delivery(
            capture(T0 + i, prediction=PredictionInfo(id="predA")), [pending("up0", "predA"), pending("up1", "predA")]
        )
        for i in range(3)
    ]
    other = await store.record_delivery(
        capture(T0 + 3, prediction=PredictionInfo(id="predB")), [pending("up0", "predB")]
    )
    due = by_delivery(await store.due_outbox(T0 + 10, UP0, 10))
    assert sorted(due) == [events[0], other]  # later events of predA wait for the first
    first, busy = due[events[0]], {due[other].outbox_id}

    # A retry of the first still holds the others back; the next time anything is due is the retry.
    await store.finish_attempt(
        first.outbox_id, attempt(events[0], status=503, outcome="retry"), "pending", T0 + 50, "retrying"
    )
    assert await store.due_outbox(T0 + 20, UP0, 10, exclude=busy) == []
    assert await store.next_due_after(T0 + 20, UP0) == T0 + 50
    (retry,) = await store.due_outbox(T0 + 50, UP0, 10, exclude=busy)
    assert (retry.delivery_id, retry.attempts_made) == (events[0], 1)
    await store.finish_attempt(retry.outbox_id, attempt(events[0], started_at=T0 + 50), "delivered", None, None)

    (second,) = await store.due_outbox(T0 + 50, UP0, 10, exclude=busy)
    assert second.delivery_id == events[1]
    await store.finish_attempt(second.outbox_id, attempt(events[1], status=400, outcome="failed"), "failed", None, "x")
    (third,) = await store.due_outbox(T0 + 50, UP0, 10, exclude=busy)
    assert third.delivery_id == events[2]
    # The other upstream has its own order: its first event was never settled.
    assert [i.delivery_id for i in await store.due_outbox(T0 + 50, ("up1",), 10)] == [events[0]]


async def test_finish_attempt_records_it_and_never_moves_a_settled_row_back(store):
    delivery_id = await store.record_delivery(capture(), [pending()])
    (item,) = await store.due_outbox(T0, UP0, 10)
    sent = attempt(delivery_id, response_body=b"\x00binary\xff answer", request_body=b"re-signed\x00")
    await store.finish_attempt(item.outbox_id, sent, "delivered", None, None)
    fw = await forwarding_of(store, delivery_id)
    assert (fw.state, fw.attempts_made, fw.next_attempt_at, fw.note) == ("delivered", 1, None, None)
    (recorded,) = fw.attempts
    assert recorded.id is not None
    assert replace(recorded, id=None) == sent

    # A late or repeated result (another relay's, a retry racing a replay) changes nothing.
    late = attempt(delivery_id, started_at=T0 + 5, status=503, outcome="retry")
    await store.finish_attempt(item.outbox_id, late, "pending", T0 + 10, "attempt 2 of 5: HTTP 503; retrying")
    fw = await forwarding_of(store, delivery_id)
    assert (fw.state, fw.attempts_made, fw.next_attempt_at, fw.note) == ("delivered", 1, None, None)
    assert await store.due_outbox(T0 + 1000, UP0, 10) == []
    assert await store.next_due_after(T0, UP0) is None
    assert await store.outbox_states() == {"delivered": 1}


async def test_retry_is_due_at_its_time_and_not_before(store):
    delivery_id = await store.record_delivery(capture(), [pending()])
    (item,) = await store.due_outbox(T0, UP0, 10)
    note = "attempt 1 of 5: HTTP 503; retrying"
    await store.finish_attempt(
        item.outbox_id, attempt(delivery_id, status=503, outcome="retry"), "pending", T0 + 30, note
    )
    fw = await forwarding_of(store, delivery_id)
    assert (fw.state, fw.attempts_made, fw.next_attempt_at, fw.note) == ("pending", 1, T0 + 30, note)
    assert [a.status for a in fw.attempts] == [503]
    assert await store.due_outbox(T0 + 29, UP0, 10) == []
    assert await store.next_due_after(T0 + 29, UP0) == T0 + 30
    (again,) = await store.due_outbox(T0 + 30, UP0, 10)
    assert (again.outbox_id, again.attempts_made) == (item.outbox_id, 1)
    await store.finish_attempt(again.outbox_id, attempt(delivery_id, started_at=T0 + 30), "delivered", None, None)
    fw = await forwarding_of(store, delivery_id)
    assert (fw.state, fw.attempts_made) == ("delivered", 2)
    assert [a.status for a in fw.attempts] == [503, 200]


async def test_settle_outbox_closes_a_row_without_an_attempt(store):
    delivery_id = await store.record_delivery(capture(), [pending(), pending("up1")])
    items = {i.upstream: i for i in await store.due_outbox(T0, ("up0", "up1"), 10)}
    reason = "duplicate of delivery 1, which up0 already acknowledged"
    await store.settle_outbox(items["up0"].outbox_id, "skipped", reason, T0 + 1)
    fw = await forwarding_of(store, delivery_id)
    assert (fw.state, fw.attempts_made, fw.note, fw.attempts) == ("skipped", 0, reason, ())
    await store.settle_outbox(items["up0"].outbox_id, "delivered", "too late", T0 + 2)  # settled stays settled
    assert (await forwarding_of(store, delivery_id)).state == "skipped"
    assert (await forwarding_of(store, delivery_id, "up1")).state == "pending"
    assert [i.upstream for i in await store.due_outbox(T0 + 1000, ("up0", "up1"), 10)] == ["up1"]
    assert await store.outbox_states() == {"skipped": 1, "pending": 1}


async def test_duplicates_are_marked_and_not_sent_twice(store):
    body = prediction_body("same")
    first = await store.record_delivery(capture(T0, body=body, webhook_id="msg_1"), [pending()])
    copy = await store.record_delivery(capture(T0 + 1, body=body, webhook_id="msg_1"), [pending()])
    changed = await store.record_delivery(capture(T0 + 2, body=body + b" ", webhook_id="msg_1"), [pending()])
    other_id = await store.record_delivery(capture(T0 + 3, body=body, webhook_id="msg_2"), [pending()])
    unsigned = [await store.record_delivery(capture(T0 + 4 + i, body=body), [pending()]) for i in range(2)]
    third = await store.record_delivery(capture(T0 + 6, body=body, webhook_id="msg_1"), [pending()])
    assert (await store.get_delivery(first)).duplicate_of is None
    assert (await store.get_delivery(copy)).duplicate_of == first
    assert (await store.get_delivery(third)).duplicate_of == first
    for delivery_id in (changed, other_id, *unsigned):
        assert (await store.get_delivery(delivery_id)).duplicate_of is None, delivery_id
    summaries = {s.id: s for s in (await store.list_deliveries(DeliveryFilter()))[0]}
    assert summaries[copy].duplicate_of == first and summaries[copy].webhook_id == "msg_1"

    due = by_delivery(await store.due_outbox(T0 + 10, UP0, 10))
    assert due[copy].already_delivered_as is None  # the first is not delivered yet
    await store.finish_attempt(due[first].outbox_id, attempt(first), "delivered", None, None)
    retry = attempt(copy, status=503, outcome="retry")
    await store.finish_attempt(due[copy].outbox_id, retry, "pending", T0 + 20, "retrying")
    for delivery_id in (changed, other_id, *unsigned, third):
        await store.finish_attempt(
            due[delivery_id].outbox_id, attempt(delivery_id, status=503, outcome="retry"), "pending", T0 + 20, "r"
        )
    due = by_delivery(await store.due_outbox(T0 + 20, UP0, 10))
    assert due[copy].already_delivered_as == first
    assert due[third].already_delivered_as == first
    for delivery_id in (changed, other_id, *unsigned):
        assert due[delivery_id].already_delivered_as is None, delivery_id


async def test_copies_committed_in_one_batch_are_duplicates_of_the_first(store):
    # Enqueued together, so the group commit takes them in one transaction (SQLite: one
    # multi-row INSERT, whose subqueries cannot see the statement's own rows).
    body = prediction_body("burst")
    earlier = await store.record_delivery(capture(T0, body=body, webhook_id="msg_old"), [pending()])
    captures = [
        capture(T0 + 1, body=body, webhook_id="msg_new"),
        capture(T0 + 1, body=body, webhook_id="msg_new"),
        capture(T0 + 1, body=body, webhook_id="msg_other"),
        capture(T0 + 1, body=body, webhook_id="msg_new"),
        capture(T0 + 1, body=body, webhook_id="msg_old"),
        capture(T0 + 1, body=body),
        capture(T0 + 1, body=body),
    ]
    ids = await asyncio.gather(*(store.record_delivery(c, [pending()]) for c in captures))
    marks = [(await store.get_delivery(i)).duplicate_of for i in ids]
    assert marks == [None, ids[0], None, ids[0], earlier, None, None]


# --- 5. replays, attempts, predictions, counts ----------------------------------------


async def test_replays_are_recorded_and_settle_a_dead_row(store):
    delivery_id = await store.record_delivery(capture(), [pending(), pending("up1")])
    items = {i.upstream: i for i in await store.due_outbox(T0, ("up0", "up1"), 10)}
    dead = attempt(delivery_id, status=500, outcome="dead")
    await store.finish_attempt(items["up0"].outbox_id, dead, "dead", None, "gave up after 1 attempts; last: HTTP 500")
    (forward,) = (await forwarding_of(store, delivery_id)).attempts
    assert forward.id is not None

    replay = attempt(delivery_id, kind="replay", started_at=T0 + 60, request_body=b"edited\x00\xff")
    replay_id = await store.record_attempt(replay)
    assert isinstance(replay_id, int)
    assert await store.get_attempt(replay_id) == replace(replay, id=replay_id)
    elsewhere = attempt(delivery_id, kind="replay", upstream=None, started_at=T0 + 70, status=None, outcome="error")
    elsewhere_id = await store.record_attempt(elsewhere)
    assert elsewhere_id > replay_id

    assert await store.previous_attempt(await store.get_attempt(elsewhere_id)) == replay_id
    assert await store.previous_attempt(await store.get_attempt(replay_id)) == forward.id
    assert await store.previous_attempt(forward) is None
    got = await store.get_delivery(delivery_id)
    assert got.replays == (replace(replay, id=replay_id), replace(elsewhere, id=elsewhere_id))
    assert [a.id for a in got.forwarding[0].attempts] == [forward.id]  # replays are not forwards

    await store.mark_delivered_by_replay(delivery_id, "up0", replay_id, T0 + 61)
    fw = await forwarding_of(store, delivery_id)
    assert fw.state == "delivered"
    assert str(replay_id) in (fw.note or "")
    # A row the forwarder still owns is left to it.
    await store.mark_delivered_by_replay(delivery_id, "up1", replay_id, T0 + 62)
    assert (await forwarding_of(store, delivery_id, "up1")).state == "pending"
    assert await store.outbox_states() == {"delivered": 1, "pending": 1}
    assert await store.due_outbox(T0 + 1000, UP0, 10) == []

    with pytest.raises(NotFound):
        await store.get_attempt(elsewhere_id + 1000)
    with pytest.raises(NotFound):
        await store.get_delivery(delivery_id + 1000)


async def test_deliveries_of_a_prediction_in_arrival_order(store):
    def event(i: int, prediction: str | None) -> Capture:
        return capture(T0 + i, prediction=PredictionInfo(id=prediction, status="processing"))

    e1 = await store.record_delivery(event(0, "p1"), [pending()])
    other = await store.record_delivery(event(1, "p2"), [pending()])
    e2 = await store.record_delivery(event(2, "p1"), [pending()])
    anonymous = await store.record_delivery(event(3, None), [])
    e3 = await store.record_delivery(event(4, "p1"), [pending("up1")])

    found = await store.prediction_deliveries("p1")
    assert [d.id for d in found] == [e1, e2, e3]
    assert [[f.upstream for f in d.forwarding] for d in found] == [["up0"], ["up0"], ["up1"]]
    assert [d.id for d in await store.prediction_deliveries("p1", cap=2)] == [e1, e2]
    assert await store.prediction_deliveries("nope") == []
    assert await store.previous_of_prediction(found[2]) == e2
    assert await store.previous_of_prediction(found[1]) == e1
    assert await store.previous_of_prediction(found[0]) is None
    assert await store.previous_of_prediction(await store.get_delivery(other)) is None
    assert await store.previous_of_prediction(await store.get_delivery(anonymous)) is None


async def test_counts(store):
    assert await store.count_deliveries() == 0
    assert await store.outbox_states() == {}
    ids = [await store.record_delivery(capture(T0 + i), [pending(), pending("up1")]) for i in range(4)]
    await store.record_delivery(capture(T0 + 9), [PlannedForward("up0", "skipped", None, "filtered")])
    await store.record_delivery(capture(T0 + 10), [])
    items = await store.due_outbox(T0 + 10, ("up0",), 10)
    assert len(items) == 4
    await store.finish_attempt(items[0].outbox_id, attempt(ids[0]), "delivered", None, None)
    await store.finish_attempt(items[1].outbox_id, attempt(ids[1], status=500, outcome="dead"), "dead", None, "x")
    assert await store.count_deliveries() == 6
    assert await store.outbox_states() == {"pending": 6, "delivered": 1, "dead": 1, "skipped": 1}


# --- 6. retention ------------------------------------------------------------------------


async def test_prune_removes_old_deliveries_with_their_rows(store):
    ids = []
    for i in range(10):
        body = prediction_body("ancient relic" if i < 5 else "fresh")
        ids.append(await store.record_delivery(capture(T0 + i, body=body), [pending()]))
    assert await listed_ids(store, q="relic") == ids[4::-1]  # indexed before the prune
    items = by_delivery(await store.due_outbox(T0 + 100, UP0, 100))
    for delivery_id in ids:
        await store.finish_attempt(items[delivery_id].outbox_id, attempt(delivery_id), "delivered", None, None)
    old_replay = await store.record_attempt(attempt(ids[0], kind="replay"))
    new_replay = await store.record_attempt(attempt(ids[9], kind="replay"))
    old_forward = (await forwarding_of(store, ids[0])).attempts[0].id

    assert await store.prune(older_than=T0 + 5, batch=2) == 5
    assert await store.count_deliveries() == 5
    assert await listed_ids(store) == ids[:4:-1]
    for delivery_id in ids[:5]:
        with pytest.raises(NotFound):
            await store.get_delivery(delivery_id)
    for attempt_id in (old_replay, old_forward):
        with pytest.raises(NotFound):
            await store.get_attempt(attempt_id)
    assert (await store.get_attempt(new_replay)).delivery_id == ids[9]
    assert (await forwarding_of(store, ids[5])).attempts_made == 1
    assert await store.outbox_states() == {"delivered": 5}
    assert await listed_ids(store, q="relic") == []
    assert await listed_ids(store, q="fresh") == ids[:4:-1]
    assert await store.prune(older_than=T0 + 5) == 0
    await store.check_writable(T0 + 10)
    assert await store.record_delivery(capture(T0 + 20), []) > ids[-1]


# --- 7. PostgreSQL: several relays on one database --------------------------------------


async def open_all(*coros: Any) -> list[Store]:
    """Open stores together; on any failure close the ones that opened, then raise."""
    results = await asyncio.gather(*coros, return_exceptions=True)
    opened = [r for r in results if not isinstance(r, BaseException)]
    for result in results:
        if isinstance(result, BaseException):
            for store in opened:
                await store.close()
            raise result
    return opened


async def close_all(stores: Sequence[Store]) -> None:
    for store in stores:
        await store.close()


async def test_pg_two_relays_claim_disjoint_rows(postgres: PostgresCluster):
    dsn = postgres.new_database()
    a, b = stores = await open_all(open_store(dsn), open_store(dsn))
    try:
        ids = await asyncio.gather(*(a.record_delivery(capture(T0 + i % 7), [pending()]) for i in range(200)))
        claimed: dict[str, list[int]] = {"a": [], "b": []}
        for _ in range(50):
            got_a, got_b = await asyncio.gather(a.due_outbox(T0 + 10, UP0, 17), b.due_outbox(T0 + 10, UP0, 17))
            claimed["a"] += [i.delivery_id for i in got_a]
            claimed["b"] += [i.delivery_id for i in got_b]
            if not got_a and not got_b:
                break
        assert not set(claimed["a"]) & set(claimed["b"])
        assert sorted(claimed["a"] + claimed["b"]) == sorted(ids)  # each exactly once
        assert claimed["a"] and claimed["b"]
    finally:
        await close_all(stores)


async def test_pg_lease_of_a_dead_relay_runs_out(postgres: PostgresCluster):
    dsn = postgres.new_database()
    a, b = stores = await open_all(open_store(dsn, lease_seconds=1), open_store(dsn))
    try:
        ids = [await a.record_delivery(capture(T0 + i * 0.01), [pending()]) for i in range(3)]
        assert [i.delivery_id for i in await a.due_outbox(T0 + 0.1, UP0, 10)] == ids
        # a never finishes its attempts: it died. Its lease holds until T0 + 1.1, then b sends them.
        assert await b.due_outbox(T0 + 0.5, UP0, 10) == []
        assert await b.next_due_after(T0 + 0.5, UP0) == T0 + 0.1 + 1
        taken = await b.due_outbox(T0 + 2, UP0, 10)
        assert [i.delivery_id for i in taken] == ids
        assert [i.attempts_made for i in taken] == [0, 0, 0]
        assert await a.due_outbox(T0 + 2.5, UP0, 10) == []  # b's lease (60 s) now holds them
    finally:
        await close_all(stores)


async def test_pg_prediction_order_holds_across_relays(postgres: PostgresCluster):
    dsn = postgres.new_database()
    a, b = stores = await open_all(open_store(dsn), open_store(dsn))
    try:
        key = "predX"
        e1 = await a.record_delivery(capture(T0, prediction=PredictionInfo(id=key)), [pending("up0", key)])
        e2 = await b.record_delivery(capture(T0 + 1, prediction=PredictionInfo(id=key)), [pending("up0", key)])
        (first,) = await a.due_outbox(T0 + 2, UP0, 10)
        assert first.delivery_id == e1
        assert await b.due_outbox(T0 + 2, UP0, 10) == []
        assert await b.due_outbox(T0 + 30, UP0, 10) == []  # still a's, and e2 waits behind it
        await a.finish_attempt(first.outbox_id, attempt(e1, started_at=T0 + 31), "delivered", None, None)
        (second,) = await b.due_outbox(T0 + 32, UP0, 10)
        assert second.delivery_id == e2
        assert await a.due_outbox(T0 + 32, UP0, 10) == []
    finally:
        await close_all(stores)


async def listening(dsn: str, expected: int) -> bool:
    conn = await asyncpg.connect(dsn)
    try:
        count = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND state = 'idle' AND query ILIKE 'LISTEN %replicate_relay_events%'"
        )
    finally:
        await conn.close()
    return int(count) == expected


async def test_pg_live_events_reach_the_other_relays_only(postgres: PostgresCluster):
    dsn = postgres.new_database()
    a, b = stores = await open_all(open_store(dsn), open_store(dsn))
    try:
        got_a: list[tuple[str, dict[str, Any]]] = []
        got_b: list[tuple[str, dict[str, Any]]] = []
        a.add_event_listener(lambda kind, data: got_a.append((kind, data)))
        b.add_event_listener(lambda kind, data: got_b.append((kind, data)))
        await wait_until(lambda: listening(dsn, 2))
        delivery = {"id": 7, "summary": {"source": "replicate", "text": 'ünï "q" \u2028 🚀'}}
        a.share_event("delivery", delivery)
        await wait_until(lambda: got_b == [("delivery", delivery)])
        reply = {"id": 7, "upstream": "up0", "status": 200}
        b.share_event("attempt", reply)
        await wait_until(lambda: bool(got_a))
        # a's own event was sent before b's reply: had it come back to a, it would be first.
        assert got_a == [("attempt", reply)]
        assert got_b == [("delivery", delivery)]
    finally:
        await close_all(stores)


async def test_pg_relays_starting_together_migrate_once(postgres: PostgresCluster):
    dsn = postgres.new_database()
    stores = await open_all(*(open_store(dsn) for _ in range(3)))
    try:
        ids = [await s.record_delivery(capture(T0 + n), []) for n, s in enumerate(stores)]
        assert len(set(ids)) == 3
        for s in stores:
            assert await s.count_deliveries() == 3
    finally:
        await close_all(stores)
    versions = postgres.psql("SELECT version FROM relay_schema ORDER BY version", dsn.rsplit("/", 1)[1])
    assert versions.split() == [str(n) for n in range(1, len(PG_MIGRATIONS) + 1)]
    reopened = await open_store(dsn)  # and a later start changes nothing
    await reopened.close()
    assert postgres.psql("SELECT count(*) FROM relay_schema", dsn.rsplit("/", 1)[1]) == str(len(PG_MIGRATIONS))


async def test_pg_server_not_listening_is_reported_at_once():
    port = free_port()
    async with asyncio.timeout(15):
        with pytest.raises(StoreUnavailable) as raised:
            await open_store(f"postgresql://postgres@127.0.0.1:{port}/relay")
    message = str(raised.value)
    assert "cannot connect to PostgreSQL" in message
    assert str(port) in message


async def test_pg_a_relay_whose_lease_ran_out_cannot_free_the_row_for_a_third(postgres: PostgresCluster):
    """A's attempt outlived its lease and B took the row over; A's late result is recorded but
    settles nothing, so C cannot claim the row while B is still sending it."""
    dsn = postgres.new_database()
    a, b, c = stores = await open_all(*(open_store(dsn, lease_seconds=40) for _ in range(3)))
    try:
        await a.record_delivery(capture(T0, prediction=PredictionInfo(id="P")), [pending("up0", "P")])
        (item,) = await a.due_outbox(T0, UP0, 10)
        assert [i.outbox_id for i in await b.due_outbox(T0 + 41, UP0, 10)] == [item.outbox_id]
        await a.finish_attempt(
            item.outbox_id, attempt(item.delivery_id, status=500, outcome="retry"), "pending", T0 + 42, "retry"
        )
        assert await c.due_outbox(T0 + 43, UP0, 10) == []
        fw = (await a.get_delivery(item.delivery_id)).forwarding[0]
        assert (fw.state, fw.attempts_made, len(fw.attempts)) == ("pending", 0, 1)  # recorded, not counted
        await b.finish_attempt(item.outbox_id, attempt(item.delivery_id), "delivered", None, None)
        assert (await a.get_delivery(item.delivery_id)).forwarding[0].state == "delivered"
    finally:
        await close_all(stores)


async def test_pg_events_of_one_prediction_committed_by_two_relays_keep_their_order(postgres: PostgresCluster):
    """Relay A is committing event 1 of P (its transaction is open, as during a slow fsync) when
    relay B stores event 2: B waits for A's commit, so event 2 is never sent before event 1."""
    import relay.pg_store as pg

    dsn = postgres.new_database()
    a, b = stores = await open_all(open_store(dsn), open_store(dsn))
    conn = await asyncpg.connect(dsn)
    try:
        tx = conn.transaction()
        await tx.start()  # A's group commit, under way: the same statements, not yet committed
        await conn.execute(pg._ORDER_LOCKS, ["P"])
        first_id = await conn.fetchval(pg._NEW_IDS, 1)
        first = capture(T0, prediction=PredictionInfo(id="P"), webhook_id="e1")
        await conn.execute(pg._INSERT_DELIVERY, *pg._delivery_params(first, first_id))
        await conn.execute(pg.numbered(pg.INSERT_OUTBOX), first_id, "up0", "pending", "P", T0, T0, None)
        second = asyncio.create_task(
            b.record_delivery(
                capture(T0 + 0.01, prediction=PredictionInfo(id="P"), webhook_id="e2"), [pending("up0", "P")]
            )
        )
        watcher = await asyncpg.connect(dsn)
        try:

            async def b_blocked_or_done() -> bool:
                waiting = await watcher.fetchval(
                    "SELECT COUNT(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
                )
                return second.done() or waiting > 0

            await wait_until(b_blocked_or_done, timeout=10)
        finally:
            await watcher.close()
        assert not second.done(), "relay B stored event 2 while event 1 was still being committed"
        await tx.commit()
        second_id = await second
        assert [i.delivery_id for i in await b.due_outbox(T0 + 1, UP0, 10)] == [first_id]
        assert second_id > first_id
    finally:
        await conn.close()
        await close_all(stores)


async def test_pg_health_checks_of_relays_do_not_wait_on_each_other(postgres: PostgresCluster):
    """A relay whose transaction hangs on its own health row must not make the others unhealthy."""
    dsn = postgres.new_database()
    a, b = stores = await open_all(open_store(dsn, commit_timeout=2), open_store(dsn, commit_timeout=2))
    conn = await asyncpg.connect(dsn)
    try:
        await a.check_writable(T0)
        tx = conn.transaction()
        await tx.start()  # a hung relay: a transaction holding A's health row, never finishing
        await conn.execute("UPDATE meta SET value = 'x' WHERE key LIKE 'healthz%'")
        await b.check_writable(T0 + 1)  # B's own row: no wait
        assert await b.record_delivery(capture(T0 + 1), [pending()]) > 0
        await tx.rollback()
    finally:
        await conn.close()
        await close_all(stores)


@pytest.mark.parametrize("limit", [999, 10, 3])
def test_batches_insert_whole_under_any_variable_limit(tmp_path, limit):
    """SQLite before 3.32 allows 999 variables in a statement (a build may allow fewer); a batch
    of any size still goes in whole and in order (writer.execute_rows splits its multi-row INSERTs)."""
    import sqlite3

    from relay.writer import execute_rows

    conn = sqlite3.connect(tmp_path / "t.db", isolation_level=None)
    conn.execute("CREATE TABLE t (n INTEGER, a TEXT, b BLOB)")
    conn.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, limit)
    expected: list[tuple[int, str, bytes]] = []
    for size in (1, 2, 3, 37, 64, 1000):
        rows = [(len(expected) + i, f"row {i}", bytes([i % 256])) for i in range(size)]
        execute_rows(conn, "INSERT INTO t (n, a, b) VALUES (?, ?, ?)", rows)
        expected += rows
    assert conn.execute("SELECT n, a, b FROM t ORDER BY rowid").fetchall() == expected
    conn.close()


@pytest.mark.parametrize("writers", [1, 2])
async def test_sqlite_log_starts_over_under_steady_writes(tmp_path, monkeypatch, writers):
    """Checkpoints run beside the commits (relay/checkpoint.py), never inside one; under writes that
    never pause the log must still start over, or it grows without bound (a passive checkpoint
    alone never rewinds it: new commits land while it copies). With two writers on the file, as
    the relay and its forwarder process are, the other's commits must not keep it from starting over."""
    import sqlite3

    import relay.checkpoint

    monkeypatch.setattr(relay.checkpoint, "INTERVAL_SECONDS", 0.01)
    monkeypatch.setattr(relay.checkpoint, "RESTART_FRAMES", 64)
    monkeypatch.setattr(relay.checkpoint, "TAIL_FRAMES", 64)
    path = tmp_path / "relay.db"
    stores = [await open_store(str(path)) for _ in range(writers)]
    body = json.dumps({"output": "x" * 8000}).encode()
    largest_log = 0
    try:
        for store in stores:  # no commit may checkpoint (the relay's p99 latency)
            assert store._wconn.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0
        for round_ in range(150):  # each round ~120 pages of log, 280 times the 64-page limit in all
            await asyncio.gather(
                *(stores[i % writers].record_delivery(capture(T0 + round_, body=body), [pending()]) for i in range(40))
            )
            largest_log = max(largest_log, (tmp_path / "relay.db-wal").stat().st_size)
        assert await stores[0].count_deliveries() == 6000
    finally:
        await close_all(stores)
    written = 6000 * len(body)
    assert largest_log < written / 5, f"the log reached {largest_log} bytes for {written} written"
    # Closed: every row is in the database file itself, and the log is gone.
    assert not (tmp_path / "relay.db-wal").exists()
    conn = sqlite3.connect(f"file:{path}?immutable=1", uri=True)
    assert conn.execute("SELECT COUNT(*) FROM deliveries").fetchone()[0] == 6000
    conn.close()


async def test_sqlite_checkpoints_copy_the_log_while_the_relay_runs(tmp_path):
    """The database file itself (read here while ignoring the log) catches up soon after a commit."""
    import sqlite3

    path = tmp_path / "relay.db"
    store = await open_store(str(path))
    try:
        ids = [await store.record_delivery(capture(T0 + i), [pending()]) for i in range(5)]

        def in_file() -> int:
            # Until the first checkpoint even the tables are only in the log; and a page being
            # copied while this reads can look torn. Either way: not there yet.
            try:
                conn = sqlite3.connect(f"file:{path}?immutable=1", uri=True)
                try:
                    return int(conn.execute("SELECT COUNT(*) FROM deliveries").fetchone()[0])
                finally:
                    conn.close()
            except sqlite3.DatabaseError:
                return -1

        await wait_until(lambda: in_file() == len(ids), timeout=5)
    finally:
        await store.close()


async def test_sqlite_full_text_index_stays_merged_through_indexing_and_prune(tmp_path):
    """FTS5's automatic merging is off (it held the write lock for whole-level merges); the relay
    merges in short steps instead. After thousands of deliveries indexed chunk by chunk and a prune,
    the index is sound, its segments are few, and search finds exactly what is left."""
    import sqlite3

    from relay.indexer import CHUNK

    path = tmp_path / "relay.db"
    store = await open_store(str(path))
    try:
        for start in range(0, 3000, 100):
            await asyncio.gather(
                *(
                    store.record_delivery(capture(T0 + i, body=prediction_body(f"word{i % 7} shared")), [])
                    for i in range(start, start + 100)
                )
            )
            while await store.index_bodies(CHUNK) == CHUNK:
                pass
        await store.tidy_index()
        # Small batches: each transaction adds a segment of deletions, 100 in all, for the prune's
        # own merging (tidy_index) to take down again.
        assert await store.prune(T0 + 1000, batch=10) == 1000
        assert await listed_ids(store, q="word3") == sorted(
            [i + 1 for i in range(1000, 3000) if i % 7 == 3], reverse=True
        )
    finally:
        await store.close()
    conn = sqlite3.connect(path)
    try:
        conn.execute("INSERT INTO deliveries_fts (deliveries_fts, rank) VALUES ('integrity-check', 1)")
        assert conn.execute("SELECT v FROM deliveries_fts_config WHERE k = 'automerge'").fetchone() == (0,)
        segments = conn.execute("SELECT COUNT(DISTINCT id >> 37) FROM deliveries_fts_data WHERE id >> 37 > 0")
        # 120 indexing transactions and 100 of prune; merged, FTS5 leaves at most 3 per level.
        assert segments.fetchone()[0] <= 9
    finally:
        conn.close()


async def test_sqlite_database_of_an_older_relay_opens_and_stays_openable_by_it(tmp_path):
    """Automerge is a setting of the file, not a schema migration: a database made by the previous
    release opens, keeps its deliveries searchable, and keeps the schema version that release knows."""
    import sqlite3

    from relay.schema import MIGRATIONS, split_statements

    path = tmp_path / "relay.db"
    old = sqlite3.connect(path, isolation_level=None)
    old.execute("PRAGMA journal_mode = WAL")
    for number, script in enumerate(MIGRATIONS, start=1):
        for statement in split_statements(script):
            old.execute(statement)
        old.execute(f"PRAGMA user_version = {number}")
    old.close()
    store = await open_store(str(path))
    try:
        found = await store.record_delivery(capture(T0, body=prediction_body("an astronaut")), [])
        assert await listed_ids(store, q="astronaut") == [found]
    finally:
        await store.close()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    assert conn.execute("SELECT v FROM deliveries_fts_config WHERE k = 'automerge'").fetchone() == (0,)
    conn.close()
