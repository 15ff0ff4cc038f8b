"""Assembling a running relay: storage, HTTP client, forwarder and both listeners.

``relay serve`` and the end-to-end tests use the same :class:`Relay`, so the
tests exercise the real start-up and shutdown order on real sockets.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from dataclasses import dataclass

from aiohttp import web

from relay.admin import create_admin_app
from relay.config import Config, ConfigError
from relay.deadline import DeadlineSite
from relay.events import EventBus
from relay.forward import Forwarder
from relay.forward_process import ForwarderProcess
from relay.http_client import HttpClient
from relay.indexer import Indexer
from relay.ingest import create_ingest_app
from relay.metrics import Metrics
from relay.model import Clock
from relay.retention import Retention
from relay.store import Store, open_store

log = logging.getLogger(__name__)

SHUTDOWN_GRACE_SECONDS = 10.0
KEEPALIVE_SECONDS = 75.0
LEASE_MARGIN_SECONDS = 10.0


def lease_seconds(config: Config) -> float:
    """How long a relay on a shared database holds an outbox row it is sending.

    Longer than any attempt can take (the slowest upstream's timeout, plus
    room), so a row is only taken over from a relay that is really gone.
    """
    if config.relay.outbox_lease_seconds is not None:
        return config.relay.outbox_lease_seconds
    slowest = max((u.timeout_seconds for u in config.upstreams), default=0.0)
    return slowest + 2 * config.relay.commit_timeout_seconds + LEASE_MARGIN_SECONDS


@dataclass(frozen=True)
class Bound:
    ingest_url: str
    admin_url: str


class Relay:
    """One relay process's parts, started and stopped in the right order."""

    def __init__(self, config: Config, clock: Clock = time.time, concurrency: int = 64) -> None:
        self.config = config
        self.clock = clock
        self.concurrency = concurrency
        self.metrics = Metrics()
        self.events = EventBus()
        self._runners: list[web.AppRunner] = []
        self.store: Store | None = None
        self.client: HttpClient | None = None
        self.forwarder: Forwarder | None = None
        self.forwarder_process: ForwarderProcess | None = None
        self.indexer: Indexer | None = None
        self.retention: Retention | None = None
        self.bound: Bound | None = None

    async def start(self) -> Bound:
        config = self.config
        if config.relay.ui_token is None and not config.relay.ui_listen.is_loopback:
            # parse_config refuses this too; a hand-built Config must not slip past it.
            raise ConfigError("relay.ui_listen: a non-loopback address needs a UI token")
        self.store = await open_store(config.relay.database, config.relay.commit_timeout_seconds, lease_seconds(config))
        try:
            self.events.share_with(self.store.share_event)
            self.store.add_event_listener(self.events.receive)
            self.client = HttpClient()
            if config.relay.forwarder == "process":
                self.forwarder_process = ForwarderProcess(
                    config, self.metrics, self.events, self.concurrency, lease_seconds(config)
                )
                self.forwarder_process.start()
                self.store.add_commit_listener(self.forwarder_process.wake)
            else:
                self.forwarder = Forwarder(
                    config, self.store, self.client, self.metrics, self.events, self.clock, self.concurrency
                )
                self.forwarder.start()
            self.indexer = Indexer(self.store)
            self.indexer.start()
            self.retention = Retention(self.store, config.relay.retention_days, self.clock)
            self.retention.start()
            ingest = create_ingest_app(config, self.store, self.metrics, self.events, self.clock)
            admin = create_admin_app(config, self.store, self.metrics, self.events, self.clock, self.client)
            ingest_url = await self._listen(ingest, config.relay.ingest_listen.host, config.relay.ingest_listen.port)
            admin_url = await self._listen(admin, config.relay.ui_listen.host, config.relay.ui_listen.port)
        except BaseException:
            await self.stop()
            raise
        self.bound = Bound(ingest_url, admin_url)
        log.info(
            "ingest listening on %s, UI and API on %s, database %s", ingest_url, admin_url, config.relay.database_shown
        )
        return self.bound

    async def _listen(self, app: web.Application, host: str, port: int) -> str:
        # keepalive_timeout: aiohttp's default keeps an idle connection for an hour; a public
        # listener should not hold sockets for clients that went quiet. DeadlineSite: aiohttp has
        # no limit for reading a request head once it has started (Slowloris); see relay/deadline.py.
        runner = web.AppRunner(
            app, access_log=None, shutdown_timeout=SHUTDOWN_GRACE_SECONDS, keepalive_timeout=KEEPALIVE_SECONDS
        )
        await runner.setup()
        self._runners.append(runner)
        site = DeadlineSite(runner, host, port, header_timeout=self.config.relay.header_timeout_seconds, backlog=1024)
        await site.start()
        address = runner.addresses[0]
        host_text = f"[{address[0]}]" if ":" in address[0] else address[0]
        return f"http://{host_text}:{address[1]}"

    async def stop(self) -> None:
        """Stop accepting, answer what is in flight, finish attempts, flush the writer."""
        self.events.close()
        ingest_runners, self._runners = self._runners, []
        for runner in ingest_runners:
            await runner.cleanup()
        if self.forwarder is not None:
            await self.forwarder.stop()
            self.forwarder = None
        if self.forwarder_process is not None:
            await self.forwarder_process.stop()
            self.forwarder_process = None
        if self.retention is not None:
            await self.retention.stop()
            self.retention = None
        if self.indexer is not None:
            await self.indexer.stop()
            self.indexer = None
        if self.client is not None:
            await self.client.close()
            self.client = None
        if self.store is not None:
            await self.store.close()
            self.store = None


async def serve(config: Config) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully."""
    relay = Relay(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await relay.start()
    try:
        await stop.wait()
        log.info("shutting down: finishing requests and attempts in flight")
    finally:
        await relay.stop()
    log.info("stopped")
