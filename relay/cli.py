"""The ``relay`` command line.

``serve`` runs the relay. ``send-test`` and ``secret`` talk HTTP to a relay or
to Replicate. Commands that inspect deliveries read the SQLite database
directly (``--database``), so they work while the relay runs and when it is
stopped.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from pathlib import Path

import aiohttp
import click
from rich.console import Console
from rich.table import Table
from rich.text import Text

from relay.config import Config, ConfigError, default_config, load_config
from relay.lifecycle import encode, new_prediction_id, prediction_lifecycle, signed_headers
from relay.replicate_api import DEFAULT_API_BASE, ReplicateAPIError, fetch_signing_secret, set_source_secret
from relay.runtime import LOG_FORMAT, event_loop_factory
from relay.verify import SecretError, decode_secret

console = Console()
err_console = Console(stderr=True)


def _load(config_path: str | None) -> Config:
    try:
        return load_config(config_path) if config_path else default_config()
    except ConfigError as exc:
        raise click.ClickException(f"configuration refused: {exc}") from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="replicate-relay")
def main() -> None:
    """replicate-relay: capture, verify, forward, inspect and replay Replicate webhooks."""


@main.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="TOML config (default: embedded).")
@click.option("--log-level", default="info", type=click.Choice(["debug", "info", "warning", "error"]))
def serve(config_path: str | None, log_level: str) -> None:
    """Run the ingest listener, the UI/API listener and the forwarder.

    Without --config: ingest on 127.0.0.1:8080 at /webhooks/replicate, UI on
    127.0.0.1:8081, database relay.db, secret from REPLICATE_WEBHOOK_SECRET
    when set, no upstream.
    """
    config = _load(config_path)
    logging.basicConfig(level=log_level.upper(), format=LOG_FORMAT)
    from relay.service import serve as run

    try:
        with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
            runner.run(run(config))
    except OSError as exc:
        raise click.ClickException(f"cannot start: {exc}") from None


@main.command("send-test")
@click.option(
    "--url",
    default="http://127.0.0.1:8080/webhooks/replicate?userId=123&jobId=456",
    show_default=True,
    help="The relay's ingest URL (query string included).",
)
@click.option(
    "--secret",
    envvar="REPLICATE_WEBHOOK_SECRET",
    help="Signing secret [env REPLICATE_WEBHOOK_SECRET]; without one the webhooks go unsigned.",
)
@click.option(
    "--predictions",
    default=1,
    show_default=True,
    type=click.IntRange(1, 1000),
    help="How many prediction lifecycles to send.",
)
def send_test(url: str, secret: str | None, predictions: int) -> None:
    """Send a realistic, signed prediction lifecycle (starting → processing → succeeded) to a relay over HTTP."""
    try:
        key = decode_secret(secret) if secret else None
    except SecretError as exc:
        raise click.ClickException(f"--secret: {exc}") from None
    rows = asyncio.run(_send_lifecycles(url, key, predictions))
    table = Table("prediction", "status", "answer", "delivery")
    failed = 0
    for prediction_id, status, answer, delivery in rows:
        ok = answer.startswith("2")
        failed += not ok
        table.add_row(prediction_id, status, f"[{'green' if ok else 'red'}]{answer}[/]", delivery)
    console.print(table)
    if not key:
        err_console.print("[yellow]sent unsigned: pass --secret or set REPLICATE_WEBHOOK_SECRET to sign[/]")
    if failed:
        raise click.ClickException(f"{failed} of {len(rows)} webhooks were not accepted")


async def _send_lifecycles(url: str, key: bytes | None, count: int) -> list[tuple[str, str, str, str]]:
    rows = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        for _ in range(count):
            prediction_id = new_prediction_id()
            for document in prediction_lifecycle(prediction_id, url):
                body = encode(document)
                try:
                    async with session.post(url, data=body, headers=signed_headers(key, body)) as resp:
                        payload = await resp.json(content_type=None)
                        answer = (
                            f"{resp.status} {payload.get('error', 'received') if isinstance(payload, dict) else ''}"
                        )
                        delivery = str(payload.get("delivery", "")) if isinstance(payload, dict) else ""
                except (aiohttp.ClientError, ValueError) as exc:
                    raise click.ClickException(f"could not send to {url}: {exc}") from None
                rows.append((prediction_id, str(document["status"]), answer, delivery))
    return rows


@main.command()
@click.option(
    "--api-base",
    default=DEFAULT_API_BASE,
    show_default=True,
    envvar="REPLICATE_API_BASE",
    help="Replicate API base URL.",
)
@click.option(
    "--write-config",
    type=click.Path(dir_okay=False, exists=True),
    help="Write the secret into this config file instead of printing it.",
)
@click.option(
    "--source", default="replicate", show_default=True, help="The [[sources]] entry to set, with --write-config."
)
def secret(api_base: str, write_config: str | None, source: str) -> None:
    """Fetch the account's webhook signing secret from Replicate (needs REPLICATE_API_TOKEN)."""
    token = os.environ.get("REPLICATE_API_TOKEN", "").strip()
    if not token:
        raise click.ClickException("REPLICATE_API_TOKEN is not set; create a token at replicate.com/account")
    try:
        key = asyncio.run(fetch_signing_secret(token, api_base))
        if write_config is None:
            click.echo(key)
            return
        path = Path(write_config)
        path.write_text(set_source_secret(path.read_text(), source, key))
    except ReplicateAPIError as exc:
        raise click.ClickException(str(exc)) from None
    err_console.print(f"wrote the signing secret into {write_config} (source {source!r})")


@main.command()
@click.argument("remote")
@click.option("--token", envvar="RELAY_UI_TOKEN", help="The remote relay's UI/API token [env RELAY_UI_TOKEN].")
@click.option("--to", "target", required=True, help="Local URL, e.g. http://localhost:3000/webhooks/replicate.")
@click.option(
    "--secret",
    envvar="REPLICATE_WEBHOOK_SECRET",
    help="Re-sign with the secret your local app expects [env REPLICATE_WEBHOOK_SECRET].",
)
@click.option("--keep-signature", is_flag=True, help="Pass the original webhook-* headers instead of re-signing.")
@click.option("--verdict", help="Only deliveries with this verdict.")
@click.option("--status", help="Only this prediction status.")
@click.option("--prediction", help="Only this prediction id.")
@click.option("--since", help="First replay what was missed: an age such as 1h, or a delivery id.")
def connect(
    remote: str,
    token: str | None,
    target: str,
    secret: str | None,
    keep_signature: bool,
    verdict: str | None,
    status: str | None,
    prediction: str | None,
    since: str | None,
) -> None:
    """Stream a deployed relay's deliveries to a local dev server (talks to REMOTE's API).

    Each new delivery is POSTed to --to with its exact body and query string,
    re-signed with a fresh timestamp, and recorded on the remote relay as an
    attempt of kind connect. Survives dropped connections and remote restarts.
    """
    from relay.connect import ConnectError, ConnectOptions, Connector, Forwarded

    if keep_signature:
        key = None
    elif not secret:
        raise click.UsageError("give --secret (or REPLICATE_WEBHOOK_SECRET), or --keep-signature")
    else:
        try:
            key = decode_secret(secret)
        except SecretError as exc:
            raise click.BadParameter(str(exc), param_hint="--secret") from None
    filters = {k: v for k, v in (("verdict", verdict), ("status", status), ("prediction", prediction)) if v}
    options = ConnectOptions(remote=remote, token=token, target=target, sign_key=key, filters=filters)

    def show(f: Forwarded) -> None:
        d, r = f.delivery, f.result
        ok = r.status is not None and 200 <= r.status <= 299
        answer = f"HTTP {r.status}" if r.status is not None else (r.error or "no answer")
        line = Text(time.strftime("%H:%M:%S "), style="dim")
        line.append(f"#{d['id']} ").append(f"{d['prediction']['id'] or '-'} ", style="cyan")
        line.append(f"{d['prediction']['status'] or '-':<10} ")
        line.append(answer, style="green" if ok else "red").append(f"  {r.duration_ms:.0f} ms", style="dim")
        console.print(line)

    async def run() -> None:
        connector = Connector(options, show)
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, task.cancel)  # also interrupts a quiet event stream at once
        try:
            await connector.start_at(since)
            err_console.print(f"connected to {remote}; forwarding to {target} (Ctrl+C to stop)")
            await connector.follow(asyncio.Event())
        except asyncio.CancelledError:
            err_console.print(f"stopped; last delivery handled: {connector.last_id}")
        finally:
            await connector.close()

    try:
        asyncio.run(run())
    except ConnectError as exc:
        raise click.ClickException(str(exc)) from None
    except aiohttp.ClientError as exc:
        raise click.ClickException(f"cannot reach {remote}: {exc}") from None


# The inspection commands register themselves on ``main``.
from relay import cli_deliveries  # noqa: E402,F401

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
