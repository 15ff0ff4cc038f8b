"""``relay connect``: stream a deployed relay's deliveries to a local dev server.

The laptop connects *out* to the team's relay (its admin API, with the token),
so nothing needs to reach the laptop from outside. Progress is kept as the id
of the last delivery handled: after a dropped stream, a laptop sleep or a
restart of the remote relay, the client asks the database-backed list API for
everything after that id, in order, before following the live stream again;
the in-memory event stream is only a doorbell, so nothing can be skipped.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp

from relay.http_client import HttpClient
from relay.outgoing import build_request
from relay.sender import SendResult, send

log = logging.getLogger(__name__)

PAGE = 500
RECONNECT_MAX_SECONDS = 15.0


class ConnectError(RuntimeError):
    """The remote relay refused us (bad token, wrong URL): retrying will not help."""


@dataclass(frozen=True)
class ConnectOptions:
    remote: str
    token: str | None
    target: str
    sign_key: bytes | None  # None: keep the original signature headers
    filters: dict[str, str]
    timeout_seconds: float = 30.0


@dataclass(frozen=True)
class Forwarded:
    delivery: dict[str, Any]
    result: SendResult


class Connector:
    def __init__(self, options: ConnectOptions, on_forwarded: Callable[[Forwarded], None]) -> None:
        self.options = options
        self.on_forwarded = on_forwarded
        self.last_id = 0
        headers = {"Authorization": f"Bearer {options.token}"} if options.token else {}
        self._api = aiohttp.ClientSession(base_url=None, headers=headers, timeout=aiohttp.ClientTimeout(total=60))
        self._local = HttpClient()

    async def close(self) -> None:
        await self._api.close()
        await self._local.close()

    def _url(self, path: str) -> str:
        return self.options.remote.rstrip("/") + path

    async def _get(self, path: str, params: dict[str, str] | None = None) -> Any:
        async with self._api.get(self._url(path), params=params) as resp:
            if resp.status == 401:
                raise ConnectError(f"{self.options.remote} refused the token (HTTP 401)")
            if resp.status == 403:
                raise ConnectError(f"{self.options.remote} refused the request (HTTP 403): {await resp.text()}")
            if resp.status >= 400:
                raise ConnectError(f"{self.options.remote}{path} answered HTTP {resp.status}: {await resp.text()}")
            return await resp.json()

    async def start_at(self, since: str | None) -> None:
        """Set the starting point: a delivery id, an age such as 1h (backfill), or now."""
        if since is None:
            page = await self._get("/api/deliveries", {"limit": "1"})
            self.last_id = page["deliveries"][0]["id"] if page["deliveries"] else 0
        elif since.isdigit():
            self.last_id = int(since) - 1
        else:
            page = await self._get("/api/deliveries", {"until": since, "limit": "1"})
            self.last_id = page["deliveries"][0]["id"] if page["deliveries"] else 0

    async def catch_up(self) -> int:
        """Forward every matching delivery after ``last_id``, oldest first."""
        ids: list[int] = []
        before: int | None = None
        while True:  # the list API pages newest first; collect back to last_id
            params = {**self.options.filters, "after": str(self.last_id), "limit": str(PAGE)}
            if before is not None:
                params["before"] = str(before)
            page = await self._get("/api/deliveries", params)
            ids.extend(item["id"] for item in page["deliveries"])
            if page["next"] is None:
                break
            before = page["next"]
        for delivery_id in sorted(ids):
            await self._forward(delivery_id)
            self.last_id = delivery_id
        return len(ids)

    async def _forward(self, delivery_id: int) -> None:
        delivery = await self._get(f"/api/deliveries/{delivery_id}")
        if delivery["body_base64"] is None:
            log.warning("delivery %s has no stored body (over the size limit); skipped", delivery_id)
            return
        now = int(time.time())
        request = build_request(
            method=delivery["method"],
            target_url=self.options.target,
            query=delivery["query"],
            headers=tuple((name, value) for name, value in delivery["headers"]),
            body=base64.b64decode(delivery["body_base64"]),
            delivery_id=delivery_id,
            peer=None,
            sign_key=self.options.sign_key,
            now=now,
        )
        result = await send(self._local, request, self.options.timeout_seconds, wall_clock=float(now))
        self.on_forwarded(Forwarded(delivery, result))
        await self._record(delivery_id, request.url, result)

    async def _record(self, delivery_id: int, target: str, result: SendResult) -> None:
        """Tell the remote relay, so the team sees who replayed what to where (kind ``connect``)."""
        payload = {
            "kind": "connect",
            "target": target,
            "started_at": result.started_at,
            "duration_ms": result.duration_ms,
            "status": result.status,
            "error": result.error,
            "response_headers": [list(pair) for pair in result.headers],
            "response_body_base64": base64.b64encode(result.body).decode(),
            "response_truncated": result.truncated,
        }
        async with self._api.post(self._url(f"/api/deliveries/{delivery_id}/attempts"), json=payload) as resp:
            if resp.status >= 400:
                log.warning("the remote relay did not record the attempt: HTTP %s", resp.status)

    async def follow(self, stop: asyncio.Event) -> None:
        """Catch up, then follow the event stream; reconnect with backoff and catch up again."""
        delay = 0.5
        while not stop.is_set():
            try:
                await self.catch_up()
                async with self._api.get(
                    self._url("/api/events"), timeout=aiohttp.ClientTimeout(total=None, sock_read=45)
                ) as resp:
                    if resp.status == 401:
                        raise ConnectError(f"{self.options.remote} refused the token (HTTP 401)")
                    if resp.status != 200:
                        raise ConnectError(f"{self.options.remote}/api/events answered HTTP {resp.status}")
                    delay = 0.5
                    await self.catch_up()  # anything that arrived before the stream was open
                    async for line in resp.content:
                        if stop.is_set():
                            return
                        if line.startswith(b"event: delivery"):
                            await self.catch_up()
            except ConnectError:
                raise
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                log.warning("connection to %s lost (%s); reconnecting in %.1f s", self.options.remote, exc, delay)
                try:
                    await asyncio.wait_for(stop.wait(), delay)
                except TimeoutError:
                    pass
                delay = min(delay * 2, RECONNECT_MAX_SECONDS)
