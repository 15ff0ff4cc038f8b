"""Sending one OutgoingRequest and recording exactly what came back.

The response body is read up to a cap and the connection dropped after it,
so an upstream answering 50 MB costs 64 KiB of memory, not 50 MB.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from relay.http_client import HttpClient, HttpError
from relay.model import Attempt, HeaderPairs
from relay.outgoing import OutgoingRequest

RESPONSE_BODY_CAP = 64 * 1024


@dataclass(frozen=True)
class SendResult:
    started_at: float
    duration_ms: float
    status: int | None
    headers: HeaderPairs
    body: bytes
    truncated: bool
    error: str | None

    def header(self, name: str) -> str | None:
        wanted = name.lower()
        return next((v for k, v in self.headers if k.lower() == wanted), None)

    def attempt(
        self,
        request: OutgoingRequest,
        *,
        delivery_id: int,
        kind: str,
        outcome: str,
        upstream: str | None,
        request_body: bytes | None = None,
    ) -> Attempt:
        """The record of this send, as stored for forward, replay and connect alike."""
        return Attempt(
            delivery_id=delivery_id,
            kind=kind,
            target=request.url,
            started_at=self.started_at,
            duration_ms=self.duration_ms,
            status=self.status,
            response_headers=self.headers,
            response_body=self.body,
            response_truncated=self.truncated,
            error=self.error,
            outcome=outcome,
            upstream=upstream,
            request_headers=request.headers,
            request_body=request_body,
        )


async def send(
    client: HttpClient,
    request: OutgoingRequest,
    timeout_seconds: float,
    wall_clock: float | None = None,
    body_cap: int = RESPONSE_BODY_CAP,
) -> SendResult:
    """Send once; never raises for network trouble, which is reported in ``error``."""
    started_at = time.time() if wall_clock is None else wall_clock
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    try:
        async with asyncio.timeout(timeout_seconds):
            # Only the stored headers are sent, plus Host and Content-Length for the new connection.
            response = await client.request(
                request.method, request.url, request.headers, request.body, body_cap=body_cap
            )
    except TimeoutError:
        error = f"timed out after {timeout_seconds:g} s"
    except HttpError as exc:
        error = str(exc)
    except (OSError, ValueError) as exc:  # connect, DNS, TLS; a URL or header the client refuses
        error = f"{type(exc).__name__}: {exc}"
    else:
        duration = (loop.time() - t0) * 1000
        return SendResult(
            started_at, duration, response.status, response.headers, response.body, response.truncated, None
        )
    return SendResult(started_at, (loop.time() - t0) * 1000, None, (), b"", False, error)
