"""Prometheus metrics of one worker, in a registry of its own (one per app)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)
RTF_BUCKETS = (0.02, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 5.0)


class WorkerMetrics:
    """The worker's metric families; names are part of the contract the gateway reads."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "worker_requests",
            "Finished synthesis requests by HTTP status and error code ('' on success).",
            ["status", "code"],
            registry=self.registry,
        )
        self.syntheses_started = Counter(
            "worker_syntheses_started",
            "Engine syntheses actually started (after admission).",
            registry=self.registry,
        )
        self.queue_wait = Histogram(
            "worker_queue_wait_seconds",
            "Time an admitted request waited for a synthesis slot.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.time_to_first_audio = Histogram(
            "worker_time_to_first_audio_seconds",
            "From request arrival to the first audio chunk from the engine.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.real_time_factor = Histogram(
            "worker_real_time_factor",
            "Synthesis wall time over audio duration, per completed request.",
            buckets=RTF_BUCKETS,
            registry=self.registry,
        )
        self.active_streams = Gauge(
            "worker_active_streams",
            "Syntheses holding a slot right now.",
            registry=self.registry,
        )
        self.audio_seconds = Counter(
            "worker_audio_seconds",
            "Seconds of audio produced.",
            registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
