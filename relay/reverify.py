"""Re-verifying a stored delivery, against the time it was received (so the answer is stable)."""

from __future__ import annotations

from typing import Any

from relay.config import Config
from relay.model import Delivery
from relay.verify import SecretError, Verdict, decode_secret, verify


def reverify(config: Config, delivery: Delivery, secret: str | None = None) -> dict[str, Any]:
    """The verdict for this delivery with the given secret, or the source's configured one.

    For secret rotation and wrong-secret debugging: the stored verdict is not
    changed; the answer shows both.
    """
    source = next((s for s in config.sources if s.name == delivery.source), None)
    tolerance = source.tolerance_seconds if source else 300
    if secret:
        try:
            key: bytes | None = decode_secret(secret)
        except SecretError as exc:
            return {
                "verdict": Verdict.BAD_SECRET.value,
                "detail": str(exc),
                "secret": "given",
                "stored_verdict": delivery.verdict.value,
            }
        used = "given"
    else:
        key = source.secret.key if source and source.secret else None
        used = "configured" if key else "none"
    if delivery.body is None:
        return {
            "verdict": Verdict.INVALID_SIGNATURE.value,
            "secret": used,
            "stored_verdict": delivery.verdict.value,
            "detail": "not checked: the body was over max_body_bytes and was not kept",
        }
    result = verify(delivery.headers, delivery.body, key, tolerance, delivery.received_at)
    return {
        "verdict": result.verdict.value,
        "detail": result.detail,
        "secret": used,
        "stored_verdict": delivery.verdict.value,
    }
