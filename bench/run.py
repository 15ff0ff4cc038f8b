"""Benchmark: the relay against a bare aiohttp ceiling and mitmdump, under the same wrk load.

    python3 bench/run.py            # full run (three rounds, medians), about 20 minutes
    python3 bench/run.py --quick    # a few seconds per target, what CI runs so it cannot rot

Every figure printed is measured in this run; results go to bench/results/.
Load is loopback only and bounded in time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import resource
import secrets
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "tests"))  # the tests' pgcluster and proctree serve here too

from relay.lifecycle import encode, prediction_lifecycle  # noqa: E402
from relay.verify import decode_secret, sign  # noqa: E402

from proctree import child_pids, forwarder_pids  # noqa: E402
from table import markdown, median, per_round  # noqa: E402

BENCH = ROOT / "bench"
RESULTS = BENCH / "results"
MITM_VENV = BENCH / ".venv-mitm"
MITM_VERSION = "11.0.2"  # 11.1+ needs Python 3.12
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
KEY = decode_secret(SECRET)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_http(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError as exc:
            if getattr(exc, "code", None):  # an HTTP error still means it is up
                return
            time.sleep(0.05)
    raise RuntimeError(f"{url} did not come up within {timeout} s")


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())


@contextmanager
def process(args: list[str], health: str, env: dict[str, str] | None = None, log: Path | None = None):  # type: ignore[no-untyped-def]
    out = open(log, "wb") if log else subprocess.DEVNULL
    proc = subprocess.Popen(args, env={**os.environ, **(env or {})}, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_http(health)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if log:
            out.close()  # type: ignore[union-attr]


def make_requests(path: Path, count: int) -> None:
    """Pre-signed ~2 KB prediction webhooks with fresh timestamps (wrk's Lua has no HMAC)."""
    now = int(time.time())
    with open(path, "w") as fh:
        written = 0
        while written < count:
            prediction = secrets.token_hex(13)
            for document in prediction_lifecycle(prediction, "https://relay.example.com/webhooks/replicate", now):
                document["logs"] = (document["logs"] or "") + "".join(
                    f"step {i:03d}: denoising latents, guidance 3.5, scheduler euler\n" for i in range(14)
                )
                body = encode(document).decode()
                msg_id = "msg_" + secrets.token_urlsafe(18)
                fh.write(f"{msg_id}\t{now}\t{sign(KEY, msg_id, now, body.encode())}\t{body}\n")
                written += 1


@dataclass
class WrkResult:
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int


def _ms(text: str) -> float:
    value, unit = re.match(r"([\d.]+)(\w+)", text).groups()  # type: ignore[union-attr]
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]


def wrk(
    url: str, requests_file: Path, seconds: float, connections: int, delay_ms: int = 0, part: int = 0, parts: int = 1
) -> WrkResult:
    """One wrk run; ``part`` of ``parts`` when several run at once, so none repeats another's requests."""
    threads = min(2, connections)
    env = {
        **os.environ,
        "BENCH_REQUESTS": str(requests_file),
        "BENCH_DELAY_MS": str(delay_ms),
        "BENCH_THREADS": str(threads),
        "BENCH_PART": str(part),
        "BENCH_PARTS": str(parts),
    }
    out = subprocess.run(
        ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds:g}s", "--latency", "-s", str(BENCH / "post.lua"), url],
        env=env,
        capture_output=True,
        text=True,
        timeout=seconds + 60,
        check=True,
    ).stdout
    latency = dict(re.findall(r"^\s+(50|99)%\s+(\S+)$", out, re.M))
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errors = int(non2xx.group(1)) if non2xx else 0
    if socket_errors:
        errors += sum(int(g) for g in socket_errors.groups())
    return WrkResult(
        rps=float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),  # type: ignore[union-attr]
        p50_ms=_ms(latency["50"]),
        p99_ms=_ms(latency["99"]),
        requests=requests,
        errors=errors,
    )


def peak_rss_mb(pid: int) -> float:
    """Peak resident memory of a relay: its main process and its children (the forwarder process) together."""
    total = 0.0
    for member in [pid, *child_pids(pid)]:
        for line in Path(f"/proc/{member}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                total += int(line.split()[1]) / 1024
    return total


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextmanager
def cpu_meter(processes: dict[str, int]) -> Iterator[dict[str, float]]:
    """CPU seconds each named process used within the block, and ``wrk``'s (the children this
    script waited for meanwhile: wrk runs to completion inside the block)."""
    before = {name: cpu_seconds(pid) for name, pid in processes.items()}
    waited = resource.getrusage(resource.RUSAGE_CHILDREN)
    used: dict[str, float] = {}
    yield used
    for name, pid in processes.items():
        used[name] = cpu_seconds(pid) - before[name]
    now = resource.getrusage(resource.RUSAGE_CHILDREN)
    used["wrk"] = (now.ru_utime + now.ru_stime) - (waited.ru_utime + waited.ru_stime)


def record_cpu(samples: Samples, name: str, used: dict[str, float], count: int) -> None:
    for part, seconds in used.items():
        samples.add(f"{name}.cpu_us.{part}", seconds / count * 1e6 if count else float("nan"))


def mitmdump_path() -> Path | None:
    """mitmdump in its own virtual environment (it pins dependencies the relay does not want)."""
    exe = MITM_VENV / "bin" / "mitmdump"
    if exe.exists():
        return exe
    print(f"setting up mitmproxy=={MITM_VERSION} in {MITM_VENV} ...", flush=True)
    try:
        subprocess.run([sys.executable, "-m", "venv", str(MITM_VENV)], check=True, capture_output=True)
        subprocess.run(
            [str(MITM_VENV / "bin" / "pip"), "install", "-q", f"mitmproxy=={MITM_VERSION}"],
            check=True,
            capture_output=True,
            timeout=900,
        )
    except (subprocess.SubprocessError, OSError) as exc:
        print(f"mitmproxy unavailable ({exc}); the peer row is skipped", flush=True)
        shutil.rmtree(MITM_VENV, ignore_errors=True)
        return None
    return exe


@dataclass
class Samples:
    values: dict[str, list[float]] = field(default_factory=dict)

    def add(self, key: str, value: float) -> None:
        self.values.setdefault(key, []).append(value)

    def median(self, key: str) -> float | None:
        return median(self.values.get(key, []))

    def ratio(self, key: str, of: str) -> float | None:
        """The median of the per-round ratios (see ``table.per_round``)."""
        return median(per_round(self.values, key, of))


def relay_config(
    work: Path, ingest: int, ui: int, sink: int | None, database: str | None = None, name: str = "relay"
) -> Path:
    """A relay TOML; ``sink=None``: no upstream (ingest alone)."""
    path = work / f"{name}.toml"
    upstream = f"""
[[upstreams]]
name = "sink"
source = "replicate"
url = "http://127.0.0.1:{sink}/hook"
"""
    path.write_text(
        f"""[relay]
database = "{database or work / "relay.db"}"
ingest_listen = "127.0.0.1:{ingest}"
ui_listen = "127.0.0.1:{ui}"

[[sources]]
name = "replicate"
path = "/webhooks/replicate"
secret = "{SECRET}"
{upstream if sink is not None else ""}"""
    )
    return path


def relay_process(work: Path, config: Path, ingest: int):  # type: ignore[no-untyped-def]
    """``relay serve`` with this config, up once its ingest listener answers; its log beside the config."""
    return process(
        [sys.executable, "-m", "relay", "serve", "--config", str(config), "--log-level", "warning"],
        f"http://127.0.0.1:{ingest}/healthz",
        log=work / f"{config.stem}.log",
    )


def remove_database(db: Path) -> None:
    """A SQLite database and its -wal and -shm files, so the next relay starts empty."""
    for stale in db.parent.glob(db.name + "*"):
        stale.unlink()


def reset_sink(sink: str) -> None:
    urllib.request.urlopen(urllib.request.Request(sink + "/reset", method="POST"), timeout=5).close()


def forwarder_pid(pid: int) -> int:
    found = forwarder_pids(pid)
    if not found:
        raise RuntimeError(f"process {pid} has no forwarder process (see its log)")
    return found[0]


def stored_span(db: Path) -> tuple[int, float, float, int]:
    """(deliveries stored, first and last ``received_at``, outbox rows to forward) of a SQLite database.

    Read once the count holds still: when wrk exits, the requests it had in flight may still be committing.
    """
    conn = sqlite3.connect(db)
    try:
        span = "SELECT COUNT(*), MIN(received_at), MAX(received_at) FROM deliveries"
        stored, first, last = conn.execute(span).fetchone()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            time.sleep(0.2)
            again = conn.execute(span).fetchone()
            if again[0] == stored:
                break
            stored, first, last = again
        to_forward = conn.execute("SELECT COUNT(*) FROM outbox WHERE state != 'skipped'").fetchone()[0]
    finally:
        conn.close()
    return stored, first, last, to_forward


def db_bytes_per_thousand(db: Path) -> float:
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    count = conn.execute("SELECT COUNT(*) FROM deliveries").fetchone()[0]
    conn.close()
    size = db.stat().st_size + sum(p.stat().st_size for p in db.parent.glob(db.name + "-*"))
    return size / count * 1000 if count else float("nan")


def run_round(
    work: Path,
    requests_file: Path,
    refresh: Callable[[], None],
    seconds: float,
    samples: Samples,
    mitmdump: Path | None,
) -> None:
    sink_port = free_port()
    with process(
        [sys.executable, str(BENCH / "sink.py"), str(sink_port)], f"http://127.0.0.1:{sink_port}/count"
    ) as sink_proc:
        sink = f"http://127.0.0.1:{sink_port}"
        # ceiling
        port = free_port()
        ceiling = f"http://127.0.0.1:{port}"
        with process([sys.executable, str(BENCH / "ceiling.py"), str(port)], ceiling + "/count") as server:
            url = ceiling + "/webhooks/replicate"
            with cpu_meter({"server": server.pid}) as used:
                saturated = wrk(url, requests_file, seconds, 64)
            seen = get_json(ceiling + "/count")
            samples.add("ceiling.ingest_rate", seen["count"] / (seen["last"] - seen["first"]))
            record_cpu(samples, "ceiling", used, saturated.requests)
            record(samples, "ceiling", saturated, wrk(url, requests_file, seconds, 10, 20))
        # relay
        refresh()  # signatures older than the 300 s tolerance would be refused (400), not stored
        remove_database(work / "relay.db")
        reset_sink(sink)
        ingest, ui = free_port(), free_port()
        url = f"http://127.0.0.1:{ingest}/webhooks/replicate"
        with relay_process(work, relay_config(work, ingest, ui, sink_port), ingest) as proc:
            # CPU from the first request until every delivery has reached the sink: all the work
            # the stored deliveries cost, ingest and forwarding, in each process on these cores.
            parts = {"relay": proc.pid, "forwarder": forwarder_pid(proc.pid), "sink": sink_proc.pid}
            with cpu_meter(parts) as used:
                saturated = wrk(url, requests_file, seconds, 64)
                stored, first, last, to_forward = stored_span(work / "relay.db")
                drain(samples, "relay", sink, stored, to_forward, first, last)
            record_cpu(samples, "relay", used, stored)
            refresh()  # new webhooks: repeats of the ones above would be duplicates, stored but not forwarded
            moderate = wrk(url, requests_file, seconds, 10, 20)  # the forwarder drains this as it comes
            record(samples, "relay", saturated, moderate)
            samples.add("relay.rss_mb", peak_rss_mb(proc.pid))
        samples.add("relay.db_bytes_per_1000", db_bytes_per_thousand(work / "relay.db"))
        # the same relay with no upstream: what ingest alone sustains when it has the cores to itself
        refresh()
        remove_database(work / "relay.db")
        ingest, ui = free_port(), free_port()
        with relay_process(work, relay_config(work, ingest, ui, None, name="ingest-only"), ingest) as proc:
            with cpu_meter({"relay": proc.pid}) as used:
                alone = wrk(f"http://127.0.0.1:{ingest}/webhooks/replicate", requests_file, seconds, 64)
            record_cpu(samples, "ingest_only", used, alone.requests)
            record(samples, "ingest_only", alone)
        # the floor: the least a durable verify-store-forward program must do (bench/floor.py), same sink and load
        refresh()
        remove_database(work / "floor.db")
        reset_sink(sink)
        port = free_port()
        args = [sys.executable, str(BENCH / "floor.py"), str(port), str(sink_port), str(work / "floor.db"), SECRET]
        with process(args, f"http://127.0.0.1:{port}/healthz", log=work / "floor.log") as floor:
            parts = {"ingest": floor.pid, "forwarder": forwarder_pid(floor.pid), "sink": sink_proc.pid}
            with cpu_meter(parts) as used:
                saturated = wrk(f"http://127.0.0.1:{port}/webhooks/replicate", requests_file, seconds, 64)
                stored, first, last, to_forward = stored_span(work / "floor.db")
                drain(samples, "floor", sink, stored, to_forward, first, last)
            record_cpu(samples, "floor", used, stored)
            record(samples, "floor", saturated)
        # peer: mitmdump as a reverse proxy writing flows to a file, in front of the same sink
        if mitmdump is not None:
            port = free_port()
            flows = work / "flows.mitm"
            args = [
                str(mitmdump),
                "--mode",
                f"reverse:{sink}",
                "--listen-host",
                "127.0.0.1",
                "--listen-port",
                str(port),
                "-w",
                str(flows),
                "-q",
            ]
            with process(args, f"http://127.0.0.1:{port}/count"):
                url = f"http://127.0.0.1:{port}/webhooks/replicate"
                record(samples, "peer", wrk(url, requests_file, seconds, 64), wrk(url, requests_file, seconds, 10, 20))
            flows.unlink(missing_ok=True)


def wrk_spread(urls: list[str], requests_file: Path, seconds: float, connections: int, delay_ms: int = 0) -> WrkResult:
    """One wrk per relay instance, at once, sharing the connections: the sum of rates, the worst p99.

    A stand-in for a load balancer, which this machine does not have.
    """
    with ThreadPoolExecutor(len(urls)) as pool:
        results = list(
            pool.map(
                lambda i: wrk(urls[i], requests_file, seconds, connections // len(urls), delay_ms, i, len(urls)),
                range(len(urls)),
            )
        )
    return WrkResult(
        rps=sum(r.rps for r in results),
        p50_ms=statistics.mean(r.p50_ms for r in results),
        p99_ms=max(r.p99_ms for r in results),
        requests=sum(r.requests for r in results),
        errors=sum(r.errors for r in results),
    )


def run_pg_round(
    work: Path,
    requests_file: Path,
    refresh: Callable[[], None],
    seconds: float,
    samples: Samples,
    cluster: Any,
    instances: int,
) -> None:
    """``instances`` relays on one fresh PostgreSQL database, each loaded by its own wrk."""
    refresh()
    name = f"pg{instances}"
    database = cluster.new_database()
    dbname = database.rsplit("/", 1)[1]
    sink_port = free_port()
    with ExitStack() as stack:
        stack.enter_context(
            process([sys.executable, str(BENCH / "sink.py"), str(sink_port)], f"http://127.0.0.1:{sink_port}/count")
        )
        urls, procs = [], []
        for n in range(instances):
            ingest, ui = free_port(), free_port()
            config = relay_config(work, ingest, ui, sink_port, database, name=f"{name}-{n}")
            procs.append(stack.enter_context(relay_process(work, config, ingest)))
            urls.append(f"http://127.0.0.1:{ingest}/webhooks/replicate")
        saturated = wrk_spread(urls, requests_file, seconds, 64)
        stored, first, last = (
            float(x)
            for x in cluster.psql(
                "SELECT COUNT(*) || ' ' || MIN(received_at) || ' ' || MAX(received_at) FROM deliveries", dbname
            ).split()
        )
        to_forward = int(cluster.psql("SELECT COUNT(*) FROM outbox WHERE state != 'skipped'", dbname))
        drain(samples, name, f"http://127.0.0.1:{sink_port}", int(stored), to_forward, first, last)
        refresh()  # new webhooks for the moderate run (repeats would not be forwarded)
        moderate = wrk_spread(urls, requests_file, seconds, 9 if instances == 3 else 10, 20)
        record(samples, name, saturated, moderate)
        samples.add(f"{name}.rss_mb", max(peak_rss_mb(p.pid) for p in procs))
    size = int(cluster.psql(f"SELECT pg_database_size('{dbname}')"))
    samples.add(f"{name}.db_bytes_per_1000", size / stored * 1000 if stored else float("nan"))


def drain(samples: Samples, name: str, sink: str, stored: int, to_forward: int, first: float, last: float) -> None:
    """Wait until the sink has every delivery; record ingest and drain rates over the relay's own clock.

    Both windows start at the first delivery's ``received_at`` (wall clock, as is the
    sink's): timing around wrk would also count the seconds its Lua script spends
    loading the request file before the first request.
    """
    deadline = time.monotonic() + 300
    while (seen := get_json(sink + "/count"))["count"] < to_forward and time.monotonic() < deadline:
        time.sleep(0.05)
    if seen["count"] < to_forward:
        print(f"  {name}: only {seen['count']} of {to_forward} deliveries reached the sink within 300 s", flush=True)
    samples.add(f"{name}.ingest_rate", stored / (last - first))
    samples.add(f"{name}.undelivered", max(to_forward - seen["count"], 0))
    if seen["count"]:
        samples.add(f"{name}.drain_rate", seen["count"] / (seen["last"] - first))
        # How long after the last delivery was stored the last one reached the sink: near zero
        # when forwarding kept pace with ingest throughout, the backlog's drain time when it did not.
        samples.add(f"{name}.drain_lag_s", seen["last"] - last)
    print(
        f"  {name} stored {stored} in {last - first:.1f} s, forwarded {seen['count']} by {seen['last'] - first:.1f} s",
        flush=True,
    )


def record(samples: Samples, name: str, saturated: WrkResult, moderate: WrkResult | None = None) -> None:
    """A target's figures at saturation (64 connections) and, when measured, at the moderate rate."""
    errors = saturated.errors + (moderate.errors if moderate else 0)
    samples.add(f"{name}.rps", saturated.rps)
    samples.add(f"{name}.p50_ms", saturated.p50_ms)
    samples.add(f"{name}.p99_ms", saturated.p99_ms)
    samples.add(f"{name}.errors", errors)
    line = f"  {name:11} {saturated.rps:9.0f} req/s  p99 {saturated.p99_ms:6.1f} ms | "
    if moderate is not None:
        samples.add(f"{name}.moderate_rps", moderate.rps)
        samples.add(f"{name}.moderate_p50_ms", moderate.p50_ms)
        samples.add(f"{name}.moderate_p99_ms", moderate.p99_ms)
        line += f"moderate {moderate.rps:5.0f} req/s p99 {moderate.p99_ms:5.1f} ms | "
    print(line + f"errors {errors}", flush=True)


async def query_latency(work: Path, rows: int, samples: Samples) -> None:
    """List page and full-text search latency through the real API on a database of ``rows`` deliveries."""
    import aiohttp

    from relay.config import parse_config
    from relay.service import Relay

    db = work / "big.db"
    remove_database(db)
    config = parse_config(
        {
            "relay": {"database": str(db), "ingest_listen": "127.0.0.1:0", "ui_listen": "127.0.0.1:0"},
            "sources": [{"name": "replicate", "path": "/webhooks/replicate", "secret": SECRET}],
        },
        env={},
    )
    relay = Relay(config)
    bound = await relay.start()
    try:
        async with aiohttp.ClientSession() as session:
            now = int(time.time())
            needle_every = 1000

            async def post(i: int) -> None:
                document = prediction_lifecycle(f"p{i // 4:07d}", "https://relay.example.com/w", now)[i % 4]
                if i % needle_every == 0:
                    document["error"] = "CUDA out of memory while allocating latents"
                body = encode(document)
                msg_id = f"msg_{i}"
                headers = {
                    "webhook-id": msg_id,
                    "webhook-timestamp": str(now),
                    "webhook-signature": sign(KEY, msg_id, now, body),
                    "Content-Type": "application/json",
                }
                async with session.post(bound.ingest_url + "/webhooks/replicate", data=body, headers=headers) as r:
                    await r.read()

            t0 = time.monotonic()
            for start in range(0, rows, 256):
                await asyncio.gather(*(post(i) for i in range(start, min(start + 256, rows))))
            print(f"  seeded {rows} deliveries in {time.monotonic() - t0:.1f} s", flush=True)
            assert relay.store is not None
            await relay.store.catch_up_index()

            async def timed(path: str, key: str) -> None:
                for _ in range(30):
                    t = time.perf_counter()
                    async with session.get(bound.admin_url + path) as resp:
                        await resp.read()
                        assert resp.status == 200, path
                    samples.add(key, (time.perf_counter() - t) * 1000)

            await timed("/api/deliveries", "query.list_ms")
            await timed("/api/deliveries?status=succeeded&limit=50", "query.filter_ms")
            await timed("/api/deliveries?q=CUDA%20out%20of%20memory", "query.fts_ms")
            await timed("/", "query.page_ms")
    finally:
        await relay.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few seconds per target (CI)")
    parser.add_argument("--rounds", type=int, help="rounds (default 3, quick 1)")
    parser.add_argument("--seconds", type=float, help="seconds per wrk run (default 10, quick 2)")
    parser.add_argument("--rows", type=int, help="deliveries for the query benchmark (default 100000, quick 5000)")
    parser.add_argument("--no-peer", action="store_true", help="skip mitmdump")
    parser.add_argument("--no-pg", action="store_true", help="skip the PostgreSQL rows")
    args = parser.parse_args()
    rounds = args.rounds or (1 if args.quick else 3)
    seconds = args.seconds or (2 if args.quick else 10)
    rows = args.rows or (5000 if args.quick else 100_000)
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed: apt-get install wrk")
    mitmdump = None if args.no_peer else mitmdump_path()
    samples = Samples()
    cluster = None
    if not args.no_pg:
        from pgcluster import PostgresCluster  # the tests' private server, here with fsync on

        cluster = PostgresCluster(durable=True).start()
    with ExitStack() as cleanup, tempfile.TemporaryDirectory(prefix="relay-bench-") as tmp:
        if cluster is not None:
            cleanup.callback(cluster.stop)
        work = Path(tmp)
        requests_file = work / "requests.tsv"
        # Unique requests for the whole relay run: a repeated webhook-id and body is a
        # duplicate, which the relay stores but does not forward again.
        count = 30_000 if args.quick else int(8_000 * seconds)

        def refresh() -> None:
            make_requests(requests_file, count)

        refresh()
        for number in range(1, rounds + 1):
            print(f"round {number}/{rounds}", flush=True)
            run_round(work, requests_file, refresh, seconds, samples, mitmdump)
            if cluster is not None:
                for instances in (1, 3):
                    run_pg_round(work, requests_file, refresh, seconds, samples, cluster, instances)
        print(f"query latency on {rows} deliveries", flush=True)
        asyncio.run(query_latency(work, rows, samples))
    report(samples, rounds, seconds, rows, args.quick)


def report(samples: Samples, rounds: int, seconds: float, rows: int, quick: bool) -> None:
    m = samples.median
    figures = {k: m(k) for k in samples.values}
    # Against the ceiling and the floor: rates on each server's own clock (first to last request
    # received), which wrk's Requests/sec overstates by starting its clock after its first thread.
    figures["relay/ceiling"] = samples.ratio("relay.ingest_rate", "ceiling.ingest_rate")
    figures["floor/ceiling"] = samples.ratio("floor.ingest_rate", "ceiling.ingest_rate")
    figures["relay/floor"] = samples.ratio("relay.ingest_rate", "floor.ingest_rate")
    figures["relay/peer"] = samples.ratio("relay.rps", "peer.rps")  # mitmdump has no clock of its own to read
    figures["pg3/pg1"] = samples.ratio("pg3.rps", "pg1.rps")
    result = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
        },
        "settings": {
            "rounds": rounds,
            "seconds": seconds,
            "rows": rows,
            "quick": quick,
            "connections": 64,
            "moderate": "10 connections x 20 ms think time (~500 req/s)",
        },
        "medians": figures,
        "samples": samples.values,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / ("quick.json" if quick else "latest.json")
    out.write_text(json.dumps(result, indent=2))
    print()
    print(markdown(result))  # the same text the README shows (bench/table.py)
    print(f"written to {out}")


if __name__ == "__main__":
    main()
