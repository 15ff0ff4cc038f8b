"""Forwarding decisions as pure functions: who gets a delivery, what an answer means, when to retry.

Kept free of aiohttp and SQLite so the rules can be read, and tested, on
their own; the forwarder only carries them out.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from email.utils import parsedate_to_datetime

from relay.config import SourceConfig, UpstreamConfig
from relay.model import PlannedForward
from relay.verify import Verdict

RETRY_AFTER_CAP_SECONDS = 24 * 3600.0

# Outcome names recorded on attempts.
DELIVERED = "delivered"
RETRY = "retry"
FAILED = "failed"
DEAD = "dead"


def plan_forwards(
    source: SourceConfig,
    upstreams: tuple[UpstreamConfig, ...],
    verdict: Verdict,
    body_kept: bool,
    prediction_id: str | None,
) -> list[PlannedForward]:
    """One outbox row per upstream of the source: pending, or skipped with the reason."""
    plans = []
    for upstream in upstreams:
        order_key = prediction_id if upstream.ordered else None
        if not body_kept:
            plans.append(PlannedForward(upstream.name, "skipped", None, "body over max_body_bytes was not kept"))
        elif not verdict.accepted and not source.forward_invalid:
            plans.append(
                PlannedForward(
                    upstream.name, "skipped", None, f"not forwarded: {verdict.value} (forward_invalid = false)"
                )
            )
        else:
            plans.append(PlannedForward(upstream.name, "pending", order_key))
    return plans


def is_retryable_status(status: int) -> bool:
    return status in (408, 429) or 500 <= status <= 599


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP-date), or None."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return min(float(value), RETRY_AFTER_CAP_SECONDS)
    try:
        when = parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    return min(max(when - now, 0.0), RETRY_AFTER_CAP_SECONDS)


def backoff_seconds(attempt_number: int, base: float, cap: float, rand: Callable[[], float] = random.random) -> float:
    """Delay before retry ``attempt_number`` + 1: exponential, capped, with ±25 % jitter.

    Jitter spreads the retries of a burst that failed together so that a
    recovering upstream is not hit by all of them in the same second.
    """
    delay = min(cap, base * (2 ** max(attempt_number - 1, 0)))
    return float(delay * (0.75 + 0.5 * rand()))


def decide(
    status: int | None,
    retry_after: str | None,
    attempt_number: int,
    upstream: UpstreamConfig,
    now: float,
    rand: Callable[[], float] = random.random,
) -> tuple[str, float | None]:
    """The outcome of attempt ``attempt_number`` (1-based) and when to try next.

    ``status`` is None for a connection error or timeout.
    """
    if status is not None and 200 <= status <= 299:
        return DELIVERED, None
    if status is not None and not is_retryable_status(status):
        return FAILED, None
    if attempt_number >= upstream.max_attempts:
        return DEAD, None
    delay = backoff_seconds(attempt_number, upstream.retry_base_seconds, upstream.retry_max_seconds, rand)
    if status == 429 or status == 503:
        honoured = parse_retry_after(retry_after, now)
        if honoured is not None:
            delay = honoured
    return RETRY, now + delay
