"""The forwarder: drains the durable outbox to the upstreams, one attempt at a time per row.

State lives only in the database: a row is ``pending`` until an attempt
settles it, so after a crash or restart every unfinished row is simply due
again (at-least-once). The in-memory set of rows in flight only stops this
process from sending the same row twice at once.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
from collections.abc import Callable

from relay.config import Config, UpstreamConfig
from relay.events import EventBus
from relay.http_client import HttpClient
from relay.metrics import Metrics
from relay.model import Clock, OutboxItem
from relay.outgoing import build_request
from relay.policy import DEAD, DELIVERED, FAILED, RETRY, decide
from relay.render import attempt_event
from relay.sender import send
from relay.store import Store, StoreUnavailable
from relay.tasks import cancel_and_wait

log = logging.getLogger(__name__)

STATE_FOR_OUTCOME = {DELIVERED: "delivered", FAILED: "failed", DEAD: "dead", RETRY: "pending"}
STORE_RETRY_SECONDS = 1.0
REFILL_DIVISOR = 8  # with attempts in flight, look for more once 1/8 of the slots are free


class Forwarder:
    def __init__(
        self,
        config: Config,
        store: Store,
        client: HttpClient,
        metrics: Metrics,
        events: EventBus,
        clock: Clock,
        concurrency: int = 64,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self._config = config
        self._store = store
        self._client = client
        self._metrics = metrics
        self._events = events
        self._clock = clock
        self._concurrency = concurrency
        self._rand = rand
        self._upstreams = tuple(u.name for u in config.upstreams)
        # Each upstream's share of the slots: one that hangs (up to its timeout) must not
        # take them all and hold back the others' deliveries. One upstream has them all.
        self._share = max(1, concurrency // max(1, len(self._upstreams)))
        self._turn = 0  # which upstream looks first (they take turns; matters only past 64 upstreams)
        self._inflight: dict[int, tuple[str, asyncio.Task[None]]] = {}  # outbox id -> (upstream, attempt)
        # Rows whose attempt finished while a due-query was running: that query's answer
        # may predate the attempt's commit, so they must not be taken from it again.
        self._finished_since_query: set[int] = set()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    def wake(self) -> None:
        """Look for due rows now (called after every commit)."""
        self._wakeup.set()

    def start(self) -> None:
        self._store.add_commit_listener(self.wake)
        self._task = asyncio.create_task(self._loop(), name="relay-forwarder")

    async def stop(self) -> None:
        """Stop taking rows; let attempts in flight finish and be recorded."""
        self._stopping = True
        await cancel_and_wait(self._task)
        self._task = None
        if self._inflight:
            await asyncio.gather(*(task for _, task in self._inflight.values()), return_exceptions=True)

    async def _loop(self) -> None:
        # Under load every finished attempt wakes this loop. Looking for due rows each time cost
        # two queries per delivery (a third of a core, profiled); with attempts in flight, wait
        # until a batch of slots is free (no more than an upstream's share, so an idle upstream is
        # looked for even while the others fill theirs). An idle forwarder still looks at once.
        refill = max(1, min(self._concurrency // REFILL_DIVISOR, self._share))
        while not self._stopping:
            self._wakeup.clear()
            now = self._clock()
            next_due: float | None = None
            try:
                free = self._concurrency - len(self._inflight)
                if free >= refill or (free > 0 and not self._inflight):
                    self._finished_since_query.clear()
                    short = await self._take_due(now)
                    if short:  # nothing else of theirs is due now: sleep until their next retry is
                        next_due = await self._store.next_due_after(now, short)
            except StoreUnavailable as exc:
                log.error("forwarder cannot read the outbox: %s", exc)
                next_due = now + STORE_RETRY_SECONDS
            except Exception:  # keep forwarding alive through a bug or an odd database error
                log.exception("forwarder: looking for due rows failed unexpectedly")
                next_due = now + STORE_RETRY_SECONDS
            timeout = None if next_due is None else max(next_due - self._clock(), 0.0)
            poll = self._store.idle_poll_seconds
            if poll is not None:
                timeout = poll if timeout is None else min(timeout, poll)
            try:
                await asyncio.wait_for(self._wakeup.wait(), timeout)
            except TimeoutError:
                pass

    async def _take_due(self, now: float) -> tuple[str, ...]:
        """Start attempts for due rows, each upstream within its share of the slots.

        Returns the upstreams whose look found less than it had room for: nothing else of
        theirs is due now, so the caller sleeps until their next retry. Every other upstream
        has attempts in flight, and each one that finishes wakes the loop to look again.
        (With one upstream: one look with every free slot, as before shares existed.)
        """
        busy = collections.Counter(upstream for upstream, _ in self._inflight.values())
        first = self._turn % max(1, len(self._upstreams))
        self._turn = first + 1
        short: list[str] = []
        for upstream in self._upstreams[first:] + self._upstreams[:first]:
            room = min(self._share - busy[upstream], self._concurrency - len(self._inflight))
            if room <= 0:
                continue
            items = await self._store.due_outbox(now, (upstream,), room, exclude=set(self._inflight))
            if len(items) < room:
                short.append(upstream)
            for item in items:
                if item.outbox_id in self._inflight or item.outbox_id in self._finished_since_query:
                    continue  # finished while the query ran: its answer may predate that commit
                task = asyncio.create_task(self._attempt(item), name=f"relay-forward-{item.outbox_id}")
                self._inflight[item.outbox_id] = (upstream, task)
        return tuple(short)

    async def _attempt(self, item: OutboxItem) -> None:
        try:
            await self._attempt_once(item)
        except StoreUnavailable as exc:
            # The attempt happened but could not be recorded: the row stays pending and
            # will be sent again (at-least-once), after a pause so a full disk is not hammered.
            log.error("delivery %s to %s: result not recorded: %s", item.delivery_id, item.upstream, exc)
            await asyncio.sleep(STORE_RETRY_SECONDS)
        except Exception:
            log.exception("delivery %s to %s: forwarding failed unexpectedly", item.delivery_id, item.upstream)
            await asyncio.sleep(STORE_RETRY_SECONDS)
        finally:
            self._inflight.pop(item.outbox_id, None)
            self._finished_since_query.add(item.outbox_id)
            self.wake()

    def _sign_key(self, upstream: UpstreamConfig) -> bytes | None:
        if not upstream.resign:
            return None
        secret = upstream.secret or self._config.source(upstream.source).secret
        return secret.key if secret else None

    async def _attempt_once(self, item: OutboxItem) -> None:
        upstream = self._config.upstream(item.upstream)
        if item.already_delivered_as is not None:
            reason = f"duplicate of delivery {item.already_delivered_as}, which {upstream.name} already acknowledged"
            log.info("delivery %s to %s: skipped, %s", item.delivery_id, upstream.name, reason)
            await self._store.settle_outbox(item.outbox_id, "skipped", reason, self._clock())
            return
        now = self._clock()
        request = build_request(
            method=item.method,
            target_url=upstream.url,
            query=item.query,
            headers=item.headers,
            body=item.body,
            delivery_id=item.delivery_id,
            peer=item.peer,
            sign_key=self._sign_key(upstream),
            now=int(now),
        )
        result = await send(self._client, request, upstream.timeout_seconds, wall_clock=now)
        number = item.attempts_made + 1
        outcome, next_at = decide(
            result.status, result.header("Retry-After"), number, upstream, self._clock(), self._rand
        )
        attempt = result.attempt(
            request, delivery_id=item.delivery_id, kind="forward", outcome=outcome, upstream=upstream.name
        )
        note = _note(outcome, number, upstream, result.status, result.error)
        await self._store.finish_attempt(item.outbox_id, attempt, STATE_FOR_OUTCOME[outcome], next_at, note)
        self._metrics.forward_attempt(upstream.name, outcome, result.duration_ms / 1000)
        self._events.publish("attempt", attempt_event(attempt))
        level = logging.INFO if outcome == DELIVERED else logging.WARNING
        log.log(
            level,
            "delivery %s to %s: attempt %d %s (%s)",
            item.delivery_id,
            upstream.name,
            number,
            outcome,
            result.status if result.status is not None else result.error,
        )


def _note(outcome: str, number: int, upstream: UpstreamConfig, status: int | None, error: str | None) -> str | None:
    answer = f"HTTP {status}" if status is not None else (error or "no answer")
    if outcome == RETRY:
        return f"attempt {number} of {upstream.max_attempts}: {answer}; retrying"
    if outcome == DEAD:
        return f"gave up after {number} attempts; last: {answer}"
    if outcome == FAILED:
        return f"{answer} is final (not retried)"
    return None
