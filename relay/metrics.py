"""Prometheus metrics, held in a registry per relay instance rather than the global one.

A private registry keeps tests (several relays in one process) independent
and keeps library-default collectors out of the relay's /metrics.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.deliveries = Counter(
            "relay_deliveries",
            "Deliveries stored, by source and verdict",
            ["source", "verdict"],
            registry=self.registry,
        )
        self.ingest_refused = Counter(
            "relay_ingest_refused",
            "Ingest requests answered without storing (503) or over the size limit (413)",
            ["source", "reason"],
            registry=self.registry,
        )
        self.ingest_latency = Histogram(
            "relay_ingest_seconds",
            "Time from request start to the committed answer",
            ["source"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.attempts = Counter(
            "relay_attempts",
            "Attempts made, by upstream (or target kind) and outcome",
            ["upstream", "kind", "outcome"],
            registry=self.registry,
        )
        self.attempt_latency = Histogram(
            "relay_attempt_seconds",
            "Duration of forwarding attempts",
            ["upstream"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.outbox_depth = Gauge(
            "relay_outbox_rows",
            "Outbox rows by state",
            ["state"],
            registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
