"""Screenshots of the real admin UI for the docs: ``python3 scripts/screenshots.py --out docs``.

Starts a real relay (temporary SQLite database, ephemeral ports) with one
upstream: a small aiohttp app that answers 503 to its first request and 200
afterwards. Sends two realistic Replicate prediction lifecycles, signed as
Replicate signs them, one event of the second with a wrong secret. When
forwarding has settled, headless Chromium saves ``list.png`` (the deliveries
list) and ``delivery.png`` (the delivery whose first forward failed and was
retried) at a 1400x900 viewport.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from playwright.async_api import async_playwright

from relay.config import parse_config
from relay.lifecycle import encode, new_prediction_id, prediction_lifecycle, signed_headers
from relay.service import Relay
from relay.verify import decode_secret

# The Chromium launch settings are shared with the browser tests, in tests/support.py.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from support import CHROMIUM, CHROMIUM_ARGS

VIEWPORT = {"width": 1400, "height": 900}
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
WRONG_SECRET = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD"
INGEST_PATH = "/webhooks/replicate"


class FlakyApp:
    """The user's webhook handler: down for its first request (a deploy in progress), fine afterwards."""

    def __init__(self) -> None:
        self.requests = 0

    async def handle(self, request: web.Request) -> web.Response:
        await request.read()
        self.requests += 1
        if self.requests == 1:
            return web.json_response({"error": "service restarting, try again"}, status=503)
        return web.json_response({"ok": True})


async def start_upstream(app: FlakyApp) -> tuple[web.AppRunner, str]:
    server = web.Application()
    server.router.add_post("/webhooks/replicate", app.handle)
    runner = web.AppRunner(server, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    return runner, f"http://{host}:{port}/webhooks/replicate"


async def send_lifecycles(http: aiohttp.ClientSession, ingest_url: str) -> None:
    key, wrong = decode_secret(SECRET), decode_secret(WRONG_SECRET)
    webhook_url = "https://relay.example.com" + INGEST_PATH
    for n in range(2):
        prediction = new_prediction_id()
        for i, document in enumerate(prediction_lifecycle(prediction, webhook_url)):
            body = encode(document)
            signing_key = wrong if (n == 1 and i == 1) else key  # one event of the second run: a wrong secret
            async with http.post(ingest_url + INGEST_PATH, data=body, headers=signed_headers(signing_key, body)) as r:
                await r.read()
            await asyncio.sleep(0.15)  # Replicate's events of one prediction are spread over time


async def settled(http: aiohttp.ClientSession, admin_url: str, timeout: float = 30.0) -> list[dict[str, Any]]:
    """Wait until no forward is pending any more; returns the deliveries (newest first)."""
    deadline = time.monotonic() + timeout
    while True:
        async with http.get(admin_url + "/api/deliveries") as resp:
            deliveries: list[dict[str, Any]] = (await resp.json())["deliveries"]
        if all(state != "pending" for d in deliveries for state in d["forwarding"].values()):
            return deliveries
        if time.monotonic() > deadline:
            raise SystemExit(f"forwarding did not settle within {timeout} s")
        await asyncio.sleep(0.1)


async def retried_delivery(http: aiohttp.ClientSession, admin_url: str, deliveries: list[dict[str, Any]]) -> int:
    """The delivery whose forwarding needed more than one attempt (the 503, then the 200)."""
    for summary in deliveries:
        async with http.get(f"{admin_url}/api/deliveries/{summary['id']}") as resp:
            full = await resp.json()
        if any(f["attempts_made"] > 1 for f in full["forwarding"].values()):
            return int(full["id"])
    return int(deliveries[-1]["id"])


async def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    flaky = FlakyApp()
    upstream_runner, upstream_url = await start_upstream(flaky)
    with tempfile.TemporaryDirectory(prefix="relay-screenshots-") as tmp:
        config = parse_config(
            {
                "relay": {
                    "database": str(Path(tmp) / "relay.db"),
                    "ingest_listen": "127.0.0.1:0",
                    "ui_listen": "127.0.0.1:0",
                },
                "sources": [{"name": "replicate", "path": INGEST_PATH, "secret": SECRET}],
                "upstreams": [
                    {
                        "name": "my-app",
                        "source": "replicate",
                        "url": upstream_url,
                        "retry_base_seconds": 0.3,
                        "retry_max_seconds": 1,
                    }
                ],
            },
            env={},
        )
        relay = Relay(config)
        bound = await relay.start()
        try:
            async with aiohttp.ClientSession() as http:
                await send_lifecycles(http, bound.ingest_url)
                deliveries = await settled(http, bound.admin_url)
                retried = await retried_delivery(http, bound.admin_url, deliveries)
            async with async_playwright() as p:
                browser = await p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
                try:
                    page = await browser.new_page(viewport=VIEWPORT)
                    await page.goto(bound.admin_url + "/")
                    await page.locator("#live-status").wait_for(state="visible")
                    await page.screenshot(path=str(out / "list.png"))
                    await page.goto(f"{bound.admin_url}/deliveries/{retried}")
                    await page.locator("#forwarding li.attempt").first.wait_for(state="visible")
                    await page.screenshot(path=str(out / "delivery.png"))
                finally:
                    await browser.close()
        finally:
            await relay.stop()
            await upstream_runner.cleanup()
    print(f"wrote {out / 'list.png'} and {out / 'delivery.png'} (delivery #{retried})")


def cli(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, required=True, help="directory for list.png and delivery.png")
    args = parser.parse_args(argv)
    asyncio.run(main(args.out))


if __name__ == "__main__":
    cli()
