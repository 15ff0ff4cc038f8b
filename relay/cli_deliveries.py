"""CLI commands that inspect, verify, diff, export, replay and prune deliveries.

They open the SQLite database directly (``--database``, else the config's),
so they work whether or not the relay is running; replays are sent from this
machine and recorded in that database as attempts of kind ``replay``.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.syntax import Syntax
from rich.table import Table
from rich.text import Text

from relay.cli import _load, main
from relay.compare import compare_attempts, compare_deliveries
from relay.config import Config
from relay.export import original_curl
from relay.filters import FilterError, parse_filter
from relay.http_client import HttpClient
from relay.model import display_text, rfc3339
from relay.render import delivery_json, pretty_body, summary_json
from relay.replay import BulkProgress, ReplayError, ReplayRequest, bulk_filter, replay, replay_many
from relay.reverify import reverify
from relay.store import NotFound, Store, StoreUnavailable, is_postgres_url, open_store
from relay.verify import SecretError, decode_secret

console = Console(highlight=False)
T = TypeVar("T")
VERDICT_STYLE = {"verified": "green", "unsigned": "dim"}
STATE_STYLE = {"delivered": "green", "pending": "yellow", "skipped": "dim"}


def database_options(func: Callable[..., Any]) -> Callable[..., Any]:
    func = click.option(
        "--database", type=click.Path(dir_okay=False), help="SQLite file or postgresql:// URL (default: the config's)."
    )(func)
    return click.option(
        "--config",
        "config_path",
        type=click.Path(dir_okay=False, exists=True),
        help="TOML config for sources, upstreams and secrets (default: embedded).",
    )(func)


@asynccontextmanager
async def opened(config: Config, database: str | None) -> AsyncIterator[Store]:
    path = database or config.relay.database
    if not is_postgres_url(path) and not Path(path).exists():
        raise click.ClickException(f"no database at {path} (use --database or --config)")
    store = await open_store(path)
    try:
        yield store
    finally:
        await store.close()


def run(config_path: str | None, database: str | None, work: Callable[[Config, Store], Awaitable[T]]) -> T:
    config = _load(config_path)

    async def go() -> T:
        async with opened(config, database) as store:
            return await work(config, store)

    try:
        return asyncio.run(go())
    except (NotFound, FilterError, ReplayError, StoreUnavailable) as exc:
        raise click.ClickException(str(exc)) from None


def _verdict(v: str) -> Text:
    return Text(v, style=VERDICT_STYLE.get(v, "red"))


def filter_options(func: Callable[..., Any]) -> Callable[..., Any]:
    for name, help_text in reversed(
        [
            ("--source", "Source name."),
            ("--verdict", "verified, unsigned, missing_headers, bad_timestamp, expired, future, invalid_signature."),
            ("--state", "Forwarding state: pending, delivered, failed, dead, skipped."),
            ("--prediction", "Prediction id."),
            ("--status", "Prediction status (starting, processing, succeeded, ...)."),
            ("--search", "Full-text search in bodies."),
            ("--since", "RFC 3339, Unix seconds or an age such as 24h."),
            ("--until", "RFC 3339, Unix seconds or an age such as 1h."),
        ]
    ):
        func = click.option(name, help=help_text)(func)
    return func


def _filter_params(opts: dict[str, Any]) -> dict[str, str]:
    keys = {
        "source": "source",
        "verdict": "verdict",
        "state": "state",
        "prediction": "prediction",
        "status": "status",
        "search": "q",
        "since": "since",
        "until": "until",
    }
    return {keys[k]: str(v) for k, v in opts.items() if k in keys and v is not None}


@main.command("list")
@database_options
@filter_options
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 500))
@click.option("--before", type=int, help="Page cursor: deliveries older than this id.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON like GET /api/deliveries.")
def list_cmd(
    config_path: str | None, database: str | None, limit: int, before: int | None, as_json: bool, **opts: Any
) -> None:
    """List deliveries, newest first, with the API's filters (reads the database)."""
    params = {**_filter_params(opts), "limit": str(limit)}
    if before:
        params["before"] = str(before)

    async def work(config: Config, store: Store) -> None:
        page, cursor = await store.list_deliveries(parse_filter(params, time.time()))
        if as_json:
            click.echo(json.dumps({"deliveries": [summary_json(s) for s in page], "next": cursor}, indent=2))
            return
        table = Table("id", "received", "verdict", "prediction", "status", "forwarding", "size")
        for s in page:
            fwd = Text(" ").join(Text(f"{u}:{st}", style=STATE_STYLE.get(st, "red")) for u, st in s.forwarding)
            table.add_row(
                str(s.id),
                rfc3339(s.received_at),
                _verdict(s.verdict.value),
                Text(s.prediction.id or ""),
                Text(s.prediction.status or ""),
                fwd,
                str(s.size),
            )
        console.print(table)
        if cursor:
            console.print(f"[dim]more: relay list --before {cursor}[/]")

    run(config_path, database, work)


@main.command()
@database_options
@click.argument("delivery_id", type=int)
@click.option("--json", "as_json", is_flag=True, help="Print JSON like GET /api/deliveries/ID.")
def show(config_path: str | None, database: str | None, delivery_id: int, as_json: bool) -> None:
    """Show one delivery: request, verdict, headers, body, forwarding and attempts (reads the database)."""

    async def work(config: Config, store: Store) -> None:
        d = await store.get_delivery(delivery_id)
        if as_json:
            click.echo(json.dumps(delivery_json(d), indent=2))
            return
        where = f"  {rfc3339(d.received_at)}  from {d.peer or ''}  source {d.source}"
        console.print(Text(f"Delivery #{d.id}", style="bold").append(where, style=""))
        console.print(Text(f"{d.method} {d.path}{'?' + d.query if d.query else ''}"))
        console.print(Text("verdict ").append(_verdict(d.verdict.value)).append(f"  {d.verdict_detail}"))
        if d.prediction.id:
            console.print(Text(f"prediction {d.prediction.id}  {d.prediction.status}  {d.prediction.model}"))
        if d.duplicate_of:
            console.print(f"[yellow]duplicate of #{d.duplicate_of}[/]")
        headers = Table("header", "value", show_header=False, box=None)
        for name, value in d.headers:
            headers.add_row(Text(display_text(name)), Text(display_text(value)))
        console.print(headers)
        pretty = pretty_body(d.body)
        if pretty is not None:
            console.print(Syntax(pretty, "json", word_wrap=True))
        elif d.body is not None:
            console.print(Text(d.body.decode("utf-8", "replace")))
        for f in d.forwarding:
            console.print(
                Text(f"→ {f.upstream}: ")
                .append(f.state, style=STATE_STYLE.get(f.state, "red"))
                .append(f"  {f.note or ''}")
            )
            for a in f.attempts:
                console.print(Text(f"   {rfc3339(a.started_at)}  {a.status or a.error}  {a.duration_ms:.1f} ms"))
        for a in d.replays:
            console.print(
                Text(f"↺ {a.kind} to {a.target}: {a.status or a.error}  {a.duration_ms:.1f} ms  (attempt {a.id})")
            )

    run(config_path, database, work)


@main.command()
@database_options
@click.argument("delivery_id", type=int)
@click.option("--secret", help="Check with this secret instead of the configured one.")
def verify(config_path: str | None, database: str | None, delivery_id: int, secret: str | None) -> None:
    """Re-verify a stored delivery against the time it was received (reads the database)."""

    async def work(config: Config, store: Store) -> dict[str, Any]:
        return reverify(config, await store.get_delivery(delivery_id), secret)

    result = run(config_path, database, work)
    console.print(Text.assemble(_verdict(result["verdict"]), f"  {result['detail']}"))  # Text: never markup
    console.print(f"[dim]secret: {result['secret']}; stored verdict: {result['stored_verdict']}[/]")
    if result["verdict"] not in ("verified", "unsigned"):
        sys.exit(1)


@main.command()
@database_options
@click.argument("ids", type=int, nargs=-1, required=True)
@click.option("--attempts", is_flag=True, help="The ids are attempts: diff their responses.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON like GET /api/diff.")
def diff(config_path: str | None, database: str | None, ids: tuple[int, ...], attempts: bool, as_json: bool) -> None:
    """Diff two deliveries (A B), or one against the previous event of its prediction (B) (reads the database)."""
    if len(ids) > 2:
        raise click.UsageError("give one or two ids")

    if attempts and len(ids) != 2:
        raise click.UsageError("--attempts needs two attempt ids")
    left_id = ids[0] if len(ids) == 2 else None

    async def work(config: Config, store: Store) -> dict[str, Any]:
        compare = compare_attempts if attempts else compare_deliveries
        return (await compare(store, left_id, ids[-1])).result

    result = run(config_path, database, work)
    if as_json:
        click.echo(json.dumps(result, indent=2, ensure_ascii=False))
        return
    print_diff(result)


def short(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)[:200]


def print_diff(result: dict[str, Any]) -> None:
    noun = "attempt" if result["kind"] == "attempts" else "delivery"
    console.print(f"[bold]--- {noun} {result['a']}[/]\n[bold]+++ {noun} {result['b']}[/]")
    if "status" in result and result["status"]["old"] != result["status"]["new"]:
        console.print(Text(f"~ status {result['status']['old']} → {result['status']['new']}", style="yellow"))
    for h in result["headers"]:
        if h["op"] == "added":
            console.print(Text(f"+ header {h['name']}: {h['new']}", style="green"))
        elif h["op"] == "removed":
            console.print(Text(f"- header {h['name']}: {h['old']}", style="red"))
        else:
            console.print(Text(f"~ header {h['name']}: {h['old']} → {h['new']}", style="yellow"))
    if result["body"] is not None:
        for op in result["body"]:
            if op["op"] == "add":
                console.print(Text(f"+ {op['path']}: {short(op['value'])}", style="green"))
            elif op["op"] == "remove":
                console.print(Text(f"- {op['path']}: {short(op['old'])}", style="red"))
            elif op["op"] == "replace":
                console.print(Text(f"~ {op['path']}: {short(op['old'])} → {short(op['value'])}", style="yellow"))
            else:
                console.print(Text(f"{op['op']} {op.get('from', '')} → {op['path']}", style="cyan"))
    elif result["text"]:
        for line in result["text"].splitlines():
            style = "green" if line.startswith("+") else "red" if line.startswith("-") else None
            console.print(Text(line, style=style or ""))
    if result.get("same") and not result["headers"]:
        console.print("[dim]identical[/]")


@main.command()
@database_options
@click.argument("delivery_id", type=int)
@click.option("--curl", "fmt", flag_value="curl", default=True, help="A byte-exact curl command (default).")
@click.option("--json", "fmt", flag_value="json", help="The full record as JSON.")
@click.option("--to", "url", help="Target URL for the curl command (default: the original URL).")
@click.option("--resign", is_flag=True, help="Fresh timestamp and signature (the source's secret, or --secret).")
@click.option("--secret", help="Secret to re-sign with.")
def export(
    config_path: str | None,
    database: str | None,
    delivery_id: int,
    fmt: str,
    url: str | None,
    resign: bool,
    secret: str | None,
) -> None:
    """Export a delivery as a byte-exact curl command or as JSON (reads the database)."""

    async def work(config: Config, store: Store) -> str:
        d = await store.get_delivery(delivery_id)
        if fmt == "json":
            return json.dumps(delivery_json(d), indent=2)
        if d.body is None:
            raise ReplayError(f"delivery {delivery_id} has no stored body")
        key = None
        if resign or secret:
            try:
                source = next((s.secret for s in config.sources if s.name == d.source), None)
                key = decode_secret(secret) if secret else (source.key if source else None)
            except SecretError as exc:
                raise ReplayError(f"--secret: {exc}") from None
            if key is None:
                raise ReplayError("no secret to re-sign with: pass --secret or --config")
        return original_curl(d, url, key, int(time.time()))

    click.echo(run(config_path, database, work), nl=False)


@main.command("replay")
@database_options
@click.argument("delivery_id", type=int, required=False)
@click.option("--to", "url", help="Replay to this URL (e.g. http://localhost:3000/webhooks/replicate).")
@click.option("--upstream", help="Replay to this configured upstream.")
@click.option("--keep-signature", is_flag=True, help="Send the original webhook-* headers (default: re-sign).")
@click.option("--body", "body_file", type=click.File("rb"), help="Send this body instead (forces re-signing).")
@click.option("--webhook-id", help="Use a new webhook-id (forces re-signing).")
@click.option("--secret", help="Sign with this secret instead of the configured one.")
@filter_options
@click.option("--yes", is_flag=True, help="Bulk: do not ask for confirmation.")
def replay_cmd(
    config_path: str | None,
    database: str | None,
    delivery_id: int | None,
    url: str | None,
    upstream: str | None,
    keep_signature: bool,
    body_file: Any,
    webhook_id: str | None,
    secret: str | None,
    yes: bool,
    **opts: Any,
) -> None:
    """Replay one delivery (ID), or every delivery matching the filters, to an upstream or URL.

    Sends from this machine and records each as an attempt of kind replay in the database.
    Bulk example: relay replay --state dead --since 24h --upstream app
    """
    if (url is None) == (upstream is None):
        raise click.UsageError("give exactly one of --to URL or --upstream NAME")
    req = ReplayRequest(
        upstream=upstream,
        url=url,
        resign=not keep_signature,
        body=body_file.read() if body_file else None,
        webhook_id=webhook_id,
        secret=secret,
    )
    params = _filter_params(opts)
    if delivery_id is not None and params:
        raise click.UsageError("give a delivery id or filters, not both")
    if delivery_id is None and not params:
        raise click.UsageError("give a delivery id, or filters for a bulk replay (e.g. --state dead --since 24h)")
    params = bulk_filter(params, req)

    async def work(config: Config, store: Store) -> Any:
        client = HttpClient()
        try:
            if delivery_id is not None:
                return await replay(store, client, config, time.time, delivery_id, req)
            ids = await store.delivery_ids(parse_filter(params, time.time()), 100_000)
            if not ids:
                return BulkProgress(job=0, total=0, finished=True)
            if not yes and sys.stdin.isatty() and not click.confirm(f"Replay {len(ids)} deliveries?"):
                raise click.Abort()
            progress_bar = Progress(
                TextColumn("replaying"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("[green]{task.fields[ok]} ok[/] [red]{task.fields[failed]} failed[/]"),
                TimeElapsedColumn(),
                console=console,
            )
            with progress_bar:
                task = progress_bar.add_task("replay", total=len(ids), ok=0, failed=0)

                def update(p: BulkProgress) -> None:
                    progress_bar.update(task, completed=p.done, ok=p.ok, failed=p.failed)

                return await replay_many(
                    store, client, config, time.time, ids, req, BulkProgress(job=0, total=len(ids)), update
                )
        finally:
            await client.close()

    result = run(config_path, database, work)
    if isinstance(result, BulkProgress):
        table = Table("sent", "2xx", "failed")
        table.add_row(str(result.done), f"[green]{result.ok}[/]", f"[red]{result.failed}[/]")
        console.print(table)
        if result.failed:
            sys.exit(1)
        return
    answer = f"HTTP {result.status}" if result.status is not None else result.error
    style = "green" if result.outcome == "delivered" else "red"
    console.print(
        Text(f"{answer}", style=style).append(
            f" in {result.duration_ms:.1f} ms → {result.target}  (attempt {result.id})", style=""
        )
    )
    if result.response_body:
        console.print(Text(result.response_body.decode("utf-8", "replace")[:2000]))
    if result.outcome != "delivered":
        sys.exit(1)


@main.command()
@database_options
@click.option("--older-than", help="Age such as 30d (default: the config's retention_days).")
def prune(config_path: str | None, database: str | None, older_than: str | None) -> None:
    """Delete deliveries older than the retention period, with their attempts; compact (writes the database)."""

    async def work(config: Config, store: Store) -> int:
        age = older_than or f"{config.relay.retention_days}d"
        try:
            cutoff = parse_filter({"since": age}, time.time()).since
        except FilterError:
            raise click.BadParameter(f"expected an age such as 30d, got {age!r}", param_hint="--older-than") from None
        assert cutoff is not None
        return await store.prune(cutoff, compact=True)

    deleted = run(config_path, database, work)
    console.print(f"deleted {deleted} deliveries")
