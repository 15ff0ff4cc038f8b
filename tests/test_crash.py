"""The real ``relay serve`` process under load: killed with SIGKILL, stopped with SIGTERM.

SPEC §3–4: never a 2xx without a commit, and every delivery acknowledged to
Replicate is forwarded at least once, across crashes and restarts. These tests
run the CLI in a subprocess on loopback, post signed webhooks like Replicate
does (retrying on connection errors and 503 with a fresh timestamp, the same
``webhook-id`` and body), and check the SQLite file and a recording upstream.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import resource
import signal
import sqlite3
import time
from pathlib import Path
from typing import Any

import aiohttp

from processes import RecordingUpstream, RelayProcess, make_bodies, split_by_prediction, write_config
from proctree import forwarder_pids
from support import catch_all, free_port, signed, wait_until

RETRY_PAUSE = 0.02  # a poster's pause before retrying (inside its own deadline)


def db_rows(db_path: Path, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=10)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


async def test_sigkill_under_load_loses_no_acknowledged_delivery(tmp_path, serve, http):
    upstream = RecordingUpstream()
    upstream.url = await serve(catch_all(upstream.handle), "/hook")
    ingest = free_port()
    config = write_config(tmp_path, upstream.url, ingest, free_port())
    relay = RelayProcess(config, ingest, tmp_path / "relay.log")
    bodies = make_bodies("k", 1500)
    sha = {wid: hashlib.sha256(body).hexdigest() for wid, body in bodies}
    acked: dict[str, int] = {}  # webhook-id -> delivery id from the 200
    sent = 0
    unexpected: list[tuple[str, int, str]] = []
    errors = {"connection": 0, "503": 0, "timeout": 0}
    kills = 3
    deadline = time.monotonic() + 45

    async def poster(share: list[tuple[str, bytes]], session: aiohttp.ClientSession) -> None:
        nonlocal sent
        for wid, body in share:
            while True:
                assert time.monotonic() < deadline, "posting did not finish in time"
                sent += 1
                try:
                    # A fresh timestamp and signature on every retry; same webhook-id and body.
                    async with session.post(relay.url, data=body, headers=signed(body, msg_id=wid)) as resp:
                        text = await resp.text()
                        if resp.status == 200:
                            acked[wid] = int(json.loads(text)["delivery"])
                            break
                        if resp.status != 503:
                            unexpected.append((wid, resp.status, text))
                            break
                        errors["503"] += 1
                except aiohttp.ClientConnectionError:
                    errors["connection"] += 1
                except TimeoutError:
                    errors["timeout"] += 1
                await asyncio.sleep(RETRY_PAUSE)

    async def killer() -> None:
        for n in range(1, kills + 1):
            # Driven by progress, not by time: kill after every 300 acknowledged deliveries.
            await wait_until(lambda n=n: len(acked) >= 300 * n, timeout=30, interval=0.005)
            await relay.kill()
            relay.start()
            await relay.healthy(http)

    relay.start()
    try:
        await relay.healthy(http)
        timeout = aiohttp.ClientTimeout(total=15)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            posting = asyncio.gather(*(poster(share, session) for share in split_by_prediction(bodies, 3)))
            await asyncio.gather(posting, killer())

        assert not unexpected, unexpected[:5]
        assert len(acked) == len(bodies)
        assert relay.starts == kills + 1

        db = tmp_path / "relay.db"
        stored = {
            row[0]: row[1:] for row in db_rows(db, "SELECT id, webhook_id, body_sha256, body, verdict FROM deliveries")
        }
        for wid, delivery_id in acked.items():
            assert delivery_id in stored, f"acknowledged {wid} as delivery {delivery_id}, which is not stored"
            webhook_id, body_sha, body, verdict = stored[delivery_id]
            assert webhook_id == wid
            assert body_sha == sha[wid] == hashlib.sha256(bytes(body)).hexdigest()
            assert verdict == "verified"
        assert db_rows(db, "PRAGMA integrity_check") == [("ok",)]
        orphans = db_rows(db, "SELECT COUNT(*) FROM outbox WHERE delivery_id NOT IN (SELECT id FROM deliveries)")
        assert orphans == [(0,)]
        assert len(db_rows(db, "SELECT id FROM outbox")) == len(stored)  # one outbox row per delivery

        # At least once: every acknowledged webhook reaches the upstream after the last restart.
        await wait_until(lambda: set(acked) <= upstream.webhook_ids(), timeout=20, interval=0.05)
        await wait_until(
            lambda: db_rows(db, "SELECT COUNT(*) FROM outbox WHERE state = 'pending'") == [(0,)], timeout=20
        )
        states = dict(db_rows(db, "SELECT state, COUNT(*) FROM outbox GROUP BY state"))
        assert set(states) <= {"delivered", "skipped"}, states
        forwarded = upstream.webhook_ids()
        duplicates = len(upstream.seen) - len(forwarded)
        print(
            f"\ncrash report: sent={sent} acknowledged={len(acked)} stored={len(stored)} "
            f"forwarded(distinct webhook-id)={len(forwarded)} upstream requests={len(upstream.seen)} "
            f"duplicates at upstream={duplicates} kills={kills} retries: connection={errors['connection']} "
            f"503={errors['503']} timeout={errors['timeout']} outbox={states}"
        )
    finally:
        relay.cleanup()


async def test_sigterm_under_load_exits_cleanly_and_leaves_nothing_half_done(tmp_path, serve, http):
    upstream = RecordingUpstream(delay=1.0)  # slow: attempts are in flight when SIGTERM comes
    upstream.url = await serve(catch_all(upstream.handle), "/hook")
    ingest = free_port()
    config = write_config(tmp_path, upstream.url, ingest, free_port())
    relay = RelayProcess(config, ingest, tmp_path / "relay.log")
    bodies = make_bodies("t", 900)
    sha = {wid: hashlib.sha256(body).hexdigest() for wid, body in bodies}
    outcomes: list[tuple[str, str]] = []  # (webhook-id, "200" / "503" / "connection" / other)
    acked: dict[str, int] = {}
    grace = 15.0  # SHUTDOWN_GRACE_SECONDS (10) plus the slow upstream's answer, with room
    stopped = asyncio.Event()

    async def poster(share: list[tuple[str, bytes]], session: aiohttp.ClientSession) -> None:
        # One try per webhook: the question is what each request was answered, not retrying.
        for wid, body in share:
            if stopped.is_set():
                return
            try:
                async with session.post(relay.url, data=body, headers=signed(body, msg_id=wid)) as resp:
                    text = await resp.text()
                    outcomes.append((wid, str(resp.status)))
                    if resp.status == 200:
                        acked[wid] = int(json.loads(text)["delivery"])
            except aiohttp.ClientConnectionError:
                outcomes.append((wid, "connection"))
                stopped.set()  # the listener is gone
            except TimeoutError:
                outcomes.append((wid, "hang"))

    relay.start()
    try:
        await relay.healthy(http)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=grace)) as session:
            posting = asyncio.gather(*(poster(share, session) for share in split_by_prediction(bodies, 3)))

            # SIGTERM mid-load, while the slow upstream holds attempts open that were sent over
            # the last ~0.7 s (so their answers, and the relay's commits of them, are spread out).
            def loaded() -> bool:
                spread = upstream.first_at is not None and time.monotonic() - upstream.first_at >= 0.7
                return spread and len(acked) >= 200 and upstream.in_flight > 0

            await wait_until(loaded, timeout=20, interval=0.005)
            in_flight_at_term = upstream.in_flight
            assert relay.proc is not None
            relay.proc.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            try:
                code: int | None = await relay.wait_exit(grace)
            except AssertionError:
                # Still running past the deadline: note it, kill it, and check the rest anyway
                # (the failure is reported at the end, with everything else that was seen).
                code = None
                await relay.kill()
            exit_seconds = time.monotonic() - signalled
            await asyncio.wait_for(posting, grace)

        answers = {o for _, o in outcomes}
        assert answers <= {"200", "503", "connection"}, [
            o for o in outcomes if o[1] not in ("200", "503", "connection")
        ]

        db = tmp_path / "relay.db"
        assert db_rows(db, "PRAGMA integrity_check") == [("ok",)]
        stored = {r[0]: r[1:] for r in db_rows(db, "SELECT id, webhook_id, body_sha256 FROM deliveries")}
        for wid, delivery_id in acked.items():
            assert stored.get(delivery_id) == (wid, sha[wid]), f"acknowledged {wid} ({delivery_id}) not stored"

        # Nothing half-way: each request the upstream got is either recorded as an attempt
        # or its outbox row is still pending (to be sent again); states are only these.
        states = dict(db_rows(db, "SELECT state, COUNT(*) FROM outbox GROUP BY state"))
        assert set(states) <= {"pending", "delivered"}, states
        attempted = {r[0] for r in db_rows(db, "SELECT delivery_id FROM attempts WHERE kind = 'forward'")}
        pending = {r[0] for r in db_rows(db, "SELECT delivery_id FROM outbox WHERE state = 'pending'")}
        unrecorded = [d for d, _ in upstream.seen if d not in attempted and d not in pending]
        assert not unrecorded, f"sent to the upstream but neither recorded nor pending: {unrecorded[:10]}"
        half_done = db_rows(
            db,
            "SELECT o.delivery_id FROM outbox o WHERE o.state = 'delivered' AND NOT EXISTS "
            "(SELECT 1 FROM attempts a WHERE a.delivery_id = o.delivery_id AND a.outcome = 'delivered')",
        )
        assert half_done == []
        recorded_in_flight = len({d for d, _ in upstream.seen} & attempted)

        # After a restart everything pending is delivered (a fast upstream now).
        upstream.delay = 0.0
        relay.start()
        await relay.healthy(http)
        await wait_until(lambda: set(acked) <= upstream.webhook_ids(), timeout=20, interval=0.05)
        await wait_until(
            lambda: db_rows(db, "SELECT COUNT(*) FROM outbox WHERE state = 'pending'") == [(0,)], timeout=20
        )
        print(
            f"\nsigterm report: requests={len(outcomes)} answers="
            f"{ {a: sum(1 for _, o in outcomes if o == a) for a in sorted(answers)} } "
            f"acknowledged={len(acked)} stored={len(stored)} in flight at SIGTERM={in_flight_at_term} "
            f"exit {code} after {exit_seconds:.2f} s; at exit: outbox={states} "
            f"attempts recorded for sent={recorded_in_flight} "
            f"pending={len(pending)}; after restart forwarded(distinct)={len(upstream.webhook_ids())} "
            f"upstream requests={len(upstream.seen)}"
        )
        assert code == 0, f"relay serve did not exit within {grace:g} s of SIGTERM (exit {code})"
        assert "stopped" in relay.log.read_text()
        assert relay.proc is not None
        relay.proc.send_signal(signal.SIGTERM)
        assert await relay.wait_exit(grace) == 0
    finally:
        relay.cleanup()


async def relay_with_upstream(
    tmp_path: Path, serve: Any, http: aiohttp.ClientSession
) -> tuple[RelayProcess, RecordingUpstream]:
    """A running ``relay serve`` forwarding to a recording upstream (the caller cleans it up)."""
    upstream = RecordingUpstream()
    upstream.url = await serve(catch_all(upstream.handle), "/hook")
    ingest = free_port()
    relay = RelayProcess(write_config(tmp_path, upstream.url, ingest, free_port()), ingest, tmp_path / "relay.log")
    relay.start()
    try:
        await relay.healthy(http)
    except BaseException:
        relay.cleanup()
        raise
    return relay, upstream


async def post_ok(http: aiohttp.ClientSession, relay: RelayProcess, wid: str, body: bytes) -> None:
    async with http.post(relay.url, data=body, headers=signed(body, msg_id=wid)) as resp:
        assert resp.status == 200


async def test_a_killed_forwarder_process_is_replaced_and_forwarding_resumes(tmp_path, serve, http):
    relay, upstream = await relay_with_upstream(tmp_path, serve, http)
    bodies = make_bodies("k", 8)
    try:
        assert relay.proc is not None
        for wid, body in bodies[:2]:
            await post_ok(http, relay, wid, body)
        await wait_until(lambda: {w for w, _ in bodies[:2]} <= upstream.webhook_ids(), timeout=15)
        await wait_until(lambda: len(forwarder_pids(relay.proc.pid)) == 1, timeout=10)
        (first,) = forwarder_pids(relay.proc.pid)
        os.kill(first, signal.SIGKILL)
        for wid, body in bodies[2:]:
            await post_ok(http, relay, wid, body)  # ingest does not depend on the forwarder
        await wait_until(lambda: {w for w, _ in bodies} <= upstream.webhook_ids(), timeout=15)
        (second,) = forwarder_pids(relay.proc.pid)
        assert second != first
        log = relay.tail(200)
        assert "the forwarder process exited (code -9)" in log and "starting a new forwarder process in 1 s" in log
        # Stopping still stops both.
        relay.proc.send_signal(signal.SIGTERM)
        assert await relay.wait_exit(20) == 0
        assert not Path(f"/proc/{second}").exists() or "zombie" in Path(f"/proc/{second}/status").read_text()
    finally:
        relay.cleanup()


async def test_a_forwarder_process_that_cannot_be_started_is_tried_again(tmp_path, serve, http):
    """Out of file descriptors when the dead forwarder is replaced: the relay says so, keeps trying
    on its backoff, and forwards again once a start succeeds (without a restart of the relay)."""
    relay, upstream = await relay_with_upstream(tmp_path, serve, http)
    bodies = make_bodies("f", 4)
    try:
        assert relay.proc is not None
        pid = relay.proc.pid
        await post_ok(http, relay, *bodies[0])
        await wait_until(lambda: bodies[0][0] in upstream.webhook_ids(), timeout=15)
        (first,) = forwarder_pids(pid)
        soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
        in_use = len(os.listdir(f"/proc/{pid}/fd"))
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (in_use, hard))  # no new descriptor from here
        try:
            os.kill(first, signal.SIGKILL)
            await wait_until(lambda: relay.tail(200).count("could not start a new forwarder process") >= 2, timeout=15)
            assert forwarder_pids(pid) == []
        finally:
            resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
        await wait_until(lambda: len(forwarder_pids(pid)) == 1, timeout=15)
        for wid, body in bodies[1:]:
            await post_ok(http, relay, wid, body)
        await wait_until(lambda: {w for w, _ in bodies} <= upstream.webhook_ids(), timeout=15)
        assert "Too many open files" in relay.tail(200)
    finally:
        relay.cleanup()
