"""The whole local cluster through nginx: 2 workers (Piper), 2 gateways, Redis and nginx.

One cluster per module, started by the launcher (`python -m cluster up` does the same) on free
ports in its own run directory. Tests that kill processes come last.
"""

from __future__ import annotations

import io
import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import soundfile as sf

from cluster import launcher, nginx_config, processes
from cluster.settings import ClusterSettings
from tests.e2e.conftest import cluster_on_free_ports

SENTENCE = "The quick brown fox jumps over the lazy dog."
PARAGRAPH = (
    "Streaming speech arrives in pieces. Each sentence is synthesized on its own. "
    "The client hears the first words while the rest is still being made."
)


@pytest.fixture(scope="module")
def cluster(run_dir: Path) -> Iterator[ClusterSettings]:
    settings = cluster_on_free_ports(
        run_dir,
        gateways=2,
        workers=2,
        rate_per_addr="10r/s",
        burst_per_addr=20,
        max_body="1m",
        ready_timeout=240,
    )
    try:
        launcher.up(settings)
        yield settings
    finally:
        records = launcher.load_records(settings)
        launcher.down(settings)
        assert not [record.name for record in records.values() if record.alive()]


def _speech(url: str, text: str, **extra: object) -> httpx.Response:
    body = {"model": "tts-1", "input": text, "voice": "alloy", "response_format": "wav", **extra}
    return httpx.post(f"{url}/v1/audio/speech", json=body, timeout=120)


def _decode(data: bytes) -> tuple[np.ndarray, int]:
    audio, rate = sf.read(io.BytesIO(data), dtype="float32")
    return audio, int(rate)


def _check_speech(audio: np.ndarray, sample_rate: int, text: str) -> None:
    seconds = len(audio) / sample_rate
    words = len(text.split())
    # Ordinary speech runs 1.5 to 4 words per second; allow generous margins either way.
    assert words / 6 <= seconds <= words / 0.8, seconds
    assert np.sqrt(np.mean(np.square(audio))) > 0.01


def test_a_second_up_starts_nothing(cluster: ClusterSettings) -> None:
    assert launcher.up(cluster) == []
    assert all(row.alive and row.ready for row in launcher.status(cluster))


def test_speech_streams_chunked_through_nginx(cluster: ClusterSettings) -> None:
    body = {"model": "tts-1", "input": PARAGRAPH, "voice": "alloy", "response_format": "pcm"}
    with httpx.stream(
        "POST", f"{cluster.public_url}/v1/audio/speech", json=body, timeout=120,
        headers={"Cache-Control": "no-store"},
    ) as response:
        assert response.status_code == 200
        assert response.headers["transfer-encoding"] == "chunked"
        assert response.headers["X-Cache"] == "BYPASS"
        chunks = [chunk for chunk in response.iter_raw() if chunk]
    assert len(chunks) > 1
    pcm = np.frombuffer(b"".join(chunks), dtype="<i2").astype(np.float32) / 32768
    _check_speech(pcm, 24000, PARAGRAPH)


def test_second_identical_request_is_a_hit(cluster: ClusterSettings) -> None:
    first = _speech(cluster.public_url, "Cached once, served twice.")
    second = _speech(cluster.public_url, "Cached once, served twice.")
    assert first.status_code == second.status_code == 200
    assert first.headers["X-Cache"] == "MISS"
    assert second.headers["X-Cache"] == "HIT"
    # The same samples; the hit is a complete WAV whose header states its real sizes, where the
    # streamed miss said "unknown" (docs/gateway.md, complete files).
    assert first.content[44:] == second.content[44:]
    assert int.from_bytes(second.content[40:44], "little") == len(second.content) - 44
    audio, rate = _decode(second.content)
    assert rate == int(second.headers["X-Sample-Rate"])
    _check_speech(audio, rate, "Cached once, served twice.")


def test_seed_service_call_through_nginx(cluster: ClusterSettings) -> None:
    response = httpx.post(
        f"{cluster.public_url}/synthesize", data={"text": SENTENCE}, timeout=120
    )
    assert response.status_code == 200
    rate = int(response.headers["X-Sample-Rate"])
    _check_speech(np.frombuffer(response.content, dtype="<f4"), rate, SENTENCE)


def test_openai_client_works_unchanged(cluster: ClusterSettings) -> None:
    client = openai.OpenAI(base_url=f"{cluster.public_url}/v1", api_key="unused")
    with client.audio.speech.with_streaming_response.create(
        model="tts-1", voice="alloy", input=SENTENCE, response_format="mp3"
    ) as response:
        data = response.read()
    audio, rate = _decode(data)
    _check_speech(audio, rate, SENTENCE)
    assert client.models.list().data


def test_request_id_reaches_the_client(cluster: ClusterSettings) -> None:
    response = httpx.get(f"{cluster.public_url}/v1/models", headers={"X-Request-ID": "e2e-1"})
    assert response.headers.get_list("X-Request-ID") == ["e2e-1"]


@pytest.mark.parametrize("path", ["/metrics", "/v1/synthesize", "/v1/info", "/livez"])
def test_internal_routes_are_not_public(cluster: ClusterSettings, path: str) -> None:
    response = httpx.get(f"{cluster.public_url}{path}")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"
    assert httpx.get(f"{cluster.internal_url}/metrics").status_code == 200


def test_oversized_body_gets_413_json(cluster: ClusterSettings) -> None:
    response = httpx.post(
        f"{cluster.public_url}/synthesize",
        data={"text": "x"},
        files={"prompt_audio": ("p.wav", b"\0" * (2 * 1024 * 1024), "audio/wav")},
    )
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"


def test_rate_limit_answers_429_json(cluster: ClusterSettings) -> None:
    transport = httpx.HTTPTransport(local_address="127.0.0.2")
    with httpx.Client(transport=transport, timeout=30) as client:
        statuses = [client.get(f"{cluster.public_url}/v1/models") for _ in range(60)]
    limited = [response for response in statuses if response.status_code == 429]
    assert limited
    assert limited[0].json()["error"]["code"] == "rate_limited"
    assert {response.status_code for response in statuses} <= {200, 429}


def test_http2_through_nginx(cluster: ClusterSettings) -> None:
    version = nginx_config.nginx_version(nginx_config.nginx_binary())
    same_port = version >= nginx_config.HTTP2_DIRECTIVE_SINCE
    port = cluster.public_port if same_port else cluster.h2c_port
    with httpx.Client(http1=False, http2=True, timeout=120) as client:
        response = client.post(
            f"http://127.0.0.1:{port}/v1/audio/speech",
            json={"model": "tts-1", "input": SENTENCE, "response_format": "wav"},
        )
    assert response.http_version == "HTTP/2"
    assert response.status_code == 200
    audio, rate = _decode(response.content)
    _check_speech(audio, rate, SENTENCE)


def _kill(settings: ClusterSettings, name: str) -> None:
    record = launcher.load_records(settings)[name]
    assert processes.signal_record(record, signal.SIGKILL)
    processes.stop(record)


def test_requests_succeed_with_one_of_two_workers_killed(cluster: ClusterSettings) -> None:
    _kill(cluster, "worker-1")
    for index in range(6):
        text = f"Worker fault number {index}, and the speech goes on."
        response = _speech(cluster.public_url, text, speed=1.0 + index / 100)
        assert response.status_code == 200, response.text
        assert response.headers["X-Cache"] == "MISS"
        audio, rate = _decode(response.content)
        _check_speech(audio, rate, text)


def test_requests_succeed_with_one_of_two_gateways_killed(cluster: ClusterSettings) -> None:
    _kill(cluster, "gateway-0")
    for index in range(6):
        text = f"Gateway fault number {index}, and the speech goes on."
        response = _speech(cluster.public_url, text)
        assert response.status_code == 200, response.text
        audio, rate = _decode(response.content)
        _check_speech(audio, rate, text)
