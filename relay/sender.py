"""Sending one OutgoingRequest with aiohttp and recording exactly what came back.

The response body is read up to a cap and the connection dropped after it,
so an upstream answering 50 MB costs 64 KiB of memory, not 50 MB.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import aiohttp
from yarl import URL

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
    session: aiohttp.ClientSession,
    request: OutgoingRequest,
    timeout_seconds: float,
    wall_clock: float | None = None,
    body_cap: int = RESPONSE_BODY_CAP,
) -> SendResult:
    """Send once; never raises for network trouble, which is reported in ``error``."""
    started_at = time.time() if wall_clock is None else wall_clock
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    timeout = aiohttp.ClientTimeout(total=timeout_seconds)
    try:
        async with session.request(
            request.method,
            URL(request.url, encoded=True),
            headers=list(request.headers),
            data=request.body,
            timeout=timeout,
            allow_redirects=False,
            # Send only the stored headers: no client defaults mixed into the user's request.
            skip_auto_headers=("Content-Type", "User-Agent", "Accept", "Accept-Encoding"),
        ) as resp:
            chunks: list[bytes] = []
            size = 0
            truncated = False
            while size <= body_cap:
                chunk = await resp.content.read(min(65536, body_cap + 1 - size))
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
            body = b"".join(chunks)
            if len(body) > body_cap:
                body, truncated = body[:body_cap], True
                resp.close()  # drop the connection rather than read the rest
            headers = tuple((k.decode("latin-1"), v.decode("latin-1")) for k, v in resp.raw_headers)
            return SendResult(started_at, (loop.time() - t0) * 1000, resp.status, headers, body, truncated, None)
    except TimeoutError:
        error = f"timed out after {timeout_seconds:g} s"
    except aiohttp.ClientError as exc:
        error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    except OSError as exc:
        error = f"{type(exc).__name__}: {exc}"
    return SendResult(started_at, (loop.time() - t0) * 1000, None, (), b"", False, error)
