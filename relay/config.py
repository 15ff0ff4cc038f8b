"""Configuration: TOML in, frozen objects out, or a refusal that names the key.

The relay is often started by a process manager where a silently ignored typo
would mean unverified webhooks in production, so every unknown key and every
bad value stops start-up with the dotted path of the offending key.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from relay.verify import SecretError, decode_secret


class ConfigError(ValueError):
    """A configuration problem, phrased for the person editing the file."""


@dataclass(frozen=True)
class Secret:
    """A webhook signing secret; its text never appears in ``repr`` or logs."""

    text: str = field(repr=False)
    key: bytes = field(repr=False)
    origin: str = ""

    def __repr__(self) -> str:
        return f"Secret(from {self.origin or 'config'})"


@dataclass(frozen=True)
class Listen:
    host: str
    port: int

    @property
    def is_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class SourceConfig:
    name: str
    path: str
    secret: Secret | None
    tolerance_seconds: int = 300
    on_invalid: str = "reject"
    forward_invalid: bool = False


@dataclass(frozen=True)
class UpstreamConfig:
    name: str
    source: str
    url: str
    timeout_seconds: float = 10.0
    max_attempts: int = 8
    resign: bool = False
    ordered: bool = True
    secret: Secret | None = None
    retry_base_seconds: float = 2.0
    retry_max_seconds: float = 600.0


@dataclass(frozen=True)
class RelayConfig:
    database: str = "relay.db"
    ingest_listen: Listen = Listen("127.0.0.1", 8080)
    ui_listen: Listen = Listen("127.0.0.1", 8081)
    ui_token: Secret | None = None
    max_body_bytes: int = 10 * 1024 * 1024
    retention_days: int = 30
    commit_timeout_seconds: float = 10.0
    outbox_lease_seconds: float | None = None
    forwarder: str = "process"
    header_timeout_seconds: float = 10.0
    body_timeout_seconds: float = 30.0

    @property
    def database_shown(self) -> str:
        """The database for logs and pages: a PostgreSQL URL without its password."""
        return redact_database(self.database)


@dataclass(frozen=True)
class Config:
    relay: RelayConfig
    sources: tuple[SourceConfig, ...]
    upstreams: tuple[UpstreamConfig, ...]

    def source(self, name: str) -> SourceConfig:
        for source in self.sources:
            if source.name == name:
                return source
        raise KeyError(name)

    def upstreams_of(self, source: str) -> tuple[UpstreamConfig, ...]:
        return tuple(u for u in self.upstreams if u.source == source)

    def upstream(self, name: str) -> UpstreamConfig:
        for upstream in self.upstreams:
            if upstream.name == name:
                return upstream
        raise KeyError(name)


# --- value checkers: each takes (dotted key, raw value) and returns the clean value.

Checker = Callable[[str, Any], Any]


def _string(key: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{key}: expected a non-empty string, got {value!r}")
    return value


def _bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    return value


def _positive_int(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{key}: expected a positive integer, got {value!r}")
    return value


def _positive_number(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ConfigError(f"{key}: expected a positive number, got {value!r}")
    return float(value)


def _listen(key: str, value: Any) -> Listen:
    text = _string(key, value)
    host, sep, port = text.rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    host = host[1:-1] if bracketed else host
    if not sep or not _valid_host(host, bracketed) or not (port.isascii() and port.isdigit()) or int(port) > 65535:
        raise ConfigError(f"{key}: expected 'host:port' such as '127.0.0.1:8080', got {value!r}")
    return Listen(host, int(port))


def _valid_host(host: str, bracketed: bool) -> bool:
    """An IP address (IPv6 only in brackets) or a DNS name."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return bool(re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?", host)) and not bracketed
    return bracketed == (address.version == 6)


def _path(key: str, value: Any) -> str:
    text = _string(key, value)
    if not text.startswith("/") or "?" in text or "#" in text:
        raise ConfigError(f"{key}: expected a URL path starting with '/', got {value!r}")
    return text


def _url(key: str, value: Any) -> str:
    text = _string(key, value)
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"{key}: expected an http:// or https:// URL, got {value!r}")
    return text


def _one_of(*choices: str) -> Checker:
    def check(key: str, value: Any) -> str:
        if value not in choices:
            raise ConfigError(f"{key}: expected one of {', '.join(map(repr, choices))}, got {value!r}")
        return str(value)

    return check


def _database(key: str, value: Any) -> str:
    """A SQLite file path, or a postgresql:// URL naming at least a host or a database."""
    text = _string(key, value)
    if text.startswith(("postgresql://", "postgres://")):
        parts = urlsplit(text)
        try:
            _port = parts.port  # read for its check: urlsplit raises on a bad port
        except ValueError:
            raise ConfigError(f"{key}: {redact_database(text)} has a bad port") from None
        if not (parts.hostname or parts.path.strip("/") or parts.query):
            raise ConfigError(f"{key}: {redact_database(text)} names no host or database")
    elif "://" in text:
        raise ConfigError(f"{key}: expected a SQLite file path or a postgresql:// URL, got {redact_database(text)}")
    return text


def redact_database(database: str) -> str:
    """Hide the password of a database URL, in its user part or its query (``?password=``):
    it must never reach logs, pages or the API."""
    if "://" not in database:
        return database
    parts = urlsplit(database)
    netloc = parts.netloc
    if parts.password is not None:
        netloc = netloc.replace(f":{parts.password}@", ":***@", 1)
    query = "&".join(
        f"{key}=***" if key.lower() in ("password", "passfile", "sslpassword") else f"{key}={value}"
        for key, value in (item.partition("=")[::2] for item in parts.query.split("&") if item)
    )
    return urlunsplit(parts._replace(netloc=netloc, query=query))


RELAY_KEYS: dict[str, Checker] = {
    "database": _database,
    "database_env": _string,
    "outbox_lease_seconds": _positive_number,
    "forwarder": _one_of("inline", "process"),
    "ingest_listen": _listen,
    "ui_listen": _listen,
    "ui_token_env": _string,
    "max_body_bytes": _positive_int,
    "retention_days": _positive_int,
    "commit_timeout_seconds": _positive_number,
    "header_timeout_seconds": _positive_number,
    "body_timeout_seconds": _positive_number,
}
SOURCE_KEYS: dict[str, Checker] = {
    "name": _string,
    "path": _path,
    "secret": _string,
    "secret_env": _string,
    "tolerance_seconds": _positive_int,
    "on_invalid": _one_of("reject", "accept"),
    "forward_invalid": _bool,
}
UPSTREAM_KEYS: dict[str, Checker] = {
    "name": _string,
    "source": _string,
    "url": _url,
    "timeout_seconds": _positive_number,
    "max_attempts": _positive_int,
    "resign": _bool,
    "ordered": _bool,
    "secret": _string,
    "secret_env": _string,
    "retry_base_seconds": _positive_number,
    "retry_max_seconds": _positive_number,
}
TOP_KEYS = ("relay", "sources", "upstreams")


def _table(key: str, raw: Any, schema: Mapping[str, Checker]) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise ConfigError(f"{key}: expected a table, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(schema))
    if unknown:
        raise ConfigError(f"{key}.{unknown[0]}: unknown key (known: {', '.join(schema)})")
    return {name: schema[name](f"{key}.{name}", value) for name, value in raw.items()}


def _secret(key: str, values: dict[str, Any], env: Mapping[str, str], required: bool) -> Secret | None:
    if "secret" in values and "secret_env" in values:
        raise ConfigError(f"{key}.secret: give either secret or secret_env, not both")
    if "secret" in values:
        text, origin, where = values["secret"], "config", f"{key}.secret"
    elif "secret_env" in values:
        name = values["secret_env"]
        where = f"{key}.secret_env"
        if name not in env or not env[name].strip():
            raise ConfigError(f"{where}: environment variable {name} is not set")
        text, origin = env[name], f"${name}"
    else:
        if required:
            raise ConfigError(f"{key}.secret: required")
        return None
    try:
        return Secret(text.strip(), decode_secret(text), origin)
    except SecretError as exc:
        raise ConfigError(f"{where}: {exc} (verdict bad_secret: refusing to start)") from None


def _array(key: str, raw: Any) -> list[Any]:
    if not isinstance(raw, list):
        raise ConfigError(f"{key}: expected an array of tables ([[{key}]])")
    return raw


def parse_config(raw: Mapping[str, Any], env: Mapping[str, str] | None = None) -> Config:
    """Validate a parsed TOML document; ``env`` supplies ``*_env`` lookups."""
    env = os.environ if env is None else env
    unknown = sorted(set(raw) - set(TOP_KEYS))
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown top-level key (known: relay, sources, upstreams)")

    relay_values = _table("relay", raw.get("relay", {}), RELAY_KEYS)
    token = None
    if "ui_token_env" in relay_values:
        name = relay_values.pop("ui_token_env")
        if env.get(name, "").strip():
            token = Secret(env[name].strip(), b"", f"${name}")
    if "database_env" in relay_values:
        if "database" in relay_values:
            raise ConfigError("relay.database_env: give either database or database_env, not both")
        name = relay_values.pop("database_env")
        if not env.get(name, "").strip():
            raise ConfigError(f"relay.database_env: environment variable {name} is not set")
        relay_values["database"] = _database(f"relay.database_env (${name})", env[name].strip())
    relay = RelayConfig(ui_token=token, **relay_values)
    if not relay.ui_listen.is_loopback and token is None:
        raise ConfigError(
            "relay.ui_listen: a non-loopback address needs a UI token "
            "(set relay.ui_token_env and that environment variable)"
        )

    sources: list[SourceConfig] = []
    for i, item in enumerate(_array("sources", raw.get("sources", []))):
        key = f"sources[{i}]"
        values = _table(key, item, SOURCE_KEYS)
        for required in ("name", "path"):
            if required not in values:
                raise ConfigError(f"{key}.{required}: required")
        secret = _secret(key, values, env, required=False)
        values.pop("secret", None)
        values.pop("secret_env", None)
        for other in sources:
            if other.name == values["name"]:
                raise ConfigError(f"{key}.name: a source named {values['name']!r} already exists")
            if other.path == values["path"]:
                raise ConfigError(f"{key}.path: {values['path']!r} is already the path of source {other.name!r}")
        sources.append(SourceConfig(secret=secret, **values))

    upstreams: list[UpstreamConfig] = []
    for i, item in enumerate(_array("upstreams", raw.get("upstreams", []))):
        key = f"upstreams[{i}]"
        values = _table(key, item, UPSTREAM_KEYS)
        for required in ("name", "source", "url"):
            if required not in values:
                raise ConfigError(f"{key}.{required}: required")
        if not any(s.name == values["source"] for s in sources):
            raise ConfigError(f"{key}.source: no source named {values['source']!r}")
        if any(u.name == values["name"] for u in upstreams):
            raise ConfigError(f"{key}.name: an upstream named {values['name']!r} already exists")
        secret = _secret(key, values, env, required=False)
        values.pop("secret", None)
        values.pop("secret_env", None)
        upstream = UpstreamConfig(secret=secret, **values)
        if upstream.resign and secret is None and _source_secret(sources, upstream.source) is None:
            raise ConfigError(f"{key}.resign: needs a secret, and neither this upstream nor its source has one")
        if upstream.retry_max_seconds < upstream.retry_base_seconds:
            raise ConfigError(f"{key}.retry_max_seconds: must not be less than retry_base_seconds")
        upstreams.append(upstream)

    lease = relay.outbox_lease_seconds
    slowest = max(upstreams, key=lambda u: u.timeout_seconds, default=None)
    # An attempt holds its row for its timeout, then waits for its result's commit (up to
    # commit_timeout_seconds in the queue and as long again in the batch).
    if lease is not None and slowest is not None:
        needed = slowest.timeout_seconds + 2 * relay.commit_timeout_seconds
        if lease <= needed:
            raise ConfigError(
                f"relay.outbox_lease_seconds: must be longer than the slowest upstream's timeout_seconds "
                f"({slowest.name}: {slowest.timeout_seconds:g}) plus twice commit_timeout_seconds "
                f"({relay.commit_timeout_seconds:g}), so more than {needed:g}; else another relay could "
                "send a row while this one's attempt or its result is still under way"
            )
    return Config(relay=relay, sources=tuple(sources), upstreams=tuple(upstreams))


def _source_secret(sources: list[SourceConfig], name: str) -> Secret | None:
    return next((s.secret for s in sources if s.name == name), None)


def load_config(path: str | Path, env: Mapping[str, str] | None = None) -> Config:
    """Read and validate a TOML file."""
    try:
        with open(path, "rb") as fh:
            raw = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such configuration file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return parse_config(raw, env)


def default_config(env: Mapping[str, str] | None = None) -> Config:
    """The embedded default of ``relay serve`` without ``--config`` (SPEC §7)."""
    env = os.environ if env is None else env
    source: dict[str, Any] = {"name": "replicate", "path": "/webhooks/replicate"}
    if env.get("REPLICATE_WEBHOOK_SECRET", "").strip():
        source["secret_env"] = "REPLICATE_WEBHOOK_SECRET"
    return parse_config({"relay": {}, "sources": [source]}, env)
