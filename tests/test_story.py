"""The README's walkthrough "debugging a failed webhook" (issue 4), played end to end in Chromium.

A production handler breaks with ``HTTP 500``; the relay retries and gives up
(``dead``). The user finds the dead deliveries in the UI, reads the error in
the attempts, replays the delivery to a fixed handler on their laptop (which
verifies it with the ``replicate`` package), compares the old 500 with the new
200, and once the fix is deployed replays everything dead to production from
the list. Everything is real: relay, sockets, SQLite, upstreams, browser.

Screenshots of each step (and of the page at a failure) are written under the
test's ``tmp_path/screenshots`` when it fails (the ``ui`` fixture in conftest.py).
"""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass, field

import pytest
from aiohttp import web
from playwright.async_api import expect

from support import (
    INGEST_PATH,
    TIMEOUT_MS,
    catch_all,
    ingest,
    lifecycle_bodies,
    make_config,
    replicate_verdict,
    signed,
    wait_until,
)

pytestmark = pytest.mark.browser

expect.set_options(timeout=TIMEOUT_MS)

PREDICTION = "pred-story"
ERROR_BODY = {"error": "KeyError: 'output'"}


@dataclass
class Hit:
    fixed: bool  # whether the handler was already fixed when this request came
    body: bytes
    verdict: str  # the replicate package's verdict on the request


@dataclass
class ProductionHandler:
    """The user's deployed handler: ``HTTP 500`` with a KeyError until the fix is deployed."""

    fixed: bool = False
    hits: list[Hit] = field(default_factory=list)
    url: str = ""

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.hits.append(Hit(self.fixed, body, replicate_verdict(request.headers, body)))
        if not self.fixed:
            return web.json_response(ERROR_BODY, status=500)
        return web.json_response({"ok": True})


async def test_debugging_a_failed_webhook_from_dead_list_to_bulk_replay(
    relay_factory, user_handler_factory, serve, http, ui, tmp_path
):
    # 1. Production answers 500 to everything; the relay gives up after two attempts.
    production = ProductionHandler()
    production.url = await serve(catch_all(production.handle), INGEST_PATH)
    config = make_config(
        str(tmp_path / "relay.db"), upstreams=[{"name": "app", "url": production.url, "max_attempts": 2}]
    )
    relay = await relay_factory(config)
    assert relay.bound is not None
    admin = relay.bound.admin_url
    bodies = lifecycle_bodies(PREDICTION)
    ids = [await ingest(http, relay, body, signed(body)) for body in bodies]
    succeeded = ids[-1]

    async def app_states() -> dict[int, str]:
        async with http.get(f"{admin}/api/deliveries", params={"prediction": PREDICTION}) as resp:
            assert resp.status == 200
            listed = (await resp.json())["deliveries"]
        return {d["id"]: d["forwarding"].get("app") for d in listed}

    async def all_in(state: str) -> bool:
        return await app_states() == {i: state for i in ids}

    await wait_until(lambda: all_in("dead"))
    assert len(production.hits) == 2 * len(bodies)  # max_attempts each, then dead

    # 2. The Dead link in the header lists them; the succeeded event's page shows why.
    page = ui.page
    await page.goto(admin + "/")
    await page.locator("header nav").get_by_role("link", name="Dead", exact=True).click()
    await expect(page).to_have_url(re.compile(r"/\?state=dead$"))
    rows = page.locator("#rows tr[data-id]")
    await expect(rows).to_have_count(len(ids))
    await expect(rows.locator(".fwd")).to_have_text(["app: dead"] * len(ids))
    await ui.checkpoint("dead-list")
    target = page.locator(f'#rows tr[data-id="{succeeded}"]')
    await expect(target.locator(".status")).to_have_text("succeeded")
    await target.get_by_role("link", name=f"#{succeeded}", exact=True).click()
    await expect(page).to_have_url(re.compile(rf"/deliveries/{succeeded}$"))

    forwarded = page.locator('#forwarding [data-upstream="app"]')
    await expect(forwarded.locator("h3 .badge")).to_have_text("app: dead")
    attempts = forwarded.locator("li.attempt")
    await expect(attempts).to_have_count(2)
    await expect(attempts.locator("strong")).to_have_text(["HTTP 500", "HTTP 500"])
    last = attempts.last
    response = last.locator("details pre.body")
    await expect(response).to_be_hidden()
    await last.locator("details summary").click()
    await expect(response).to_be_visible()
    await expect(response).to_contain_text("KeyError: 'output'")
    assert json.loads(await response.inner_text()) == ERROR_BODY
    await ui.checkpoint("delivery-dead")

    # 3. The fixed handler on the laptop gets the stored delivery, re-signed so it verifies.
    laptop = await user_handler_factory(INGEST_PATH)
    await page.select_option("#replay-target", label="URL…")
    await expect(page.locator("#replay-url")).to_be_visible()
    await page.fill("#replay-url", laptop.url)
    await expect(page.locator("#replay-resign")).to_be_checked()
    await page.locator("#replay-submit").click()
    await expect(page.locator("#replay-status")).to_have_text("HTTP 200")
    assert len(laptop.arrivals) == 1
    arrival = laptop.arrivals[0]
    assert arrival.body == bodies[-1]
    assert arrival.verdict == "ok"
    replays = page.locator("#replays li.attempt")
    await expect(replays).to_have_count(1)
    await expect(replays.locator("strong")).to_have_text("HTTP 200")
    await expect(replays).to_contain_text(laptop.url)
    # A replay to a URL settles nothing: production still has it dead.
    await expect(forwarded.locator("h3 .badge")).to_have_text("app: dead")
    await ui.checkpoint("delivery-replayed")

    # 4. "Compare with previous response": the old 500 against the new 200.
    await expect(page.locator("#forwarding li.attempt")).to_have_count(3)  # two forwards, one replay
    replay_id = await replays.first.get_attribute("data-attempt")
    compare = replays.first.locator("a.compare-response")
    await expect(compare).to_be_visible()
    await compare.click()
    await expect(page).to_have_url(re.compile(rf"/diff\?.*attempt_b={replay_id}(&|$)"))
    await expect(page.locator("h1")).to_contain_text(f"→ {replay_id} (responses)")
    await expect(page.locator(".changed-status")).to_have_text("Status 500 → 200")
    removed, added = page.locator("#left .line-removed"), page.locator("#right .line-added")
    await expect(removed.filter(has_text="KeyError: 'output'")).to_have_count(1)
    await expect(added.filter(has_text="handler: ok")).to_have_count(1)
    await ui.checkpoint("diff")

    # 5. The fix is deployed: replay every dead delivery to production from the filtered list.
    production.fixed = True
    await page.goto(admin + "/?state=dead")
    await expect(rows).to_have_count(len(ids))
    await page.select_option("#bulk-target", "upstream:app")
    await expect(page.locator("#bulk-url")).to_be_hidden()
    page.on("dialog", lambda dialog: asyncio.ensure_future(dialog.accept()))
    await page.locator("#bulk-replay").click()
    n = len(ids)
    await expect(page.locator("#bulk-progress")).to_have_text(f"Done: {n}/{n} ({n} ok, 0 failed)", timeout=15_000)
    await ui.checkpoint("bulk-done")

    # 6. Every event of the prediction is delivered to app, each sent once by the bulk replay.
    assert await app_states() == {i: "delivered" for i in ids}
    after_fix = [hit for hit in production.hits if hit.fixed]
    assert sorted(hit.body for hit in after_fix) == sorted(bodies)
    assert [hit.verdict for hit in after_fix] == ["ok"] * n  # re-signed with a fresh timestamp
    await page.reload()
    await expect(page.locator("#empty")).to_be_visible()  # nothing is dead any more
    await expect(rows).to_have_count(0)
    ui.assert_no_js_errors()
