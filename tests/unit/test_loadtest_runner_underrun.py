"""The runner's client-side underrun figures: per stream, per level, in table and JSON."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import numpy as np
import pytest

from loadtest.runner.probe import measure
from loadtest.runner.report import HEADER, table_row
from loadtest.runner.stats import Sample, summarize
from loadtest.runner.targets import Api, Target

RATE = 24000
CHUNK_S = 0.05


class PacedBody(httpx.AsyncByteStream):
    """`chunks` pieces of 50 ms of 16-bit PCM, `pause_s` apart."""

    def __init__(self, chunks: int, pause_s: float) -> None:
        tone = 0.3 * np.sin(2 * np.pi * 220 * np.arange(int(RATE * CHUNK_S)) / RATE)
        self._piece = (tone * 32767).astype("<i2").tobytes()
        self._chunks = chunks
        self._pause_s = pause_s

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for index in range(self._chunks):
            if index:
                await asyncio.sleep(self._pause_s)
            yield self._piece


async def _measure(pause_s: float, audio_format: str = "pcm") -> Sample:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200, stream=PacedBody(chunks=4, pause_s=pause_s), headers={"X-Sample-Rate": "24000"}
        )

    target = Target(label="t", url="http://t", api=Api.OPENAI, format=audio_format)
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        return await measure(client, target, "Hello.", None)


async def test_a_stream_ahead_of_playback_has_no_gap() -> None:
    sample = await _measure(pause_s=0.0)
    assert sample.ok
    assert sample.audio_s == pytest.approx(4 * CHUNK_S)
    assert sample.worst_gap_s is not None
    assert sample.worst_gap_s < 0.02


async def test_a_slowed_stream_reports_its_worst_gap() -> None:
    # 50 ms of audio every 300 ms: each later piece leaves the listener waiting about 250 ms.
    sample = await _measure(pause_s=0.3)
    assert sample.ok
    assert sample.worst_gap_s is not None
    assert 0.2 < sample.worst_gap_s < 0.6


async def test_compressed_formats_are_not_measured() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=b"not flac")

    target = Target(label="t", url="http://t", api=Api.OPENAI, format="flac")
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        sample = await measure(client, target, "Hello.", None)
    assert sample.worst_gap_s is None


def test_level_figures_table_and_json() -> None:
    samples = [
        Sample(status=200, latency_s=1.0, audio_s=1.0, worst_gap_s=0.0),
        Sample(status=200, latency_s=1.0, audio_s=1.0, worst_gap_s=0.05),
        Sample(status=200, latency_s=1.0, audio_s=1.0, worst_gap_s=0.3),
        Sample(status=200, latency_s=1.0, audio_s=1.0, worst_gap_s=None),  # not measured
        Sample(status=503, latency_s=0.01, error="busy", worst_gap_s=None),
    ]
    result = summarize("t", 2, samples, elapsed_s=2.0)
    assert result.worst_gap_s.count == 3
    assert result.worst_gap_s.p50 == pytest.approx(0.05)
    assert result.worst_gap_s.max == pytest.approx(0.3)
    assert result.without_underrun_ratio == pytest.approx(2 / 3)
    row = table_row(result)
    assert len(row) == len(HEADER)
    assert row.split()[-3:] == ["50ms", "295ms", "67"]
    doc = result.to_json()
    assert doc["worst_gap_s"]["p99"] == pytest.approx(0.295)
    assert doc["without_underrun_ratio"] == pytest.approx(2 / 3)


def test_levels_without_measured_streams_say_so() -> None:
    result = summarize("t", 1, [Sample(status=200, latency_s=1.0, audio_s=1.0)], 1.0)
    assert result.worst_gap_s.count == 0
    assert result.without_underrun_ratio is None
    assert table_row(result).split()[-3:] == ["-", "-", "-"]
