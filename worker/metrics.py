"""Prometheus metrics of one worker, in a registry of its own (one per app)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from worker.admission import Admission

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)
RTF_BUCKETS = (0.02, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 5.0)
# 0 counts streams that never made a listener wait; 0.1 is contract.playback's underrun line.
GAP_BUCKETS = (0.0, 0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


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
        self.stream_worst_gap = Histogram(
            "worker_stream_worst_gap_seconds",
            "Per stream that sent audio, its longest wait behind a listener's playback "
            "(wall time between chunks beyond the audio already sent; contract.playback).",
            buckets=GAP_BUCKETS,
            registry=self.registry,
        )
        self.streams_without_underrun = Counter(
            "worker_streams_without_underrun",
            "Streams that never fell more than 100 ms behind playback.",
            registry=self.registry,
        )
        self.queued = Gauge(
            "worker_queued_requests",
            "Requests waiting for a synthesis slot right now.",
            registry=self.registry,
        )
        self.max_concurrency = Gauge(
            "worker_max_concurrency",
            "Synthesis slots this worker has (saturation = active streams / this).",
            registry=self.registry,
        )

    def watch_admission(self, admission: Admission, max_concurrency: int) -> None:
        """Export the admission queue's length, read at each scrape, and the slot count."""
        self.queued.set_function(lambda: admission.waiting)
        self.max_concurrency.set(max_concurrency)

    def watch_gpu(self, device: str) -> None:
        """Export the GPU memory this process holds (torch's caching allocator) and the card's
        total, read at each scrape; for workers whose engine runs on a CUDA `device`."""
        import torch

        if not torch.cuda.is_available():
            return
        index = torch.device(device).index or 0
        labels = {"device": f"cuda:{index}"}
        held = Gauge("worker_gpu_memory_bytes", "GPU memory reserved by this worker's torch.",
                     ["device"], registry=self.registry)
        limit = Gauge("worker_gpu_memory_limit_bytes", "Total memory of the worker's GPU.",
                      ["device"], registry=self.registry)
        held.labels(**labels).set_function(lambda: torch.cuda.memory_reserved(index))
        limit.labels(**labels).set(torch.cuda.get_device_properties(index).total_memory)

    def render(self) -> bytes:
        return generate_latest(self.registry)
