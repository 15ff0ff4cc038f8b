"""A realistic Replicate prediction lifecycle, for ``relay send-test`` and the tests.

The bodies follow the prediction object Replicate POSTs (SPEC §1): the same
id through ``starting``, ``processing`` with growing logs and output, and a
final ``succeeded`` with metrics and timestamps.
"""

from __future__ import annotations

import json
import secrets
import string
import time
from datetime import UTC, datetime
from typing import Any

from relay.verify import sign

MODEL = "black-forest-labs/flux-schnell"
VERSION = "5599ed30703defd1d160a25a63321b4dec97101d98b4674bcc56e41f62f35637"


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def new_prediction_id() -> str:
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(26))


def prediction_lifecycle(prediction_id: str, webhook_url: str, now: float | None = None) -> list[dict[str, Any]]:
    """Four webhook bodies: starting, processing (logs), processing (output), succeeded."""
    t0 = time.time() if now is None else now
    base: dict[str, Any] = {
        "id": prediction_id,
        "model": MODEL,
        "version": VERSION,
        "input": {"prompt": "an astronaut riding a horse, photorealistic", "num_outputs": 2, "seed": 42},
        "logs": "",
        "output": None,
        "data_removed": False,
        "error": None,
        "source": "api",
        "status": "starting",
        "created_at": _iso(t0),
        "started_at": None,
        "completed_at": None,
        "urls": {
            "cancel": f"https://api.replicate.com/v1/predictions/{prediction_id}/cancel",
            "get": f"https://api.replicate.com/v1/predictions/{prediction_id}",
            "stream": f"https://stream.replicate.com/v1/files/{prediction_id}",
            "web": f"https://replicate.com/p/{prediction_id}",
        },
        "webhook": webhook_url,
        "webhook_events_filter": ["start", "output", "logs", "completed"],
        "metrics": {},
    }
    out_url = f"https://replicate.delivery/xezq/{prediction_id}/out-{{}}.webp"
    started = {**base, "status": "processing", "started_at": _iso(t0 + 0.4), "logs": "Using seed: 42\n"}
    logs2 = started["logs"] + "  0%|          | 0/4 [00:00<?, ?it/s]\n 50%|█████     | 2/4 [00:00<00:00, 9.1it/s]\n"
    output = {**started, "logs": logs2, "output": [out_url.format(0)]}
    logs3 = logs2 + "100%|██████████| 4/4 [00:00<00:00, 9.3it/s]\n"
    done = {
        **output,
        "status": "succeeded",
        "logs": logs3,
        "output": [out_url.format(0), out_url.format(1)],
        "completed_at": _iso(t0 + 1.7),
        "metrics": {"image_count": 2, "predict_time": 1.2874, "total_time": 1.7021},
    }
    return [base, started, output, done]


def encode(document: dict[str, Any]) -> bytes:
    """Serialise like Replicate: compact JSON, UTF-8."""
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()


def signed_headers(
    key: bytes | None, body: bytes, msg_id: str | None = None, timestamp: int | None = None
) -> dict[str, str]:
    """Headers Replicate would send with this body (no webhook-* when there is no key)."""
    headers = {"Content-Type": "application/json", "User-Agent": "Replicate-Webhooks/1.0 (relay send-test)"}
    if key is None:
        return headers
    msg_id = msg_id or "msg_" + secrets.token_urlsafe(18)
    ts = int(time.time()) if timestamp is None else timestamp
    headers.update(
        {"webhook-id": msg_id, "webhook-timestamp": str(ts), "webhook-signature": sign(key, msg_id, ts, body)}
    )
    return headers
