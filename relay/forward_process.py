"""The forwarder in a process of its own, so forwarding does not share ingest's interpreter lock.

Profiled at saturation, the relay process used one core (its interpreter
lock) while the machine sat 39 % idle, and forwarding through aiohttp's client
cost more per delivery than ingest. Here the same :class:`~relay.forward.Forwarder`
runs in a child process with its own store connection on the same SQLite file
(WAL lets the two writers take turns; each polls for the write lock, see
``relay.writer``). A pipe joins them:

- parent → child: a byte after each ingest commit ("look for due rows"), and
  ``stop`` at shutdown (the child finishes its attempts in flight, then exits);
- child → parent: the live events of its attempts, which the parent publishes
  to its pages and counts in its metrics (one message per turn of the child's
  event loop, however many attempts finished in it: a message each cost the
  parent a poll and a read per attempt, 9 % of its time at saturation).

If the parent dies (even by SIGKILL) the pipe closes and the child stops too;
anything it was sending stays pending in the database and is sent again
(at-least-once, as after any crash). If the child dies (it could not open the
database at start, or a bug), the parent starts a new one, after 1 s and then
up to a minute between tries while it keeps dying.
"""

from __future__ import annotations

import asyncio
import json
import logging
import multiprocessing
import signal
import time
from multiprocessing.connection import Connection
from typing import Any

from relay.config import Config
from relay.events import EventBus
from relay.forward import Forwarder
from relay.http_client import HttpClient
from relay.metrics import Metrics
from relay.runtime import LOG_FORMAT, event_loop_factory
from relay.store import StoreUnavailable, open_store
from relay.tasks import cancel_and_wait

log = logging.getLogger(__name__)

STOP = b"stop"
WAKE = b"w"
STOP_GRACE_SECONDS = 30.0
RESTART_SECONDS = (1.0, 2.0, 5.0, 10.0, 30.0, 60.0)  # waits before restarting a dead child, in turn
HEALTHY_SECONDS = 60.0  # a child that lived this long starts the waits over
EXIT_NO_DATABASE = 3


class ForwarderProcess:
    """The parent's handle on the child forwarder."""

    def __init__(self, config: Config, metrics: Metrics, events: EventBus, concurrency: int, lease: float) -> None:
        self._config = config
        self._metrics = metrics
        self._events = events
        self._concurrency = concurrency
        self._lease = lease
        self._conn: Connection | None = None
        self._proc: multiprocessing.process.BaseProcess | None = None
        self._wake_scheduled = False
        self._stopping = False
        self._restarts = 0
        self._started_at = 0.0
        self._restart_handle: asyncio.TimerHandle | None = None
        self._reaper: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start the child. At start-up a failure is the caller's; a restart that fails tries again later."""
        self._restart_handle = None
        if self._stopping:
            return
        loop = asyncio.get_running_loop()
        self._started_at = loop.time()
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe()
        level = logging.getLogger().getEffectiveLevel()
        proc = ctx.Process(
            target=child_main,
            args=(self._config, child, self._concurrency, self._lease, level),
            name="relay-forwarder",
        )
        try:
            proc.start()
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()  # the child's end now lives in the child
        self._proc = proc
        self._conn = parent
        loop.add_reader(parent.fileno(), self._on_message)

    def _restart(self) -> None:
        try:
            self.start()
        except Exception as exc:  # EMFILE, ENOMEM...: forwarding must not stay stopped for good
            log.error("could not start a new forwarder process: %s: %s", type(exc).__name__, exc)
            self._schedule_restart(asyncio.get_running_loop())

    def _schedule_restart(self, loop: asyncio.AbstractEventLoop) -> None:
        if loop.time() - self._started_at >= HEALTHY_SECONDS:
            self._restarts = 0
        delay = RESTART_SECONDS[min(self._restarts, len(RESTART_SECONDS) - 1)]
        self._restarts += 1
        log.error("starting a new forwarder process in %g s (pending deliveries wait meanwhile)", delay)
        self._restart_handle = loop.call_later(delay, self._restart)

    def wake(self) -> None:
        """After a commit: tell the child once per turn of the event loop, however many commits."""
        if not self._wake_scheduled and self._conn is not None:
            self._wake_scheduled = True
            asyncio.get_running_loop().call_soon(self._send_wake)

    def _send_wake(self) -> None:
        self._wake_scheduled = False
        if self._conn is not None:
            try:
                self._conn.send_bytes(WAKE)
            except OSError as exc:
                log.error("cannot wake the forwarder process: %s", exc)

    def _on_message(self) -> None:
        """Every message waiting (each a list of events: the child sends one per turn of its loop)."""
        conn = self._conn
        assert conn is not None
        try:
            while True:
                for kind, data in json.loads(conn.recv_bytes()):
                    self._events.publish(kind, data)
                    if kind == "attempt" and data.get("kind") == "forward":
                        self._metrics.forward_attempt(data["upstream"], data["outcome"], data["duration_ms"] / 1000)
                if not conn.poll():
                    return
        except (EOFError, OSError):
            self._child_gone()

    def _child_gone(self) -> None:
        """The pipe closed: the child exited. Unless we are stopping, start another."""
        loop = asyncio.get_running_loop()
        conn, proc = self._conn, self._proc
        assert conn is not None and proc is not None
        loop.remove_reader(conn.fileno())
        conn.close()
        self._conn = None
        if self._stopping:
            return
        self._reaper = loop.create_task(self._restart_later(proc), name="relay-forwarder-restart")

    async def _restart_later(self, proc: multiprocessing.process.BaseProcess) -> None:
        await _reap(proc)  # it closed its end of the pipe on the way out
        if self._stopping:
            return
        log.error("the forwarder process exited (code %s)", proc.exitcode)
        self._schedule_restart(asyncio.get_running_loop())
        self._reaper = None

    async def stop(self) -> None:
        """Ask the child to finish its attempts in flight and exit; wait for it."""
        self._stopping = True
        if self._restart_handle is not None:
            self._restart_handle.cancel()
        await cancel_and_wait(self._reaper)
        conn, proc = self._conn, self._proc
        if proc is None:
            return
        try:
            if conn is not None:
                conn.send_bytes(STOP)
        except OSError:
            pass  # it is gone already
        await _reap(proc)
        if conn is not None:
            try:
                asyncio.get_running_loop().remove_reader(conn.fileno())
            except (OSError, ValueError):
                pass
            conn.close()
        self._conn = self._proc = None


async def _reap(proc: multiprocessing.process.BaseProcess) -> None:
    """Wait for the child to exit, killing it if it has not within the grace period."""
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, proc.join, STOP_GRACE_SECONDS)
    if proc.is_alive():
        log.error("the forwarder process did not exit within %g s; killing it", STOP_GRACE_SECONDS)
        proc.kill()
        await loop.run_in_executor(None, proc.join)


def child_main(config: Config, conn: Connection, concurrency: int, lease: float, log_level: int) -> None:
    """The child's entry point (a spawned process: nothing is inherited but these arguments)."""
    # The parent decides when to stop (it is the one signals are sent to); a group-wide
    # Ctrl-C must not cut the child's attempts short.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=log_level, format=LOG_FORMAT)
    with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
        try:
            runner.run(_child(config, conn, concurrency, lease))
        except StoreUnavailable as exc:
            # Expected while the database is away: one line, and the parent tries again later.
            log.error("the forwarder process cannot open the database: %s", exc)
            raise SystemExit(EXIT_NO_DATABASE) from None


async def _child(config: Config, conn: Connection, concurrency: int, lease: float) -> None:
    store = await open_store(config.relay.database, config.relay.commit_timeout_seconds, lease)
    events = EventBus()
    loop = asyncio.get_running_loop()
    outgoing: list[tuple[str, dict[str, Any]]] = []

    def flush() -> None:
        batch = outgoing.copy()
        outgoing.clear()
        try:
            conn.send_bytes(json.dumps(batch).encode())
        except OSError:
            pass  # the parent is gone; the pipe's EOF stops us

    def to_parent(kind: str, data: dict[str, Any]) -> None:
        if not outgoing:
            loop.call_soon(flush)
        outgoing.append((kind, data))

    events.share_with(to_parent)
    stopping = asyncio.Event()
    client = HttpClient()
    forwarder = Forwarder(config, store, client, Metrics(), events, time.time, concurrency)

    def on_readable() -> None:
        try:
            while conn.poll():
                if conn.recv_bytes() == STOP:
                    stopping.set()
                    return
            forwarder.wake()
        except (EOFError, OSError):
            log.warning("the relay's main process is gone; the forwarder stops")
            stopping.set()

    loop.add_reader(conn.fileno(), on_readable)
    forwarder.start()
    try:
        await stopping.wait()
    finally:
        loop.remove_reader(conn.fileno())
        await forwarder.stop()
        if outgoing:
            flush()  # the events of the last attempts
        await client.close()
        await store.close()
        conn.close()
