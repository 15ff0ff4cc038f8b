"""The request the relay sends onwards, built from a stored delivery (pure).

Forwarding, replay, ``relay connect`` and ``relay export --curl`` all build
their request here, so they agree on which headers pass, how the query string
is joined and how re-signing works.
"""

from __future__ import annotations

from dataclasses import dataclass

from relay.model import HeaderPairs
from relay.verify import HEADER_ID, HEADER_SIGNATURE, HEADER_TIMESTAMP, sign

# RFC 9110 §7.6.1 connection-specific headers, plus those the client library
# recomputes for the new connection (Host, Content-Length).
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
        "expect",
    }
)
RELAY_HEADER = "X-Relay-Delivery"


@dataclass(frozen=True)
class OutgoingRequest:
    method: str
    url: str
    headers: HeaderPairs
    body: bytes


def join_query(url: str, query: str) -> str:
    """Append the original raw query string to a target URL, keeping both intact."""
    if not query:
        return url
    base, _, fragment = url.partition("#")
    sep = "&" if "?" in base else "?"
    if base.endswith(("?", "&")):
        sep = ""
    return base + sep + query + (f"#{fragment}" if fragment else "")


def build_request(
    *,
    method: str,
    target_url: str,
    query: str,
    headers: HeaderPairs,
    body: bytes,
    delivery_id: int,
    peer: str | None,
    proto: str = "http",
    sign_key: bytes | None = None,
    now: int | None = None,
    webhook_id: str | None = None,
    relay_headers: bool = True,
) -> OutgoingRequest:
    """Build the onward request.

    With ``sign_key`` the ``webhook-timestamp`` becomes ``now`` and the
    signature is made afresh (over ``webhook_id`` when given, else the
    original id); otherwise the original ``webhook-*`` headers pass unchanged,
    so the receiver's own verification works on the untouched bytes.
    """
    connection_named = {
        token.strip().lower() for name, value in headers if name.lower() == "connection" for token in value.split(",")
    }
    dropped = HOP_BY_HOP | connection_named
    if relay_headers:
        dropped = dropped | {"x-relay-delivery"}
    out: list[tuple[str, str]] = []
    forwarded_for: str | None = None
    original_id: str | None = None
    for name, value in headers:
        lower = name.lower()
        if lower in dropped:
            continue
        if lower == HEADER_ID and original_id is None:
            original_id = value.strip()
        if relay_headers and lower == "x-forwarded-for":
            forwarded_for = value if forwarded_for is None else f"{forwarded_for}, {value}"
            continue
        if relay_headers and lower == "x-forwarded-proto":
            proto = value
            continue
        out.append((name, value))
    if sign_key is not None:
        if now is None:
            raise ValueError("re-signing needs the current time")
        msg_id = webhook_id or original_id or f"msg_relay_{delivery_id}"
        fresh = {HEADER_ID: msg_id, HEADER_TIMESTAMP: str(now), HEADER_SIGNATURE: sign(sign_key, msg_id, now, body)}
        out = [(n, v) for n, v in out if n.lower() not in fresh]
        out.extend((name, value) for name, value in fresh.items())
    if relay_headers:
        chain = ", ".join(part for part in (forwarded_for, peer) if part)
        if chain:
            out.append(("X-Forwarded-For", chain))
        out.append(("X-Forwarded-Proto", proto))
        out.append((RELAY_HEADER, str(delivery_id)))
    return OutgoingRequest(method, join_query(target_url, query), tuple(out), body)
