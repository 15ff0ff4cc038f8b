"""Bad input, hypothesis-driven: the ingest listener never answers 500, and the config loader only refuses.

One real relay (real sockets, SQLite file) runs on its own event loop thread
for the whole module; every example writes the wire itself with
``support.raw_request`` so nothing is normalised by a client library.
"""

from __future__ import annotations

import asyncio
import json
import string
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay.config import ConfigError, parse_config
from relay.service import Relay

from support import INGEST_PATH, make_config, raw_request, signed

MAX_BODY = 2048
# The relay's own answers (SPEC §3), plus the HTTP server's 400 for malformed requests.
ALLOWED = {200, 400, 404, 405, 413, 503}
FUZZ = settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

TCHAR = string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~"
HOP = {"content-length", "transfer-encoding", "connection", "host", "expect", "upgrade"}


class Running:
    """A relay on an event loop in a background thread; ``call`` runs a coroutine there."""

    def __init__(self, relay: Relay, loop: asyncio.AbstractEventLoop) -> None:
        self.relay = relay
        self.loop = loop

    def call(self, coro: Any, timeout: float = 30) -> Any:
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(timeout)

    @property
    def base(self) -> str:
        assert self.relay.bound is not None
        return self.relay.bound.ingest_url

    def send(self, head: bytes, body: bytes = b"") -> tuple[int, bytes]:
        return self.call(raw_request(self.base, head, body))  # type: ignore[no-any-return]

    def healthz(self) -> int:
        status, _ = self.send(b"GET /healthz HTTP/1.1\r\nHost: relay\r\nConnection: close\r\n\r\n")
        return status


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    db = tmp_path_factory.mktemp("fuzz") / "relay.db"
    relay = Relay(make_config(str(db), relay={"max_body_bytes": MAX_BODY}))
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="fuzz-relay", daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(relay.start(), loop).result(30)
    try:
        yield Running(relay, loop)
    finally:
        asyncio.run_coroutine_threadsafe(relay.stop(), loop).result(60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)
        loop.close()


def request(
    method: bytes = b"POST",
    target: bytes = INGEST_PATH.encode(),
    headers: list[tuple[bytes, bytes]] | None = None,
    body: bytes = b"",
    chunks: list[bytes] | None = None,
) -> tuple[bytes, bytes]:
    """A raw HTTP/1.1 request head and payload (Content-Length, or chunked when ``chunks`` is given)."""
    lines = [method + b" " + target + b" HTTP/1.1", b"Host: relay.test"]
    lines += [name + b": " + value for name, value in headers or []]
    if chunks is not None:
        lines.append(b"Transfer-Encoding: chunked")
        payload = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks if c) + b"0\r\n\r\n"
    else:
        lines.append(b"Content-Length: %d" % len(body))
        payload = body
    lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n", payload


def check(status: int, payload: bytes) -> None:
    assert status in ALLOWED, (status, payload[:300])


# --- strategies --------------------------------------------------------------------------------

header_names = st.text(alphabet=TCHAR, min_size=1, max_size=24).filter(lambda n: n.lower() not in HOP)
# Field values: visible ASCII, space, HTAB and obs-text are allowed by RFC 9110 ...
legal_values = st.binary(max_size=64).map(
    lambda b: bytes(c for c in b if c == 9 or 32 <= c <= 126 or c >= 128).strip(b" \t")
)
# ... other control characters (never CR or LF, which would end the line) are not: 400 from the server.
any_values = st.binary(max_size=64).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
header_lists = st.lists(
    st.tuples(header_names.map(str.encode), st.one_of(legal_values, any_values)), min_size=0, max_size=100
)
bodies = st.one_of(
    st.binary(max_size=MAX_BODY + 64),
    # invalid UTF-8 inside something JSON-looking
    st.binary(min_size=1, max_size=200).map(lambda b: b'{"id": "' + b + b'\xff\xfe", "status": "succeeded"}'),
)


# --- ingest ------------------------------------------------------------------------------------


@FUZZ
@given(headers=header_lists, body=bodies, sign=st.booleans())
def test_random_headers_and_bodies_never_500(running, headers, body, sign):
    if sign:
        headers = [(k.encode(), v.encode()) for k, v in signed(body).items()] + headers
    head, payload = request(headers=headers, body=body)
    status, answer = running.send(head, payload)
    check(status, answer)
    if len(body) > MAX_BODY:
        assert status == 413, answer
    elif status in (200, 400) and answer.startswith(b"{") and b"delivery" in answer:
        delivery = running.call(running.relay.store.get_delivery(json.loads(answer)["delivery"]))
        assert delivery.body == body


@FUZZ
@given(body=st.binary(max_size=MAX_BODY + 600), cuts=st.lists(st.integers(0, MAX_BODY + 600), max_size=8))
def test_chunked_bodies_are_reassembled_or_refused_by_size(running, body, cuts):
    points = sorted({c for c in cuts if 0 < c < len(body)})
    chunks = [body[a:b] for a, b in zip([0, *points], [*points, len(body)], strict=True)]
    headers = [(k.encode(), v.encode()) for k, v in signed(body).items()]
    head, payload = request(headers=headers, chunks=chunks)
    status, answer = running.send(head, payload)
    check(status, answer)
    if len(body) > MAX_BODY:
        assert status == 413, answer
    else:
        assert status == 200, answer
        delivery = running.call(running.relay.store.get_delivery(json.loads(answer)["delivery"]))
        assert delivery.body == body


KNOWN_METHODS = ["GET", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "POST", "TRACE"]
path_chars = string.ascii_letters + string.digits + "-._~!$&'()*+,;=:@/%?#"


@FUZZ
@given(
    method=st.one_of(
        st.sampled_from(KNOWN_METHODS),
        st.text(alphabet=TCHAR, min_size=1, max_size=12),
    ),
    path=st.one_of(
        st.just(INGEST_PATH),
        st.text(alphabet=path_chars, max_size=60).map(lambda p: "/" + p),
        st.binary(max_size=40).map(lambda b: "/" + b.decode("latin-1")),
    ),
)
def test_random_methods_and_paths_never_500(running, method, path):
    target = path.encode("latin-1").replace(b" ", b"%20").replace(b"\r", b"").replace(b"\n", b"")
    head, payload = request(method=method.encode(), target=target, body=b"{}")
    status, answer = running.send(head, payload)
    check(status, answer)
    if method == "POST" and path == INGEST_PATH:
        assert status == 400  # unsigned, on a signed source
    elif path == INGEST_PATH and method in KNOWN_METHODS and method not in ("POST", "HEAD"):
        assert status == 405, (method, answer)  # (unknown methods are refused by the HTTP parser: 400)


@pytest.mark.parametrize("size", [MAX_BODY - 1, MAX_BODY, MAX_BODY + 1])
@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_body_at_and_just_over_the_limit(running, size, chunked):
    body = (b"\xff\xfe\x80" * size)[:size]  # not UTF-8 either
    headers = [(k.encode(), v.encode()) for k, v in signed(body).items()]
    head, payload = request(
        headers=headers, body=body, chunks=[body[: size // 2], body[size // 2 :]] if chunked else None
    )
    status, answer = running.send(head, payload)
    if size > MAX_BODY:
        assert status == 413, answer
        assert json.loads(answer)["max_body_bytes"] == MAX_BODY
        delivery = running.call(running.relay.store.get_delivery(json.loads(answer)["delivery"]))
        assert delivery.body is None and delivery.size >= size
    else:
        assert status == 200, answer
        delivery = running.call(running.relay.store.get_delivery(json.loads(answer)["delivery"]))
        assert delivery.body == body and delivery.body_format == "non_json"


def test_a_hundred_headers_are_all_kept(running):
    body = b'{"id": "many", "status": "starting"}'
    extra = [(b"X-Fuzz-%d" % i, b"v\t%d \x80\xff" % i) for i in range(100)]
    headers = [(k.encode(), v.encode()) for k, v in signed(body).items()] + extra
    head, payload = request(headers=headers, body=body)
    status, answer = running.send(head, payload)
    assert status == 200, answer
    delivery = running.call(running.relay.store.get_delivery(json.loads(answer)["delivery"]))
    kept = [(k, v) for k, v in delivery.headers if k.startswith("X-Fuzz-")]
    assert [k for k, _ in kept] == [k.decode() for k, _ in extra]


@pytest.mark.parametrize(
    "head",
    [
        b"POST /webhooks/replicate HTTP/1.1\r\nHost: r\r\nContent-Length: nope\r\nConnection: close\r\n\r\n",
        b"POST /webhooks/replicate HTTP/1.1\r\nHost: r\r\nContent-Length: 1\r\nContent-Length: 2\r\n"
        b"Connection: close\r\n\r\nab",
        b"POST /webhooks/replicate HTTP/1.1\r\nHost: r\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        b"zz\r\nabc\r\n0\r\n\r\n",
        b"POST /webhooks/replicate HTTP/1.1\r\nHost: r\r\nBad Header: x\r\nConnection: close\r\n\r\n",
        b"POST /webhooks/replicate HTTP/1.1\r\nHost: r\r\nX-Nul: a\x00b\r\nConnection: close\r\n\r\n",
        b"POST /webhooks/replicate HTTP/9.9\r\nHost: r\r\nConnection: close\r\n\r\n",
        b"GARBAGE\r\n\r\n",
    ],
)
def test_malformed_requests_get_the_servers_400(running, head):
    status, answer = running.send(head)
    assert status in (400, 505), answer


def test_relay_keeps_serving_after_the_fuzzing(running):
    assert running.healthz() == 200
    body = b'{"id": "after", "status": "succeeded"}'
    head, payload = request(headers=[(k.encode(), v.encode()) for k, v in signed(body).items()], body=body)
    status, answer = running.send(head, payload)
    assert status == 200, answer


# --- config loader -----------------------------------------------------------------------------

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
    st.sampled_from(
        [
            "127.0.0.1:8080",
            "[::1]:0",
            "0.0.0.0:99999",
            "/webhooks/replicate",
            "http://127.0.0.1:9/x",
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "whsec_!!!",
            "reject",
            "accept",
            "SECRET_ENV",
            "replicate",
        ]
    ),
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
RELAY_KEYS = ["database", "ingest_listen", "ui_listen", "ui_token_env", "max_body_bytes", "retention_days",
              "commit_timeout_seconds"]  # fmt: skip
SOURCE_KEYS = ["name", "path", "secret", "secret_env", "tolerance_seconds", "on_invalid", "forward_invalid"]
UPSTREAM_KEYS = ["name", "source", "url", "timeout_seconds", "max_attempts", "resign", "ordered", "secret",
                 "secret_env", "retry_base_seconds", "retry_max_seconds"]  # fmt: skip


def tables(keys: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    return st.dictionaries(st.one_of(st.sampled_from(keys), st.text(max_size=10)), values, max_size=len(keys))


documents = st.fixed_dictionaries(
    {},
    optional={
        "relay": st.one_of(tables(RELAY_KEYS), values),
        "sources": st.one_of(st.lists(st.one_of(tables(SOURCE_KEYS), values), max_size=3), values),
        "upstreams": st.one_of(st.lists(st.one_of(tables(UPSTREAM_KEYS), values), max_size=3), values),
    },
) | st.dictionaries(st.text(max_size=10), values, max_size=4)
envs = st.dictionaries(st.sampled_from(["SECRET_ENV", "TOKEN", "X"]), st.text(max_size=40), max_size=3)


@settings(max_examples=400, deadline=None, database=None)
@given(raw=documents, env=envs)
def test_parse_config_only_ever_raises_config_error(raw, env):
    try:
        config = parse_config(raw, env)
    except ConfigError as exc:
        assert str(exc)
    else:
        assert config.relay.max_body_bytes > 0
