"""Parsing list filters from query parameters (API, UI, CLI alike), refusing bad values by name."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from datetime import datetime

from relay.verify import Verdict

STATES = ("pending", "delivered", "failed", "dead", "skipped")
DEFAULT_LIMIT = 50
MAX_LIMIT = 500
_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)\s*(s|m|h|d|w)$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class FilterError(ValueError):
    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param


@dataclass(frozen=True)
class DeliveryFilter:
    source: str | None = None
    verdict: str | None = None
    state: str | None = None
    upstream: str | None = None
    prediction: str | None = None
    status: str | None = None
    q: str | None = None
    since: float | None = None
    until: float | None = None
    before: int | None = None
    after: int | None = None
    limit: int = DEFAULT_LIMIT


def parse_time(param: str, text: str, now: float) -> float:
    """RFC 3339, Unix seconds, or an age such as ``24h``, ``30m``, ``7d`` (meaning now minus that)."""
    text = text.strip()
    match = _RELATIVE.match(text)
    if match:
        return now - float(match.group(1)) * _UNITS[match.group(2)]
    try:
        return float(text)
    except ValueError:
        pass
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise FilterError(param, f"expected RFC 3339, Unix seconds or an age like 24h, got {text!r}") from None
    if parsed.tzinfo is None:
        raise FilterError(param, f"give a time zone (e.g. Z) in {text!r}")
    return parsed.timestamp()


def _int(param: str, text: str, low: int, high: int | None = None) -> int:
    if not (text.isascii() and text.isdigit()):
        raise FilterError(param, f"expected a whole number, got {text!r}")
    value = int(text)
    high = 2**63 - 1 if high is None else high  # SQLite INTEGER range
    if value < low or value > high:
        raise FilterError(param, f"must be between {low} and {high}")
    return value


def parse_filter(params: Mapping[str, str], now: float) -> DeliveryFilter:
    """Build a DeliveryFilter from query parameters; empty values mean 'no filter'."""
    values = {k: v for k, v in params.items() if v != ""}
    known = {f.name for f in fields(DeliveryFilter)}
    for name in values:
        if name not in known:
            raise FilterError(name, f"unknown filter (known: {', '.join(sorted(known))})")
    verdict = values.get("verdict")
    if verdict is not None and verdict not in {v.value for v in Verdict}:
        raise FilterError("verdict", f"unknown verdict {verdict!r} (one of: {', '.join(v.value for v in Verdict)})")
    state = values.get("state")
    if state is not None and state not in STATES:
        raise FilterError("state", f"unknown state {state!r} (one of: {', '.join(STATES)})")
    since = parse_time("since", values["since"], now) if "since" in values else None
    until = parse_time("until", values["until"], now) if "until" in values else None
    if since is not None and until is not None and since > until:
        raise FilterError("since", "is after until")
    q = values.get("q")
    if q is not None and len(q) > 500:
        raise FilterError("q", "at most 500 characters")
    return DeliveryFilter(
        source=values.get("source"),
        verdict=verdict,
        state=state,
        upstream=values.get("upstream"),
        prediction=values.get("prediction"),
        status=values.get("status"),
        q=q,
        since=since,
        until=until,
        before=_int("before", values["before"], 1) if "before" in values else None,
        after=_int("after", values["after"], 0) if "after" in values else None,
        limit=_int("limit", values["limit"], 1, MAX_LIMIT) if "limit" in values else DEFAULT_LIMIT,
    )


def fts_phrase(q: str) -> str:
    """Quote user text as one FTS5 phrase so its punctuation is never query syntax.

    A NUL would end FTS5's query string early ("unterminated string"); it separates words
    like any other punctuation, so it becomes a space.
    """
    return '"' + q.replace("\x00", " ").replace('"', '""') + '"'


def search_words(text: str) -> str:
    """Text reduced to its words, split where SQLite's unicode61 tokenizer splits (at
    everything but letters and digits), for PostgreSQL's parser: left alone it keeps
    URLs, paths and hosts whole, so "sdxl" would not find "stability-ai/sdxl"."""
    return " ".join(_NOT_WORD.split(text)).strip()


_NOT_WORD = re.compile(r"[\W_]+")
