"""Fixtures: a real relay on real sockets with a SQLite file in tmp_path (or a fresh PostgreSQL
database of a private server), and scripted upstreams."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from playwright.async_api import async_playwright

from relay.config import Config
from relay.service import Relay

from pgcluster import PostgresCluster
from support import CHROMIUM, CHROMIUM_ARGS, TIMEOUT_MS, UI, ScriptedUpstream, UserHandler, make_config


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresCluster]:
    """One private PostgreSQL server for the whole run, started only if a test asks for it."""
    cluster = PostgresCluster().start()
    yield cluster
    cluster.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The ``relay.database`` of a test that must hold on both storage backends: a SQLite file
    in tmp_path, or an empty database on the private PostgreSQL server."""
    if request.param == "sqlite":
        return str(tmp_path / "relay.db")
    cluster: PostgresCluster = request.getfixturevalue("postgres")
    return cluster.new_database()


@pytest.fixture
async def serve() -> AsyncIterator[Callable[..., Awaitable[str]]]:
    """Start aiohttp apps on real sockets (on a given port, or any); all are closed at teardown.

    ``await serve(app, path, port=None)`` returns the URL of ``path`` on the new server.
    """
    servers: list[TestServer] = []

    async def start(app: web.Application, path: str, port: int | None = None) -> str:
        server = TestServer(app, host="127.0.0.1", port=port)
        await server.start_server()
        servers.append(server)
        return str(server.make_url(path))

    yield start
    for server in servers:
        await server.close()


@pytest.fixture
def upstream_factory(serve: Callable[..., Awaitable[str]]) -> Callable[..., Awaitable[ScriptedUpstream]]:
    async def make(script: list[Any] | None = None, then: int = 200) -> ScriptedUpstream:
        upstream = ScriptedUpstream(script=list(script or []), then=then)
        upstream.url = await serve(upstream.app(), "/hook")
        return upstream

    return make


@pytest.fixture
def user_handler_factory(serve: Callable[..., Awaitable[str]]) -> Callable[[str], Awaitable[UserHandler]]:
    """Start a user's validating webhook handler (support.UserHandler); its ``url`` is ``path`` on it."""

    async def make(path: str) -> UserHandler:
        handler = UserHandler()
        handler.url = await serve(handler.app(), path)
        return handler

    return make


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


@pytest.fixture
async def ui(relay_factory: Any, tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[UI]:
    """A fresh Chromium per test, closed at teardown (before the relays stop: this fixture needs
    ``relay_factory``, so it is torn down first). On failure it saves screenshots first."""
    failed_before = request.session.testsfailed
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            context = await browser.new_context(viewport={"width": 1280, "height": 900})
            context.set_default_timeout(TIMEOUT_MS)
            page = await context.new_page()
            handle = UI(browser, context, page, tmp_path / "screenshots")
            page.on("pageerror", lambda exc: handle.js_errors.append(str(exc)))
            yield handle
            # The call phase's report is logged before teardown runs, so a failed test has
            # already been counted here; no conftest hook is needed to know it.
            if request.session.testsfailed > failed_before:
                written = await handle.save_failure()
                print(f"screenshots of the failed browser test: {[str(path) for path in written]}")
        finally:
            await browser.close()
