"""Three real ``relay serve`` processes on one PostgreSQL database, one killed with SIGKILL mid-run.

The promise of the shared outbox: every acknowledged delivery is forwarded;
no delivery is sent by two relays at once (a second send only happens after
the first relay died and its lease ran out); a prediction's events reach the
upstream in order even when its events landed on different relays; and a UI
on any relay sees deliveries that arrived at another.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import json
import subprocess
import time

import aiohttp
import asyncpg

from pgcluster import PostgresCluster
from processes import RecordingUpstream, RelayProcess, make_bodies, write_config
from support import catch_all, free_port, make_config, relay_command, signed, wait_until

LEASE = 3.0  # outbox_lease_seconds
UPSTREAM_TIMEOUT = 1.0  # the lease must outlast an attempt and its result's commit:
COMMIT_TIMEOUT = 0.9  # more than 1 + 2 x 0.9


async def test_three_relays_share_the_outbox_and_survive_a_sigkill(tmp_path, serve, http, postgres):
    database = postgres.new_database()
    upstream = RecordingUpstream(delay=0.05)  # attempts are in flight when the kill comes
    upstream.url = await serve(catch_all(upstream.handle), "/hook")
    relays = []
    for n in range(3):
        ingest = free_port()
        config = write_config(
            tmp_path,
            upstream.url,
            ingest,
            free_port(),
            database=database,
            upstream_timeout=UPSTREAM_TIMEOUT,
            relay_extra=f"outbox_lease_seconds = {LEASE}",
            name=f"relay{n}.toml",
            commit_timeout=COMMIT_TIMEOUT,
        )
        relays.append(RelayProcess(config, ingest, tmp_path / f"relay{n}.log"))
    bodies = make_bodies("s", 1200)  # 300 predictions, four events each
    sha = {wid: hashlib.sha256(body).hexdigest() for wid, body in bodies}
    acked: dict[str, int] = {}  # webhook-id -> delivery id
    acked_by = collections.Counter[int]()
    killed_at: float | None = None
    deadline = time.monotonic() + 60

    async def poster(share: list[tuple[str, bytes]], first: int, session: aiohttp.ClientSession) -> None:
        """Like a load balancer in front of the relays: round robin, the next relay on failure.

        Consecutive events of one prediction go to different relays, so ordering
        must hold across them.
        """
        turn = first
        for wid, body in share:
            while True:
                assert time.monotonic() < deadline, "posting did not finish in time"
                relay = relays[turn % 3]
                turn += 1
                try:
                    async with session.post(relay.url, data=body, headers=signed(body, msg_id=wid)) as resp:
                        if resp.status == 200:
                            acked[wid] = int(json.loads(await resp.text())["delivery"])
                            acked_by[relays.index(relay)] += 1
                            break
                        assert resp.status == 503, (resp.status, await resp.text())
                except (aiohttp.ClientConnectionError, TimeoutError):
                    pass  # that relay is down: the next one takes it

    async def killer() -> None:
        nonlocal killed_at
        await wait_until(lambda: len(acked) >= 400, timeout=30, interval=0.005)
        await wait_until(lambda: upstream.in_flight > 0, timeout=10, interval=0.001)
        await relays[0].kill()
        killed_at = time.monotonic()

    shares: list[list[tuple[str, bytes]]] = [[] for _ in range(6)]
    for i in range(0, len(bodies), 4):  # one prediction's events to one poster, in order
        shares[(i // 4) % 6].extend(bodies[i : i + 4])
    for relay in relays:
        relay.start()
    try:
        for relay in relays:
            await relay.healthy(http)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            await asyncio.gather(*(poster(share, n, session) for n, share in enumerate(shares)), killer())
        assert killed_at is not None
        assert len(acked) == len(bodies)
        assert all(acked_by[n] > 0 for n in range(3)), f"load not spread: {acked_by}"

        # Every acknowledged delivery is forwarded, and the shared outbox drains completely.
        await wait_until(lambda: set(acked) <= upstream.webhook_ids(), timeout=30, interval=0.05)
        conn = await asyncpg.connect(database)
        try:

            async def drained() -> bool:
                return await conn.fetchval("SELECT COUNT(*) FROM outbox WHERE state = 'pending'") == 0

            await wait_until(drained, timeout=20)
            stored = {r["id"]: r for r in await conn.fetch("SELECT id, webhook_id, body FROM deliveries")}
            states = dict(await conn.fetch("SELECT state, COUNT(*) FROM outbox GROUP BY state"))
        finally:
            await conn.close()
        for wid, delivery_id in acked.items():
            row = stored[delivery_id]
            assert row["webhook_id"] == wid and hashlib.sha256(row["body"]).hexdigest() == sha[wid]
        # "skipped": a webhook posted again after the kill, whose first copy was delivered already.
        assert set(states) <= {"delivered", "skipped"} and sum(states.values()) == len(stored), states

        # Never sent by two relays at once: a delivery arrives twice only if its first send was
        # made before the kill, and only once that send's lease could have run out. (Keyed by
        # delivery id: a poster that lost its connection at the kill posts the webhook again,
        # and that second delivery is forwarded too, at least once, as it should be.)
        arrivals: dict[int, list[float]] = collections.defaultdict(list)
        for (delivery_id, _), at in zip(upstream.seen, upstream.arrived_at, strict=True):
            arrivals[delivery_id].append(at)
        repeats = {did: times for did, times in arrivals.items() if len(times) > 1}
        for did, times in repeats.items():
            first, second = times[0], times[1]
            assert first <= killed_at, f"delivery {did} sent twice, though nobody died before its first send"
            assert second - first >= LEASE - UPSTREAM_TIMEOUT - 0.1, f"{did} sent again {second - first:.2f} s later"

        # Per prediction, events first reach the upstream in the order they were posted in
        # (make_bodies numbers them; four events per prediction).
        first_seen: dict[str, float] = {}
        for (_, wid), at in zip(upstream.seen, upstream.arrived_at, strict=True):
            first_seen.setdefault(wid, at)
        by_prediction: dict[int, list[int]] = collections.defaultdict(list)
        for wid, _ in sorted(first_seen.items(), key=lambda item: item[1]):
            event = int(wid.rsplit("_", 1)[1])
            by_prediction[event // 4].append(event)
        out_of_order = {p: events for p, events in by_prediction.items() if events != sorted(events)}
        assert not out_of_order, list(out_of_order.items())[:3]
        print(
            f"\nscale-out report: acknowledged={len(acked)} per relay={dict(acked_by)} stored={len(stored)} "
            f"upstream requests={len(upstream.seen)} repeats after the kill={len(repeats)}"
        )
    finally:
        for relay in relays:
            relay.cleanup()


async def test_a_ui_on_one_relay_sees_deliveries_that_arrive_at_another(tmp_path, serve, http, postgres):
    """LISTEN/NOTIFY: the live event stream of relay B carries a delivery ingested by relay A."""
    database = postgres.new_database()
    upstream = RecordingUpstream()
    upstream.url = await serve(catch_all(upstream.handle), "/hook")
    relays, ui_ports = [], []
    for n in range(2):
        ingest, ui = free_port(), free_port()
        config = write_config(tmp_path, upstream.url, ingest, ui, database=database, name=f"relay{n}.toml")
        relays.append(RelayProcess(config, ingest, tmp_path / f"relay{n}.log"))
        ui_ports.append(ui)
    for relay in relays:
        relay.start()
    try:
        for relay in relays:
            await relay.healthy(http)
        events: list[dict[str, object]] = []

        async def listen() -> None:
            async with http.get(f"http://127.0.0.1:{ui_ports[1]}/api/events") as resp:
                async for line in resp.content:
                    if line.startswith(b"data:"):
                        events.append(json.loads(line[5:]))

        listening = asyncio.create_task(listen())
        try:
            body = make_bodies("ui", 1)[0][1]
            # The stream may take a moment to subscribe: post until an event arrives.
            acked: list[int] = []

            async def seen() -> bool:
                async with http.post(relays[0].url, data=body, headers=signed(body)) as resp:
                    assert resp.status == 200
                    acked.append(int((await resp.json())["delivery"]))
                return any(e.get("id") in acked for e in events)

            await wait_until(seen, timeout=15, interval=0.2)
        finally:
            listening.cancel()
    finally:
        for relay in relays:
            relay.cleanup()


async def test_postgresql_going_away_answers_503_then_recovers_without_a_restart(tmp_path, serve, http):
    """The database server dies (immediate stop) and comes back: while it is gone ingest answers 503,
    never 200, and /healthz says so; afterwards the same relay stores and forwards again, and
    everything acknowledged before is intact. The test server runs with synchronous_commit = off
    (tests/pgcluster.py), so this also proves the relay's commits ask for a synchronous commit."""
    cluster = PostgresCluster().start()  # its own server: this test stops it
    try:
        database = cluster.new_database()
        upstream = RecordingUpstream()
        upstream.url = await serve(catch_all(upstream.handle), "/hook")
        ingest = free_port()
        config = write_config(tmp_path, upstream.url, ingest, free_port(), database=database)
        relay = RelayProcess(config, ingest, tmp_path / "relay.log")
        relay.start()
        try:
            await relay.healthy(http)
            bodies = make_bodies("pgdown", 8)

            async def post(body: bytes, wid: str) -> int:
                async with http.post(relay.url, data=body, headers=signed(body, msg_id=wid)) as resp:
                    return resp.status

            before = [await post(body, wid) for wid, body in bodies[:4]]
            assert before == [200] * 4
            cluster.halt()
            assert await post(bodies[4][1], bodies[4][0]) == 503
            async with http.get(f"http://127.0.0.1:{ingest}/healthz") as resp:
                assert resp.status == 503
            cluster.start()

            async def stores_again() -> bool:
                return await post(bodies[4][1], bodies[4][0]) == 200

            await wait_until(stores_again, timeout=30, interval=0.2)
            assert [await post(body, wid) for wid, body in bodies[5:]] == [200] * 3
            await relay.healthy(http)
            await wait_until(lambda: {wid for wid, _ in bodies} <= upstream.webhook_ids(), timeout=30)
            conn = await asyncpg.connect(database)
            try:
                stored = {
                    r["webhook_id"]: bytes(r["body"])
                    for r in await conn.fetch("SELECT webhook_id, body FROM deliveries")
                }
            finally:
                await conn.close()
            assert stored == dict(bodies)
        finally:
            relay.cleanup()
    finally:
        cluster.stop()


async def test_the_cli_inspects_and_prunes_the_shared_database(relay_factory, http, postgres):
    """``relay list/show/prune --database postgresql://...`` work on the database the relays share."""
    database = postgres.new_database()
    relay = await relay_factory(make_config(database))
    assert relay.bound is not None
    body = make_bodies("cli", 1)[0][1]
    async with http.post(relay.bound.ingest_url + "/webhooks/replicate", data=body, headers=signed(body)) as resp:
        delivery_id = int((await resp.json())["delivery"])

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(relay_command(*args, "--database", database), capture_output=True, text=True, timeout=60)

    listed = cli("list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert [d["id"] for d in json.loads(listed.stdout)["deliveries"]] == [delivery_id]
    shown = cli("show", str(delivery_id), "--json")
    assert shown.returncode == 0 and json.loads(shown.stdout)["body"] == body.decode(), shown.stdout[:500]
    pruned = cli("prune", "--older-than", "1d")
    assert pruned.returncode == 0 and "deleted 0 deliveries" in pruned.stdout, pruned.stdout + pruned.stderr


async def test_postgresql_locked_past_the_deadline_answers_503_then_recovers(relay_factory, http, postgres):
    """Another session holds the deliveries table longer than commit_timeout_seconds: ingest
    answers 503 (never 200) about then, /healthz stays honest, and the relay recovers by itself."""
    database = postgres.new_database()
    relay = await relay_factory(make_config(database, relay={"commit_timeout_seconds": 1}))
    assert relay.bound is not None
    url = relay.bound.ingest_url + "/webhooks/replicate"
    bodies = [body for _, body in make_bodies("lock", 3)]

    async def post(body: bytes) -> int:
        async with http.post(url, data=body, headers=signed(body)) as resp:
            return resp.status

    assert await post(bodies[0]) == 200
    locker = await asyncpg.connect(database)
    try:
        tx = locker.transaction()
        await tx.start()
        await locker.execute("LOCK TABLE deliveries IN ACCESS EXCLUSIVE MODE")
        started = time.monotonic()
        assert await post(bodies[1]) == 503
        assert time.monotonic() - started < 4, "the 503 should come after about commit_timeout_seconds"
        await tx.rollback()
    finally:
        await locker.close()

    async def stores_again() -> bool:
        return await post(bodies[2]) == 200

    await wait_until(stores_again, timeout=15)
