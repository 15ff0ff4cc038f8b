"""Exporting a stored delivery: a curl command that reproduces it byte for byte (pure).

The body goes through ``printf '%s'`` with POSIX single quotes, which carry
any byte but NUL unchanged; bodies with NUL or invalid UTF-8 go through
``base64 -d`` instead, so the command stays exact for any body.
"""

from __future__ import annotations

import base64

from relay.model import Delivery, display_text
from relay.outgoing import OutgoingRequest, build_request

CURL_DEFAULT_HEADERS = ("Content-Type", "User-Agent", "Accept", "Expect")


def shell_quote(text: str) -> str:
    """POSIX single-quoting (shlex.quote leaves some strings bare; we always quote)."""
    return "'" + text.replace("'", "'\"'\"'") + "'"


def curl_command(request: OutgoingRequest) -> str:
    """A curl command line sending exactly this request."""
    # -g: brackets and braces in the query string are data, not curl URL globs.
    lines = [f"curl -gsS -X {request.method} {shell_quote(request.url)}"]
    for name, value in request.headers:
        lines.append(f"  -H {shell_quote(f'{name}: {value}')}")
    # Empty -H removes a header curl would otherwise add on its own.
    present = {name.lower() for name, _ in request.headers}
    for default in CURL_DEFAULT_HEADERS:
        if default.lower() not in present:
            lines.append(f"  -H '{default}:'")
    lines.append("  --data-binary @-")
    command = " \\\n".join(lines)
    body = request.body
    try:
        text = body.decode("utf-8")
        printable = "\x00" not in text
    except UnicodeDecodeError:
        printable = False
    if printable:
        feeder = f"printf '%s' {shell_quote(text)}"
    else:
        feeder = f"printf '%s' {shell_quote(base64.b64encode(body).decode())} | base64 -d"
    return f"{feeder} | {command}\n"


def original_curl(
    delivery: Delivery, target_url: str | None = None, sign_key: bytes | None = None, now: int | None = None
) -> str:
    """Copy-as-curl: the delivery as it reached the relay, to its original URL or ``target_url``.

    With ``sign_key`` the command carries a fresh timestamp and signature
    (valid for the receiver's tolerance from ``now``); otherwise the original ones.
    """
    if target_url is None:
        host = next((v for k, v in delivery.headers if k.lower() == "host"), "127.0.0.1")
        target_url = f"http://{display_text(host)}{delivery.path}"
    request = build_request(
        method=delivery.method,
        target_url=target_url,
        query=delivery.query,
        headers=delivery.headers,
        body=delivery.body or b"",
        delivery_id=delivery.id,
        peer=None,
        relay_headers=False,
        sign_key=sign_key,
        now=now,
    )
    return curl_command(request)
