"""``relay connect``: a remote relay's deliveries streamed to a local handler, end to end.

The remote is a real relay with a UI token on real sockets; the client is the
real CLI in a subprocess; the local app verifies with the replicate package's
validator and a 300 s tolerance (so re-signing is what makes it accept).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator

import pytest

from relay.config import parse_config
from relay.filters import DeliveryFilter
from relay.service import Relay

from support import SECRET, free_port, ingest, lifecycle_bodies, relay_command, signed, wait_until

TOKEN = "connect-test-token-1234"


def remote_config(db: str, ui_port: int, ingest_port: int):  # type: ignore[no-untyped-def]
    return parse_config(
        {
            "relay": {
                "database": db,
                "ingest_listen": f"127.0.0.1:{ingest_port}",
                "ui_listen": f"127.0.0.1:{ui_port}",
                "ui_token_env": "TOK",
            },
            "sources": [{"name": "replicate", "path": "/webhooks/replicate", "secret": SECRET}],
        },
        env={"TOK": TOKEN},
    )


@pytest.fixture
async def remote(tmp_path) -> AsyncIterator[dict]:  # type: ignore[type-arg]
    ports = {"ui": free_port(), "ingest": free_port()}
    state: dict = {"relay": None, "ports": ports, "db": str(tmp_path / "remote.db")}  # type: ignore[type-arg]

    async def start() -> Relay:
        relay = Relay(remote_config(state["db"], ports["ui"], ports["ingest"]))
        await relay.start()
        state["relay"] = relay
        return relay

    state["start"] = start
    await start()
    yield state
    if state["relay"] is not None:
        await state["relay"].stop()


def start_client(remote_url: str, target: str, *extra: str, token: str = TOKEN) -> subprocess.Popen[str]:
    env = {**os.environ, "RELAY_UI_TOKEN": token, "REPLICATE_WEBHOOK_SECRET": SECRET, "COLUMNS": "200"}
    return subprocess.Popen(
        relay_command("connect", remote_url, "--to", target, *extra),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def stop_client(proc: subprocess.Popen[str]) -> str:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        out, _ = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return out


async def test_live_deliveries_arrive_in_order_and_verify_across_a_remote_restart(remote, user_handler_factory, http):
    handler = await user_handler_factory("/webhooks/replicate")
    relay: Relay = remote["relay"]
    admin = relay.bound.admin_url
    client = start_client(admin, handler.url + "?local=1")
    try:
        # The client is following once a probe delivery posted now arrives.
        probe = b'{"id": "probe", "status": "starting"}'
        await wait_until(lambda: client.poll() is None, timeout=5)
        sent: list[bytes] = []
        deadline = time.monotonic() + 20
        while not handler.arrivals and time.monotonic() < deadline:
            await ingest(http, relay, probe, signed(probe))
            sent.append(probe)
            await asyncio.sleep(0.2)  # poll interval inside a deadline: the client may still be starting
        assert handler.arrivals, await asyncio.to_thread(stop_client, client)
        baseline = len(handler.arrivals)
        first = lifecycle_bodies("pred-connect-1")
        for body in first:
            await ingest(http, relay, body, signed(body))
        await wait_until(lambda: len(handler.arrivals) >= baseline + 4, timeout=20)
        # Kill the remote relay mid-stream, post more after it is back: none is lost.
        await relay.stop()
        remote["relay"] = None
        relay = await remote["start"]()
        second = lifecycle_bodies("pred-connect-2")
        for body in second:
            await ingest(http, relay, body, signed(body))
        await wait_until(lambda: len(handler.arrivals) >= baseline + 8, timeout=40)
    finally:
        out = await asyncio.to_thread(stop_client, client)
    arrived = [a.body for a in handler.arrivals[baseline:]]
    assert arrived == first + second, out
    assert all(a.verdict == "ok" for a in handler.arrivals), [a.verdict for a in handler.arrivals]
    assert all(a.path_qs.startswith("/webhooks/replicate?local=1") for a in handler.arrivals)
    assert "pred-connect-2" in out and "HTTP 200" in out
    assert TOKEN not in out
    # The remote recorded each bridge delivery as an attempt of kind connect.
    page = await relay.store.list_deliveries(DeliveryFilter(limit=1))
    latest = await relay.store.get_delivery(page[0][0].id)
    assert [a.kind for a in latest.replays] == ["connect"] and latest.replays[0].status == 200


async def test_since_backfills_what_was_missed_in_order(remote, user_handler_factory, http):
    handler = await user_handler_factory("/hook")
    relay: Relay = remote["relay"]
    bodies = lifecycle_bodies("pred-missed")
    for body in bodies:
        await ingest(http, relay, body, signed(body))
    client = start_client(relay.bound.admin_url, handler.url, "--since", "1h")
    try:
        await wait_until(lambda: len(handler.arrivals) >= 4, timeout=20)
    finally:
        out = await asyncio.to_thread(stop_client, client)
    assert [a.body for a in handler.arrivals] == bodies, out
    assert all(a.verdict == "ok" for a in handler.arrivals)


async def test_a_wrong_token_fails_clearly_with_nonzero_exit(remote, user_handler_factory):
    handler = await user_handler_factory("/hook")
    client = start_client(remote["relay"].bound.admin_url, handler.url, token="wrong-token")
    # In a thread: the remote relay runs on this event loop and must keep answering.
    out, _ = await asyncio.to_thread(client.communicate, timeout=20)
    assert client.returncode == 1
    assert "refused the token" in out and "wrong-token" not in out
