"""Prometheus metrics of one gateway, each app in its own registry."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


@dataclass
class GatewayMetrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.requests = Counter(
            "gateway_requests_total",
            "Finished HTTP requests by route, status and error code (empty on success).",
            ["route", "status", "code"],
            registry=r,
        )
        self.cache_lookups = Counter(
            "gateway_cache_lookups_total",
            "Audio requests by cache outcome: hit, miss or bypass.",
            ["result"],
            registry=r,
        )
        self.cache_errors = Counter(
            "gateway_cache_errors_total",
            "Redis calls that failed or ran past the cache budget; each is served as a miss.",
            ["operation"],
            registry=r,
        )
        self.cache_skipped = Counter(
            "gateway_cache_skipped_total",
            "Cache calls skipped while Redis is considered down after a failure.",
            ["operation"],
            registry=r,
        )
        self.cache_stores = Counter(
            "gateway_cache_stores_total",
            "Finished syntheses by what happened to their audio: stored, too_large, failed.",
            ["result"],
            registry=r,
        )
        self.single_flight_joins = Counter(
            "gateway_single_flight_joins_total",
            "Requests that joined a synthesis already running for the same key.",
            registry=r,
        )
        self.upstream_attempts = Counter(
            "gateway_upstream_attempts_total",
            "Requests sent to a worker, by outcome: ok, busy, http_error, connect_error, timeout.",
            ["outcome"],
            registry=r,
        )
        self.upstream_aborted = Counter(
            "gateway_upstream_aborted_streams_total",
            "Worker streams that broke after the first byte (never cached).",
            registry=r,
        )
        self.cache_version_mismatch = Counter(
            "gateway_cache_version_mismatch_total",
            "Complete syntheses served uncached: the worker's X-Model-Version was not the "
            "model version in the request's cache key (a rolling upgrade).",
            registry=r,
        )
        self.time_to_first_byte = Histogram(
            "gateway_time_to_first_byte_seconds",
            "From request arrival to the first audio byte handed to the client, by cache result.",
            ["cache"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.active_flights = Gauge(
            "gateway_active_syntheses",
            "Worker syntheses this gateway is relaying now.",
            registry=r,
        )
        self.worker_ready = Gauge(
            "gateway_worker_ready",
            "1 when the last poll found a ready worker behind the upstream URL, else 0.",
            registry=r,
        )
