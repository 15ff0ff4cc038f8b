"""The real CLI in a subprocess: serve, send-test, secret, and refusals at start-up."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from support import SECRET, free_port, relay_command, wait_until

ROOT = Path(__file__).resolve().parent.parent


def example_config(tmp_path: Path, upstream_url: str) -> tuple[Path, int, int]:
    """config.example.toml with the database in tmp_path, free ports, and our upstream."""
    ingest, ui = free_port(), free_port()
    text = (ROOT / "config.example.toml").read_text()
    text = text.replace('database = "relay.db"', f'database = "{tmp_path / "relay.db"}"')
    text = text.replace('"127.0.0.1:8080"', f'"127.0.0.1:{ingest}"').replace('"127.0.0.1:8081"', f'"127.0.0.1:{ui}"')
    text = text.replace('"http://127.0.0.1:3000/webhooks/replicate"', f'"{upstream_url}"')
    path = tmp_path / "relay.toml"
    path.write_text(text)
    return path, ingest, ui


async def run(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    proc = await asyncio.create_subprocess_exec(
        *relay_command(*args),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return subprocess.CompletedProcess(args, proc.returncode, out.decode(), err.decode())


async def test_serve_example_config_receives_send_test_and_forwards(tmp_path, upstream_factory, http):
    upstream = await upstream_factory()
    config, ingest, ui = example_config(tmp_path, upstream.url)
    env = {**os.environ, "REPLICATE_WEBHOOK_SECRET": SECRET}
    server = subprocess.Popen(
        relay_command("serve", "--config", str(config)),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:

        async def healthy() -> bool:
            try:
                async with http.get(f"http://127.0.0.1:{ingest}/healthz") as resp:
                    return resp.status == 200
            except OSError:
                return False

        await wait_until(healthy, timeout=20)
        result = await run(
            "send-test",
            "--url",
            f"http://127.0.0.1:{ingest}/webhooks/replicate?userId=7",
            env={"REPLICATE_WEBHOOK_SECRET": SECRET},
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.count("200 received") == 4
        for status in ("starting", "processing", "succeeded"):
            assert status in result.stdout
        await wait_until(lambda: len(upstream.received) == 4, timeout=20)
        assert all(r.path_qs == "/hook?userId=7" for r in upstream.received)
        server.send_signal(signal.SIGTERM)
        out, _ = server.communicate(timeout=30)
        assert server.returncode == 0, out
        assert "stopped" in out
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    db = sqlite3.connect(tmp_path / "relay.db")
    verdicts = db.execute("SELECT verdict, COUNT(*) FROM deliveries GROUP BY verdict").fetchall()
    states = db.execute("SELECT state, COUNT(*) FROM outbox GROUP BY state").fetchall()
    db.close()
    assert verdicts == [("verified", 4)]
    assert states == [("delivered", 4)]


async def test_send_test_reports_rejections_with_nonzero_exit(relay_factory):
    relay = await relay_factory()
    result = await run(
        "send-test",
        "--url",
        relay.bound.ingest_url + "/webhooks/replicate",
        "--secret",
        "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD",
    )
    assert result.returncode == 1
    assert "400 invalid signature" in result.stdout
    assert "4 of 4 webhooks were not accepted" in result.stderr


@pytest.mark.parametrize(
    ("toml", "key"),
    [
        ("[relay]\nbogus = 1\n", "relay.bogus"),
        ('[[sources]]\nname = "a"\npath = "/a"\nsecret = "whsec_!!!"\n', "sources[0].secret"),
        ('[[sources]]\nname = "a"\npath = "/a"\n[[sources]]\nname = "b"\npath = "/a"\n', "sources[1].path"),
        (
            '[[sources]]\nname = "a"\npath = "/a"\n[[upstreams]]\nname = "u"\nsource = "zz"\nurl = "http://x"\n',
            "upstreams[0].source",
        ),
        ('[relay]\nui_listen = "0.0.0.0:8081"\n', "relay.ui_listen"),
    ],
)
async def test_serve_refuses_bad_config_naming_the_key(tmp_path, toml, key):
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    result = await run("serve", "--config", str(path))
    assert result.returncode == 1
    assert key in result.stderr and "configuration refused" in result.stderr


async def fake_replicate(expected_token: str) -> TestServer:
    async def secret(request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != f"Bearer {expected_token}":
            return web.json_response({"detail": "Invalid token."}, status=401)
        return web.json_response({"key": SECRET})

    app = web.Application()
    app.router.add_get("/v1/webhooks/default/secret", secret)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    return server


async def test_secret_prints_and_writes_into_config(tmp_path):
    server = await fake_replicate("r8_good")
    try:
        base = str(server.make_url("")).rstrip("/")
        printed = await run("secret", "--api-base", base, env={"REPLICATE_API_TOKEN": "r8_good"})
        assert printed.returncode == 0 and printed.stdout.strip() == SECRET
        config = tmp_path / "relay.toml"
        config.write_text(
            '# mine\n[[sources]]\nname = "replicate"\npath = "/w"\nsecret_env = "X"\n\n'
            '[[upstreams]]\nname = "app"\nsource = "replicate"\nurl = "http://127.0.0.1:1/"\n'
        )
        wrote = await run(
            "secret", "--api-base", base, "--write-config", str(config), env={"REPLICATE_API_TOKEN": "r8_good"}
        )
        assert wrote.returncode == 0, wrote.stderr
        text = config.read_text()
        assert f'secret = "{SECRET}"' in text and "secret_env" not in text and text.startswith("# mine")
        from relay.config import load_config

        assert load_config(config, env={}).sources[0].secret is not None
        refused = await run("secret", "--api-base", base, env={"REPLICATE_API_TOKEN": "r8_bad"})
        assert refused.returncode == 1 and "401" in refused.stderr
    finally:
        await server.close()


async def test_secret_without_token_explains(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "REPLICATE_API_TOKEN"}
    proc = await asyncio.create_subprocess_exec(*relay_command("secret"), env=env, stderr=asyncio.subprocess.PIPE)
    _, err = await proc.communicate()
    assert proc.returncode == 1 and b"REPLICATE_API_TOKEN is not set" in err
