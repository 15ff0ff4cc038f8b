"""Retention while running: old deliveries go, with their outbox rows and attempts; recent ones stay."""

from __future__ import annotations

import sqlite3
import time

from relay.filters import DeliveryFilter

from support import ingest, make_config, signed, wait_until


async def test_the_running_relay_prunes_deliveries_past_retention(relay_factory, upstream_factory, http, tmp_path):
    db = str(tmp_path / "r.db")
    upstream = await upstream_factory()
    old_clock = time.time() - 40 * 86400
    old = await relay_factory(make_config(db, upstreams=[{"url": upstream.url}]), clock=lambda: old_clock)
    old_body = b'{"id": "ancient", "status": "succeeded", "logs": "needle-old"}'
    old_id = await ingest(http, old, old_body, signed(old_body, timestamp=int(old_clock)))
    await wait_until(lambda: len(upstream.received) == 1)
    await old.stop()
    # A relay with the real clock and retention_days = 30 prunes it at start-up, keeps the new one.
    relay = await relay_factory(make_config(db, relay={"retention_days": 30}, upstreams=[{"url": upstream.url}]))
    new_body = b'{"id": "fresh", "status": "succeeded", "logs": "needle-new"}'
    new_id = await ingest(http, relay, new_body, signed(new_body))

    async def gone() -> bool:
        page, _ = await relay.store.list_deliveries(DeliveryFilter())
        return [d.id for d in page] == [new_id]

    await wait_until(gone)
    assert new_id > old_id  # ids are never reused, even after the newest rows were pruned
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT COUNT(*) FROM outbox WHERE delivery_id = ?", (old_id,)).fetchone()[0] == 0
    assert conn.execute("SELECT COUNT(*) FROM attempts WHERE delivery_id = ?", (old_id,)).fetchone()[0] == 0
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()
    found, _ = await relay.store.list_deliveries(DeliveryFilter(q="needle-old"))
    assert found == []
    found, _ = await relay.store.list_deliveries(DeliveryFilter(q="needle-new"))
    assert [d.id for d in found] == [new_id]
