"""Replaying a stored delivery somewhere: one function for the API, the UI, the CLI and bulk jobs.

By default a replay is re-signed with a fresh timestamp, so a handler with
a five-minute tolerance accepts a day-old delivery; ``resign=False`` sends
the original headers untouched. An edited body always forces re-signing
(the old signature cannot match it).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from relay.config import Config, UpstreamConfig
from relay.events import EventBus
from relay.http_client import HttpClient
from relay.model import Attempt, Clock, Delivery
from relay.outgoing import build_request
from relay.policy import DELIVERED, FAILED
from relay.render import attempt_event
from relay.sender import send
from relay.store import Store
from relay.verify import SecretError, decode_secret

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_SECONDS = 30.0


class ReplayError(ValueError):
    """The replay request itself is wrong (unknown upstream, bad URL, nothing to sign with)."""


@dataclass(frozen=True)
class ReplayRequest:
    upstream: str | None = None
    url: str | None = None
    resign: bool = True
    body: bytes | None = None
    webhook_id: str | None = None
    secret: str | None = None  # a signing secret for this replay only (never stored)
    kind: str = "replay"


def check_target(config: Config, req: ReplayRequest) -> UpstreamConfig | None:
    """Refuse a replay target that cannot work (before any delivery is read); the upstream, if named."""
    if (req.upstream is None) == (req.url is None):
        raise ReplayError("give exactly one of upstream or url")
    if req.upstream is not None:
        try:
            return config.upstream(req.upstream)
        except KeyError:
            names = ", ".join(u.name for u in config.upstreams) or "none configured"
            raise ReplayError(f"upstream: no upstream named {req.upstream!r} ({names})") from None
    assert req.url is not None
    parts = urlsplit(req.url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ReplayError(f"url: expected an http:// or https:// URL, got {req.url!r}")
    return None


def bulk_filter(params: dict[str, str], req: ReplayRequest) -> dict[str, str]:
    """A bulk replay's filter: replaying to an upstream, a ``state`` means that state *for that upstream*."""
    if req.upstream is not None and params.get("state") and not params.get("upstream"):
        return {**params, "upstream": req.upstream}
    return params


def _target(config: Config, delivery: Delivery, req: ReplayRequest) -> tuple[str, float, str | None, bytes | None]:
    """(url, timeout, upstream name, signing key) for a replay request."""
    upstream = check_target(config, req)
    key: bytes | None = None
    if req.secret:
        try:
            key = decode_secret(req.secret)
        except SecretError as exc:
            raise ReplayError(f"secret: {exc}") from None
    source_secret = next((s.secret for s in config.sources if s.name == delivery.source), None)
    if upstream is not None:
        secret = upstream.secret or source_secret
        return upstream.url, upstream.timeout_seconds, upstream.name, key or (secret.key if secret else None)
    assert req.url is not None
    return req.url, DEFAULT_TIMEOUT_SECONDS, None, key or (source_secret.key if source_secret else None)


async def replay(
    store: Store,
    client: HttpClient,
    config: Config,
    clock: Clock,
    delivery_id: int,
    req: ReplayRequest,
) -> Attempt:
    """Send one stored delivery once, record it as an attempt, and return that attempt."""
    delivery = await store.get_delivery(delivery_id)
    url, timeout, upstream_name, key = _target(config, delivery, req)
    if delivery.body is None and req.body is None:
        raise ReplayError(f"delivery {delivery_id} has no stored body (over max_body_bytes); give a body")
    body = req.body if req.body is not None else (delivery.body or b"")
    resign = req.resign or req.body is not None or req.webhook_id is not None
    if resign and key is None:
        raise ReplayError("no secret to re-sign with: configure the source's secret, pass one, or keep the signature")
    now = clock()
    request = build_request(
        method=delivery.method,
        target_url=url,
        query=delivery.query,
        headers=delivery.headers,
        body=body,
        delivery_id=delivery.id,
        peer=delivery.peer,
        sign_key=key if resign else None,
        now=int(now),
        webhook_id=req.webhook_id,
    )
    result = await send(client, request, timeout, wall_clock=now)
    if result.status is None:
        outcome = "error"
    else:
        outcome = DELIVERED if 200 <= result.status <= 299 else FAILED
    attempt = result.attempt(
        request,
        delivery_id=delivery.id,
        kind=req.kind,
        outcome=outcome,
        upstream=upstream_name,
        request_body=req.body if req.body is not None and req.body != delivery.body else None,
    )
    attempt_id = await store.record_attempt(attempt)
    if outcome == DELIVERED and upstream_name is not None:
        await store.mark_delivered_by_replay(delivery.id, upstream_name, attempt_id, clock())
    log.info(
        "delivery %s replayed to %s: %s",
        delivery.id,
        upstream_name or request.url,
        result.status if result.status is not None else result.error,
    )
    return Attempt(**{**attempt.__dict__, "id": attempt_id})


@dataclass
class BulkProgress:
    job: int
    total: int
    done: int = 0
    ok: int = 0
    failed: int = 0
    finished: bool = False

    def as_json(self) -> dict[str, int | bool]:
        return {
            "job": self.job,
            "total": self.total,
            "done": self.done,
            "ok": self.ok,
            "failed": self.failed,
            "finished": self.finished,
        }


async def replay_many(
    store: Store,
    client: HttpClient,
    config: Config,
    clock: Clock,
    ids: list[int],
    req: ReplayRequest,
    progress: BulkProgress,
    on_progress: Callable[[BulkProgress], None] = lambda p: None,
    concurrency: int = 8,
    on_attempt: Callable[[Attempt], None] = lambda a: None,
) -> BulkProgress:
    """Replay each id once (oldest first, ``concurrency`` at a time), counting each exactly once."""
    semaphore = asyncio.Semaphore(concurrency)

    async def one(delivery_id: int) -> None:
        async with semaphore:
            try:
                attempt = await replay(store, client, config, clock, delivery_id, req)
                on_attempt(attempt)
                ok = attempt.outcome == DELIVERED
            except Exception as exc:  # one bad delivery must not stop the batch; it is counted and logged
                log.error("bulk replay job %d: delivery %d: %s", progress.job, delivery_id, exc)
                ok = False
            progress.done += 1
            progress.ok += ok
            progress.failed += not ok
            on_progress(progress)

    await asyncio.gather(*(one(i) for i in ids))
    progress.finished = True
    on_progress(progress)
    return progress


class BulkReplays:
    """Bulk replay jobs of the running relay, with progress published as SSE ``replay`` events.

    Jobs live in memory: a restart ends them (the attempts already made stay
    recorded); rerun the same filter to continue.
    """

    def __init__(self, store: Store, client: HttpClient, config: Config, clock: Clock, events: EventBus) -> None:
        self._store, self._client, self._config, self._clock, self._events = store, client, config, clock, events
        self._jobs: dict[int, BulkProgress] = {}
        self._tasks: dict[int, asyncio.Task[BulkProgress]] = {}

    def start(self, ids: list[int], req: ReplayRequest) -> BulkProgress:
        job = len(self._jobs) + 1
        progress = BulkProgress(job=job, total=len(ids))
        self._jobs[job] = progress
        self._tasks[job] = asyncio.create_task(
            replay_many(
                self._store,
                self._client,
                self._config,
                self._clock,
                ids,
                req,
                progress,
                lambda p: self._events.publish("replay", p.as_json()),
                on_attempt=lambda a: self._events.publish("attempt", attempt_event(a)),
            ),
            name=f"relay-bulk-replay-{job}",
        )
        return progress

    def get(self, job: int) -> BulkProgress | None:
        return self._jobs.get(job)

    async def close(self) -> None:
        for task in self._tasks.values():
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
