"""The inspection CLI in subprocesses (``python -m relay ...``) against the database of a running relay.

list, show, verify, diff, export --json and replay (single and bulk) read and
write the same SQLite file the relay is using; what they record is then read
back through the relay's API, so both sides of the shared database are checked.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from relay.lifecycle import encode, prediction_lifecycle
from relay.service import Relay

from support import (
    INGEST_PATH,
    KEY,
    OTHER_SECRET,
    SECRET,
    UserHandler,
    ingest,
    make_config,
    relay_command,
    signed,
    wait_until,
)

ANSI = "\x1b["


# --- helpers ---------------------------------------------------------------------------


async def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run the real CLI; no signing secret leaks in from the environment unless given."""
    base = {k: v for k, v in os.environ.items() if k != "REPLICATE_WEBHOOK_SECRET"}
    proc = await asyncio.create_subprocess_exec(
        *relay_command(*args),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**base, "COLUMNS": "200", **(env or {})},
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return subprocess.CompletedProcess(args, proc.returncode, out.decode(), err.decode())


def write_config(tmp_path: Path, db: Path, upstream_url: str | None = None, secret: str = SECRET) -> Path:
    """A TOML config for the CLI with the source secret inline (and optionally upstream up0)."""
    text = (
        f'[relay]\ndatabase = "{db}"\n\n[[sources]]\nname = "replicate"\npath = "{INGEST_PATH}"\nsecret = "{secret}"\n'
    )
    if upstream_url:
        text += f'\n[[upstreams]]\nname = "up0"\nsource = "replicate"\nurl = "{upstream_url}"\nmax_attempts = 1\n'
    path = tmp_path / "cli.toml"
    path.write_text(text)
    return path


async def api_get(http: aiohttp.ClientSession, relay: Relay, path: str) -> Any:
    assert relay.bound is not None
    async with http.get(relay.bound.admin_url + path) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


def lifecycle(prediction_id: str) -> list[bytes]:
    return [encode(d) for d in prediction_lifecycle(prediction_id, "http://relay/w", now=1_700_000_000)]


async def post_lifecycle(http: aiohttp.ClientSession, relay: Relay, prediction_id: str) -> list[int]:
    now = int(time.time())
    return [
        await ingest(http, relay, body, signed(body, msg_id=f"msg_{prediction_id}_{i}", timestamp=now + i))
        for i, body in enumerate(lifecycle(prediction_id))
    ]


def ids_of(stdout: str) -> list[int]:
    return [d["id"] for d in json.loads(stdout)["deliveries"]]


# --- list and show ---------------------------------------------------------------------


async def test_list_and_show_read_the_running_relays_database(relay_factory, http, tmp_path):
    db = tmp_path / "relay.db"
    relay = await relay_factory(make_config(str(db)))
    lifecycle_ids = await post_lifecycle(http, relay, "pred_cli_list")
    bad_body = lifecycle("pred_cli_bad")[0]
    bad = await ingest(http, relay, bad_body, signed(bad_body, key=b"not the secret"), expect=400)
    everything = [*lifecycle_ids, bad]

    listed, as_json, invalid, page1, bad_filter = await asyncio.gather(
        cli("list", "--database", str(db)),
        cli("list", "--json", "--database", str(db)),
        cli("list", "--json", "--verdict", "invalid_signature", "--database", str(db)),
        cli("list", "--json", "--prediction", "pred_cli_list", "--limit", "2", "--database", str(db)),
        cli("list", "--verdict", "nope", "--database", str(db)),
    )
    assert listed.returncode == 0, listed.stderr
    assert ANSI not in listed.stdout  # not a terminal: no colours
    rows = [line for line in listed.stdout.splitlines() if "pred_cli" in line]
    assert len(rows) == 5
    assert [int(re.search(r"\d+", row).group()) for row in rows] == everything[::-1]  # newest first
    assert sum("invalid_signature" in row for row in rows) == 1 and sum("verified" in row for row in rows) == 4
    assert "succeeded" in rows[1] and "starting" in rows[-1]

    assert as_json.returncode == 0, as_json.stderr
    assert ids_of(as_json.stdout) == everything[::-1]
    assert json.loads(as_json.stdout)["next"] is None
    assert json.loads(as_json.stdout) == await api_get(http, relay, "/api/deliveries")
    assert ids_of(invalid.stdout) == [bad]
    assert json.loads(invalid.stdout)["deliveries"][0]["verdict"] == "invalid_signature"
    assert ids_of(page1.stdout) == lifecycle_ids[:1:-1]
    cursor = json.loads(page1.stdout)["next"]
    assert cursor == lifecycle_ids[2]
    page2 = await cli(
        "list",
        "--json",
        "--prediction",
        "pred_cli_list",
        "--limit",
        "2",
        "--before",
        str(cursor),
        "--database",
        str(db),
    )
    assert ids_of(page2.stdout) == lifecycle_ids[1::-1]
    assert bad_filter.returncode == 1 and "verdict: unknown verdict 'nope'" in bad_filter.stderr

    shown, shown_bad, shown_json, missing = await asyncio.gather(
        cli("show", str(lifecycle_ids[3]), "--database", str(db)),
        cli("show", str(bad), "--database", str(db)),
        cli("show", str(lifecycle_ids[3]), "--json", "--database", str(db)),
        cli("show", "999", "--database", str(db)),
    )
    assert shown.returncode == 0, shown.stderr
    out = shown.stdout
    assert f"Delivery #{lifecycle_ids[3]}" in out
    assert re.search(r"verdict verified\s+signature matched", out)
    assert "prediction pred_cli_list  succeeded" in out
    assert re.search(r"webhook-id\s+msg_pred_cli_list_3", out)
    assert re.search(r"webhook-signature\s+v1,", out)
    assert '"status": "succeeded"' in out  # the body, pretty-printed
    assert ANSI not in out
    assert "verdict invalid_signature" in shown_bad.stdout
    assert "none of the 1 signature(s) offered matched" in shown_bad.stdout
    assert json.loads(shown_json.stdout) == await api_get(http, relay, f"/api/deliveries/{lifecycle_ids[3]}")
    assert missing.returncode == 1
    assert "no delivery 999" in missing.stderr


async def test_commands_explain_a_missing_database(tmp_path):
    result = await cli("list", "--database", str(tmp_path / "nothing-here.db"))
    assert result.returncode == 1
    assert "no database at" in result.stderr
    assert not (tmp_path / "nothing-here.db").exists()


# --- verify ----------------------------------------------------------------------------

T0 = 1_700_000_000.0


async def test_verify_exit_codes_and_verdicts_judged_at_receive_time(relay_factory, http, tmp_path):
    db = tmp_path / "relay.db"
    relay = await relay_factory(make_config(str(db)), clock=lambda: T0)  # received long ago
    body = lifecycle("pred_cli_verify")[3]
    did = await ingest(http, relay, body, signed(body, timestamp=int(T0)))
    config = write_config(tmp_path, db)

    configured, from_env, other, garbage, unknown = await asyncio.gather(
        cli("verify", str(did), "--database", str(db), "--config", str(config)),
        cli("verify", str(did), "--database", str(db), env={"REPLICATE_WEBHOOK_SECRET": SECRET}),
        cli("verify", str(did), "--secret", OTHER_SECRET, "--database", str(db), "--config", str(config)),
        cli("verify", str(did), "--secret", "whsec_%%%", "--database", str(db)),
        cli("verify", "999", "--database", str(db), "--config", str(config)),
    )
    assert configured.returncode == 0, configured.stderr
    assert configured.stdout.startswith("verified")
    assert "secret: configured; stored verdict: verified" in configured.stdout
    assert from_env.returncode == 0 and from_env.stdout.startswith("verified")  # the embedded default reads the env
    assert other.returncode == 1
    assert other.stdout.startswith("invalid_signature")
    assert "secret: given; stored verdict: verified" in other.stdout
    assert garbage.returncode == 1 and garbage.stdout.startswith("bad_secret")
    assert unknown.returncode == 1 and "no delivery 999" in unknown.stderr


async def test_verify_of_an_expired_delivery_fails_with_the_skew(relay_factory, http, tmp_path):
    db = tmp_path / "relay.db"
    relay = await relay_factory(make_config(str(db), source={"on_invalid": "accept"}))
    body = lifecycle("pred_cli_expired")[3]
    did = await ingest(http, relay, body, signed(body, timestamp=int(time.time()) - 3600))
    result = await cli("verify", str(did), "--database", str(db), "--config", str(write_config(tmp_path, db)))
    assert result.returncode == 1
    assert result.stdout.startswith("expired")
    assert re.search(r"timestamp 36\d\d s older than the 300 s tolerance", result.stdout)


# --- diff ------------------------------------------------------------------------------


async def test_diff_prints_changes_and_json(relay_factory, upstream_factory, http, tmp_path):
    db = tmp_path / "relay.db"
    upstream = await upstream_factory(script=[503], then=200)
    relay = await relay_factory(make_config(str(db), upstreams=[{"url": upstream.url, "max_attempts": 3}]))
    ids = await post_lifecycle(http, relay, "pred_cli_diff")
    first = lifecycle("pred_cli_diff")[0]
    same_headers = signed(first, msg_id="msg_same", timestamp=int(time.time()))
    twin_a = await ingest(http, relay, first, same_headers)
    twin_b = await ingest(http, relay, first, same_headers)

    async def settled() -> bool:
        return await relay.store.outbox_states() == {"delivered": len(ids) + 1, "skipped": 1}

    await wait_until(settled, timeout=15)
    attempts = (await api_get(http, relay, f"/api/deliveries/{ids[0]}"))["forwarding"]["up0"]["attempts"]
    assert [a["status"] for a in attempts] == [503, 200]

    pair, shortcut, as_json, twins, no_earlier, by_attempt = await asyncio.gather(
        cli("diff", str(ids[2]), str(ids[3]), "--database", str(db)),
        cli("diff", str(ids[3]), "--database", str(db)),
        cli("diff", str(ids[2]), str(ids[3]), "--json", "--database", str(db)),
        cli("diff", str(twin_a), str(twin_b), "--database", str(db)),
        cli("diff", str(ids[0]), "--database", str(db)),
        cli("diff", "--attempts", str(attempts[0]["id"]), str(attempts[1]["id"]), "--database", str(db)),
    )
    assert pair.returncode == 0, pair.stderr
    out = pair.stdout
    assert ANSI not in out
    assert f"--- delivery {ids[2]}" in out and f"+++ delivery {ids[3]}" in out
    assert '~ /status: "processing" → "succeeded"' in out
    assert "~ /logs: " in out
    assert re.search(r"^[+~-] /output", out, re.MULTILINE)
    assert "~ header webhook-id: msg_pred_cli_diff_2 → msg_pred_cli_diff_3" in out
    assert "identical" not in out
    # B alone: against the previous event of its prediction. (Lines are compared as a set: the
    # order of ops on object keys follows jsonpatch's set iteration, which varies per process.)
    assert sorted(shortcut.stdout.splitlines()) == sorted(out.splitlines())

    result = json.loads(as_json.stdout)
    assert unordered(result) == unordered(await api_get(http, relay, f"/api/diff?a={ids[2]}&b={ids[3]}"))
    assert {"op": "replace", "path": "/status", "value": "succeeded", "old": "processing"} in result["body"]

    assert twins.returncode == 0 and "identical" in twins.stdout
    assert no_earlier.returncode == 1 and "no earlier event of the same prediction" in no_earlier.stderr
    assert by_attempt.returncode == 0, by_attempt.stderr
    assert "~ status 503 → 200" in by_attempt.stdout
    assert "-answer 503" in by_attempt.stdout and "+answer 200" in by_attempt.stdout


async def test_diff_prints_values_verbatim_even_when_they_look_like_markup(relay_factory, http, tmp_path):
    """Model logs such as torch's ``[rank0]:`` lines must appear as sent, not be taken for colour tags."""
    db = tmp_path / "relay.db"
    relay = await relay_factory(make_config(str(db)))
    before = {"id": "pred_cli_markup", "status": "processing", "logs": "starting\n"}
    after = {**before, "logs": "starting\n[rank0]: loading weights [done]\n"}
    ids = [await ingest(http, relay, encode(doc), signed(encode(doc))) for doc in (before, after)]
    result = await cli("diff", str(ids[0]), str(ids[1]), "--database", str(db))
    assert result.returncode == 0, result.stderr
    assert json.dumps(after["logs"], ensure_ascii=False) in result.stdout, result.stdout


def unordered(result: dict[str, Any]) -> dict[str, Any]:
    return {**result, "body": sorted(result["body"], key=lambda op: json.dumps(op, sort_keys=True))}


# --- export --json ---------------------------------------------------------------------


async def test_export_json_prints_the_record(relay_factory, http, tmp_path):
    db = tmp_path / "relay.db"
    relay = await relay_factory(make_config(str(db)))
    body = lifecycle("pred_cli_export")[2]
    did = await ingest(http, relay, body, signed(body), query="userId=1")
    exported, missing = await asyncio.gather(
        cli("export", str(did), "--json", "--database", str(db)),
        cli("export", "999", "--json", "--database", str(db)),
    )
    assert exported.returncode == 0, exported.stderr
    record = json.loads(exported.stdout)
    assert record == await api_get(http, relay, f"/api/deliveries/{did}")
    assert record["body"] == body.decode() and record["query"] == "userId=1" and record["verdict"] == "verified"
    assert missing.returncode == 1 and "no delivery 999" in missing.stderr


# --- replay ----------------------------------------------------------------------------


@pytest.fixture
async def handler(user_handler_factory: Any) -> UserHandler:
    return await user_handler_factory("/dev/webhook")


async def test_replay_one_keep_signature_resigned_and_edited_body(relay_factory, http, tmp_path, handler):
    db = tmp_path / "relay.db"
    relay = await relay_factory(make_config(str(db), source={"on_invalid": "accept"}))
    body = lifecycle("pred_cli_replay")[3]
    old_ts = int(time.time()) - 3600
    did = await ingest(http, relay, body, signed(body, msg_id="msg_cli_old", timestamp=old_ts), query="userId=9")
    config = write_config(tmp_path, db)
    common = ("--database", str(db), "--config", str(config))

    kept = await cli("replay", str(did), "--to", handler.url, "--keep-signature", *common)
    assert kept.returncode == 1, kept.stdout + kept.stderr
    assert "HTTP 400" in kept.stdout and "handler: InvalidTimestampError" in kept.stdout
    assert handler.arrivals[-1].headers["webhook-timestamp"] == str(old_ts)

    fresh = await cli("replay", str(did), "--to", handler.url, *common)
    assert fresh.returncode == 0, fresh.stdout + fresh.stderr
    assert "HTTP 200" in fresh.stdout and f"{handler.url}?userId=9" in fresh.stdout
    got = handler.arrivals[-1]
    assert (got.path_qs, got.body, got.verdict) == ("/dev/webhook?userId=9", body, "ok")
    assert got.headers["webhook-id"] == "msg_cli_old" and abs(int(got.headers["webhook-timestamp"]) - time.time()) <= 10

    edited = '{"id":"pred_cli_replay","status":"failed","error":"edited — ✓ it\'s mine"}'.encode()
    body_file = tmp_path / "edited.json"
    body_file.write_bytes(edited)
    replaced = await cli("replay", str(did), "--to", handler.url, "--keep-signature", "--body", str(body_file), *common)
    assert replaced.returncode == 0, replaced.stdout + replaced.stderr
    assert handler.arrivals[-1].body == edited and handler.arrivals[-1].verdict == "ok"
    assert len(handler.arrivals) == 3

    # What the CLI recorded is what the running relay shows.
    record = await api_get(http, relay, f"/api/deliveries/{did}")
    assert [(r["kind"], r["status"], r["request_body_edited"]) for r in record["replays"]] == [
        ("replay", 400, False),
        ("replay", 200, False),
        ("replay", 200, True),
    ]
    assert "InvalidTimestampError" in record["replays"][0]["response_body"]
    assert record["body"] == body.decode()
    shown = await cli("show", str(did), "--database", str(db))
    assert shown.returncode == 0, shown.stderr
    target = f"{handler.url}?userId=9"
    assert re.findall(r"↺ replay to (\S+): (\d+)", shown.stdout) == [(target, "400"), (target, "200"), (target, "200")]


async def test_replay_refusals(relay_factory, http, tmp_path, handler):
    db = tmp_path / "relay.db"
    relay = await relay_factory(make_config(str(db)))
    body = lifecycle("pred_cli_refuse")[0]
    did = await ingest(http, relay, body, signed(body))
    config = str(write_config(tmp_path, db))
    neither, unknown_up, unknown_id, bad_url, no_secret = await asyncio.gather(
        cli("replay", str(did), "--database", str(db), "--config", config),
        cli("replay", str(did), "--upstream", "nope", "--database", str(db), "--config", config),
        cli("replay", "999", "--to", handler.url, "--database", str(db), "--config", config),
        cli("replay", str(did), "--to", "ftp://127.0.0.1/x", "--database", str(db), "--config", config),
        cli("replay", str(did), "--to", handler.url, "--database", str(db)),  # no config, no env: no secret
    )
    assert neither.returncode == 2 and "give exactly one of --to URL or --upstream NAME" in neither.stderr
    assert unknown_up.returncode == 1 and "no upstream named 'nope'" in unknown_up.stderr
    assert unknown_id.returncode == 1 and "no delivery 999" in unknown_id.stderr
    assert bad_url.returncode == 1 and "url: expected an http:// or https:// URL" in bad_url.stderr
    assert no_secret.returncode == 1 and "no secret to re-sign with" in no_secret.stderr
    assert handler.arrivals == []
    assert (await api_get(http, relay, f"/api/deliveries/{did}"))["replays"] == []


def summary_row(stdout: str) -> tuple[int, int, int]:
    """The numbers of the sent / 2xx / failed table."""
    lines = stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if re.search(r"sent\W+2xx\W+failed", line))
    numbers = next(re.findall(r"\d+", line) for line in lines[header + 1 :] if re.search(r"\d", line))
    sent, ok, failed = (int(n) for n in numbers)
    return sent, ok, failed


async def test_bulk_replay_of_dead_deliveries_prints_a_summary(relay_factory, upstream_factory, http, tmp_path):
    db = tmp_path / "relay.db"
    upstream = await upstream_factory(then=503)
    relay = await relay_factory(make_config(str(db), upstreams=[{"url": upstream.url, "max_attempts": 1}]))
    ids = []
    for i in range(20):
        body = json.dumps({"id": f"pred_cli_bulk_{i:02d}", "status": "succeeded", "output": [i]}).encode()
        ids.append(await ingest(http, relay, body, signed(body, key=KEY)))

    async def all_dead() -> bool:
        return await relay.store.outbox_states() == {"dead": 20}

    await wait_until(all_dead, timeout=15)
    config = str(write_config(tmp_path, db, upstream_url=upstream.url))
    bulk = ("replay", "--state", "dead", "--upstream", "up0", "--yes", "--database", str(db), "--config", config)

    # Still down: every replay fails, the exit code says so, nothing changes state.
    before = len(upstream.received)
    down = await cli(*bulk)
    assert down.returncode == 1, down.stdout + down.stderr
    assert summary_row(down.stdout) == (20, 0, 20)
    assert len(upstream.received) == before + 20
    assert await relay.store.outbox_states() == {"dead": 20}

    upstream.then = 200
    before = len(upstream.received)
    up = await cli(*bulk)
    assert up.returncode == 0, up.stdout + up.stderr
    assert summary_row(up.stdout) == (20, 20, 0)
    replayed = collections.Counter(
        next(v for k, v in r.headers if k.lower() == "x-relay-delivery") for r in upstream.received[before:]
    )
    assert replayed == collections.Counter({str(i): 1 for i in ids})
    assert await relay.store.outbox_states() == {"delivered": 20}
    record = await api_get(http, relay, f"/api/deliveries/{ids[0]}")
    assert [(r["kind"], r["status"]) for r in record["replays"]] == [("replay", 503), ("replay", 200)]

    nothing_left = await cli(*bulk)
    assert nothing_left.returncode == 0
    assert summary_row(nothing_left.stdout) == (0, 0, 0)
    assert len(upstream.received) == before + 20
