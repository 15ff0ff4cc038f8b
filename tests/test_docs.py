"""Structural promises: the docs and the CI script say what the code does."""

from __future__ import annotations

import importlib.util
import json
import re
import tomllib
from pathlib import Path

from relay.cli import main
from relay.config import RELAY_KEYS, SOURCE_KEYS, UPSTREAM_KEYS, load_config

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
EXAMPLE = (ROOT / "config.example.toml").read_text()


def test_every_config_key_is_in_the_example_and_the_readme():
    # Commented-out alternatives (secret / secret_env) count: the example shows both forms.
    example_keys = set(re.findall(r"^#?\s*([a-z_]+)\s*=", EXAMPLE, re.M))
    for table, keys in (("relay", RELAY_KEYS), ("sources[]", SOURCE_KEYS), ("upstreams[]", UPSTREAM_KEYS)):
        for key in keys:
            assert key in example_keys, f"{table}.{key} missing from config.example.toml"
            assert f"`{table}.{key}" in README or (key.startswith("secret") and f"`{table}.secret`" in README), (
                f"{table}.{key} missing from the README's configuration table"
            )


def test_the_example_config_is_valid():
    config = load_config(
        ROOT / "config.example.toml", env={"REPLICATE_WEBHOOK_SECRET": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"}
    )
    assert config.sources[0].name == "replicate" and config.upstreams[0].name == "app"
    raw = tomllib.loads(EXAMPLE)
    assert set(raw["relay"]) <= set(RELAY_KEYS)


def test_every_cli_command_is_documented():
    for name in main.commands:
        assert f"`relay {name}" in README, f"relay {name} is not in the README"


def test_the_readme_test_command_is_what_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text()
    block = re.search(r"# 2\. set up and run the whole test suite.*?\n(.+?)\n", README)
    assert block, "the README's second command is missing"
    command = block.group(1).strip()
    assert command in ci, f"CI does not run the README's test command: {command}"


def test_every_api_route_is_documented():
    from aiohttp import web

    from relay.api import add_routes

    app = web.Application()
    add_routes(app)
    for route in app.router.routes():
        path = route.resource.canonical if route.resource else ""
        if route.method == "HEAD":
            continue
        assert f"`{route.method} {path}" in README, f"{route.method} {path} is not in the README's API table"


def test_the_readme_performance_figures_are_the_latest_benchmark_results():
    # Every figure there is measured: a hand edit, or a benchmark run not written in with
    # `python3 bench/table.py --readme`, shows here as a difference.
    spec = importlib.util.spec_from_file_location("bench_table", ROOT / "bench" / "table.py")
    assert spec is not None and spec.loader is not None
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    results = json.loads((ROOT / "bench" / "results" / "latest.json").read_text())
    block = README.partition(table.BEGIN)[2].partition(table.END)[0]
    assert block.strip() == table.markdown(results).strip()
