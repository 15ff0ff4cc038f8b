"""Print a results file of bench/run.py as the Markdown the README's Performance section shows.

So that the README's figures are copied by a program, not by hand:
``python3 bench/table.py [bench/results/latest.json]`` prints it, and with
``--readme`` writes it between the README's ``bench:begin`` and ``bench:end`` markers.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

BEGIN = "<!-- bench:begin (written by python3 bench/table.py --readme) -->"
END = "<!-- bench:end -->"
TARGETS = (
    ("ceiling", "ceiling (bare aiohttp)"),
    ("floor", "floor (verify, store, forward, nothing else)"),
    ("relay", "relay (SQLite)"),
    ("ingest_only", "relay, no upstream (ingest alone)"),
    ("peer", "peer (mitmdump -w)"),
    ("pg1", "relay on PostgreSQL, 1 relay"),
    ("pg3", "relay on PostgreSQL, 3 relays"),
)


def fmt(value: float | None, spec: str = ",.0f") -> str:
    return "—" if value is None else format(value, spec)


def megabytes(value: float | None) -> float | None:
    return None if value is None else value / 1e6


def rounds(samples: dict[str, list[float]], key: str, spec: str = ".1f") -> str:
    return ", ".join(fmt(v, spec) for v in samples.get(key, [])) or "—"


def per_round(samples: dict[str, list[float]], key: str, of: str) -> list[float]:
    """Each round's ratio of two figures (rounds run minutes apart, on the machine as it was then);
    none unless both were measured in every round."""
    tops, bottoms = samples.get(key, []), samples.get(of, [])
    if len(tops) != len(bottoms) or not all(bottoms):
        return []
    return [top / bottom for top, bottom in zip(tops, bottoms, strict=True)]


def floor_bound(result: dict[str, Any]) -> list[float]:
    """Per round: the most deliveries a second the floor's CPU per delivery (its two processes and
    the sink; wrk left out) allows on all of the machine's cores, as a fraction of the ceiling."""
    s: dict[str, list[float]] = result["samples"]
    parts = [s.get(f"floor.cpu_us.{part}", []) for part in ("ingest", "forwarder", "sink")]
    ceilings = s.get("ceiling.ingest_rate", [])
    rounds_seen = min([len(ceilings), *(len(p) for p in parts)])
    cores = result["machine"]["cpus"]
    return [cores * 1e6 / sum(p[i] for p in parts) / ceilings[i] for i in range(rounds_seen)]


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def listed(values: list[float]) -> str:
    return ", ".join(fmt(v, ".2f") for v in values) or "—"


def markdown(result: dict[str, Any]) -> str:
    m: dict[str, float | None] = result["medians"]
    s: dict[str, list[float]] = result["samples"]
    get = m.get
    lines = [
        "| target | req/s (64 conns) | p50 ms | p99 ms | p50 ms @ ~500 req/s | p99 ms @ ~500 req/s | errors |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for key, label in TARGETS:
        if get(f"{key}.rps") is None:
            continue
        lines.append(
            f"| {label} | {fmt(get(f'{key}.rps'))} | {fmt(get(f'{key}.p50_ms'), '.1f')} | "
            f"{fmt(get(f'{key}.p99_ms'), '.1f')} | {fmt(get(f'{key}.moderate_p50_ms'), '.1f')} | "
            f"{fmt(get(f'{key}.moderate_p99_ms'), '.1f')} | {fmt(get(f'{key}.errors'))} |"
        )
    machine = result["machine"]
    lines += [
        "",
        f"Machine: {machine['cpus']} CPUs ({machine['processor']}), Python {machine['python']}, "
        f"{machine['platform']}; {result['settings']['rounds']} rounds of "
        f"{result['settings']['seconds']:g} s, medians.",
        "",
        f"* Per round: ceiling req/s {rounds(s, 'ceiling.rps', ',.0f')}; relay req/s {rounds(s, 'relay.rps', ',.0f')}; "
        f"relay p99 at ~500 req/s {rounds(s, 'relay.moderate_p99_ms')} ms; "
        f"mitmdump req/s {rounds(s, 'peer.rps', ',.0f')}.",
        f"* relay / ceiling **{fmt(get('relay/ceiling'), '.2f')}** (ingest on each server's own clock: "
        f"{fmt(get('relay.ingest_rate'))} against {fmt(get('ceiling.ingest_rate'))}/s; ratios are medians of the "
        f"rounds' ratios); relay / mitmdump **{fmt(get('relay/peer'), '.1f')}×** (wrk's figures).",
        f"* The floor (`bench/floor.py`) reaches **{fmt(get('floor/ceiling'), '.2f')}** of the ceiling (per round: "
        f"{listed(per_round(s, 'floor.ingest_rate', 'ceiling.ingest_rate'))}), forwarding "
        f"{fmt(get('floor.drain_rate'))}/s against an ingest of {fmt(get('floor.ingest_rate'))}/s, at "
        f"{fmt(get('floor.cpu_us.ingest'))} µs (ingest process) + {fmt(get('floor.cpu_us.forwarder'))} µs "
        f"(forwarder) + {fmt(get('floor.cpu_us.sink'))} µs (sink) + {fmt(get('floor.cpu_us.wrk'))} µs (wrk) of CPU "
        f"per delivery. With both cores its own and wrk costing nothing, that CPU would carry at most "
        f"**{fmt(median(floor_bound(result)), '.2f')}** of the ceiling (per round: {listed(floor_bound(result))}). "
        f"The relay reaches **{fmt(get('relay/floor'), '.2f')}** of the floor "
        f"(per round: floor req/s {rounds(s, 'floor.rps', ',.0f')}).",
        f"* Forwarding at saturation: **{fmt(get('relay.drain_rate'))} deliveries/s** reached the sink against an "
        f"ingest of **{fmt(get('relay.ingest_rate'))}/s**. PostgreSQL: {fmt(get('pg1.drain_rate'))}/s against "
        f"{fmt(get('pg1.ingest_rate'))}/s with one relay, {fmt(get('pg3.drain_rate'))}/s against "
        f"{fmt(get('pg3.ingest_rate'))}/s with three.",
        f"* Peak RSS **{fmt(get('relay.rss_mb'))} MB** for the relay's two processes together "
        f"(PostgreSQL: {fmt(get('pg1.rss_mb'))} MB per relay); "
        f"**{fmt(megabytes(get('relay.db_bytes_per_1000')), '.1f')} MB of database per 1,000 deliveries** with "
        f"SQLite, {fmt(megabytes(get('pg1.db_bytes_per_1000')), '.1f')} MB with PostgreSQL.",
        f"* On a database of **{result['settings']['rows']:,} deliveries**, through the HTTP API: list page "
        f"**{fmt(get('query.list_ms'), '.1f')} ms**, filtered list {fmt(get('query.filter_ms'), '.1f')} ms, "
        f"full-text search **{fmt(get('query.fts_ms'), '.1f')} ms**, the HTML list page "
        f"{fmt(get('query.page_ms'), '.1f')} ms.",
        f"* CPU per delivery at saturation (ingest and forwarding): relay main process "
        f"**{fmt(get('relay.cpu_us.relay'))} µs**, forwarder process **{fmt(get('relay.cpu_us.forwarder'))} µs**, "
        f"sink {fmt(get('relay.cpu_us.sink'))} µs, wrk {fmt(get('relay.cpu_us.wrk'))} µs. Per request of the "
        f"ceiling: the server {fmt(get('ceiling.cpu_us.server'))} µs, wrk {fmt(get('ceiling.cpu_us.wrk'))} µs. "
        f"With no upstream: the relay {fmt(get('ingest_only.cpu_us.relay'))} µs, "
        f"wrk {fmt(get('ingest_only.cpu_us.wrk'))} µs per request.",
    ]
    return "\n".join(lines + ["", *targets(result)])


def judged(ok: bool | None, quick: bool) -> str:
    if quick:
        return "not judged (quick run)"
    return "not measured" if ok is None else ("**met**" if ok else "**not met**")


def at_most(value: float | None, limit: float) -> bool | None:
    return None if value is None else value <= limit


def targets(result: dict[str, Any]) -> list[str]:
    """Issue 5's targets against this file's medians, judged here so that no verdict is typed by hand."""
    m: dict[str, float | None] = result["medians"]
    s: dict[str, list[float]] = result["samples"]
    quick = bool(result["settings"]["quick"])
    rows = result["settings"]["rows"]
    ceiling, peer = m.get("relay/ceiling"), m.get("relay/peer")
    p99 = m.get("relay.moderate_p99_ms")
    lags = s.get("relay.drain_lag_s", [])
    # Kept pace: every delivery reached the sink, the last within 2 % of a run's length of the last one stored.
    lag_limit = max(0.2, 0.02 * result["settings"]["seconds"])
    undelivered = s.get("relay.undelivered", [])
    kept_pace = None if not lags else (max(lags) <= lag_limit and not any(undelivered))
    listing, search = m.get("query.list_ms"), m.get("query.fts_ms")
    at_scale = None
    if listing is not None and search is not None and rows >= 100_000:
        at_scale = listing <= 50 and search <= 50
    return [
        "Against the targets of issue 5 (judged by `bench/table.py` from the same file):",
        "",
        f"* Ingest ≥ 50 % of the ceiling: {judged(None if ceiling is None else ceiling >= 0.5, quick)} "
        f"({fmt(ceiling, '.2f')}; the floor {fmt(m.get('floor/ceiling'), '.2f')}; on the servers' own clocks).",
        f"* Ingest ≥ 3× mitmdump: {judged(None if peer is None else peer >= 3, quick)} ({fmt(peer, '.1f')}×).",
        f"* p99 ≤ 20 ms at ~500 req/s while the forwarder drains: {judged(at_most(p99, 20), quick)} "
        f"({fmt(p99, '.1f')} ms; rounds {rounds(s, 'relay.moderate_p99_ms')}).",
        f"* Forwarding drains at least as fast as ingest: {judged(kept_pace, quick)} "
        f"({fmt(m.get('relay.drain_rate'))}/s against {fmt(m.get('relay.ingest_rate'))}/s; the last delivery "
        f"reached the sink {rounds(s, 'relay.drain_lag_s', '.2f')} s after the last one was stored, per round "
        f"(at most {lag_limit:g} s allowed); deliveries that never arrived: "
        f"{rounds(s, 'relay.undelivered', ',.0f')}).",
        f"* List page and full-text search ≤ 50 ms at 100,000 deliveries: {judged(at_scale, quick)} "
        f"({fmt(listing, '.1f')} and {fmt(search, '.1f')} ms at {rows:,}).",
    ]


def write_into(readme: Path, text: str) -> None:
    """Replace what lies between the README's two markers with ``text``."""
    content = readme.read_text()
    head, begin, rest = content.partition(BEGIN)
    _, end, tail = rest.partition(END)
    if not begin or not end:
        raise SystemExit(f"{readme} has no {BEGIN} ... {END} block")
    readme.write_text(f"{head}{BEGIN}\n{text}\n{END}{tail}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="?", type=Path, default=Path(__file__).parent / "results" / "latest.json")
    parser.add_argument("--readme", action="store_true", help="write the text into README.md's Performance section")
    args = parser.parse_args()
    text = markdown(json.loads(args.results.read_text()))
    if args.readme:
        write_into(Path(__file__).resolve().parent.parent / "README.md", text)
    else:
        print(text)


if __name__ == "__main__":
    main()
