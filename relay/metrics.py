"""Prometheus metrics, held in a registry per relay instance rather than the global one.

A private registry keeps tests (several relays in one process) independent
and keeps library-default collectors out of the relay's /metrics.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    def __init__(self) -> None:
        self._children: dict[tuple[str, str], tuple[Any, Any]] = {}
        self.registry = CollectorRegistry(auto_describe=True)
        self.deliveries = Counter(
            "relay_deliveries",
            "Deliveries stored, by source and verdict",
            ["source", "verdict"],
            registry=self.registry,
        )
        self.ingest_refused = Counter(
            "relay_ingest_refused",
            "Ingest requests answered without storing (503, 408 for a slow body) or over the size limit (413)",
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

    def delivery_recorded(self, source: str, verdict: str, seconds: float) -> None:
        """Count a stored delivery; label children are cached (this runs once per webhook)."""
        key = (source, verdict)
        children = self._children.get(key)
        if children is None:
            children = (self.deliveries.labels(source, verdict), self.ingest_latency.labels(source))
            self._children[key] = children
        children[0].inc()
        children[1].observe(seconds)

    def forward_attempt(self, upstream: str, outcome: str, seconds: float) -> None:
        """Count a forwarding attempt, whether the forwarder runs inline or in its own process."""
        self.attempts.labels(upstream, "forward", outcome).inc()
        self.attempt_latency.labels(upstream).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
