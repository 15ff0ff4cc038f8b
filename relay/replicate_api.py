"""Talking to Replicate's own API: fetching the account's webhook signing secret.

Also writes that secret into a relay config file: TOML has no writer in the
standard library and a full rewrite would lose the user's comments, so the
edit is a small line-based one, checked by parsing the result.
"""

from __future__ import annotations

import re
import tomllib

import aiohttp

DEFAULT_API_BASE = "https://api.replicate.com"


class ReplicateAPIError(RuntimeError):
    pass


async def fetch_signing_secret(token: str, api_base: str = DEFAULT_API_BASE, timeout: float = 15.0) -> str:
    """GET /v1/webhooks/default/secret → the ``whsec_...`` key."""
    url = api_base.rstrip("/") + "/v1/webhooks/default/secret"
    headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session:
            async with session.get(url, headers=headers) as resp:
                text = await resp.text()
                if resp.status == 401:
                    raise ReplicateAPIError("Replicate refused the token (HTTP 401): check REPLICATE_API_TOKEN")
                if resp.status != 200:
                    raise ReplicateAPIError(f"Replicate answered HTTP {resp.status}: {text[:200]}")
                try:
                    key = (await resp.json(content_type=None))["key"]
                except (ValueError, KeyError, TypeError):
                    raise ReplicateAPIError(f"unexpected answer from Replicate: {text[:200]}") from None
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise ReplicateAPIError(f"could not reach {api_base}: {exc or type(exc).__name__}") from None
    if not isinstance(key, str) or not key.startswith("whsec_"):
        raise ReplicateAPIError("Replicate's answer holds no whsec_ key")
    return key


_TABLE_HEADER = re.compile(r"^\s*\[")
_SECRET_LINE = re.compile(r"^\s*secret(_env)?\s*=")
_NAME_LINE = re.compile(r"^\s*name\s*=")


def set_source_secret(toml_text: str, source_name: str, secret: str) -> str:
    """Return the config text with ``secret = "..."`` set on the named [[sources]] entry."""
    document = tomllib.loads(toml_text)
    names = [s.get("name") for s in document.get("sources", [])]
    if source_name not in names:
        raise ReplicateAPIError(f"the config has no [[sources]] entry named {source_name!r}")
    index = names.index(source_name)
    lines = toml_text.splitlines(keepends=True)
    seen = -1
    start = end = None
    for i, line in enumerate(lines):
        if line.strip() == "[[sources]]":
            seen += 1
            if seen == index:
                start = i
                continue
        if start is not None and end is None and i > start and _TABLE_HEADER.match(line):
            end = i
    if start is None:
        raise ReplicateAPIError("could not find that [[sources]] table in the file (inline tables are not edited)")
    end = len(lines) if end is None else end
    block = [line for line in lines[start + 1 : end] if not _SECRET_LINE.match(line)]
    at = next((i + 1 for i, line in enumerate(block) if _NAME_LINE.match(line)), 0)
    block.insert(at, f'secret = "{secret}"\n')
    result = "".join(lines[: start + 1] + block + lines[end:])
    parsed = tomllib.loads(result)
    if parsed["sources"][index].get("secret") != secret:
        raise ReplicateAPIError("editing the config failed; it was left unchanged")
    return result
