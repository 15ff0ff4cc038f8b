"""The read API of the admin listener (SPEC §6) over a seeded database, against real relays on real sockets.

A module-scoped fixture seeds one SQLite file for real: about 2,500 webhooks
POSTed concurrently over HTTP to a running relay's ingest listener (signed,
wrongly signed, unsigned, expired, future, bad timestamps, prediction
lifecycles, non-JSON and non-UTF-8 bodies, an over-size body, duplicates),
forwarded to two scripted upstreams that answer 200, 400 or 503 by body
content, until no outbox row is pending. The relay's clock is shifted while
seeding so that deliveries fall in three periods (three days ago, two hours
ago, now), which makes every ``since``/``until`` form checkable exactly.

Each test then starts a fresh relay on a copy of that file and asks its API.
Expected answers come from what was posted (the test's own model), which is
itself checked against the database file with sqlite3.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import re
import shutil
import sqlite3
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client.parser import text_string_to_metric_families

from relay.lifecycle import MODEL, VERSION, encode, prediction_lifecycle
from relay.service import Relay
from relay.verify import Verdict

from support import ScriptedUpstream, lifecycle_bodies, make_config, signed, wait_until

INGEST_PATH = "/webhooks/replicate"
DAY = 86400.0
PHASES = {"old": -3 * DAY, "mid": -2 * 3600.0, "new": 0.0}
STATUSES = ("starting", "processing", "succeeded", "failed", "canceled", "weird-new-status")
MODES = {
    "signed": "verified",
    "wrong_key": "invalid_signature",
    "missing": "missing_headers",
    "expired": "expired",
    "future": "future",
    "bad_ts": "bad_timestamp",
}
N_PREDICTIONS = 120  # x 4 lifecycle events
N_SOLO = 2000
MAX_BODY = 4096
CUDA = "CUDA out of memory"
RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$")
UPSTREAMS = ("up0", "up1")


# --- the seeded database ------------------------------------------------------------------


@dataclass
class Posted:
    """One delivery as the test sent it, with what the relay should have made of it."""

    id: int
    phase: str
    kind: str
    body: bytes
    headers: dict[str, str]
    query: str
    verdict: str
    answer: int
    prediction: str | None
    status: str | None
    states: dict[str, str]
    duplicate_of: int | None = None
    kept: bool = True


@dataclass
class Seed:
    path: Path
    posted: list[Posted]
    sent: dict[tuple[str, int], int]  # requests each upstream received, by X-Relay-Delivery
    by_id: dict[int, Posted] = field(default_factory=dict)

    def ids(self, keep: Callable[[Posted], bool] = lambda p: True) -> set[int]:
        return {p.id for p in self.posted if keep(p)}

    def one(self, keep: Callable[[Posted], bool]) -> Posted:
        return next(p for p in self.posted if keep(p))


def headers_for(mode: str, body: bytes, now: float, content_type: str, msg_id: str | None = None) -> dict[str, str]:
    ts = int(now)
    if mode == "signed":
        headers = signed(body, timestamp=ts, msg_id=msg_id)
    elif mode == "wrong_key":
        headers = signed(body, key=b"definitely not the key", timestamp=ts)
    elif mode == "missing":
        headers = signed(body, key=None)
    elif mode == "expired":
        headers = signed(body, timestamp=ts - 1000)
    elif mode == "future":
        headers = signed(body, timestamp=ts + 1000)
    elif mode == "bad_ts":
        headers = {**signed(body, timestamp=ts), "webhook-timestamp": "soon"}
    else:
        raise AssertionError(mode)
    headers["Content-Type"] = content_type
    return headers


def expected_states(verdict: str, kept: bool, body: bytes) -> dict[str, str]:
    if not kept or not Verdict(verdict).accepted:
        return {"up0": "skipped", "up1": "skipped"}
    up0 = "failed" if b"reject-me" in body else "dead" if b"dead-me" in body else "delivered"
    return {"up0": up0, "up1": "delivered"}


async def upstream_decides(request: web.Request) -> web.Response:
    """up0's answer depends on the body: 400 (final), 503 (retried until dead) or 200."""
    body = await request.read()
    if b"reject-me" in body:
        return web.Response(status=400, text="rejected by the app")
    if b"dead-me" in body:
        return web.Response(status=503, text="app is down")
    return web.Response(status=200, text="ok")


def solo_body(i: int) -> tuple[str, bytes]:
    """A small prediction-like body; the mode of signing is chosen from i."""
    mode = "signed"
    if i % 20 == 0:
        mode = "wrong_key"
    elif i % 20 == 1:
        mode = "missing"
    elif i % 97 == 2:
        mode = "expired"
    elif i % 97 == 3:
        mode = "future"
    elif i % 97 == 4:
        mode = "bad_ts"
    note = "reject-me" if i % 30 == 5 else "dead-me" if i % 30 == 6 else "plain"
    doc: dict[str, Any] = {
        "id": f"solo-{i:04d}",
        "status": STATUSES[i % len(STATUSES)],
        "model": f"acme/model-{i % 7}",
        "version": f"v{i % 3}",
        "note": note,
        "seq": i,
        "error": f"{CUDA}. Tried to allocate 2.00 GiB" if i % 50 == 7 else None,
    }
    return mode, encode(doc)


def prediction_bodies(i: int) -> list[bytes]:
    pid = f"pred-{i:04d}"
    docs = prediction_lifecycle(pid, "http://relay.test/webhooks/replicate", now=1_700_000_000 + i)
    if i % 5 == 0:
        docs[-1] = {**docs[-1], "status": "failed", "output": None, "error": f"{CUDA}: tried to allocate 20 MiB"}
    return [encode(d) for d in docs]


async def _seed(path: str) -> tuple[list[Posted], dict[tuple[str, int], int]]:
    offset = [PHASES["old"]]

    def clock() -> float:
        return time.time() + offset[0]

    up0 = ScriptedUpstream(then=upstream_decides)  # type: ignore[arg-type]  # a callable answers each request
    up1 = ScriptedUpstream(then=200)
    servers = []
    for up in (up0, up1):
        server = TestServer(up.app(), host="127.0.0.1")
        await server.start_server()
        servers.append(server)
        up.url = str(server.make_url("/hook"))
    config = make_config(
        path,
        upstreams=[{"url": up0.url, "max_attempts": 2}, {"url": up1.url, "ordered": False}],
        relay={"max_body_bytes": MAX_BODY},
    )
    relay = Relay(config, clock=clock)
    await relay.start()
    assert relay.bound is not None
    base = relay.bound.ingest_url + INGEST_PATH
    posted: list[Posted] = []
    gate = asyncio.Semaphore(100)

    async def send(
        session: aiohttp.ClientSession,
        phase: str,
        kind: str,
        mode: str,
        body: bytes,
        content_type: str = "application/json",
        query: str = "",
        msg_id: str | None = None,
        duplicate_of: Posted | None = None,
    ) -> Posted:
        headers = headers_for(mode, body, clock(), content_type, msg_id)
        kept = len(body) <= MAX_BODY
        async with session.post(base + (f"?{query}" if query else ""), data=body, headers=headers) as resp:
            answer = await resp.json()
            status = resp.status
        verdict = MODES[mode] if kept else "invalid_signature"
        expected_answer = 413 if not kept else 200 if Verdict(verdict).accepted else 400
        assert status == expected_answer, (kind, mode, status, answer)
        try:
            doc = json.loads(body) if kept else None
        except ValueError:
            doc = None
        doc = doc if isinstance(doc, dict) else {}
        states = expected_states(verdict, kept, body)
        if duplicate_of is not None:
            states = {
                up: "skipped" if duplicate_of.states[up] == "delivered" else duplicate_of.states[up] for up in UPSTREAMS
            }
        item = Posted(
            id=int(answer["delivery"]),
            phase=phase,
            kind=kind,
            body=body,
            headers=headers,
            query=query,
            verdict=verdict,
            answer=status,
            prediction=doc.get("id"),
            status=doc.get("status"),
            states=states,
            duplicate_of=duplicate_of.id if duplicate_of else None,
            kept=kept,
        )
        posted.append(item)
        return item

    async def lifecycle(session: aiohttp.ClientSession, phase: str, i: int) -> None:
        async with gate:
            for body in prediction_bodies(i):  # one prediction's events in order
                await send(session, phase, "lifecycle", "signed", body)

    async def solo(session: aiohttp.ClientSession, phase: str, i: int) -> None:
        mode, body = solo_body(i)
        query = f"userId=123&jobId={i}" if i % 40 == 8 else ""
        async with gate:
            await send(session, phase, "solo", mode, body, query=query)

    async def no_pending() -> bool:
        with sqlite3.connect(path) as db:
            return db.execute("SELECT COUNT(*) FROM outbox WHERE state = 'pending'").fetchone()[0] == 0

    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=100)) as session:
            names = list(PHASES)
            for n, phase in enumerate(names):
                offset[0] = PHASES[phase]
                jobs: list[Awaitable[None]] = [lifecycle(session, phase, i) for i in range(N_PREDICTIONS) if i % 3 == n]
                jobs += [solo(session, phase, i) for i in range(N_SOLO) if i % 3 == n]
                await asyncio.gather(*jobs)
            # Specials, in the newest period.
            await send(session, "new", "text", "signed", b"plain text payload, nothing to parse", "text/plain")
            await send(session, "new", "text", "signed", f"GPU says: {CUDA} at step 3".encode(), "text/plain")
            await send(session, "new", "binary", "signed", b"\xff\xfe\x00binary\x80\x81", "application/x-custom")
            await send(session, "new", "empty", "signed", b"", "application/json")
            await send(session, "new", "big", "signed", b'{"id":"big","pad":"' + b"x" * (MAX_BODY + 500) + b'"}')
            await wait_until(no_pending, timeout=60)
            # Duplicates: the same webhook-id and body again, after the originals settled.
            plain = [p for p in posted if p.kind == "solo" and p.verdict == "verified" and b'"plain"' in p.body]
            rejected = [p for p in posted if p.kind == "solo" and p.verdict == "verified" and b"reject-me" in p.body]
            for original in plain[:5] + rejected[:1]:
                await send(
                    session,
                    "new",
                    "duplicate",
                    "signed",
                    original.body,
                    msg_id=original.headers["webhook-id"],
                    duplicate_of=original,
                )
            await wait_until(no_pending, timeout=30)
    finally:
        await relay.stop()
        for server in servers:
            await server.close()
    sent: dict[tuple[str, int], int] = {}
    for name, up in zip(UPSTREAMS, (up0, up1), strict=True):
        for received in up.received:
            did = int(next(v for k, v in received.headers if k.lower() == "x-relay-delivery"))
            sent[(name, did)] = sent.get((name, did), 0) + 1
    return posted, sent


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> Seed:
    path = tmp_path_factory.mktemp("seed") / "relay.db"
    posted, sent = asyncio.run(_seed(str(path)))
    seed = Seed(path, sorted(posted, key=lambda p: p.id), sent)
    seed.by_id = {p.id: p for p in seed.posted}
    assert len(seed.by_id) == len(posted) >= 2400
    return seed


class Api:
    def __init__(self, http: aiohttp.ClientSession, relay: Relay) -> None:
        assert relay.bound is not None
        self.http = http
        self.relay = relay
        self.base = relay.bound.admin_url

    async def get(self, path: str, params: dict[str, str] | None = None) -> tuple[int, Any]:
        async with self.http.get(self.base + path, params=params) as resp:
            assert resp.content_type == "application/json", (path, resp.content_type, await resp.text())
            return resp.status, await resp.json()

    async def page(self, **params: str) -> dict[str, Any]:
        status, data = await self.get("/api/deliveries", params)
        assert status == 200, (params, data)
        assert set(data) == {"deliveries", "next"}
        ids = [d["id"] for d in data["deliveries"]]
        assert ids == sorted(ids, reverse=True) and len(set(ids)) == len(ids), "not newest first"
        return data

    async def all_ids(self, limit: int = 500, **params: str) -> list[int]:
        """Walk every page of a filter; check the cursor contract on the way."""
        out: list[int] = []
        before: str | None = None
        for _ in range(1000):
            query = {**params, "limit": str(limit), **({"before": before} if before else {})}
            data = await self.page(**query)
            ids = [d["id"] for d in data["deliveries"]]
            out += ids
            if data["next"] is None:
                assert len(ids) <= limit
                break
            assert len(ids) == limit and data["next"] == ids[-1]
            before = str(data["next"])
        else:
            raise AssertionError("pagination never ended")
        assert out == sorted(out, reverse=True) and len(set(out)) == len(out)
        return out


@pytest.fixture
async def api(seeded: Seed, relay_factory: Any, http: aiohttp.ClientSession, tmp_path: Path) -> Api:
    db = tmp_path / "relay.db"
    for suffix in ("", "-wal", "-shm"):
        source = Path(str(seeded.path) + suffix)
        if source.exists():
            shutil.copyfile(source, str(db) + suffix)
    # Same upstream names as when seeding; nothing is pending, so nothing is sent to these.
    config = make_config(
        str(db),
        upstreams=[{"url": "http://127.0.0.1:9/none", "max_attempts": 2}, {"url": "http://127.0.0.1:9/none"}],
    )
    return Api(http, await relay_factory(config))


def db_rows(path: Path, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with sqlite3.connect(path) as db:
        return db.execute(sql, params).fetchall()


# --- the model agrees with the database ---------------------------------------------------


async def test_seeded_database_matches_what_was_posted(seeded: Seed, api: Api) -> None:
    path = Path(api.relay.config.relay.database)
    rows = db_rows(path, "SELECT id, verdict, prediction_id, status, body, duplicate_of, query FROM deliveries")
    assert {r[0] for r in rows} == seeded.ids()
    for did, verdict, prediction, status, body, duplicate_of, query in rows:
        p = seeded.by_id[did]
        assert (verdict, prediction, status, duplicate_of, query) == (
            p.verdict,
            p.prediction,
            p.status,
            p.duplicate_of,
            p.query,
        ), did
        assert (bytes(body) if body is not None else None) == (p.body if p.kept else None)
    states = {(d, u): s for d, u, s in db_rows(path, "SELECT delivery_id, upstream, state FROM outbox")}
    assert len(states) == 2 * len(seeded.posted)
    for p in seeded.posted:
        assert {u: states[(p.id, u)] for u in UPSTREAMS} == p.states, p
    # Every kind of case is really in there.
    assert {p.verdict for p in seeded.posted} == set(MODES.values())
    assert {s for p in seeded.posted for s in p.states.values()} == {"delivered", "failed", "dead", "skipped"}
    assert {p.phase for p in seeded.posted} == set(PHASES)


async def test_every_outbox_row_is_sent_as_often_as_its_outcome_requires(seeded: Seed, api: Api) -> None:
    """Under concurrent load no row is sent twice: one request per delivered/failed row, max_attempts per dead one."""
    path = Path(api.relay.config.relay.database)
    recorded = {
        (u, d): n for u, d, n in db_rows(path, "SELECT upstream, delivery_id, COUNT(*) FROM attempts GROUP BY 1, 2")
    }
    wanted = {"delivered": 1, "failed": 1, "dead": 2, "skipped": 0}
    wrong = []
    for p in seeded.posted:
        for upstream in UPSTREAMS:
            expected = wanted[p.states[upstream]]
            sent = seeded.sent.get((upstream, p.id), 0)
            stored = recorded.get((upstream, p.id), 0)
            if (sent, stored) != (expected, expected):
                wrong.append((p.id, upstream, p.states[upstream], f"sent {sent}", f"recorded {stored}"))
    assert not wrong, f"{len(wrong)} outbox rows sent more (or less) often than once per needed attempt: {wrong[:8]}"


# --- filters --------------------------------------------------------------------------------


async def test_each_filter_returns_exactly_the_expected_set(seeded: Seed, api: Api) -> None:
    async def check(expected: set[int], **params: str) -> None:
        got = await api.all_ids(**params)
        assert set(got) == expected, (params, sorted(set(got) ^ expected)[:20])

    everything = seeded.ids()
    await check(everything)
    await check(everything, source="replicate")
    await check(set(), source="another-source")

    for verdict in (v.value for v in Verdict):
        await check(seeded.ids(lambda p, v=verdict: p.verdict == v), verdict=verdict)
    assert len(seeded.ids(lambda p: p.verdict == "invalid_signature")) > 50

    for state in ("pending", "delivered", "failed", "dead", "skipped"):
        expected = seeded.ids(lambda p, s=state: s in p.states.values())
        assert state == "pending" or expected, state
        await check(expected, state=state)
        for upstream in UPSTREAMS:
            await check(seeded.ids(lambda p, s=state, u=upstream: p.states[u] == s), state=state, upstream=upstream)
    await check(everything, upstream="up0")
    await check(set(), upstream="nope")

    for i in (0, 1, 7, N_PREDICTIONS - 1):
        pid = f"pred-{i:04d}"
        expected = seeded.ids(lambda p, x=pid: p.prediction == x)
        assert len(expected) == 4
        await check(expected, prediction=pid)
    duplicate = seeded.one(lambda p: p.kind == "duplicate")
    assert duplicate.prediction is not None
    await check({duplicate.id, duplicate.duplicate_of or 0}, prediction=duplicate.prediction)
    await check(set(), prediction="no-such-prediction")

    for status in STATUSES:
        expected = seeded.ids(lambda p, s=status: p.status == s)
        assert expected, status
        await check(expected, status=status)

    cuda = seeded.ids(lambda p: CUDA.encode() in p.body and p.kept)
    assert len(cuda) > 30 and any(seeded.by_id[i].kind == "text" for i in cuda)
    await check(cuda, q=CUDA)
    await check(cuda, q="cuda OUT of Memory")  # case-insensitive
    await check(seeded.ids(lambda p: b"reject-me" in p.body), q="reject-me")
    await check(set(), q="phrase that appears nowhere")

    # Filters combine with AND.
    await check(
        seeded.ids(lambda p: p.verdict == "verified" and p.status == "failed" and p.phase != "old"),
        verdict="verified",
        status="failed",
        since="1d",
    )
    await check(
        seeded.ids(lambda p: p.states["up0"] == "failed" and CUDA.encode() in p.body),
        state="failed",
        upstream="up0",
        q=CUDA,
    )
    # An empty value is no filter at all.
    await check(everything, verdict="", state="", q="")


async def test_punctuation_only_search_is_not_a_server_error(api: Api) -> None:
    for q in ('"><', "*", "AND", "NEAR(", '"', "-", ":"):
        status, data = await api.get("/api/deliveries", {"q": q})
        assert status == 200, (q, status, data)


async def test_since_and_until_in_every_time_form(seeded: Seed, api: Api) -> None:
    path = Path(api.relay.config.relay.database)
    received = dict(db_rows(path, "SELECT id, received_at FROM deliveries"))
    phase = {p: seeded.ids(lambda x, ph=p: x.phase == ph) for p in PHASES}
    old, mid, new = phase["old"], phase["mid"], phase["new"]
    now = time.time()

    async def check(expected: set[int], **params: str) -> None:
        got = set(await api.all_ids(**params))
        assert got == expected, (params, len(got), len(expected))

    # Relative ages.
    await check(new, since="1h")
    await check(mid | new, since="3h")
    await check(mid | new, since="1d")
    await check(old, until="1d")
    await check(old | mid, until="30m")
    await check(old | mid | new, since="4d")
    await check(mid, since="3h", until="1h")
    await check(mid | new, since="180m")
    await check(mid | new, since="10800s")
    await check(old | mid | new, since="1w")
    # RFC 3339, with Z and with an offset, and Unix seconds (integer and fraction).
    day_ago = datetime.fromtimestamp(now - DAY, UTC)
    await check(mid | new, since=day_ago.isoformat().replace("+00:00", "Z"))
    await check(mid | new, since=day_ago.astimezone(timezone(timedelta(hours=2))).isoformat())
    await check(old, until=day_ago.strftime("%Y-%m-%dT%H:%M:%SZ"))
    await check(old | mid, until=str(int(now - 3600)))
    await check(new, since=f"{now - 3600:.3f}")
    await check(mid, since=str(int(now - DAY)), until=str(int(now - 3600)))
    # Bounds are inclusive, to the exact stored instant.
    pick = sorted(mid)[len(mid) // 2]
    at = received[pick]
    await check({i for i, r in received.items() if r >= at}, since=repr(at))
    await check({i for i, r in received.items() if r <= at}, until=repr(at))
    await check({i for i, r in received.items() if r == at}, since=repr(at), until=repr(at))


# --- pagination -----------------------------------------------------------------------------


async def test_keyset_pagination_visits_every_delivery_once(seeded: Seed, api: Api) -> None:
    everything = sorted(seeded.ids(), reverse=True)
    walked = await api.all_ids(limit=100)
    assert walked == everything
    pages = -(-len(everything) // 100)
    assert pages > 20
    # The walk through a filter is complete and ordered as well.
    verified = sorted(seeded.ids(lambda p: p.verdict == "verified"), reverse=True)
    assert await api.all_ids(limit=100, verdict="verified") == verified
    # Default page size and both ends of the allowed range.
    data = await api.page()
    assert len(data["deliveries"]) == 50 and data["next"] == everything[49]
    data = await api.page(limit="1")
    assert [d["id"] for d in data["deliveries"]] == everything[:1] and data["next"] == everything[0]
    data = await api.page(limit="500")
    assert [d["id"] for d in data["deliveries"]] == everything[:500] and data["next"] == everything[499]
    # ``before`` is exclusive and works from any id, even one that does not exist.
    data = await api.page(limit="3", before=str(everything[10]))
    assert [d["id"] for d in data["deliveries"]] == everything[11:14]
    data = await api.page(limit="500", before=str(everything[-1]))
    assert data == {"deliveries": [], "next": None}
    data = await api.page(before=str(everything[0] + 1000), limit="2")
    assert [d["id"] for d in data["deliveries"]] == everything[:2]
    # A last page that is exactly full says so (no cursor to an empty page).
    four = sorted(seeded.ids(lambda p: p.prediction == "pred-0002"), reverse=True)
    data = await api.page(prediction="pred-0002", limit="4")
    assert [d["id"] for d in data["deliveries"]] == four and data["next"] is None
    first = await api.page(prediction="pred-0002", limit="2")
    assert [d["id"] for d in first["deliveries"]] == four[:2] and first["next"] == four[1]
    second = await api.page(prediction="pred-0002", limit="2", before=str(first["next"]))
    assert [d["id"] for d in second["deliveries"]] == four[2:] and second["next"] is None
    # The summary rows carry what a list needs.
    row = (await api.page(prediction="pred-0002", limit="1"))["deliveries"][0]
    assert row["prediction"]["id"] == "pred-0002" and row["verdict"] == "verified"
    assert row["forwarding"] == seeded.by_id[row["id"]].states
    assert RFC3339.match(row["received_at"])


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"limit": "0"}, "limit"),
        ({"limit": "501"}, "limit"),
        ({"limit": "abc"}, "limit"),
        ({"limit": "-5"}, "limit"),
        ({"verdict": "nope"}, "verdict"),
        ({"state": "nope"}, "state"),
        ({"since": "garbage"}, "since"),
        ({"until": "yesterday-ish"}, "until"),
        ({"since": "2024-01-01T00:00:00"}, "since"),  # no time zone
        ({"since": "1h", "until": "2h"}, "since"),  # since after until
        ({"before": "-1"}, "before"),
        ({"before": "0"}, "before"),
        ({"before": "1.5"}, "before"),
        ({"q": "x" * 501}, "q"),
        ({"colour": "blue"}, "colour"),
    ],
)
async def test_bad_filter_values_are_400_naming_the_parameter(
    relay_factory: Any, http: aiohttp.ClientSession, params: dict[str, str], param: str
) -> None:
    relay = await relay_factory()
    async with http.get(relay.bound.admin_url + "/api/deliveries", params=params) as resp:
        assert resp.status == 400, await resp.text()
        assert resp.content_type == "application/json"
        data = await resp.json()
    assert data["param"] == param
    assert isinstance(data["error"], str) and param in data["error"]


async def test_out_of_range_ids_are_404_or_400_never_500(api: Api) -> None:
    huge = "9" * 30  # a whole number, but beyond SQLite's 64-bit integers
    answers = {}
    for path, params in (
        (f"/api/deliveries/{huge}", None),
        (f"/api/deliveries/{huge}/raw", None),
        ("/api/deliveries", {"before": huge}),
        ("/api/deliveries", {"after": huge}),
    ):
        async with api.http.get(api.base + path, params=params) as resp:
            answers[(path, str(params))] = (resp.status, resp.content_type)
    async with api.http.get(f"{api.base}/deliveries/{huge}") as resp:
        answers[("page", huge)] = (resp.status, resp.content_type)
    bad = {k: v for k, v in answers.items() if v[0] not in (400, 404) and not (v[0] == 200 and "before" in k[1])}
    assert not bad, f"server errors for out-of-range ids: {bad}"


# --- one delivery -----------------------------------------------------------------------------


def check_detail(d: dict[str, Any], p: Posted, received_at: float) -> None:
    types: dict[str, Any] = {
        "id": int,
        "received_at": str,
        "source": str,
        "method": str,
        "path": str,
        "query": str,
        "headers": list,
        "body": (str, type(None)),
        "body_base64": (str, type(None)),
        "body_sha256": str,
        "size": int,
        "verdict": str,
        "verdict_detail": str,
        "webhook_id": (str, type(None)),
        "prediction": dict,
        "duplicate_of": (int, type(None)),
        "forwarding": dict,
    }
    for name, kind in types.items():
        assert name in d, name
        assert isinstance(d[name], kind) and not isinstance(d[name], bool), (name, d[name])
    assert d["id"] == p.id
    assert RFC3339.match(d["received_at"]), d["received_at"]
    parsed = datetime.fromisoformat(d["received_at"].replace("Z", "+00:00"))
    assert abs(parsed.timestamp() - received_at) < 0.001
    assert (d["source"], d["method"], d["path"], d["query"]) == ("replicate", "POST", INGEST_PATH, p.query)
    assert all(isinstance(h, list) and len(h) == 2 and all(isinstance(x, str) for x in h) for h in d["headers"])
    for name, value in p.headers.items():
        assert [name, value] in d["headers"], name
    if p.kept:
        assert base64.b64decode(d["body_base64"]) == p.body
        try:
            assert d["body"] == p.body.decode("utf-8")
        except UnicodeDecodeError:
            assert d["body"] is None
    else:
        assert d["body"] is None
    if p.kept:
        assert d["body_sha256"] == hashlib.sha256(p.body).hexdigest()
    assert d["size"] == len(p.body)
    assert d["verdict"] == p.verdict
    if p.verdict != "verified":
        assert d["verdict_detail"]
    assert d["webhook_id"] == p.headers.get("webhook-id")
    assert set(d["prediction"]) >= {"id", "status", "model", "version"}
    doc = json.loads(p.body) if p.kept and p.body.startswith(b"{") else {}
    assert d["prediction"]["id"] == doc.get("id") and d["prediction"]["status"] == doc.get("status")
    assert d["prediction"]["model"] == doc.get("model") and d["prediction"]["version"] == doc.get("version")
    assert d["duplicate_of"] == p.duplicate_of
    assert set(d["forwarding"]) == set(UPSTREAMS)
    for upstream, fw in d["forwarding"].items():
        assert fw["state"] == p.states[upstream], (upstream, fw)
        assert isinstance(fw["attempts"], list)
        assert fw["attempts_made"] == len(fw["attempts"])
        for attempt in fw["attempts"]:
            assert isinstance(attempt["status"], int) and RFC3339.match(attempt["started_at"])
            assert isinstance(attempt["duration_ms"], int | float) and attempt["duration_ms"] >= 0
            assert attempt["upstream"] == upstream and attempt["target"].startswith("http://127.0.0.1:")
        # How many attempts each row should take is checked exactly in
        # test_every_outbox_row_is_sent_as_often_as_its_outcome_requires.
        statuses = {a["status"] for a in fw["attempts"]}
        outcomes = [a["outcome"] for a in fw["attempts"]]
        if fw["state"] == "skipped":
            assert fw["attempts"] == []
        elif fw["state"] == "delivered":
            assert statuses == {200} and outcomes[-1] == "delivered"
        elif fw["state"] == "failed":
            assert statuses == {400} and set(outcomes) == {"failed"}
            assert fw["attempts"][0]["response_body"] == "rejected by the app"
        elif fw["state"] == "dead":
            assert statuses == {503} and outcomes[-1] == "dead" and len(outcomes) >= 2


async def test_delivery_detail_has_every_field_with_the_right_type(seeded: Seed, api: Api) -> None:
    path = Path(api.relay.config.relay.database)
    received = dict(db_rows(path, "SELECT id, received_at FROM deliveries"))
    picks = [
        seeded.one(lambda p: p.kind == "lifecycle" and p.status == "succeeded"),
        seeded.one(lambda p: p.kind == "lifecycle" and p.status == "starting"),
        seeded.one(lambda p: p.kind == "solo" and p.query != ""),
        seeded.one(lambda p: p.states["up0"] == "failed" and p.duplicate_of is None),
        seeded.one(lambda p: p.states["up0"] == "dead"),
        seeded.one(lambda p: p.verdict == "invalid_signature" and p.kept),
        seeded.one(lambda p: p.verdict == "missing_headers"),
        seeded.one(lambda p: p.verdict == "expired"),
        seeded.one(lambda p: p.kind == "binary"),
        seeded.one(lambda p: p.kind == "text"),
        seeded.one(lambda p: p.kind == "empty"),
        seeded.one(lambda p: p.kind == "big"),
        *[p for p in seeded.posted if p.kind == "duplicate"],
    ]
    for p in picks:
        status, d = await api.get(f"/api/deliveries/{p.id}")
        assert status == 200, d
        check_detail(d, p, received[p.id])
    binary = seeded.one(lambda p: p.kind == "binary")
    status, d = await api.get(f"/api/deliveries/{binary.id}")
    assert d["body"] is None and d["body_base64"] == base64.b64encode(binary.body).decode()
    big = seeded.one(lambda p: p.kind == "big")
    status, d = await api.get(f"/api/deliveries/{big.id}")
    assert d["body"] is None and d["size"] == len(big.body) and "max_body_bytes" in d["verdict_detail"]
    invalid = seeded.one(lambda p: p.verdict == "invalid_signature" and p.kept)
    status, d = await api.get(f"/api/deliveries/{invalid.id}")
    assert "1 signature(s)" in d["verdict_detail"]
    assert all(f["note"] and "invalid_signature" in f["note"] for f in d["forwarding"].values())


async def test_unknown_and_malformed_delivery_ids_are_404_json(seeded: Seed, api: Api) -> None:
    missing = max(seeded.ids()) + 1
    for path in (
        f"/api/deliveries/{missing}",
        f"/api/deliveries/{missing}/raw",
        "/api/deliveries/abc",
        "/api/deliveries/abc/raw",
        "/api/deliveries/-1",
        "/api/deliveries/1.0",
        "/api/deliveries/%EF%BC%91",  # a full-width digit one
        "/api/deliveries/0x10",
    ):
        status, data = await api.get(path)
        assert status == 404, (path, data)
        assert isinstance(data, dict) and isinstance(data.get("error"), str) and data["error"], path


async def test_raw_returns_the_exact_bytes_as_a_sandboxed_download(seeded: Seed, api: Api) -> None:
    cases = [
        (seeded.one(lambda p: p.kind == "lifecycle"), "application/json"),
        (seeded.one(lambda p: p.kind == "binary"), "application/x-custom"),
        (seeded.one(lambda p: p.kind == "text"), "text/plain"),
        (seeded.one(lambda p: p.verdict == "missing_headers"), "application/json"),
        (seeded.one(lambda p: p.kind == "empty"), "application/json"),
    ]
    for p, content_type in cases:
        async with api.http.get(f"{api.base}/api/deliveries/{p.id}/raw") as resp:
            assert resp.status == 200
            assert await resp.read() == p.body
            assert resp.content_type == content_type
            disposition = resp.headers["Content-Disposition"]
            assert disposition.startswith("attachment") and f"delivery-{p.id}" in disposition
            csp = resp.headers["Content-Security-Policy"]
            assert "sandbox" in csp and "default-src 'none'" in csp
            assert resp.headers["X-Content-Type-Options"] == "nosniff"
    big = seeded.one(lambda p: p.kind == "big")
    status, data = await api.get(f"/api/deliveries/{big.id}/raw")
    assert status == 404 and "max_body_bytes" in data["error"]


# --- predictions ------------------------------------------------------------------------------


async def test_prediction_timeline_in_order_with_inferred_events(seeded: Seed, api: Api) -> None:
    for i, final in ((1, "succeeded"), (5, "failed")):
        pid = f"pred-{i:04d}"
        ids = sorted(seeded.ids(lambda p, x=pid: p.prediction == x))
        status, t = await api.get(f"/api/predictions/{pid}")
        assert status == 200, t
        assert t["prediction"] == pid
        assert (t["model"], t["version"], t["status"]) == (MODEL, VERSION, final)
        assert t["predict_time"] == 1.2874 and t["total_time"] == 1.7021
        assert t["created_at"] and t["started_at"] and t["completed_at"]
        events = t["events"]
        assert [e["delivery"] for e in events] == ids
        assert [e["event"] for e in events] == ["start", "logs", "output", "completed"]
        assert [e["status"] for e in events] == ["starting", "processing", "processing", final]
        assert all(e["verdict"] == "verified" and e["duplicate_of"] is None for e in events)
        assert all(RFC3339.match(e["received_at"]) for e in events)
        since = [e["since_first_ms"] for e in events]
        assert since[0] == 0 and since == sorted(since)
        assert all(e["forwarding"] == {"up0": "delivered", "up1": "delivered"} for e in events)
    # A solo delivery and its duplicate make a timeline of two.
    duplicate = seeded.one(lambda p: p.kind == "duplicate" and p.states["up0"] == "skipped")
    status, t = await api.get(f"/api/predictions/{duplicate.prediction}")
    assert [e["delivery"] for e in t["events"]] == [duplicate.duplicate_of, duplicate.id]
    assert t["events"][1]["duplicate_of"] == duplicate.duplicate_of
    assert t["events"][1]["forwarding"] == {"up0": "skipped", "up1": "skipped"}
    for unknown in ("no-such-prediction", "pred-9999"):
        status, data = await api.get(f"/api/predictions/{unknown}")
        assert status == 404 and isinstance(data["error"], str), data


# --- metrics --------------------------------------------------------------------------------------


def parse_metrics(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def metric(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


async def test_metrics_count_deliveries_attempts_outbox_and_latency(
    relay_factory: Any, upstream_factory: Any, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    up = await upstream_factory(then=upstream_decides)
    relay = await relay_factory(make_config(str(tmp_path / "m.db"), upstreams=[{"url": up.url, "max_attempts": 2}]))
    ingest = relay.bound.ingest_url + INGEST_PATH
    plan = [("signed", "plain")] * 9 + [("signed", "reject-me")] * 2 + [("signed", "dead-me")]
    plan += [("wrong_key", "plain")] * 5 + [("missing", "plain")] * 3

    async def post(n: int, mode: str, note: str) -> int:
        body = encode({"id": f"m-{n}", "status": "succeeded", "note": note})
        async with http.post(ingest, data=body, headers=headers_for(mode, body, time.time(), "application/json")) as r:
            return r.status

    answers = await asyncio.gather(*(post(n, mode, note) for n, (mode, note) in enumerate(plan)))
    assert sorted(answers) == [200] * 12 + [400] * 8

    async def settled() -> bool:
        return "pending" not in await relay.store.outbox_states()

    await wait_until(settled, timeout=15)
    async with http.get(relay.bound.admin_url + "/metrics") as resp:
        assert resp.status == 200 and resp.content_type == "text/plain"
        text = await resp.text()
    m = parse_metrics(text)
    deliveries = {
        verdict: metric(m, "relay_deliveries_total", source="replicate", verdict=verdict)
        for verdict in ("verified", "invalid_signature", "missing_headers")
    }
    assert deliveries == {"verified": 12, "invalid_signature": 5, "missing_headers": 3}
    attempts = {
        outcome: metric(m, "relay_attempts_total", upstream="up0", kind="forward", outcome=outcome)
        for outcome in ("delivered", "failed", "retry", "dead")
    }
    assert attempts == {"delivered": 9, "failed": 2, "retry": 1, "dead": 1}
    outbox = {
        state: metric(m, "relay_outbox_rows", state=state) for state in ("delivered", "failed", "dead", "skipped")
    }
    assert outbox == {"delivered": 9, "failed": 2, "dead": 1, "skipped": 8}
    assert metric(m, "relay_ingest_seconds_count", source="replicate") == 20
    assert metric(m, "relay_ingest_seconds_bucket", source="replicate", le="+Inf") == 20
    assert metric(m, "relay_attempt_seconds_count", upstream="up0") == 13
    assert metric(m, "relay_attempt_seconds_bucket", upstream="up0", le="+Inf") == 13
    assert "# TYPE relay_ingest_seconds histogram" in text and "# TYPE relay_attempt_seconds histogram" in text


async def test_outbox_gauge_drops_back_to_zero_when_rows_settle(
    relay_factory: Any, upstream_factory: Any, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    release = asyncio.Event()

    async def held(request: web.Request) -> web.Response:
        await release.wait()
        return web.Response(text="ok")

    up = await upstream_factory(then=held)
    relay = await relay_factory(make_config(str(tmp_path / "g.db"), upstreams=[{"url": up.url}]))
    body = lifecycle_bodies("gauge")[0]
    async with http.post(relay.bound.ingest_url + INGEST_PATH, data=body, headers=signed(body)) as resp:
        assert resp.status == 200
    await wait_until(lambda: len(up.received) == 1)

    async def scrape() -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        async with http.get(relay.bound.admin_url + "/metrics") as resp:
            return parse_metrics(await resp.text())

    assert metric(await scrape(), "relay_outbox_rows", state="pending") == 1
    release.set()

    async def settled() -> bool:
        return (await relay.store.outbox_states()) == {"delivered": 1}

    await wait_until(settled)
    m = await scrape()
    assert metric(m, "relay_outbox_rows", state="delivered") == 1
    assert metric(m, "relay_outbox_rows", state="pending") in (0, None), "a stale pending count is reported"


async def test_metrics_outbox_rows_by_state_on_the_seeded_database(seeded: Seed, api: Api) -> None:
    async with api.http.get(api.base + "/metrics") as resp:
        m = parse_metrics(await resp.text())
    for state in ("delivered", "failed", "dead", "skipped"):
        expected = sum(1 for p in seeded.posted for s in p.states.values() if s == state)
        assert metric(m, "relay_outbox_rows", state=state) == expected, state


# --- live events --------------------------------------------------------------------------------


async def read_frames(resp: aiohttp.ClientResponse, deadline: float) -> Any:
    """Yield (event, data) for each SSE frame until the deadline."""
    event: str | None = None
    data: list[str] = []
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError("no matching SSE frame before the deadline")
        line = await asyncio.wait_for(resp.content.readline(), remaining)
        if not line:
            raise AssertionError("SSE stream ended")
        text = line.decode().rstrip("\r\n")
        if text == "":
            if event is not None or data:
                yield event, "\n".join(data)
            event, data = None, []
        elif text.startswith("event:"):
            event = text[6:].strip()
        elif text.startswith("data:"):
            data.append(text[5:].strip())


async def test_events_stream_announces_new_deliveries_and_their_attempts(
    relay_factory: Any, upstream_factory: Any, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    up = await upstream_factory()
    relay = await relay_factory(make_config(str(tmp_path / "e.db"), upstreams=[{"url": up.url}]))
    async with http.get(relay.bound.admin_url + "/api/events") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        first = await asyncio.wait_for(resp.content.readline(), 5)
        assert first.startswith(b"retry:") or first.startswith(b":")
        body = lifecycle_bodies("ssepred")[0]
        async with http.post(relay.bound.ingest_url + INGEST_PATH, data=body, headers=signed(body)) as posted:
            assert posted.status == 200
            delivery = (await posted.json())["delivery"]
        deadline = time.monotonic() + 10
        seen: list[tuple[str | None, str]] = []
        frames = read_frames(resp, deadline)
        async for event, data in frames:
            seen.append((event, data))
            if event == "delivery" and json.loads(data)["id"] == delivery:
                assert json.loads(data)["verdict"] == "verified"
                break
        async for event, data in frames:
            seen.append((event, data))
            if event == "attempt" and json.loads(data)["delivery"] == delivery:
                payload = json.loads(data)
                assert payload["upstream"] == "up0" and payload["outcome"] == "delivered"
                assert payload["status"] == 200
                break
        await frames.aclose()
        kinds = [e for e, _ in seen]
        assert kinds.index("delivery") < kinds.index("attempt")


async def test_head_on_the_events_stream_sends_no_body(relay_factory: Any) -> None:
    """HEAD must end after the headers; a streamed body would desync a keep-alive connection."""
    relay = await relay_factory()
    host, port = relay.bound.admin_url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    data = b""
    try:
        # HEAD, then a second request pipelined on the same connection.
        writer.write(
            f"HEAD /api/events HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n"
            f"GET /healthz HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode()
        )
        await writer.drain()
        deadline = time.monotonic() + 5
        while b'{"ok": true}' not in data and time.monotonic() < deadline:
            try:
                chunk = await asyncio.wait_for(reader.read(4096), max(deadline - time.monotonic(), 0.01))
            except TimeoutError:
                break
            if not chunk:
                break
            data += chunk
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, rest = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), data
    assert rest.startswith(b"HTTP/1.1 200"), f"HEAD answer carried a body or never ended: {rest[:80]!r}"
    assert b'{"ok": true}' in rest
