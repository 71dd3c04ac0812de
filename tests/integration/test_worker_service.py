"""A real `python -m worker` with the real Piper voice: formats, streaming, validation, metrics."""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator

import httpx
import numpy as np
import pytest

from contract.audio import AudioFormat
from tests.support.audio import decode
from tests.support.processes import RunningProcess, free_port, python_service

SHORT_TEXT = "The quick brown fox jumps over the lazy dog."
TWO_SENTENCES = "Hello from the worker. This is the second sentence of the test."
MANY_SENTENCES = " ".join(
    f"This is sentence number {n}, which carries a few more words to speak aloud." for n in range(6)
)
# Generous bounds on speech duration per character of English text at speed 1.
SECONDS_PER_CHAR = (0.03, 0.15)


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningProcess]:
    port = free_port()
    env = {"WORKER_PORT": str(port), "WORKER_MAX_CONCURRENCY": "2", "WORKER_MAX_QUEUE": "8"}
    with python_service("worker", env, port=port, log_dir=tmp_path_factory.mktemp("worker")) as w:
        yield w


@pytest.fixture(scope="module")
def client(worker: RunningProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=worker.url, timeout=60.0) as c:
        yield c


def synthesize(client: httpx.Client, **body: object) -> httpx.Response:
    return client.post("/v1/synthesize", json=body)


def assert_speech(audio_bytes: bytes, audio_format: str, rate: int, text: str) -> None:
    decoded = decode(audio_bytes, audio_format, rate)
    assert decoded.sample_rate == rate
    low, high = SECONDS_PER_CHAR
    assert low * len(text) <= decoded.duration <= high * len(text) + 0.5, decoded.duration
    assert decoded.rms > 0.01, "silence"
    assert np.abs(decoded.samples).max() <= 1.0


def test_health_and_info(client: httpx.Client) -> None:
    assert client.get("/livez").status_code == 200
    assert client.get("/readyz").json()["status"] == "ready"
    info = client.get("/v1/info").json()
    assert info["engine"] == "piper"
    assert info["sample_rate"] == 22050
    assert info["default_voice"] == "joe"
    assert {"id": "joe"}.items() <= info["voices"][0].items()
    assert info["supports_cloning"] is False
    assert info["supports_instructions"] is False
    assert info["model_version"]


@pytest.mark.parametrize(
    ("audio_format", "rate"),
    [
        ("pcm_f32le", 22050),
        ("pcm", 24000),
        ("wav", 22050),
        ("flac", 22050),
        ("mp3", 22050),
        ("opus", 24000),
    ],
)
def test_every_format_decodes_to_speech(client: httpx.Client, audio_format: str, rate: int) -> None:
    response = synthesize(client, text=SHORT_TEXT, format=audio_format)
    assert response.status_code == 200, response.text
    assert response.headers["x-sample-rate"] == str(rate)
    assert response.headers["x-audio-format"] == audio_format
    assert response.headers["x-audio-channels"] == "1"
    assert_speech(response.content, audio_format, rate, SHORT_TEXT)


def test_same_request_gives_same_audio(client: httpx.Client) -> None:
    first = synthesize(client, text=TWO_SENTENCES, format="pcm_f32le")
    second = synthesize(client, text=TWO_SENTENCES, format="pcm_f32le")
    other_seed = synthesize(client, text=TWO_SENTENCES, format="pcm_f32le", seed=12345)
    assert first.content == second.content
    assert other_seed.content != first.content


def test_speed_changes_duration(client: httpx.Client) -> None:
    normal = decode(synthesize(client, text=SHORT_TEXT, format="wav").content, "wav")
    fast = decode(synthesize(client, text=SHORT_TEXT, format="wav", speed=2.0).content, "wav")
    slow = decode(synthesize(client, text=SHORT_TEXT, format="wav", speed=0.5).content, "wav")
    assert fast.duration < normal.duration * 0.75
    assert slow.duration > normal.duration * 1.5


def test_loudness_is_even_across_sentences(client: httpx.Client) -> None:
    text = "Loud and clear! " + "this quiet little line follows it, spoken in a calm voice."
    decoded = decode(synthesize(client, text=text, format="pcm_f32le").content, "pcm_f32le", 22050)
    # Piper's per-sentence normalization would put every sentence at peak 1.0 exactly.
    assert np.abs(decoded.samples).max() < 0.999


def test_first_chunk_arrives_well_before_the_last(worker: RunningProcess) -> None:
    with (
        httpx.Client(base_url=worker.url, timeout=60.0) as c,
        c.stream("POST", "/v1/synthesize", json={"text": MANY_SENTENCES}) as response,
    ):
        assert response.status_code == 200
        sent = time.monotonic()
        arrivals = []
        total = 0
        for chunk in response.iter_raw():
            arrivals.append(time.monotonic() - sent)
            total += len(chunk)
    assert len(arrivals) > 3
    assert arrivals[0] < arrivals[-1] / 3, arrivals
    assert total / 4 / 22050 > 10  # seconds of float32 audio


def test_request_id_is_echoed(client: httpx.Client) -> None:
    response = client.post(
        "/v1/synthesize", json={"text": SHORT_TEXT}, headers={"X-Request-ID": "req-123"}
    )
    assert response.headers["x-request-id"] == "req-123"
    assert client.get("/livez").headers["x-request-id"]


BAD_REQUESTS = [
    pytest.param({"text": ""}, 422, "text_empty", id="empty"),
    pytest.param({"text": " \n\t "}, 422, "text_empty", id="whitespace"),
    pytest.param({"text": "..."}, 422, "text_empty", id="nothing-to-speak"),
    pytest.param({"text": "a" * 4097}, 422, "text_too_long", id="too-long"),
    pytest.param({"text": "Hi\u0000there."}, 422, "text_invalid", id="control-char"),
    pytest.param({"text": "Hi.", "voice": "nobody"}, 422, "unknown_voice", id="voice"),
    pytest.param({"text": "Hi.", "format": "aac"}, 422, "unsupported_format", id="format"),
    pytest.param({"text": "Hi.", "speed": 0.1}, 422, "speed_out_of_range", id="slow"),
    pytest.param({"text": "Hi.", "speed": 4.5}, 422, "speed_out_of_range", id="fast"),
    pytest.param(
        {"text": "Hi.", "instruction": "Speak happily."}, 422, "instruction_unsupported", id="instr"
    ),
    pytest.param(
        {"text": "Hi.", "prompt_audio": base64.b64encode(b"RIFF....").decode()},
        422,
        "prompt_unsupported",
        id="prompt",
    ),
    pytest.param(
        {"text": "Hi.", "prompt_text": "Words."}, 422, "prompt_text_without_audio", id="ptext"
    ),
    pytest.param({"text": "Hi.", "colour": "red"}, 422, "invalid_request", id="extra-field"),
    pytest.param({"text": 5}, 422, "invalid_request", id="text-type"),
    pytest.param({}, 422, "invalid_request", id="no-text"),
]


@pytest.mark.parametrize(("body", "status", "code"), BAD_REQUESTS)
def test_bad_input_gets_its_code(
    client: httpx.Client, body: dict[str, object], status: int, code: str
) -> None:
    response = client.post("/v1/synthesize", json=body)
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    assert response.json()["error"]["code"] == code


def test_malformed_body_and_content_type(client: httpx.Client) -> None:
    broken = client.post(
        "/v1/synthesize", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert broken.status_code == 400
    assert broken.json()["error"]["code"] == "invalid_json"
    form = client.post("/v1/synthesize", data={"text": "Hi."})
    assert form.status_code == 415
    assert form.json()["error"]["code"] == "unsupported_media_type"
    missing = client.get("/v1/nothing")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "not_found"


def test_worker_keeps_serving_after_bad_input(client: httpx.Client) -> None:
    for body, _, _ in (param.values for param in BAD_REQUESTS):
        client.post("/v1/synthesize", json=body)
    response = synthesize(client, text=SHORT_TEXT, format="wav")
    assert response.status_code == 200
    assert_speech(response.content, "wav", 22050, SHORT_TEXT)


def test_metrics_count_requests_by_code(client: httpx.Client) -> None:
    synthesize(client, text="")
    synthesize(client, text=SHORT_TEXT)
    metrics = client.get("/metrics").text
    for name in (
        'worker_requests_total{code="",status="200"}',
        'worker_requests_total{code="text_empty",status="422"}',
        "worker_syntheses_started_total",
        "worker_queue_wait_seconds_count",
        "worker_time_to_first_audio_seconds_count",
        "worker_real_time_factor_count",
        "worker_active_streams",
    ):
        assert name in metrics, name


def test_every_contract_format_is_served(client: httpx.Client) -> None:
    for audio_format in AudioFormat:
        assert synthesize(client, text="Yes.", format=audio_format.value).status_code == 200

