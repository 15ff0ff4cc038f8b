"""Diff (pure functions and the API) and export as a curl command that bash runs against a real server.

The diff functions of relay.diff are tested directly; the API is tested on a
real relay; the exported curl command is produced by the real CLI in a
subprocess and executed by ``bash``, and what arrives at a real aiohttp
server is compared byte for byte with what the relay stored.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import subprocess
import time
from typing import Any

import aiohttp
import jsonpatch
import jsonpointer
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.diff import diff_bodies, diff_headers, json_ops
from relay.lifecycle import encode, prediction_lifecycle
from relay.service import Relay

from support import INGEST_PATH, SECRET, UserHandler, ingest, make_config, relay_command, signed, wait_until

HOP = {"host", "content-length"}


# --- helpers ---------------------------------------------------------------------------


async def api_get(http: aiohttp.ClientSession, relay: Relay, path: str) -> tuple[int, Any]:
    assert relay.bound is not None
    async with http.get(relay.bound.admin_url + path) as resp:
        if resp.content_type == "application/json":
            return resp.status, await resp.json()
        return resp.status, await resp.text()


def lifecycle(prediction_id: str) -> list[dict[str, Any]]:
    return prediction_lifecycle(prediction_id, "http://relay/webhooks/replicate", now=1_700_000_000)


def without_old(ops: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in op.items() if k != "old"} for op in ops]


def check_old_values(old: Any, new: Any) -> list[dict[str, Any]]:
    """Each op's ``old`` is the value it replaces or removes at the moment it applies, and the ops turn old into new."""
    ops = json_ops(old, new)
    doc = copy.deepcopy(old)
    for op in ops:
        if op["op"] in ("replace", "remove"):
            assert op["old"] == jsonpointer.resolve_pointer(doc, op["path"]), (op, doc)
        elif op["op"] == "move":
            assert op["old"] == jsonpointer.resolve_pointer(doc, op["from"]), (op, doc)
        doc = jsonpatch.apply_patch(doc, without_old([op]))
    assert doc == new
    return ops


# --- pure diff -------------------------------------------------------------------------


def test_processing_to_succeeded_gives_status_output_and_logs_ops_with_old_values():
    docs = lifecycle("pred_pure")
    result = diff_bodies(encode(docs[2]), encode(docs[3]))
    assert result["text"] is None and result["same"] is False
    ops = result["body"]
    by_path = {op["path"]: op for op in ops}
    assert by_path["/status"] == {"op": "replace", "path": "/status", "value": "succeeded", "old": "processing"}
    assert by_path["/logs"]["op"] == "replace"
    assert by_path["/logs"]["old"] == docs[2]["logs"] and by_path["/logs"]["value"] == docs[3]["logs"]
    output_ops = [op for op in ops if op["path"].startswith("/output")]
    assert output_ops, ops
    assert jsonpatch.apply_patch(docs[2], without_old(ops)) == docs[3]
    check_old_values(docs[2], docs[3])


def test_identical_json_bodies_give_an_empty_diff_even_when_formatted_differently():
    body = encode(lifecycle("pred_same")[3])
    assert diff_bodies(body, body) == {"body": [], "text": None, "same": True}
    spaced = json.dumps(json.loads(body), indent=2).encode()
    assert diff_bodies(body, spaced) == {"body": [], "text": None, "same": True}


def test_non_json_bodies_get_a_unified_text_diff():
    result = diff_bodies(b"line one\nline two\n", b"line one\nline 2\n", "left", "right")
    assert result["body"] is None and result["same"] is False
    text = result["text"]
    assert text.splitlines()[:2] == ["--- left", "+++ right"]
    assert "-line two" in text.splitlines() and "+line 2" in text.splitlines()
    assert " line one" in text.splitlines()
    assert diff_bodies(b"same text", b"same text") == {"body": None, "text": None, "same": True}
    mixed = diff_bodies(b'{"a": 1}', b"not json")
    assert mixed["body"] is None and "+not json" in mixed["text"]


@pytest.mark.parametrize(
    ("old", "new"),
    [
        # a prediction's output list shrinking (e.g. comparing a 3-image and a 1-image delivery)
        ({"output": ["a.webp", "b.webp", "c.webp"]}, {"output": ["a.webp"]}),
        ({"output": ["a.webp", "b.webp", "c.webp", "d.webp"]}, {"output": ["b.webp", "d.webp"]}),
        ({"x": 1, "y": [{"k": 1}, {"k": 2}]}, {"y": [{"k": 2}]}),
        ({"a": {"b": 1}}, {"c": {"b": 1}}),
    ],
)
def test_old_values_are_those_each_op_replaces_in_sequence(old, new):
    check_old_values(old, new)


# Prediction-like documents: objects nesting objects, and arrays of one kind (URLs, numbers, small
# objects). Arrays mixing nulls, scalars and arrays are left out: jsonpatch's own move detection
# produces unusable patches for some of those (stefankoegl/python-json-patch#124, #138, #179).
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 3) | st.sampled_from(["a", "b", "c"]),
    lambda children: (
        st.lists(st.integers(0, 3), max_size=5)
        | st.lists(st.sampled_from(["a.webp", "b.webp", "c.webp"]), max_size=5)
        | st.lists(st.fixed_dictionaries({"k": st.integers(0, 2)}), max_size=4)
        | st.dictionaries(st.sampled_from("pqrs"), children, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=200, deadline=None)
@given(json_values, json_values)
def test_property_ops_turn_a_into_b_and_carry_the_right_old_values(old, new):
    check_old_values(old, new)


def test_header_diff_lists_added_removed_and_changed_case_insensitively():
    a = (
        ("Content-Type", "application/json"),
        ("X-Old", "1"),
        ("webhook-id", "msg_1"),
        ("X-Dup", "a"),
        ("x-dup", "b"),
        ("X-Same", "v"),
    )
    b = (("content-type", "application/json"), ("X-New", "2"), ("Webhook-Id", "msg_2"), ("X-Dup", "a"), ("X-Same", "v"))
    assert diff_headers(a, b) == [
        {"op": "changed", "name": "Webhook-Id", "old": "msg_1", "new": "msg_2"},
        {"op": "changed", "name": "X-Dup", "old": "a, b", "new": "a"},
        {"op": "added", "name": "X-New", "old": None, "new": "2"},
        {"op": "removed", "name": "X-Old", "old": "1", "new": None},
    ]
    assert diff_headers(a, a) == []


# --- diff through the API --------------------------------------------------------------


async def test_api_diff_of_a_lifecycle_pair_headers_shortcut_and_identical(relay_factory, http, tmp_path):
    relay = await relay_factory(make_config(str(tmp_path / "relay.db")))
    docs = lifecycle("pred_api")
    now = int(time.time())
    ids = []
    extra = [{}, {}, {"X-Trace": "one", "X-Gone": "yes"}, {"X-Trace": "two", "X-New": "1"}]
    for i, doc in enumerate(docs):
        body = encode(doc)
        ids.append(await ingest(http, relay, body, {**signed(body, msg_id=f"msg_{i}", timestamp=now + i), **extra[i]}))
        if i == 2:  # another prediction's event in between: the shortcut must skip it
            other = encode(lifecycle("pred_other")[0])
            other_id = await ingest(http, relay, other, signed(other))

    status, result = await api_get(http, relay, f"/api/diff?a={ids[2]}&b={ids[3]}")
    assert status == 200, result
    assert (result["a"], result["b"], result["kind"]) == (ids[2], ids[3], "deliveries")
    by_path = {op["path"]: op for op in result["body"]}
    assert by_path["/status"] == {"op": "replace", "path": "/status", "value": "succeeded", "old": "processing"}
    assert by_path["/logs"]["op"] == "replace" and by_path["/logs"]["old"] == docs[2]["logs"]
    assert any(op["path"].startswith("/output") for op in result["body"])
    assert result["text"] is None and result["same"] is False
    headers = {h["name"].lower(): h for h in result["headers"]}
    assert headers["x-trace"] == {"op": "changed", "name": "X-Trace", "old": "one", "new": "two"}
    assert headers["x-gone"] == {"op": "removed", "name": "X-Gone", "old": "yes", "new": None}
    assert headers["x-new"] == {"op": "added", "name": "X-New", "old": None, "new": "1"}
    assert (headers["webhook-id"]["old"], headers["webhook-id"]["new"]) == ("msg_2", "msg_3")
    assert headers["webhook-timestamp"]["op"] == "changed"
    assert "content-type" not in headers and "user-agent" not in headers

    status, shortcut = await api_get(http, relay, f"/api/diff?b={ids[3]}")
    assert status == 200
    assert shortcut == result  # the previous event of the same prediction, not delivery {other_id}
    assert other_id not in (shortcut["a"], shortcut["b"])
    status, first = await api_get(http, relay, f"/api/diff?b={ids[0]}")
    assert status == 404 and "no earlier event of the same prediction" in first["error"]

    again = encode(docs[3])
    dup = await ingest(http, relay, again, signed(again, msg_id="msg_again", timestamp=now + 9))
    status, same = await api_get(http, relay, f"/api/diff?a={ids[3]}&b={dup}")
    assert status == 200
    assert (same["body"], same["same"], same["text"]) == ([], True, None)
    assert {h["name"].lower() for h in same["headers"]} >= {"webhook-id", "webhook-signature"}


async def test_api_diff_of_text_bodies_and_bad_parameters(relay_factory, http, tmp_path):
    relay = await relay_factory(make_config(str(tmp_path / "relay.db")))
    a = b"line one\nline two\n"
    b = b"line one\nline 2\n"
    ida = await ingest(http, relay, a, {**signed(a), "Content-Type": "text/plain"})
    idb = await ingest(http, relay, b, {**signed(b), "Content-Type": "text/plain"})
    status, result = await api_get(http, relay, f"/api/diff?a={ida}&b={idb}")
    assert status == 200
    assert result["body"] is None and result["same"] is False
    lines = result["text"].splitlines()
    assert lines[:2] == [f"--- delivery {ida}", f"+++ delivery {idb}"]
    assert "-line two" in lines and "+line 2" in lines

    for query, param in (("a=1", "b"), ("a=x&b=1", "a"), ("b=1&attempt_b=z", "attempt_b")):
        status, answer = await api_get(http, relay, f"/api/diff?{query}")
        assert status == 400, (query, answer)
        assert answer["param"] == param and answer["error"].startswith(f"{param}:")
    status, answer = await api_get(http, relay, f"/api/diff?a={ida}&b=999")
    assert (status, answer) == (404, {"error": "no delivery 999"})


async def test_api_diff_of_two_attempts_shows_status_and_response_changes(
    relay_factory, upstream_factory, http, tmp_path
):
    upstream = await upstream_factory(script=[503], then=200)
    relay = await relay_factory(
        make_config(str(tmp_path / "relay.db"), upstreams=[{"url": upstream.url, "max_attempts": 3}])
    )
    body = encode(lifecycle("pred_attempts")[3])
    did = await ingest(http, relay, body, signed(body))
    record: dict[str, Any] = {}

    async def delivered() -> bool:
        _, got = await api_get(http, relay, f"/api/deliveries/{did}")
        record.update(got)
        return got["forwarding"]["up0"]["state"] == "delivered"

    await wait_until(delivered, timeout=10)
    first, second = (a["id"] for a in record["forwarding"]["up0"]["attempts"])

    status, result = await api_get(http, relay, f"/api/diff?attempt_a={first}&attempt_b={second}")
    assert status == 200, result
    assert (result["kind"], result["a"], result["b"]) == ("attempts", first, second)
    assert result["status"] == {"old": 503, "new": 200}
    assert result["body"] is None
    assert "-answer 503" in result["text"].splitlines() and "+answer 200" in result["text"].splitlines()

    status, shortcut = await api_get(http, relay, f"/api/diff?attempt_b={second}")
    assert status == 200 and shortcut == result
    status, none = await api_get(http, relay, f"/api/diff?attempt_b={first}")
    assert status == 404 and "no earlier attempt" in none["error"]
    status, missing = await api_get(http, relay, "/api/diff?attempt_a=1&attempt_b=999")
    assert (status, missing) == (404, {"error": "no attempt 999"})


# --- export through bash ---------------------------------------------------------------


@pytest.fixture
async def receiver(user_handler_factory: Any) -> UserHandler:
    """A user's handler (the replicate validator, 300 s) that records exact arrivals."""
    return await user_handler_factory("/local/hook")


async def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "REPLICATE_WEBHOOK_SECRET"}
    proc = await asyncio.create_subprocess_exec(
        *relay_command(*args), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return subprocess.CompletedProcess(args, proc.returncode, out.decode(), err.decode())


async def bash(command: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    proc = await asyncio.create_subprocess_exec(
        "bash", "-c", command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return subprocess.CompletedProcess(command, proc.returncode, out.decode(), err.decode())


def comparable(headers: Any) -> list[tuple[str, str]]:
    return [(k.lower(), v) for k, v in headers if k.lower() not in HOP]


def header(headers: Any, name: str) -> str:
    return next(v for k, v in headers if k.lower() == name)


TRICKY_DOC = {
    "id": "pred_export",
    "status": "succeeded",
    "output": 'it\'s a "test" $HOME `id` $(echo x) \\n %s %d ünïcødé ✓ \t tab',
    "logs": "line 1\nline 2\n",
}


async def test_exported_curl_run_by_bash_reproduces_body_query_and_signature(relay_factory, http, tmp_path, receiver):
    db = tmp_path / "relay.db"
    relay = await relay_factory(make_config(str(db)))
    body = json.dumps(TRICKY_DOC, indent=2, ensure_ascii=False).encode() + b"\n"
    query = "userId=123&jobId=456&note=a%20b+c&empty="
    headers = {**signed(body), "X-Custom": "v 'quoted' \"double\"", "Accept": "*/*"}
    did = await ingest(http, relay, body, headers, query=query)
    stored = await relay.store.get_delivery(did)
    assert stored.verdict == "verified"

    exported = await cli("export", str(did), "--curl", "--database", str(db), "--to", receiver.url)
    assert exported.returncode == 0, exported.stderr
    assert exported.stdout.startswith("printf ") and "curl " in exported.stdout
    ran = await bash(exported.stdout)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout == "handler: ok"
    assert len(receiver.arrivals) == 1
    got = receiver.arrivals[0]
    assert got.verdict == "ok"  # the replicate validator, 300 s tolerance, original signature
    assert got.body == body
    assert got.path_qs == f"/local/hook?{query}"
    for name in ("webhook-id", "webhook-timestamp", "webhook-signature"):
        assert header(got.raw_headers, name) == headers[name]
    assert comparable(got.raw_headers) == comparable(stored.headers)  # same headers, same order, nothing added


async def test_exported_curl_without_target_goes_back_to_the_relay_and_matches_the_api_export(
    relay_factory, http, tmp_path
):
    db = tmp_path / "relay.db"
    relay = await relay_factory(make_config(str(db)))
    body = encode(lifecycle("pred_home")[3])
    did = await ingest(http, relay, body, signed(body), query="userId=7")

    exported = await cli("export", str(did), "--database", str(db))
    assert exported.returncode == 0, exported.stderr
    status, from_api = await api_get(http, relay, f"/api/deliveries/{did}/export")
    assert status == 200 and from_api == exported.stdout
    ran = await bash(exported.stdout)
    assert ran.returncode == 0, ran.stderr
    answer = json.loads(ran.stdout)
    assert answer["received"] is True
    again = await relay.store.get_delivery(answer["delivery"])
    original = await relay.store.get_delivery(did)
    assert again.body == original.body and again.query == "userId=7"
    assert again.verdict == "verified"
    assert again.duplicate_of == did  # same webhook-id and body: the relay sees the very same message

    status, as_json = await api_get(http, relay, f"/api/deliveries/{did}/export?format=json")
    assert status == 200 and as_json["id"] == did and as_json["body"] == body.decode()
    status, bad = await api_get(http, relay, f"/api/deliveries/{did}/export?format=xml")
    assert status == 400 and bad["param"] == "format"


@pytest.mark.parametrize(
    "body",
    [
        bytes(range(256)) + b"\x00tail\xff",
        "valid UTF-8 with a NUL \x00 inside ✓".encode(),
        b"\xc3\x28 invalid utf-8 'quote' $HOME",
    ],
    ids=["all-bytes", "utf8-with-nul", "invalid-utf8"],
)
async def test_binary_body_of_an_unsigned_source_arrives_identical(
    relay_factory, upstream_factory, http, tmp_path, body
):
    db = tmp_path / "relay.db"
    relay = await relay_factory(make_config(str(db), source={"secret": None}))
    target = await upstream_factory()
    did = await ingest(http, relay, body, {"Content-Type": "application/octet-stream"}, query="kind=bin")
    assert (await relay.store.get_delivery(did)).verdict == "unsigned"

    exported = await cli("export", str(did), "--curl", "--database", str(db), "--to", target.url)
    assert exported.returncode == 0, exported.stderr
    assert "base64 -d" in exported.stdout
    ran = await bash(exported.stdout)
    assert ran.returncode == 0, ran.stderr
    assert len(target.received) == 1
    assert target.received[0].body == body
    assert target.received[0].path_qs == "/hook?kind=bin"
    assert header(target.received[0].headers, "content-type") == "application/octet-stream"


async def test_export_resign_makes_an_hour_old_delivery_pass_the_validator(relay_factory, http, tmp_path, receiver):
    db = tmp_path / "relay.db"
    relay = await relay_factory(make_config(str(db), source={"on_invalid": "accept"}))
    body = encode(lifecycle("pred_old_export")[3])
    did = await ingest(http, relay, body, signed(body, timestamp=int(time.time()) - 3600))
    config = tmp_path / "relay.toml"
    config.write_text(
        f'[relay]\ndatabase = "{db}"\n\n[[sources]]\nname = "replicate"\npath = "{INGEST_PATH}"\nsecret = "{SECRET}"\n'
    )

    kept = await cli("export", str(did), "--database", str(db), "--to", receiver.url)
    assert kept.returncode == 0, kept.stderr
    await bash(kept.stdout)
    resigned = await cli(
        "export", str(did), "--resign", "--database", str(db), "--config", str(config), "--to", receiver.url
    )
    assert resigned.returncode == 0, resigned.stderr
    await bash(resigned.stdout)
    assert [a.verdict.split(":")[0] for a in receiver.arrivals] == ["InvalidTimestampError", "ok"]
    assert all(a.body == body for a in receiver.arrivals)
    no_secret = await cli("export", str(did), "--resign", "--database", str(db), "--to", receiver.url)
    assert no_secret.returncode == 1 and "no secret to re-sign with" in no_secret.stderr


async def test_exported_curl_keeps_a_bracketed_query_string(relay_factory, upstream_factory, http, tmp_path):
    """Array-style metadata (``?ids[0]=7&ids[1]=8``, common in Rails/PHP apps) must reach the target unchanged."""
    db = tmp_path / "relay.db"
    relay = await relay_factory(make_config(str(db)))
    target = await upstream_factory()
    body = encode(lifecycle("pred_brackets")[3])
    query = "ids[0]=7&ids[1]=8&range=[1-2]"
    did = await ingest(http, relay, body, signed(body), query=query)
    assert (await relay.store.get_delivery(did)).query == query

    exported = await cli("export", str(did), "--database", str(db), "--to", target.url)
    assert exported.returncode == 0, exported.stderr
    ran = await bash(exported.stdout)
    assert ran.returncode == 0, ran.stderr
    assert [r.path_qs for r in target.received] == [f"/hook?{query}"]
    assert target.received[0].body == body
