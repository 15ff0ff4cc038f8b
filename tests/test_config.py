"""Tests for relay.config: TOML in, frozen objects out, or a refusal naming the key."""

from __future__ import annotations

import base64
import dataclasses
import re
from pathlib import Path

import pytest

from relay.config import (
    Config,
    ConfigError,
    Listen,
    RelayConfig,
    Secret,
    SourceConfig,
    UpstreamConfig,
    default_config,
    load_config,
    parse_config,
)
from relay.verify import decode_secret

SOURCE_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
SOURCE_SECRET_B64 = "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
UPSTREAM_SECRET = "whsec_" + base64.b64encode(b"upstream-resigning-key-0123456789").decode()
UI_TOKEN = "ui-token-7f3a9c1e5b2d4f6a8c0e"

ENV = {
    "REPLICATE_WEBHOOK_SECRET": SOURCE_SECRET,
    "RELAY_UI_TOKEN": UI_TOKEN,
}

FULL_TOML = f"""
[relay]
database = "/var/lib/relay/relay.db"
ingest_listen = "0.0.0.0:9090"
ui_listen = "[::1]:9091"
ui_token_env = "RELAY_UI_TOKEN"
max_body_bytes = 1048576
retention_days = 7
commit_timeout_seconds = 2.5
header_timeout_seconds = 5
body_timeout_seconds = 12.5

[[sources]]
name = "replicate"
path = "/webhooks/replicate"
secret_env = "REPLICATE_WEBHOOK_SECRET"
tolerance_seconds = 120
on_invalid = "accept"
forward_invalid = true

[[sources]]
name = "other"
path = "/webhooks/other"

[[upstreams]]
name = "app"
source = "replicate"
url = "http://127.0.0.1:3000/webhooks/replicate"
timeout_seconds = 10
max_attempts = 3
resign = true
ordered = false
secret = "{UPSTREAM_SECRET}"
retry_base_seconds = 1
retry_max_seconds = 60.5

[[upstreams]]
name = "dev"
source = "replicate"
url = "https://dev.example.com/hook?x=1"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "relay.toml"
    path.write_text(text, encoding="utf-8")
    return path


def refuse(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> str:
    """Load ``text`` and return the ConfigError message (the load must fail)."""
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), ENV if env is None else env)
    return str(info.value)


def names_key(message: str, key: str) -> bool:
    return message.startswith(f"{key}:")


MINIMAL_SOURCE = """
[[sources]]
name = "replicate"
path = "/webhooks/replicate"
"""
UPSTREAM = '[[upstreams]]\nname = "a"\nsource = "replicate"\nurl = "http://x/"\n'


# --- a full valid file


def test_full_config_parses_into_frozen_objects(tmp_path):
    config = load_config(write(tmp_path, FULL_TOML), ENV)
    assert isinstance(config, Config)

    relay = config.relay
    assert isinstance(relay, RelayConfig)
    assert relay.database == "/var/lib/relay/relay.db"
    assert relay.ingest_listen == Listen("0.0.0.0", 9090)
    assert not relay.ingest_listen.is_loopback
    assert relay.ui_listen == Listen("::1", 9091)
    assert relay.ui_listen.is_loopback
    assert str(relay.ui_listen) == "[::1]:9091"
    assert str(relay.ingest_listen) == "0.0.0.0:9090"
    assert relay.ui_token is not None and relay.ui_token.text == UI_TOKEN
    assert relay.max_body_bytes == 1048576
    assert relay.retention_days == 7
    assert relay.commit_timeout_seconds == 2.5
    assert (relay.header_timeout_seconds, relay.body_timeout_seconds) == (5.0, 12.5)

    assert isinstance(config.sources, tuple) and len(config.sources) == 2
    rep, other = config.sources
    assert isinstance(rep, SourceConfig)
    assert rep.name == "replicate"
    assert rep.path == "/webhooks/replicate"
    assert rep.tolerance_seconds == 120
    assert rep.on_invalid == "accept"
    assert rep.forward_invalid is True
    assert isinstance(rep.secret, Secret)
    assert rep.secret.text == SOURCE_SECRET
    assert rep.secret.key == base64.b64decode(SOURCE_SECRET_B64)
    assert rep.secret.origin == "$REPLICATE_WEBHOOK_SECRET"

    # defaults for a source that sets only the required keys
    assert other == SourceConfig(name="other", path="/webhooks/other", secret=None)
    assert other.tolerance_seconds == 300
    assert other.on_invalid == "reject"
    assert other.forward_invalid is False

    assert isinstance(config.upstreams, tuple) and len(config.upstreams) == 2
    app, dev = config.upstreams
    assert isinstance(app, UpstreamConfig)
    assert app.name == "app" and app.source == "replicate"
    assert app.url == "http://127.0.0.1:3000/webhooks/replicate"
    assert app.timeout_seconds == 10.0 and isinstance(app.timeout_seconds, float)
    assert app.max_attempts == 3
    assert app.resign is True
    assert app.ordered is False
    assert app.secret is not None and app.secret.key == decode_secret(UPSTREAM_SECRET)
    assert app.retry_base_seconds == 1.0
    assert app.retry_max_seconds == 60.5

    # upstream defaults
    assert dev.url == "https://dev.example.com/hook?x=1"
    assert dev.timeout_seconds == 10.0
    assert dev.max_attempts == 8
    assert dev.resign is False
    assert dev.ordered is True
    assert dev.secret is None
    assert dev.retry_base_seconds == 2.0
    assert dev.retry_max_seconds == 600.0

    # lookups
    assert config.source("other") is other
    assert config.upstream("dev") is dev
    assert config.upstreams_of("replicate") == (app, dev)
    assert config.upstreams_of("other") == ()
    with pytest.raises(KeyError):
        config.source("nope")


def test_config_objects_are_frozen(tmp_path):
    config = load_config(write(tmp_path, FULL_TOML), ENV)
    for obj, attr in [
        (config, "sources"),
        (config.relay, "database"),
        (config.sources[0], "path"),
        (config.upstreams[0], "url"),
        (config.sources[0].secret, "text"),
        (config.relay.ingest_listen, "port"),
    ]:
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(obj, attr, None)


def test_relay_defaults_when_section_absent(tmp_path):
    config = load_config(write(tmp_path, MINIMAL_SOURCE), {})
    assert config.relay == RelayConfig()
    assert config.relay.database == "relay.db"
    assert config.relay.ingest_listen == Listen("127.0.0.1", 8080)
    assert config.relay.ui_listen == Listen("127.0.0.1", 8081)
    assert config.relay.ui_token is None
    assert config.relay.max_body_bytes == 10 * 1024 * 1024
    assert config.relay.retention_days == 30
    assert config.relay.commit_timeout_seconds == 10.0
    assert (config.relay.header_timeout_seconds, config.relay.body_timeout_seconds) == (10.0, 30.0)
    assert config.upstreams == ()


def test_empty_file_is_a_valid_config(tmp_path):
    config = load_config(write(tmp_path, ""), {})
    assert config.sources == () and config.upstreams == ()


def test_secret_env_is_read_from_the_given_mapping_not_os_environ(tmp_path, monkeypatch):
    monkeypatch.setenv("MY_SECRET", "whsec_" + base64.b64encode(b"from os.environ").decode())
    text = MINIMAL_SOURCE + 'secret_env = "MY_SECRET"\n'
    # set only in os.environ, not in the mapping given: treated as unset
    message = refuse(tmp_path, text, {})
    assert names_key(message, "sources[0].secret_env"), message
    config = load_config(write(tmp_path, text), {"MY_SECRET": f"  {SOURCE_SECRET}\n"})
    secret = config.sources[0].secret
    assert secret is not None
    assert secret.text == SOURCE_SECRET
    assert secret.key == base64.b64decode(SOURCE_SECRET_B64)
    assert secret.origin == "$MY_SECRET"


def test_inline_secret(tmp_path):
    text = MINIMAL_SOURCE + f'secret = "{SOURCE_SECRET}"\n'
    secret = load_config(write(tmp_path, text), {}).sources[0].secret
    assert secret is not None and secret.key == base64.b64decode(SOURCE_SECRET_B64)
    assert secret.origin == "config"


def test_repr_of_whole_config_never_contains_secret_text(tmp_path):
    text = FULL_TOML.replace(
        'name = "other"\npath = "/webhooks/other"',
        f'name = "other"\npath = "/webhooks/other"\nsecret = "{SOURCE_SECRET}"',
    )
    config = load_config(write(tmp_path, text), ENV)
    assert config.sources[1].secret is not None
    shown = repr(config)
    for needle in (
        SOURCE_SECRET,
        SOURCE_SECRET_B64,
        UPSTREAM_SECRET,
        UPSTREAM_SECRET.removeprefix("whsec_"),
        UI_TOKEN,
        repr(decode_secret(SOURCE_SECRET)),
        repr(decode_secret(UPSTREAM_SECRET)),
    ):
        assert needle not in shown
    assert "Secret(" in shown  # the secrets are there, just not their text
    assert SOURCE_SECRET not in str(config.sources[0].secret)


# --- refusals, each naming the key


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("bogus = 1\n" + MINIMAL_SOURCE, "bogus"),
        ('[relay]\ndatabse = "x.db"\n', "relay.databse"),
        (MINIMAL_SOURCE + 'secrte = "whsec_AAAA"\n', "sources[0].secrte"),
        (
            MINIMAL_SOURCE + UPSTREAM + "retries = 3\n",
            "upstreams[0].retries",
        ),
    ],
    ids=["top-level", "relay", "sources", "upstreams"],
)
def test_unknown_keys_refused(tmp_path, text, key):
    message = refuse(tmp_path, text)
    assert names_key(message, key), message
    assert "unknown" in message


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('[relay]\nmax_body_bytes = "10"\n', "relay.max_body_bytes"),
        ("[relay]\nretention_days = -1\n", "relay.retention_days"),
        ("[relay]\nretention_days = 0\n", "relay.retention_days"),
        ("[relay]\nretention_days = 1.5\n", "relay.retention_days"),
        ("[relay]\ncommit_timeout_seconds = -0.5\n", "relay.commit_timeout_seconds"),
        ("[relay]\ncommit_timeout_seconds = true\n", "relay.commit_timeout_seconds"),
        ("[relay]\nheader_timeout_seconds = 0\n", "relay.header_timeout_seconds"),
        ('[relay]\nbody_timeout_seconds = "30"\n', "relay.body_timeout_seconds"),
        ("[relay]\ndatabase = 5\n", "relay.database"),
        ('[relay]\ndatabase = ""\n', "relay.database"),
        (MINIMAL_SOURCE + 'tolerance_seconds = "300"\n', "sources[0].tolerance_seconds"),
        (MINIMAL_SOURCE + "tolerance_seconds = -300\n", "sources[0].tolerance_seconds"),
        (MINIMAL_SOURCE + "tolerance_seconds = true\n", "sources[0].tolerance_seconds"),
        (MINIMAL_SOURCE + "forward_invalid = 1\n", "sources[0].forward_invalid"),
        (MINIMAL_SOURCE + 'forward_invalid = "false"\n', "sources[0].forward_invalid"),
        (
            MINIMAL_SOURCE + UPSTREAM + "resign = 1\n",
            "upstreams[0].resign",
        ),
        (
            MINIMAL_SOURCE + UPSTREAM + "timeout_seconds = -1\n",
            "upstreams[0].timeout_seconds",
        ),
        (
            MINIMAL_SOURCE + UPSTREAM + 'max_attempts = "8"\n',
            "upstreams[0].max_attempts",
        ),
    ],
)
def test_wrong_types_and_values_refused(tmp_path, text, key):
    message = refuse(tmp_path, text)
    assert names_key(message, key), message


@pytest.mark.parametrize(
    "value",
    ["8080", "127.0.0.1", "127.0.0.1:", ":8080", "127.0.0.1:http", "127.0.0.1:70000", "127.0.0.1:-1"],
)
@pytest.mark.parametrize("key", ["ingest_listen", "ui_listen"])
def test_bad_listen_address_refused(tmp_path, key, value):
    message = refuse(tmp_path, f'[relay]\n{key} = "{value}"\n')
    assert names_key(message, f"relay.{key}"), message
    assert repr(value) in message


def test_bad_listen_address_message_explains_format(tmp_path):
    message = refuse(tmp_path, '[relay]\ningest_listen = "localhost"\n')
    assert names_key(message, "relay.ingest_listen")
    assert "host:port" in message


@pytest.mark.parametrize("path", ["webhooks/replicate", "", "/hook?x=1", "https://x/hook"])
def test_source_path_must_start_with_slash(tmp_path, path):
    message = refuse(tmp_path, f'[[sources]]\nname = "r"\npath = "{path}"\n')
    assert names_key(message, "sources[0].path"), message


@pytest.mark.parametrize("url", ["ftp://x/hook", "127.0.0.1:3000/hook", "/hook", "http://", ""])
def test_upstream_url_must_be_http(tmp_path, url):
    text = MINIMAL_SOURCE + f'[[upstreams]]\nname = "a"\nsource = "replicate"\nurl = "{url}"\n'
    message = refuse(tmp_path, text)
    assert names_key(message, "upstreams[0].url"), message


@pytest.mark.parametrize("value", ['"drop"', '"Reject"', "true", '""'])
def test_on_invalid_must_be_reject_or_accept(tmp_path, value):
    message = refuse(tmp_path, MINIMAL_SOURCE + f"on_invalid = {value}\n")
    assert names_key(message, "sources[0].on_invalid"), message
    assert "'reject'" in message and "'accept'" in message


def test_inline_secret_that_does_not_decode(tmp_path):
    message = refuse(tmp_path, MINIMAL_SOURCE + 'secret = "whsec_not base64!"\n')
    assert names_key(message, "sources[0].secret"), message
    assert "bad_secret" in message
    assert "not base64!" not in message  # the secret text is not echoed


def test_env_secret_that_does_not_decode(tmp_path):
    text = MINIMAL_SOURCE + 'secret_env = "REPLICATE_WEBHOOK_SECRET"\n'
    message = refuse(tmp_path, text, {"REPLICATE_WEBHOOK_SECRET": "whsec_not base64!"})
    assert names_key(message, "sources[0].secret_env"), message
    assert "bad_secret" in message


def test_upstream_secret_that_does_not_decode(tmp_path):
    text = MINIMAL_SOURCE + UPSTREAM + 'secret = "whsec_@@"\n'
    message = refuse(tmp_path, text)
    assert names_key(message, "upstreams[0].secret"), message
    assert "bad_secret" in message


@pytest.mark.parametrize("env", [{}, {"MY_SECRET": ""}, {"MY_SECRET": "  \n"}])
def test_secret_env_naming_unset_variable(tmp_path, env):
    message = refuse(tmp_path, MINIMAL_SOURCE + 'secret_env = "MY_SECRET"\n', env)
    assert names_key(message, "sources[0].secret_env"), message
    assert "MY_SECRET" in message


@pytest.mark.parametrize(
    ("text", "key", "mentions"),
    [
        pytest.param(
            MINIMAL_SOURCE + f'secret = "{SOURCE_SECRET}"\nsecret_env = "REPLICATE_WEBHOOK_SECRET"\n',
            "sources[0].secret",
            ["secret_env"],
            id="both_secret_and_secret_env",
        ),
        pytest.param(
            MINIMAL_SOURCE + '[[sources]]\nname = "second"\npath = "/webhooks/replicate"\n',
            "sources[1].path",
            ["'replicate'"],
            id="two_sources_on_one_path",
        ),
        pytest.param(
            MINIMAL_SOURCE + '[[sources]]\nname = "replicate"\npath = "/elsewhere"\n',
            "sources[1].name",
            [],
            id="duplicate_source_names",
        ),
        pytest.param(MINIMAL_SOURCE + UPSTREAM + UPSTREAM, "upstreams[1].name", [], id="duplicate_upstream_names"),
        pytest.param(
            MINIMAL_SOURCE + '[[upstreams]]\nname = "a"\nsource = "replicat"\nurl = "http://x/"\n',
            "upstreams[0].source",
            ["'replicat'"],
            id="upstream_naming_no_source",
        ),
        pytest.param(
            '[[upstreams]]\nname = "a"\nsource = "r"\nurl = "http://x/"\n',
            "upstreams[0].source",
            [],
            id="upstream_without_any_source",
        ),
        pytest.param(
            MINIMAL_SOURCE + UPSTREAM + "resign = true\n", "upstreams[0].resign", [], id="resign_without_any_secret"
        ),
        pytest.param(
            MINIMAL_SOURCE + UPSTREAM + "retry_base_seconds = 30\nretry_max_seconds = 10\n",
            "upstreams[0].retry_max_seconds",
            [],
            id="retry_max_below_base",
        ),
    ],
)
def test_contradictions_refused(tmp_path, text, key, mentions):
    message = refuse(tmp_path, text)
    assert names_key(message, key), message
    for word in mentions:
        assert word in message, message


@pytest.mark.parametrize("key", ["name", "path"])
def test_source_required_keys(tmp_path, key):
    lines = {"name": 'name = "r"', "path": 'path = "/r"'}
    del lines[key]
    message = refuse(tmp_path, "[[sources]]\n" + "\n".join(lines.values()) + "\n")
    assert names_key(message, f"sources[0].{key}"), message
    assert "required" in message


def test_resign_uses_source_secret_when_upstream_has_none(tmp_path):
    text = MINIMAL_SOURCE + f'secret = "{SOURCE_SECRET}"\n' + UPSTREAM + "resign = true\n"
    config = load_config(write(tmp_path, text), {})
    assert config.upstreams[0].resign is True
    assert config.upstreams[0].secret is None


@pytest.mark.parametrize("listen", ["0.0.0.0:8081", "192.168.1.5:8081", "[::]:8081"])
def test_non_loopback_ui_listen_needs_token(tmp_path, listen):
    text = f'[relay]\nui_listen = "{listen}"\n'
    message = refuse(tmp_path, text, {})
    assert names_key(message, "relay.ui_listen"), message
    assert "token" in message
    # naming a token variable that is not set is no better
    message = refuse(tmp_path, text + 'ui_token_env = "RELAY_UI_TOKEN"\n', {})
    assert names_key(message, "relay.ui_listen"), message
    # with the token set it is accepted
    config = load_config(write(tmp_path, text + 'ui_token_env = "RELAY_UI_TOKEN"\n'), ENV)
    assert config.relay.ui_token is not None and config.relay.ui_token.text == UI_TOKEN
    assert UI_TOKEN not in repr(config)


@pytest.mark.parametrize("listen", ["127.0.0.1:8081", "localhost:8081", "[::1]:8081", "127.0.0.2:1"])
def test_loopback_ui_listen_needs_no_token(tmp_path, listen):
    config = load_config(write(tmp_path, f'[relay]\nui_listen = "{listen}"\n'), {})
    assert config.relay.ui_listen.is_loopback
    assert config.relay.ui_token is None


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("relay = 5\n", "relay"),
        ('[sources]\nname = "r"\npath = "/r"\n', "sources"),
        ("sources = [1]\n", "sources[0]"),
        ('upstreams = "x"\n', "upstreams"),
    ],
)
def test_wrong_shapes_refused(tmp_path, text, key):
    message = refuse(tmp_path, text)
    assert names_key(message, key), message


def test_invalid_toml_syntax(tmp_path):
    path = write(tmp_path, '[relay\ndatabase = "x"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path, {})
    message = str(info.value)
    assert message.startswith(f"{path}:")
    assert "not valid TOML" in message
    assert re.search(r"line \d+", message), message


def test_missing_file(tmp_path):
    path = tmp_path / "absent.toml"
    with pytest.raises(ConfigError) as info:
        load_config(path, {})
    assert str(info.value).startswith(f"{path}:")
    assert "no such configuration file" in str(info.value)


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)
    with pytest.raises(ConfigError):
        parse_config({"nope": {}}, {})


def test_parse_config_accepts_a_dict():
    config = parse_config({"sources": [{"name": "r", "path": "/r", "secret": SOURCE_SECRET}]}, {})
    assert config.sources[0].secret is not None
    assert config.sources[0].secret.key == base64.b64decode(SOURCE_SECRET_B64)


# --- default_config


def _check_default_shape(config: Config) -> SourceConfig:
    assert config.relay.ingest_listen == Listen("127.0.0.1", 8080)
    assert str(config.relay.ingest_listen) == "127.0.0.1:8080"
    assert config.relay.ui_listen == Listen("127.0.0.1", 8081)
    assert str(config.relay.ui_listen) == "127.0.0.1:8081"
    assert config.relay.database == "relay.db"
    assert config.upstreams == ()
    assert len(config.sources) == 1
    source = config.sources[0]
    assert source.name == "replicate"
    assert source.path == "/webhooks/replicate"
    assert source.tolerance_seconds == 300
    assert source.on_invalid == "reject"
    return source


@pytest.mark.parametrize("env", [{}, {"REPLICATE_WEBHOOK_SECRET": ""}, {"OTHER": SOURCE_SECRET}])
def test_default_config_without_secret(env):
    source = _check_default_shape(default_config(env))
    assert source.secret is None


def test_default_config_with_secret_in_env():
    config = default_config({"REPLICATE_WEBHOOK_SECRET": SOURCE_SECRET})
    source = _check_default_shape(config)
    assert source.secret is not None
    assert source.secret.key == base64.b64decode(SOURCE_SECRET_B64)
    assert source.secret.origin == "$REPLICATE_WEBHOOK_SECRET"
    assert SOURCE_SECRET not in repr(config)


def test_default_config_with_undecodable_secret_refuses():
    with pytest.raises(ConfigError) as info:
        default_config({"REPLICATE_WEBHOOK_SECRET": "whsec_not base64!"})
    assert names_key(str(info.value), "sources[0].secret_env")
    assert "bad_secret" in str(info.value)


@pytest.mark.parametrize("value", ["::1", "a b:80", "127.0.0.1:٨٠", "[127.0.0.1]:80"])
def test_listen_without_valid_host_port_is_refused(value):
    with pytest.raises(ConfigError, match=r"^relay\.ingest_listen:"):
        parse_config({"relay": {"ingest_listen": value}}, {})


def test_ipv6_listen_in_brackets_is_accepted():
    config = parse_config({"relay": {"ingest_listen": "[::1]:8080"}}, {})
    assert config.relay.ingest_listen.host == "::1" and config.relay.ingest_listen.is_loopback


# --- the database: a SQLite path or a PostgreSQL URL, and the shared outbox's lease ------


def _relay(
    values: dict[str, object], env: dict[str, str] | None = None, upstreams: list[dict[str, object]] | None = None
):
    raw: dict[str, object] = {"relay": values, "sources": [{"name": "s", "path": "/hook"}]}
    if upstreams is not None:
        raw["upstreams"] = [{"name": "app", "source": "s", "url": "http://127.0.0.1:9/h", **u} for u in upstreams]
    return parse_config(raw, env or {})


@pytest.mark.parametrize("url", ["postgresql://relay@db.internal:5432/relay", "postgres:///relay", "relay.db"])
def test_database_takes_a_sqlite_path_or_a_postgresql_url(url):
    assert _relay({"database": url}).relay.database == url


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("postgresql://db:notaport/relay", "bad port"),
        ("postgresql://", "names no host or database"),
        ("mysql://db/relay", "SQLite file path or a postgresql:// URL"),
    ],
)
def test_bad_database_urls_are_refused_naming_the_key(url, message):
    with pytest.raises(ConfigError, match=rf"^relay\.database: .*{re.escape(message)}"):
        _relay({"database": url})


def test_database_env_reads_the_url_and_refuses_an_unset_variable_or_both_forms():
    url = "postgresql://relay:s3cret@db/relay"
    assert _relay({"database_env": "DB_URL"}, {"DB_URL": url}).relay.database == url
    with pytest.raises(ConfigError, match=r"^relay\.database_env: environment variable DB_URL is not set"):
        _relay({"database_env": "DB_URL"})
    with pytest.raises(ConfigError, match=r"^relay\.database_env: give either"):
        _relay({"database_env": "DB_URL", "database": "x.db"}, {"DB_URL": url})


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://relay:s3cret@db/relay",
        "postgresql://relay@db/relay?password=s3cret&sslmode=require",
        "postgresql://relay@db/relay?sslpassword=s3cret",
    ],
)
def test_the_database_password_is_never_shown(url):
    config = _relay({"database": url})
    shown = config.relay.database_shown
    assert "s3cret" not in shown and "***" in shown and shown.startswith("postgresql://relay")
    assert "sslmode=require" in shown or "sslmode" not in url
    with pytest.raises(ConfigError) as refused:  # nor in a refusal
        _relay({"database": url.replace("@db/", "@db:bad/")})
    assert "bad port" in str(refused.value) and "s3cret" not in str(refused.value)


def test_outbox_lease_must_outlast_an_attempt_and_its_commit():
    upstreams = [{"timeout_seconds": 10}]
    assert _relay({"outbox_lease_seconds": 31, "commit_timeout_seconds": 10}, upstreams=upstreams)
    with pytest.raises(ConfigError, match=r"^relay\.outbox_lease_seconds: .*more than 30"):
        _relay({"outbox_lease_seconds": 30, "commit_timeout_seconds": 10}, upstreams=upstreams)
