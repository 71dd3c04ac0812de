"""The worker's underrun metrics on its real streaming path, with a slowed and a fast engine."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from worker.app import create_app
from worker.engines.base import Audio, Capabilities, EngineRequest, VoiceInfo
from worker.settings import WorkerSettings

RATE = 16000
CHUNK_S = 0.05


@dataclass
class PacedEngine:
    """Yields `chunks` chunks of 50 ms of audio, sleeping `pause_s` before each after the first."""

    chunks: int
    pause_s: float

    def load(self) -> None:
        return None

    def warm_up(self) -> None:
        return None

    def capabilities(self) -> Capabilities:
        return Capabilities(
            engine="paced",
            model="paced",
            model_version="1",
            sample_rate=RATE,
            modes=("sft",),
            languages=("en",),
            voices=(VoiceInfo(id="v", name="V", language="en"),),
            default_voice="v",
            supports_cloning=False,
            supports_instructions=False,
        )

    async def stream(self, request: EngineRequest) -> AsyncIterator[Audio]:
        for index in range(self.chunks):
            if index:
                await asyncio.sleep(self.pause_s)
            yield np.full(int(RATE * CHUNK_S), 0.1, dtype=np.float32)


async def run_streams(engine: PacedEngine, streams: int) -> dict[str, float]:
    """Stream `streams` requests through the worker app; return its metric samples by name."""
    settings = WorkerSettings.model_validate({"max_concurrency": 2, "max_queue": 4})
    app = create_app(settings, engine=engine)
    await app.state.worker.load_engine()
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://worker") as client:
        for _ in range(streams):
            response = await client.post("/v1/synthesize", json={"text": "Hi.", "format": "wav"})
            assert response.status_code == 200
        text = (await client.get("/metrics")).text
    return {
        sample.name + _labels(sample.labels): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _labels(labels: dict[str, str]) -> str:
    return "".join(f"{{{k}={v}}}" for k, v in sorted(labels.items()))


async def test_fast_stream_never_falls_behind() -> None:
    # Chunks of 50 ms come back to back: the buffer only grows.
    samples = await run_streams(PacedEngine(chunks=6, pause_s=0.0), streams=3)
    assert samples["worker_stream_worst_gap_seconds_count"] == 3
    assert samples["worker_stream_worst_gap_seconds_sum"] < 0.03
    assert samples["worker_stream_worst_gap_seconds_bucket{le=0.1}"] == 3
    assert samples["worker_streams_without_underrun_total"] == 3


async def test_slowed_stream_counts_its_worst_gap() -> None:
    # 50 ms of audio every 300 ms: each chunk after the first waits about 250 ms.
    samples = await run_streams(PacedEngine(chunks=4, pause_s=0.3), streams=2)
    assert samples["worker_stream_worst_gap_seconds_count"] == 2
    assert samples["worker_stream_worst_gap_seconds_bucket{le=0.1}"] == 0
    assert samples["worker_stream_worst_gap_seconds_bucket{le=0.2}"] == 0
    assert samples["worker_stream_worst_gap_seconds_sum"] >= 2 * 0.24
    assert samples["worker_streams_without_underrun_total"] == 0


async def test_queue_and_slots_are_exported() -> None:
    samples = await run_streams(PacedEngine(chunks=1, pause_s=0.0), streams=1)
    assert samples["worker_queued_requests"] == 0
    assert samples["worker_max_concurrency"] == 2
