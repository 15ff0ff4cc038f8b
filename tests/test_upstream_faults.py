"""Hostile upstreams: resets, huge bodies, slowness — the relay records them and keeps ingesting."""

from __future__ import annotations

import asyncio
import json
import resource

from aiohttp import web

from support import ingest, make_config, signed, wait_until


async def test_connection_reset_is_recorded_and_retried(relay_factory, serve, http, tmp_path):
    calls = {"n": 0}

    async def handle(request: web.Request) -> web.StreamResponse:
        await request.read()
        calls["n"] += 1
        if calls["n"] <= 2:
            assert request.transport is not None
            request.transport.abort()  # reset mid-request: no answer at all
            return web.Response()
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/hook", handle)
    url = await serve(app, "/hook")
    relay = await relay_factory(make_config(str(tmp_path / "r.db"), upstreams=[{"url": url}]))
    body = b'{"id": "reset", "status": "succeeded"}'
    delivery_id = await ingest(http, relay, body, signed(body))

    async def delivered() -> bool:
        d = await relay.store.get_delivery(delivery_id)
        return d.forwarding[0].state == "delivered"

    await wait_until(delivered, timeout=15)
    attempts = (await relay.store.get_delivery(delivery_id)).forwarding[0].attempts
    assert [a.status for a in attempts] == [None, None, 200]
    assert all(a.error for a in attempts[:2]) and [a.outcome for a in attempts] == ["retry", "retry", "delivered"]


async def test_a_50_mb_answer_costs_64_kib_and_ingest_keeps_answering(relay_factory, serve, http, tmp_path):
    chunk = b"x" * (1024 * 1024)

    async def huge(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        await response.prepare(request)
        try:
            for _ in range(50):
                await response.write(chunk)
        except (ConnectionResetError, RuntimeError):
            pass  # the relay hung up after 64 KiB, as it should
        return response

    app = web.Application()
    app.router.add_post("/hook", huge)
    url = await serve(app, "/hook")
    relay = await relay_factory(make_config(str(tmp_path / "r.db"), upstreams=[{"url": url}]))
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    ids = []
    for i in range(10):
        body = json.dumps({"id": f"huge{i}", "status": "succeeded"}).encode()
        ids.append(await ingest(http, relay, body, signed(body)))

    # While the upstream streams 50 MB answers, ingest is answered promptly.
    async def quick_ingest() -> None:
        body = b'{"id": "during", "status": "starting"}'
        await asyncio.wait_for(ingest(http, relay, body, signed(body)), 2.0)

    await asyncio.gather(*(quick_ingest() for _ in range(20)))

    async def all_delivered() -> bool:
        for delivery_id in ids:
            d = await relay.store.get_delivery(delivery_id)
            if d.forwarding[0].state != "delivered":
                return False
        return True

    await wait_until(all_delivered, timeout=30)
    for delivery_id in ids:
        attempt = (await relay.store.get_delivery(delivery_id)).forwarding[0].attempts[-1]
        assert len(attempt.response_body) == 64 * 1024 and attempt.response_truncated
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    assert grown_mib < 100, f"peak memory grew by {grown_mib:.0f} MiB for ten 50 MB answers"
