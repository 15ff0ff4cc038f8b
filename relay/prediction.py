"""What a Replicate webhook body says about its prediction, derived for filtering only.

The stored body stays the raw bytes; this module never changes it.
"""

from __future__ import annotations

import json
from typing import Any

from relay.model import PredictionInfo, display_text

KNOWN_STATUSES = ("starting", "processing", "succeeded", "failed", "canceled", "aborted")
TERMINAL_STATUSES = ("succeeded", "failed", "canceled", "aborted")


def _text(value: Any) -> str | None:
    if isinstance(value, str) and value:
        return display_text(value[:500])
    return None


def parse_body(body: bytes | None) -> tuple[Any, str]:
    """Return (parsed JSON or None, body_format)."""
    if body is None:
        return None, "too_large"
    if not body.strip():
        return None, "empty"
    try:
        return json.loads(body), "json"
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None, "non_json"


def extract(document: Any) -> PredictionInfo:
    """Pick id, status, model, version and kind out of a prediction or training object.

    Unknown statuses are kept verbatim: Replicate may add new ones.
    """
    if not isinstance(document, dict):
        return PredictionInfo()
    urls = document.get("urls") if isinstance(document.get("urls"), dict) else {}
    get_url = urls.get("get", "") if isinstance(urls, dict) else ""
    kind = "prediction"
    if "destination" in document or (isinstance(get_url, str) and "/trainings/" in get_url):
        kind = "training"
    return PredictionInfo(
        id=_text(document.get("id")),
        status=_text(document.get("status")),
        model=_text(document.get("model")),
        version=_text(document.get("version")),
        kind=kind if _text(document.get("id")) else None,
    )


def infer_events(documents: list[Any]) -> list[str]:
    """Name the webhook event of each body of one prediction, in arrival order.

    Replicate does not send the event type; it follows from the status and
    from what changed since the previous body: ``start``, ``output``, ``logs``
    or ``completed``.
    """
    events: list[str] = []
    previous: dict[str, Any] = {}
    for document in documents:
        doc = document if isinstance(document, dict) else {}
        status = doc.get("status")
        if status in TERMINAL_STATUSES:
            events.append("completed")
        elif status == "starting":
            events.append("start")
        elif doc.get("output") is not None and doc.get("output") != previous.get("output"):
            events.append("output")
        else:
            events.append("logs")
        previous = doc
    return events
