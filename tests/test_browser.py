"""The admin UI in a real browser (Debian's Chromium, driven by Playwright) against a real relay.

Each test starts a relay on real sockets, posts webhooks to its ingest
listener with aiohttp, and drives the admin pages the way a user does. All
waiting is Playwright's own (``expect`` polls until its timeout). When a test
fails, screenshots of the pages it visited, and of the page as it was at the
failure, are written under the test's ``tmp_path/screenshots`` (the ``ui`` fixture in conftest.py).
"""

from __future__ import annotations

import json
import re
import time
from urllib.parse import quote

import pytest
from playwright.async_api import Locator, Page, expect

from relay.config import Config, parse_config
from relay.service import Relay
from relay.verify import Verdict, decode_secret, verify

from support import (
    INGEST_PATH,
    KEY,
    OTHER_SECRET,
    SECRET,
    TIMEOUT_MS,
    ingest,
    lifecycle_bodies,
    make_config,
    signed,
    wait_until,
)

pytestmark = pytest.mark.browser

expect.set_options(timeout=TIMEOUT_MS)

OTHER_KEY = decode_secret(OTHER_SECRET)


async def live(page: Page, relay: Relay) -> None:
    """Wait until the page's Server-Sent Events stream is connected and subscribed."""
    await expect(page.locator("#live-status")).to_be_visible()
    # The browser sees the stream open as soon as headers arrive; the subscription is made
    # right after. Waiting for it too keeps "post after load" free of any race.
    await wait_until(lambda: len(relay.events._subscribers) >= 1)


def row(page: Page, delivery: int) -> Locator:
    return page.locator(f'#rows tr[data-id="{delivery}"]')


async def test_live_list_filter_open_invalid_delivery_and_its_prediction_timeline(relay_factory, http, ui):
    relay = await relay_factory()
    page = await ui.open(relay, "/")
    await expect(page.locator("#empty")).to_be_visible()
    await live(page, relay)
    await page.evaluate("window.__not_reloaded = true")

    bodies = lifecycle_bodies("pred-browser")
    start = await ingest(http, relay, bodies[0], signed(bodies[0]))
    await expect(row(page, start)).to_be_visible()
    await expect(page.locator("#empty")).to_have_count(0)
    bad = await ingest(http, relay, bodies[1], signed(bodies[1], key=OTHER_KEY), expect=400)
    await expect(row(page, bad).locator("[data-verdict]")).to_have_text("invalid signature")
    rest = [await ingest(http, relay, b, signed(b)) for b in bodies[2:]]
    ids = [start, bad, *rest]
    # Newest first, all four arrived live, and the page never reloaded.
    await expect(page.locator("#rows tr[data-id]")).to_have_count(4)
    assert [
        int(i) for i in await page.locator("#rows tr[data-id]").evaluate_all("rows => rows.map(r => r.dataset.id)")
    ] == ids[::-1]
    assert await page.evaluate("window.__not_reloaded") is True
    await expect(row(page, ids[-1]).locator(".status")).to_have_text("succeeded")
    await ui.checkpoint("list-live")

    await page.select_option("#filter-verdict", "invalid_signature")
    await page.get_by_role("button", name="Filter", exact=True).click()
    await expect(page).to_have_url(re.compile(r"[?&]verdict=invalid_signature(&|$)"))
    rows = page.locator("#rows tr[data-id]")
    await expect(rows).to_have_count(1)
    await expect(rows.locator("[data-verdict]")).to_have_text(["invalid signature"])
    await expect(page.locator("#filter-verdict")).to_have_value("invalid_signature")

    # Still live under the filter: a valid delivery stays out, an invalid one comes in.
    await live(page, relay)
    other = lifecycle_bodies("pred-other")[0]
    valid_other = await ingest(http, relay, other, signed(other))
    invalid_other = await ingest(http, relay, other, signed(other, key=OTHER_KEY), expect=400)
    await expect(row(page, invalid_other)).to_be_visible()
    await expect(row(page, valid_other)).to_have_count(0)
    await expect(rows).to_have_count(2)
    await ui.checkpoint("list-filtered")

    await row(page, bad).get_by_role("link", name=f"#{bad}", exact=True).click()
    await expect(page).to_have_url(re.compile(rf"/deliveries/{bad}$"))
    await expect(page.locator("h1 [data-verdict]")).to_have_text("invalid signature")
    await expect(page.locator("#verdict-headline")).to_have_text("Signature does not match")
    await expect(page.locator("#verdict-detail")).to_contain_text("none of the 1 signature(s) offered matched")
    await ui.checkpoint("delivery")

    await page.locator("#prediction-link").click()
    await expect(page).to_have_url(re.compile(r"/predictions/pred-browser$"))
    events = page.locator("#timeline li.event")
    await expect(events.locator("strong")).to_have_text(["start", "logs", "output", "completed"])
    await expect(events.locator("a").filter(has_text=re.compile(r"^#\d+$"))).to_have_text([f"#{i}" for i in ids])
    await expect(events.nth(1).locator("[data-verdict]")).to_have_text("invalid signature")
    await expect(events.nth(3).locator(".status")).to_have_text("succeeded")
    await expect(page.locator("h1 .status")).to_have_text("succeeded")
    await ui.checkpoint("prediction")
    ui.assert_no_js_errors()


async def test_replay_from_the_delivery_page_to_a_url_as_sent_and_with_an_edited_body(
    relay_factory, upstream_factory, http, ui, tmp_path
):
    forwarded_to = await upstream_factory()
    test_server = await upstream_factory()
    relay = await relay_factory(make_config(str(tmp_path / "relay.db"), upstreams=[{"url": forwarded_to.url}]))
    body = lifecycle_bodies("pred-replay")[3]
    delivery = await ingest(http, relay, body, signed(body))
    await wait_until(lambda: len(forwarded_to.received) == 1)

    page = await ui.open(relay, f"/deliveries/{delivery}")
    # A configured upstream is the default target; the URL box shows only for "URL…".
    await expect(page.locator("#replay-target")).to_have_value("upstream:up0")
    await expect(page.locator("#replay-url")).to_be_hidden()
    await expect(page.locator('#forwarding [data-upstream="up0"] li.attempt')).to_have_count(1)
    await page.select_option("#replay-target", label="URL…")
    await expect(page.locator("#replay-url")).to_be_visible()
    await page.fill("#replay-url", test_server.url)
    await ui.checkpoint("delivery-before-replay")
    await page.locator("#replay-submit").click()

    await expect(page.locator("#replay-status")).to_have_text("HTTP 200")
    replays = page.locator("#replays li.attempt")
    await expect(replays).to_have_count(1)
    await expect(replays.first.locator("strong")).to_have_text("HTTP 200")
    await expect(replays.first).to_contain_text("replay")
    await expect(replays.first).to_contain_text(test_server.url)
    assert len(test_server.received) == 1
    sent = test_server.received[0]
    assert sent.method == "POST"
    assert sent.body == body
    # Re-signed with a fresh timestamp by default: the handler's own check passes.
    assert verify(sent.headers, sent.body, KEY, 300, time.time()).verdict is Verdict.VERIFIED
    await ui.checkpoint("delivery-after-replay")

    await page.check("#replay-edit")
    editor = page.locator("#replay-body")
    await expect(editor).to_be_visible()
    await expect(page.locator("#replay-resign")).to_be_checked()
    await expect(page.locator("#replay-resign")).to_be_disabled()
    assert json.loads(await editor.input_value()) == json.loads(body)  # the stored body, pretty-printed
    document = json.loads(body)
    document.update(status="failed", error="edited in the browser: ünïcode ✓", output=None)
    edited = json.dumps(document, indent=2, ensure_ascii=False)
    await editor.fill(edited)
    await page.locator("#replay-submit").click()

    await expect(replays).to_have_count(2)
    await expect(page.locator("#replay-status")).to_have_text("HTTP 200")
    await wait_until(lambda: len(test_server.received) == 2)
    resent = test_server.received[1]
    assert resent.body == edited.encode("utf-8")
    assert verify(resent.headers, resent.body, KEY, 300, time.time()).verdict is Verdict.VERIFIED
    # The forwarded attempt is untouched by replays to a URL.
    await expect(page.locator('#forwarding [data-upstream="up0"] li.attempt')).to_have_count(1)
    assert len(forwarded_to.received) == 1
    ui.assert_no_js_errors()


async def test_compare_two_deliveries_from_the_list_shows_a_highlighted_diff(relay_factory, http, ui):
    relay = await relay_factory()
    bodies = lifecycle_bodies("pred-diff")
    ids = [await ingest(http, relay, b, signed(b)) for b in bodies]
    processing, succeeded = ids[1], ids[3]

    page = await ui.open(relay, "/")
    await expect(page.locator("#rows tr[data-id]")).to_have_count(4)
    compare = page.locator("#compare")
    await expect(compare).to_be_disabled()
    await page.locator(f'input.pick[value="{succeeded}"]').check()
    await expect(compare).to_be_disabled()
    await page.locator(f'input.pick[value="{processing}"]').check()
    await expect(compare).to_be_enabled()
    await ui.checkpoint("list-picked")
    await compare.click()

    await expect(page).to_have_url(re.compile(rf"/diff\?a={processing}&b={succeeded}$"))
    await expect(page.locator("h1")).to_contain_text(f"#{processing} → #{succeeded}")
    status = page.locator('#body-changes tr[data-path="/status"]')
    await expect(status).to_have_count(1)
    await expect(status).to_have_class(re.compile(r"\bop-replace\b"))
    await expect(status.locator("td").nth(2)).to_have_text('"processing"')
    await expect(status.locator("td").nth(3)).to_have_text('"succeeded"')
    await expect(page.locator('#body-changes tr[data-path="/completed_at"]')).to_contain_text("2023-11-14T22:13:21")
    await expect(page.locator('#header-changes tr:has(td:text-is("webhook-signature"))')).to_have_count(1)
    removed, added = page.locator("#left .line-removed"), page.locator("#right .line-added")
    await expect(removed.first).to_be_visible()
    await expect(added.first).to_be_visible()
    await expect(removed.filter(has_text='"status": "processing"')).to_have_count(1)
    await expect(added.filter(has_text='"status": "succeeded"')).to_have_count(1)
    # Highlighting is real styling, not just a class name.
    colours = await page.evaluate(
        """() => [".line-added", ".line-removed", ".line:not(.line-added):not(.line-removed)"].map(
            s => getComputedStyle(document.querySelector(s)).backgroundColor)"""
    )
    assert len(set(colours)) == 3, colours
    await ui.checkpoint("diff")
    ui.assert_no_js_errors()


async def test_reverify_on_the_delivery_page_with_the_configured_and_another_secret(relay_factory, http, ui):
    relay = await relay_factory()
    body = lifecycle_bodies("pred-verify")[0]
    delivery = await ingest(http, relay, body, signed(body))
    page = await ui.open(relay, f"/deliveries/{delivery}")
    button = page.locator("#verify-form button[type=submit]")
    verdict = page.locator("#verify-verdict")

    await expect(page.locator("#verify-secret")).to_have_value("")
    await button.click()
    await expect(verdict).to_have_text("verified")
    await expect(page.locator("#verify-result")).to_have_attribute("data-good", "true")
    await ui.checkpoint("verified")

    await page.fill("#verify-secret", OTHER_SECRET)
    await button.click()
    await expect(verdict).to_have_text("invalid signature")
    await expect(page.locator("#verify-result")).to_have_attribute("data-good", "false")
    await expect(page.locator("#verify-result")).to_contain_text("stored verdict: verified")
    await expect(page.locator("#verify-result")).not_to_contain_text(OTHER_SECRET)
    await ui.checkpoint("invalid")
    ui.assert_no_js_errors()


XSS_ID = "<img src=x onerror=window.__xss=1>"
XSS_STATUS = "<script>window.__xss=2</script>"
XSS_HEADER = "<script>window.__xss=3</script>"
XSS_QUERY = "<script>window.__xss=4</script>"


async def assert_inert(page: Page) -> None:
    assert await page.evaluate("window.__xss") is None
    # Nothing was parsed as markup either (the CSP alone would also stop the handlers from running).
    await expect(page.locator('img[src="x"]')).to_have_count(0)
    scripts = await page.locator("script").evaluate_all("nodes => nodes.map(n => n.getAttribute('src'))")
    assert len(scripts) == 1 and scripts[0].startswith("/static/app.js"), scripts


async def test_hostile_payloads_render_as_text_on_list_delivery_and_prediction_pages(relay_factory, http, ui, tmp_path):
    relay = await relay_factory(make_config(str(tmp_path / "relay.db"), source={"secret": None}))
    page = await ui.open(relay, "/")
    await live(page, relay)
    body = json.dumps({"id": XSS_ID, "status": XSS_STATUS}).encode()
    headers = {"Content-Type": "application/json", "X-Evil": XSS_HEADER}
    delivery = await ingest(http, relay, body, headers, query="q=" + quote(XSS_QUERY, safe=""))

    # The row arrives live (server-rendered fragment inserted by app.js), then again on a full load.
    for how in ("live", "reloaded"):
        if how == "reloaded":
            await page.reload()
        evil = row(page, delivery)
        await expect(evil).to_be_visible()
        await expect(evil.get_by_role("link", name=XSS_ID, exact=True)).to_be_visible()
        await expect(evil.locator(".status")).to_have_text(XSS_STATUS)
        await assert_inert(page)
        await ui.checkpoint(f"list-{how}")

    await row(page, delivery).get_by_role("link", name=f"#{delivery}", exact=True).click()
    await expect(page).to_have_url(re.compile(rf"/deliveries/{delivery}$"))
    await expect(page.locator("#prediction-link")).to_have_text(XSS_ID)
    await expect(page.locator('table.headers tr:has(th:text-is("X-Evil")) td')).to_have_text(XSS_HEADER)
    stored = await relay.store.get_delivery(delivery)
    assert stored.query.startswith("q=%3Cscript%3Ewindow.__xss")  # as it came on the wire
    await expect(page.locator(".request-line")).to_have_text(f"POST {INGEST_PATH}?{stored.query}")
    await expect(page.locator("#body-pretty")).to_contain_text(XSS_ID)
    await expect(page.locator("#body-pretty")).to_contain_text(XSS_STATUS)
    await expect(page.locator("#curl")).to_contain_text(XSS_HEADER)
    await assert_inert(page)
    await ui.checkpoint("delivery")

    await page.locator("#prediction-link").click()
    await expect(page).to_have_url(re.compile(r"/predictions/"))
    await expect(page.locator("h1 .mono")).to_have_text(XSS_ID)
    await expect(page.locator("h1 .status")).to_have_text(XSS_STATUS)
    await expect(page.locator("#timeline li.event")).to_have_count(1)
    await expect(page.locator("#timeline li.event .status")).to_have_text(XSS_STATUS)
    assert XSS_ID in await page.title()
    await assert_inert(page)
    await ui.checkpoint("prediction")
    ui.assert_no_js_errors()


UI_TOKEN = "tok_browser-login-3f9a27c1d85e"


def token_config(database: str) -> Config:
    """make_config's shape, plus a UI token read from the environment mapping."""
    relay_table = {
        "database": database,
        "ingest_listen": "127.0.0.1:0",
        "ui_listen": "127.0.0.1:0",
        "ui_token_env": "RELAY_UI_TOKEN",
    }
    source = {"name": "replicate", "path": INGEST_PATH, "secret": SECRET}
    return parse_config({"relay": relay_table, "sources": [source], "upstreams": []}, env={"RELAY_UI_TOKEN": UI_TOKEN})


async def test_login_with_the_ui_token_sets_an_httponly_session_cookie(relay_factory, http, ui, tmp_path):
    relay = await relay_factory(token_config(str(tmp_path / "relay.db")))
    body = lifecycle_bodies("pred-login")[0]
    delivery = await ingest(http, relay, body, signed(body))
    admin = relay.bound.admin_url

    page = await ui.open(relay, "/")
    await expect(page).to_have_url(re.compile(r"/login\?next=/$"))
    await expect(page.get_by_role("heading", name="Log in")).to_be_visible()
    await expect(page.locator("#deliveries")).to_have_count(0)

    await page.get_by_label("Token").fill("not-the-token")
    await page.get_by_role("button", name="Log in").click()
    await expect(page.get_by_role("alert")).to_have_text("That token is not right.")
    await expect(page).to_have_url(re.compile(r"/login$"))
    assert await ui.context.cookies() == []
    await ui.checkpoint("login-wrong")

    await page.get_by_label("Token").fill(UI_TOKEN)
    await page.get_by_role("button", name="Log in").click()
    await expect(page).to_have_url(admin + "/")
    await expect(row(page, delivery)).to_be_visible()
    await expect(page.locator("#live-status")).to_be_visible()  # the SSE stream is authorised by the cookie too
    cookies = await ui.context.cookies()
    assert [c["name"] for c in cookies] == ["relay_session"]
    session = cookies[0]
    assert session["httpOnly"] is True
    assert session["sameSite"] == "Strict"
    assert UI_TOKEN not in session["value"]
    assert await page.evaluate("document.cookie") == ""
    await ui.checkpoint("list-after-login")

    # The JSON operations the page makes work under the cookie (same-origin fetch with JSON).
    await page.goto(f"{admin}/deliveries/{delivery}")
    await page.locator("#verify-form button[type=submit]").click()
    await expect(page.locator("#verify-verdict")).to_have_text("verified")
    ui.assert_no_js_errors()


async def test_login_returns_to_the_exact_page_that_was_asked_for(relay_factory, http, ui, tmp_path):
    """A bookmarked or shared link with several query parameters survives the login detour."""
    relay = await relay_factory(token_config(str(tmp_path / "relay.db")))
    bodies = lifecycle_bodies("pred-next")
    ids = [await ingest(http, relay, b, signed(b)) for b in bodies]
    wanted = f"/diff?a={ids[1]}&b={ids[3]}"

    page = await ui.open(relay, wanted)
    await expect(page).to_have_url(re.compile(r"/login\?"))
    await page.get_by_label("Token").fill(UI_TOKEN)
    await page.get_by_role("button", name="Log in").click()
    await expect(page).to_have_url(relay.bound.admin_url + wanted)
    await expect(page.locator('#body-changes tr[data-path="/status"]')).to_be_visible()
