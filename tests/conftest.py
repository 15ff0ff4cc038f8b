"""Fixtures: a real relay on real sockets with a SQLite file in tmp_path, and scripted upstreams."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from relay.config import Config
from relay.service import Relay

from support import ScriptedUpstream, make_config


@pytest.fixture
async def upstream_factory() -> AsyncIterator[Callable[..., Awaitable[ScriptedUpstream]]]:
    servers: list[TestServer] = []

    async def make(script: list[Any] | None = None, then: int = 200) -> ScriptedUpstream:
        upstream = ScriptedUpstream(script=list(script or []), then=then)
        server = TestServer(upstream.app(), host="127.0.0.1")
        await server.start_server()
        servers.append(server)
        upstream.url = str(server.make_url("/hook"))
        return upstream

    yield make
    for server in servers:
        await server.close()


@pytest.fixture
async def relay_factory(tmp_path: Any) -> AsyncIterator[Callable[..., Awaitable[Relay]]]:
    """Start real relays (ingest + admin + forwarder); all are stopped at teardown."""
    relays: list[Relay] = []

    async def make(config: Config | None = None, **kwargs: Any) -> Relay:
        relay = Relay(config or make_config(str(tmp_path / "relay.db")), **kwargs)
        await relay.start()
        relays.append(relay)
        return relay

    yield make
    for relay in relays:
        await relay.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session
