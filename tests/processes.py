"""Real ``relay serve`` processes and a recording upstream, for the crash and scale-out tests."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from support import SECRET, relay_command, wait_until

ROOT = Path(__file__).resolve().parent.parent
INGEST_PATH = "/webhooks/replicate"


def write_config(
    tmp_path: Path,
    upstream_url: str,
    ingest: int,
    ui: int,
    database: str | None = None,
    upstream_timeout: float = 5,
    relay_extra: str = "",
    name: str = "relay.toml",
    commit_timeout: float = 5,
) -> Path:
    """A config for ``relay serve``: one signed source, one upstream retried quickly and for long."""
    path = tmp_path / name
    path.write_text(
        f"""
[relay]
database = "{database or tmp_path / "relay.db"}"
ingest_listen = "127.0.0.1:{ingest}"
ui_listen = "127.0.0.1:{ui}"
commit_timeout_seconds = {commit_timeout}
{relay_extra}

[[sources]]
name = "replicate"
path = "{INGEST_PATH}"
secret = "{SECRET}"

[[upstreams]]
name = "app"
source = "replicate"
url = "{upstream_url}"
timeout_seconds = {upstream_timeout}
max_attempts = 1000
retry_base_seconds = 0.05
retry_max_seconds = 0.2
"""
    )
    return path


class RelayProcess:
    """``relay serve --config FILE`` in a subprocess, restartable on the same database and ports."""

    def __init__(self, config: Path, ingest: int, log: Path) -> None:
        self.config = config
        self.ingest = ingest
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.ingest}{INGEST_PATH}"

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                relay_command("serve", "--config", str(self.config)),
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=ROOT,  # run this working tree's relay package
            )
        self.starts += 1

    async def healthy(self, http: aiohttp.ClientSession, timeout: float = 20) -> None:
        async def ok() -> bool:
            assert self.proc is not None
            assert self.proc.poll() is None, f"relay exited with {self.proc.returncode}:\n{self.tail()}"
            try:
                async with http.get(f"http://127.0.0.1:{self.ingest}/healthz") as resp:
                    return resp.status == 200
            except (aiohttp.ClientError, OSError):
                return False

        await wait_until(ok, timeout=timeout, interval=0.05)

    async def wait_exit(self, timeout: float) -> int:
        assert self.proc is not None
        proc = self.proc
        await wait_until(lambda: proc.poll() is not None, timeout=timeout, interval=0.02)
        assert proc.returncode is not None
        return proc.returncode

    async def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        assert await self.wait_exit(10) == -signal.SIGKILL

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@dataclass
class RecordingUpstream:
    """Records (X-Relay-Delivery, webhook-id) of every request; optionally slow to answer.

    A slow upstream answers after ``delay`` plus up to 0.2 s (varying per request, as
    real latencies do), so the answers to a burst come back over a spread of time.
    """

    delay: float = 0.0
    seen: list[tuple[int, str]] = field(default_factory=list)
    arrived_at: list[float] = field(default_factory=list)  # time.monotonic() of each entry of ``seen``
    in_flight: int = 0
    first_at: float | None = None  # time.monotonic() of the first request
    url: str = ""

    async def handle(self, request: web.Request) -> web.Response:
        await request.read()
        if self.first_at is None:
            self.first_at = time.monotonic()
        self.seen.append((int(request.headers["X-Relay-Delivery"]), request.headers.get("webhook-id", "")))
        self.arrived_at.append(time.monotonic())
        self.in_flight += 1
        try:
            if self.delay:
                await asyncio.sleep(self.delay)
        finally:
            self.in_flight -= 1
        return web.Response(text="ok")

    def webhook_ids(self) -> set[str]:
        return {wid for _, wid in self.seen}


def make_bodies(run: str, count: int) -> list[tuple[str, bytes]]:
    """``count`` unique (webhook-id, body) pairs: four lifecycle events per prediction."""
    out = []
    for i in range(count):
        prediction, step = f"p{run}{i // 4:05d}", ("starting", "processing", "processing", "succeeded")[i % 4]
        doc: dict[str, Any] = {
            "id": prediction,
            "model": "black-forest-labs/flux-schnell",
            "status": step,
            "logs": f"step {i % 4}\n" + "x" * (i % 97),
            "output": None if i % 4 < 2 else [f"https://replicate.delivery/{prediction}/out-{i % 4}.webp"],
            "input": {"prompt": "an astronaut riding a horse \u2603", "seed": i},
        }
        out.append((f"msg_{run}_{i:05d}", json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()))
    return out


def split_by_prediction(bodies: list[tuple[str, bytes]], posters: int) -> list[list[tuple[str, bytes]]]:
    """One prediction's events go to one poster, in order (as Replicate sends them)."""
    shares: list[list[tuple[str, bytes]]] = [[] for _ in range(posters)]
    for i, item in enumerate(bodies):
        shares[(i // 4) % posters].append(item)
    return shares
