"""Statistics, audio accounting, texts and the sweep of the benchmark runner."""

from __future__ import annotations

import io
import json
import struct
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile

from loadtest.runner.audio import AudioDecodeError, audio_seconds, audio_stats
from loadtest.runner.plot import write_plot
from loadtest.runner.probe import measure
from loadtest.runner.report import cache_line, document, table_row
from loadtest.runner.stats import Sample, distribution, percentile, summarize
from loadtest.runner.sweep import SweepPlan, run_sweep
from loadtest.runner.targets import Api, Target
from loadtest.runner.texts import PHRASES, TextMode, TextSource


def _tone(samples: int, rate: int = 24000, amplitude: float = 0.5) -> np.ndarray:
    return (amplitude * np.sin(np.arange(samples) * 2 * np.pi * 220 / rate)).astype(np.float32)


def _pcm16(samples: np.ndarray) -> bytes:
    return (samples * 32767).astype("<i2").tobytes()


@pytest.mark.parametrize("q", [0, 1, 25, 50, 90, 95, 99, 99.9, 100])
@pytest.mark.parametrize("n", [1, 2, 7, 100, 1001])
def test_percentile_matches_numpy_linear(q: float, n: int) -> None:
    values = list(np.random.default_rng(n).exponential(size=n))
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_percentile_rejects_empty_and_bad_q() -> None:
    with pytest.raises(ValueError, match="no values"):
        percentile([], 50)
    with pytest.raises(ValueError, match="between 0 and 100"):
        percentile([1.0], 101)


def test_distribution_of_known_values() -> None:
    dist = distribution([float(v) for v in range(1, 101)])
    assert dist.count == 100
    assert dist.mean == pytest.approx(50.5)
    assert dist.p50 == pytest.approx(50.5)
    assert dist.p95 == pytest.approx(95.05)
    assert dist.p99 == pytest.approx(99.01)
    assert dist.max == 100.0
    empty = distribution([])
    assert empty.count == 0
    assert empty.p50 is None


def test_summarize_counts_rates_cache_and_errors() -> None:
    samples = [
        Sample(status=200, latency_s=1.0, ttfa_s=0.2, audio_s=4.0, cache="HIT"),
        Sample(status=200, latency_s=2.0, ttfa_s=0.4, audio_s=4.0, cache="MISS"),
        Sample(status=200, latency_s=3.0, ttfa_s=0.6, audio_s=6.0, cache="HIT"),
        Sample(status=200, latency_s=1.0, ttfa_s=0.1, audio_s=2.0, cache="BYPASS"),
        Sample(status=503, latency_s=0.01, error="busy"),
        Sample(status=503, latency_s=0.01, error="busy"),
        Sample(status=0, latency_s=5.0, error="timeout:ReadTimeout"),
        Sample(status=200, latency_s=0.5, error="transport:RemoteProtocolError"),
    ]
    result = summarize("a", 4, samples, elapsed_s=2.0)
    assert result.requests == 8
    assert result.ok == 4
    assert result.errors == 4
    assert result.error_rate == 0.5
    assert result.errors_by_status == {"200": 1, "503": 2, "no_response": 1}
    assert result.errors_by_code == {
        "busy": 2,
        "timeout:ReadTimeout": 1,
        "transport:RemoteProtocolError": 1,
    }
    assert result.requests_per_s == 2.0
    assert result.audio_seconds == 16.0
    assert result.audio_seconds_per_s == 8.0
    assert result.cache_hit_ratio == pytest.approx(2 / 3)
    assert result.cache == {"BYPASS": 1, "HIT": 2, "MISS": 1}
    assert result.latency_s.count == 4
    assert result.latency_s.max == 3.0
    assert result.ttfa_s.p50 == pytest.approx(0.3)
    assert result.rtf.p50 == pytest.approx(0.5)
    assert set(result.by_cache) == {"BYPASS", "HIT", "MISS"}
    assert result.by_cache["HIT"].latency_s.count == 2
    assert result.by_cache["HIT"].latency_s.p50 == pytest.approx(2.0)
    assert result.by_cache["MISS"].ttfa_s.max == pytest.approx(0.4)
    line = cache_line(result)
    assert line is not None
    assert "HIT n=2 ttfa p50 400ms lat p50 2000ms" in line


def test_summarize_without_cache_headers_has_no_hit_ratio() -> None:
    result = summarize("w", 1, [Sample(status=200, latency_s=1.0, audio_s=1.0)], 1.0)
    assert result.cache_hit_ratio is None
    with pytest.raises(ValueError, match="positive"):
        summarize("w", 1, [], 0.0)


def test_audio_seconds_of_raw_formats() -> None:
    f32 = np.zeros(22050, dtype="<f4").tobytes()
    assert audio_seconds(f32, "pcm_f32le", {"x-sample-rate": "22050"}) == pytest.approx(1.0)
    s16 = np.zeros(12000, dtype="<i2").tobytes()
    assert audio_seconds(s16, "pcm", {}) == pytest.approx(0.5)
    with pytest.raises(AudioDecodeError, match="whole number"):
        audio_seconds(b"\x00" * 5, "pcm_f32le", {"x-sample-rate": "22050"})
    with pytest.raises(AudioDecodeError, match="X-Sample-Rate"):
        audio_seconds(f32, "pcm_f32le", {})


def _streamed_wav(samples: int, rate: int) -> bytes:
    """A WAV as a streaming server writes it: sizes unknown (0xFFFFFFFF)."""
    fmt = struct.pack("<HHIIHH", 1, 1, rate, rate * 2, 2, 16)
    header = b"RIFF" + struct.pack("<I", 0xFFFFFFFF) + b"WAVE"
    header += b"fmt " + struct.pack("<I", len(fmt)) + fmt
    header += b"data" + struct.pack("<I", 0xFFFFFFFF)
    return header + _pcm16(_tone(samples, rate))


def test_audio_stats_give_duration_and_peak() -> None:
    stats = audio_stats(_streamed_wav(44100, 22050), "wav", {})
    assert stats.seconds == pytest.approx(2.0)
    assert stats.peak == pytest.approx(0.5, abs=1e-3)
    f32 = _tone(2400, amplitude=0.25).astype("<f4").tobytes()
    assert audio_stats(f32, "pcm_f32le", {"x-sample-rate": "24000"}).peak == pytest.approx(0.25)
    assert audio_stats(_pcm16(np.zeros(100, np.float32)), "pcm", {}).peak == 0.0


def test_audio_seconds_of_containers() -> None:
    assert audio_seconds(_streamed_wav(44100, 22050), "wav", {}) == pytest.approx(2.0)
    buffer = io.BytesIO()
    tone = 0.3 * np.sin(np.arange(24000) * 2 * np.pi * 220 / 24000)
    soundfile.write(buffer, tone, 24000, format="FLAC")
    assert audio_seconds(buffer.getvalue(), "flac", {}) == pytest.approx(1.0)
    with pytest.raises(AudioDecodeError):
        audio_seconds(b"not audio at all", "flac", {})
    with pytest.raises(AudioDecodeError, match="RIFF"):
        audio_seconds(b"{}", "wav", {})


def test_texts_repeat_unique_and_mix() -> None:
    repeat = TextSource(TextMode.REPEAT, run_id="r", pool_size=3, repeat_ratio=0.8, seed=1)
    assert {repeat.next_text() for _ in range(50)} <= set(PHRASES[:3])
    unique = TextSource(TextMode.UNIQUE, run_id="r", pool_size=3, repeat_ratio=0.8, seed=1)
    texts = [unique.next_text() for _ in range(200)]
    assert len(set(texts)) == 200
    mix = TextSource(TextMode.MIX, run_id="r", pool_size=3, repeat_ratio=0.8, seed=1)
    pooled = sum(mix.next_text() in PHRASES[:3] for _ in range(1000))
    assert 720 < pooled < 880
    with pytest.raises(ValueError, match="pool_size"):
        TextSource(TextMode.MIX, run_id="r", pool_size=0, repeat_ratio=0.8, seed=1)


def _plan(*targets: Target, duration: float = 30.0, max_requests: int = 10) -> SweepPlan:
    return SweepPlan(
        targets=targets,
        concurrency=(1, 3),
        duration_s=duration,
        max_requests=max_requests,
        timeout_s=5.0,
        pool_size=4,
        repeat_ratio=0.8,
        seed=0,
        run_id="t",
        prime=False,
        api_key="k",
    )


async def test_sweep_bounds_requests_alternates_targets_and_counts_errors(
    tmp_path: Path,
) -> None:
    seen: list[tuple[str, dict[str, object], str | None]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        seen.append((request.url.host, body, request.headers.get("authorization")))
        if request.url.host == "busy":
            if len(seen) % 2:
                return httpx.Response(503, json={"error": {"code": "busy", "message": "full"}})
            return httpx.Response(200, content=b"\x00" * 3)
        return httpx.Response(200, content=_pcm16(_tone(24000)), headers={"X-Cache": "HIT"})

    ok = Target(label="ok", url="http://ok", api=Api.OPENAI, format="pcm")
    busy = Target(label="busy", url="http://busy", api=Api.WORKER, format="pcm_f32le")
    levels: list[str] = []
    results = await run_sweep(
        _plan(ok, busy),
        on_level=lambda r: levels.append(f"{r.target}@{r.concurrency}"),
        transport=httpx.MockTransport(handler),
    )
    assert levels == ["ok@1", "busy@1", "busy@3", "ok@3"]
    assert all(r.requests == 10 for r in results)
    assert len(seen) == 40
    ok_level = results[0]
    assert ok_level.ok == 10
    assert ok_level.cache_hit_ratio == 1.0
    assert ok_level.audio_seconds == pytest.approx(10.0)
    busy_level = results[1]
    assert busy_level.ok == 0
    assert busy_level.errors_by_status == {"200": 5, "503": 5}
    assert busy_level.errors_by_code == {"bad_audio": 5, "busy": 5}
    openai_bodies = [body for host, body, _ in seen if host == "ok"]
    assert all(
        set(body) == {"model", "input", "voice", "response_format"} for body in openai_bodies
    )
    assert all(auth == "Bearer k" for _, _, auth in seen)

    doc = document(_plan(ok, busy), results, started_at=datetime.now(UTC))
    assert "api_key" not in doc["plan"]
    json.dumps(doc)
    assert "busy" in table_row(busy_level)
    png = tmp_path / "plot.png"
    write_plot(png, results, "test")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


async def test_silence_and_broken_streams_count_as_errors() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if b"silent" in request.content:
            return httpx.Response(200, content=_pcm16(np.zeros(2400, np.float32)))
        if b"bad" in request.content:
            return httpx.Response(502, content=b"<html>bad gateway</html>")
        raise httpx.ConnectError("refused", request=request)

    target = Target(label="t", url="http://t", api=Api.WORKER, format="pcm")
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        silent = await measure(client, target, "silent", None)
        bad = await measure(client, target, "bad", None)
        refused = await measure(client, target, "other", None)
    assert (silent.status, silent.error) == (200, "silent_audio")
    assert (bad.status, bad.error) == (502, "non_json")
    assert (refused.status, refused.error) == (0, "transport:ConnectError")


async def test_sweep_stops_at_the_duration() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=_pcm16(_tone(2400)))

    target = Target(label="t", url="http://t", format="pcm")
    results = await run_sweep(
        _plan(target, duration=0.2, max_requests=100_000), transport=httpx.MockTransport(handler)
    )
    for result in results:
        assert result.ok == result.requests > 0
        assert result.elapsed_s < 5.0
