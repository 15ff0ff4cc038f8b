"""Turning model objects into the JSON shapes of the API (pure).

The UI templates, the CLI's ``--json`` output and ``relay connect`` read the
same shapes, so they are defined once here.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from relay.model import Attempt, Delivery, DeliverySummary, Forwarding, PredictionInfo, display_text, rfc3339
from relay.prediction import infer_events, parse_body


def body_text(body: bytes | None) -> str | None:
    """The body as text when it is UTF-8, else None (the base64 form is always given)."""
    if body is None:
        return None
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        return None


def pretty_body(body: bytes | None) -> str | None:
    """Indented JSON for display, or None when the body is not JSON."""
    document, fmt = parse_body(body)
    if fmt != "json":
        return None
    return json.dumps(document, indent=2, ensure_ascii=False)


def headers_json(headers: tuple[tuple[str, str], ...]) -> list[list[str]]:
    return [[display_text(name), display_text(value)] for name, value in headers]


def prediction_json(p: PredictionInfo) -> dict[str, Any]:
    return {"id": p.id, "status": p.status, "model": p.model, "version": p.version, "kind": p.kind}


def attempt_json(a: Attempt) -> dict[str, Any]:
    return {
        "id": a.id,
        "delivery": a.delivery_id,
        "kind": a.kind,
        "upstream": a.upstream,
        "target": a.target,
        "started_at": rfc3339(a.started_at),
        "duration_ms": round(a.duration_ms, 2),
        "status": a.status,
        "outcome": a.outcome,
        "error": a.error,
        "response_headers": headers_json(a.response_headers),
        "response_body": body_text(a.response_body),
        "response_body_base64": base64.b64encode(a.response_body).decode(),
        "response_truncated": a.response_truncated,
        "request_headers": headers_json(a.request_headers),
        "request_body_edited": a.request_body is not None,
    }


def forwarding_json(f: Forwarding) -> dict[str, Any]:
    return {
        "upstream": f.upstream,
        "state": f.state,
        "attempts_made": f.attempts_made,
        "next_attempt_at": rfc3339(f.next_attempt_at) if f.next_attempt_at and f.state == "pending" else None,
        "note": f.note,
        "attempts": [attempt_json(a) for a in f.attempts],
    }


def delivery_json(d: Delivery) -> dict[str, Any]:
    return {
        "id": d.id,
        "received_at": rfc3339(d.received_at),
        "source": d.source,
        "method": d.method,
        "path": d.path,
        "query": d.query,
        "headers": headers_json(d.headers),
        "body": body_text(d.body),
        "body_base64": None if d.body is None else base64.b64encode(d.body).decode(),
        "body_sha256": d.body_sha256,
        "body_format": d.body_format,
        "size": d.size,
        "peer": d.peer,
        "verdict": d.verdict.value,
        "verdict_detail": d.verdict_detail,
        "webhook_id": d.webhook_id,
        "prediction": prediction_json(d.prediction),
        "duplicate_of": d.duplicate_of,
        "forwarding": {f.upstream: forwarding_json(f) for f in d.forwarding},
        "replays": [attempt_json(a) for a in d.replays],
    }


def summary_json(s: DeliverySummary) -> dict[str, Any]:
    return {
        "id": s.id,
        "received_at": rfc3339(s.received_at),
        "source": s.source,
        "verdict": s.verdict.value,
        "verdict_detail": s.verdict_detail,
        "prediction": prediction_json(s.prediction),
        "size": s.size,
        "body_format": s.body_format,
        "duplicate_of": s.duplicate_of,
        "webhook_id": s.webhook_id,
        "forwarding": dict(s.forwarding),
    }


def timeline_json(prediction_id: str, deliveries: list[Delivery]) -> dict[str, Any]:
    """The lifecycle of one prediction: each delivery with its inferred event and timings."""
    documents = [parse_body(d.body)[0] for d in deliveries]
    events = infer_events(documents)
    first = deliveries[0].received_at if deliveries else None
    last_doc = next((doc for doc in reversed(documents) if isinstance(doc, dict)), {})
    metrics = last_doc.get("metrics") if isinstance(last_doc.get("metrics"), dict) else {}
    return {
        "prediction": prediction_id,
        "model": last_doc.get("model"),
        "version": last_doc.get("version"),
        "status": last_doc.get("status"),
        "created_at": last_doc.get("created_at"),
        "started_at": last_doc.get("started_at"),
        "completed_at": last_doc.get("completed_at"),
        "predict_time": metrics.get("predict_time") if metrics else None,
        "total_time": metrics.get("total_time") if metrics else None,
        "events": [
            {
                "delivery": d.id,
                "received_at": rfc3339(d.received_at),
                "since_first_ms": round((d.received_at - first) * 1000, 1) if first is not None else None,
                "status": d.prediction.status,
                "event": event,
                "verdict": d.verdict.value,
                "duplicate_of": d.duplicate_of,
                "forwarding": {f.upstream: f.state for f in d.forwarding},
            }
            for d, event in zip(deliveries, events, strict=True)
        ],
    }


def attempt_event(a: Attempt) -> dict[str, Any]:
    """The SSE ``attempt`` event for a recorded attempt (forward, replay or connect)."""
    return {
        "delivery": a.delivery_id,
        "upstream": a.upstream,
        "outcome": a.outcome,
        "status": a.status,
        "kind": a.kind,
        "attempt": a.id,
        "duration_ms": a.duration_ms,
    }
