"""Standard Webhooks signing and verification, as pure functions.

Nothing here touches the network, the database or the clock: callers pass
``now`` so a stored delivery re-verified a week later gets the verdict it had
when it arrived.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

SECRET_PREFIX = "whsec_"
HEADER_ID = "webhook-id"
HEADER_TIMESTAMP = "webhook-timestamp"
HEADER_SIGNATURE = "webhook-signature"
REQUIRED_HEADERS = (HEADER_ID, HEADER_TIMESTAMP, HEADER_SIGNATURE)


class Verdict(StrEnum):
    VERIFIED = "verified"
    UNSIGNED = "unsigned"
    MISSING_HEADERS = "missing_headers"
    BAD_TIMESTAMP = "bad_timestamp"
    EXPIRED = "expired"
    FUTURE = "future"
    INVALID_SIGNATURE = "invalid_signature"
    BAD_SECRET = "bad_secret"

    @property
    def accepted(self) -> bool:
        """Whether this verdict lets the delivery through with ``on_invalid = "reject"``."""
        return self in (Verdict.VERIFIED, Verdict.UNSIGNED)


@dataclass(frozen=True)
class Verification:
    verdict: Verdict
    detail: str


class SecretError(ValueError):
    """The configured secret is not ``whsec_`` followed by base64."""


def decode_secret(secret: str) -> bytes:
    """Return the HMAC key: the base64-decoded text after ``whsec_``.

    Replicate's docs once showed the secret text used as the key directly;
    the published Standard Webhooks vectors prove the decode is required.
    """
    text = secret.strip()
    if text.startswith(SECRET_PREFIX):
        text = text[len(SECRET_PREFIX) :]
    if not text:
        raise SecretError("the secret is empty")
    try:
        key = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise SecretError(f"the secret is not valid base64 after '{SECRET_PREFIX}': {exc}") from None
    if not key:
        raise SecretError("the secret decodes to zero bytes")
    return key


def signed_content(msg_id: str, timestamp: str, body: bytes) -> bytes:
    """The bytes a signature covers. surrogateescape: header text holds stray (non-UTF-8)
    bytes as surrogates (relay.model.decode_header_bytes); the sender signed those bytes."""
    return msg_id.encode("utf-8", "surrogateescape") + b"." + timestamp.encode() + b"." + body


def sign(key: bytes, msg_id: str, timestamp: int | str, body: bytes) -> str:
    """Return a ``webhook-signature`` value (one ``v1,`` entry) for these parts."""
    mac = hmac.new(key, signed_content(msg_id, str(timestamp), body), hashlib.sha256)
    return "v1," + base64.b64encode(mac.digest()).decode()


def header_value(headers: Iterable[tuple[str, str]], name: str) -> str | None:
    """First value of a header, case-insensitively, from ordered pairs."""
    wanted = name.lower()
    for key, value in headers:
        if key.lower() == wanted:
            return value
    return None


def _signature_matches(
    key: bytes, msg_id: str, timestamp: str, body: bytes, header: str
) -> tuple[bool, int, list[str]]:
    """Check every ``v1`` entry; return (matched, entries offered, versions offered)."""
    expected = hmac.new(key, signed_content(msg_id, timestamp, body), hashlib.sha256).digest()
    matched = False
    offered = 0
    versions: list[str] = []
    for entry in header.split():
        version, sep, encoded = entry.partition(",")
        if not sep:
            continue
        offered += 1
        if version not in versions:
            versions.append(version)
        if version != "v1":
            continue  # unknown versions are ignored, as the spec requires
        try:
            candidate = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            continue
        # compare_digest runs in constant time for equal-length inputs.
        if hmac.compare_digest(candidate, expected):
            matched = True
    return matched, offered, versions


def verify(
    headers: Iterable[tuple[str, str]],
    body: bytes,
    key: bytes | None,
    tolerance_seconds: int,
    now: float,
) -> Verification:
    """Give the verdict for one delivery as received at ``now``.

    ``key`` is the decoded secret (see :func:`decode_secret`), or ``None`` for
    a source without a secret.
    """
    if key is None:
        return Verification(Verdict.UNSIGNED, "no secret is configured for this source; nothing was checked")
    pairs = list(headers)
    values = {name: (header_value(pairs, name) or "").strip() for name in REQUIRED_HEADERS}
    missing = [name for name, value in values.items() if not value]
    if missing:
        return Verification(
            Verdict.MISSING_HEADERS,
            "missing or empty header" + ("s " if len(missing) > 1 else " ") + ", ".join(missing),
        )
    msg_id, raw_ts, sig_header = values[HEADER_ID], values[HEADER_TIMESTAMP], values[HEADER_SIGNATURE]
    if not (raw_ts.isascii() and raw_ts.isdigit()):
        return Verification(
            Verdict.BAD_TIMESTAMP, f"webhook-timestamp {raw_ts[:40]!r} is not an integer number of seconds"
        )
    timestamp = int(raw_ts)
    matched, offered, versions = _signature_matches(key, msg_id, raw_ts, body, sig_header)
    skew = int(now) - timestamp
    also = "the signature itself matches" if matched else "the signature does not match either"
    if skew > tolerance_seconds:
        return Verification(
            Verdict.EXPIRED,
            f"timestamp {skew} s older than the {tolerance_seconds} s tolerance ({also})",
        )
    if -skew > tolerance_seconds:
        return Verification(
            Verdict.FUTURE,
            f"timestamp {-skew} s in the future, beyond the {tolerance_seconds} s tolerance ({also})",
        )
    if matched:
        return Verification(Verdict.VERIFIED, f"signature matched; timestamp skew {skew} s")
    if offered == 0:
        detail = "no signature entries of the form 'v1,<base64>' were offered"
    elif "v1" not in versions:
        detail = f"{offered} signature(s) offered, none of version v1 (versions: {', '.join(versions)})"
    else:
        detail = (
            f"none of the {offered} signature(s) offered matched (versions: {', '.join(versions)}); "
            "the secret is probably wrong or the body was altered"
        )
    return Verification(Verdict.INVALID_SIGNATURE, detail)
