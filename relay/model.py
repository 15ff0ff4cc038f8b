"""Value objects shared by ingest, storage, forwarding and the admin side."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from relay.verify import Verdict

HeaderPairs = tuple[tuple[str, str], ...]
Clock = Callable[[], float]  # wall-clock seconds; injected so tests can fix time


def decode_header_bytes(raw: bytes) -> str:
    """Header bytes to text that round-trips: UTF-8, with stray bytes as surrogates."""
    return raw.decode("utf-8", "surrogateescape")


def display_text(text: str) -> str:
    """Text safe to show or to store in a text column: stray bytes (kept as surrogates by
    decode_header_bytes) and lone surrogates (a JSON "\\ud800" escape) become U+FFFD.
    Bodies and headers are stored as they came; this is for what is shown or indexed."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:  # not stray bytes: surrogates that never were UTF-8
        return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")


def headers_to_json(headers: HeaderPairs) -> str:
    return json.dumps([list(pair) for pair in headers])


def headers_from_json(text: str) -> HeaderPairs:
    return tuple((str(name), str(value)) for name, value in json.loads(text))


def rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class PredictionInfo:
    """The fields of a Replicate prediction or training body that the relay indexes."""

    id: str | None = None
    status: str | None = None
    model: str | None = None
    version: str | None = None
    kind: str | None = None


@dataclass(frozen=True)
class Capture:
    """One request exactly as the ingest listener received it, with its verdict."""

    received_at: float
    source: str
    method: str
    path: str
    query: str
    headers: HeaderPairs
    body: bytes | None  # None when the body was over max_body_bytes and not kept
    size: int
    peer: str | None
    verdict: Verdict
    verdict_detail: str
    body_sha256: str
    webhook_id: str | None
    body_format: str  # json, non_json, empty, too_large
    prediction: PredictionInfo = field(default_factory=PredictionInfo)


@dataclass(frozen=True)
class PlannedForward:
    """An outbox row to create with the delivery: pending, or skipped with a reason."""

    upstream: str
    state: str
    order_key: str | None
    note: str | None = None


@dataclass(frozen=True)
class Attempt:
    """One HTTP attempt to send a delivery somewhere (forward, replay or connect)."""

    delivery_id: int
    kind: str
    target: str
    started_at: float
    duration_ms: float
    status: int | None
    response_headers: HeaderPairs
    response_body: bytes
    response_truncated: bool
    error: str | None
    outcome: str
    upstream: str | None = None
    request_headers: HeaderPairs = ()
    request_body: bytes | None = None  # only when it differs from the stored body
    id: int | None = None


@dataclass(frozen=True)
class Forwarding:
    """The state of one delivery towards one upstream, with its attempts."""

    upstream: str
    state: str
    attempts_made: int
    next_attempt_at: float | None
    note: str | None
    attempts: tuple[Attempt, ...] = ()


@dataclass(frozen=True)
class Delivery:
    id: int
    received_at: float
    source: str
    method: str
    path: str
    query: str
    headers: HeaderPairs
    body: bytes | None
    size: int
    peer: str | None
    verdict: Verdict
    verdict_detail: str
    body_sha256: str
    webhook_id: str | None
    body_format: str
    prediction: PredictionInfo
    duplicate_of: int | None
    forwarding: tuple[Forwarding, ...] = ()
    replays: tuple[Attempt, ...] = ()


@dataclass(frozen=True)
class OutboxItem:
    """A due outbox row joined with what is needed to send it."""

    outbox_id: int
    delivery_id: int
    upstream: str
    attempts_made: int
    method: str
    query: str
    headers: HeaderPairs
    body: bytes
    peer: str | None
    webhook_id: str | None
    already_delivered_as: int | None  # an earlier identical delivery this upstream acknowledged


@dataclass(frozen=True)
class DeliverySummary:
    """A row of the deliveries list: enough to scan, without bodies and attempts."""

    id: int
    received_at: float
    source: str
    verdict: Verdict
    verdict_detail: str
    prediction: PredictionInfo
    size: int
    body_format: str
    duplicate_of: int | None
    webhook_id: str | None
    forwarding: tuple[tuple[str, str], ...]  # (upstream, state)
