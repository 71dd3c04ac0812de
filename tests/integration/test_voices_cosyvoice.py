"""Registered voices end to end: a real gateway, a real Redis and a real cosyvoice worker on the
tiny random-weight model. Features are computed once, at registration; requests carry them."""

from __future__ import annotations

import base64
import io
import re
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import httpx
import numpy as np
import pytest
import redis
import soundfile as sf

from testbed.cosyvoice_models import build_model_dir
from tests.support.audio import decode
from tests.support.processes import RunningProcess, free_port, python_service, redis_server
from worker.engines.cosyvoice.frontend import VoicePrompt

TEXT = "Hello there, this is a registered voice speaking."
PROMPT_TEXT = "A short prompt transcript."


def _prompt_wav(seconds: float = 4.0, rate: int = 16000) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    wav = 0.3 * np.sin(2 * np.pi * 170 * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))
    buffer = io.BytesIO()
    sf.write(buffer, wav.astype(np.float32), rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, RunningProcess]]:
    root = tmp_path_factory.mktemp("voices")
    model_dir = build_model_dir(root / "tiny", eos_bias=4.5)
    worker_port, gateway_port = free_port(), free_port()
    worker_env = {"WORKER_PORT": str(worker_port), "WORKER_ENGINE": "cosyvoice",
                  "WORKER_MODEL_DIR": str(model_dir), "WORKER_DEVICE": "cpu"}
    with (
        redis_server(root / "redis") as store,
        python_service("worker", worker_env, port=worker_port, log_dir=root,
                       timeout=180.0) as worker,
        python_service(
            "gateway",
            {"GATEWAY_PORT": str(gateway_port),
             "GATEWAY_REDIS_URL": f"redis://127.0.0.1:{store.port}/0",
             "GATEWAY_WORKER_URL": worker.url},
            port=gateway_port, log_dir=root,
        ) as gateway,
    ):
        yield {"redis": store, "worker": worker, "gateway": gateway}


def _metric(worker: RunningProcess, name: str, labels: str = "") -> float:
    text = httpx.get(f"{worker.url}/metrics", timeout=10.0).text
    pattern = re.escape(name) + (re.escape("{" + labels + "}") if labels else "") + r" (\S+)"
    found = re.search(r"^" + pattern + r"$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def _features_computed(worker: RunningProcess) -> float:
    return _metric(worker, "worker_voice_features_total", 'code="",status="200"')


def _register(gateway: RunningProcess, **fields: str) -> httpx.Response:
    return httpx.post(
        f"{gateway.url}/v1/voices",
        data={"prompt_text": PROMPT_TEXT, **fields},
        files={"prompt_audio": ("prompt.wav", _prompt_wav(), "audio/wav")},
        timeout=120.0,
    )


def _synthesize(gateway: RunningProcess, voice: str, text: str = TEXT) -> httpx.Response:
    return httpx.post(
        f"{gateway.url}/synthesize",
        data={"text": text, "voice": voice, "format": "wav"},
        timeout=180.0,
    )


def test_a_registered_voice_is_computed_once_and_served_from_its_features(
    stack: dict[str, RunningProcess],
) -> None:
    gateway, worker = stack["gateway"], stack["worker"]
    info = httpx.get(f"{worker.url}/v1/info", timeout=10.0).json()
    before = _features_computed(worker)

    registered = _register(gateway, name="Narrator")
    assert registered.status_code == 201, registered.text
    voice: dict[str, Any] = registered.json()
    assert voice["type"] == "registered"
    assert voice["name"] == "Narrator"
    assert voice["engine"] == "cosyvoice"
    assert voice["model_version"] == info["model_version"]
    assert _features_computed(worker) == before + 1

    listed = httpx.get(f"{gateway.url}/v1/voices", timeout=10.0).json()["data"]
    assert voice["id"] in {v["id"] for v in listed if v["type"] == "registered"}
    assert {"english_male"} <= {v["id"] for v in listed if v["type"] == "builtin"}
    assert httpx.get(f"{gateway.url}/v1/voices/{voice['id']}", timeout=10.0).json() == voice

    started = _metric(worker, "worker_syntheses_started_total")
    first = _synthesize(gateway, voice["id"])
    assert first.status_code == 200, first.text
    assert first.headers["X-Cache"] == "MISS"
    audio = decode(first.content, "wav")
    assert audio.sample_rate == 24000
    assert 0.5 < audio.duration < 60.0
    assert audio.rms > 1e-3
    assert np.all(np.isfinite(audio.samples))

    second = _synthesize(gateway, voice["id"])
    assert second.status_code == 200
    assert second.headers["X-Cache"] == "HIT"
    assert second.content[44:] == first.content[44:]  # a complete WAV now: only sizes differ

    assert _metric(worker, "worker_syntheses_started_total") == started + 1
    assert _features_computed(worker) == before + 1, "a request recomputed prompt features"

    stored = redis.Redis(port=stack["redis"].port)
    try:
        key = f"voice:{voice['id']}"
        assert stored.ttl(key) == -1
        assert stored.hexists(key, "features")
        assert not stored.hexists(key, "prompt_audio")
    finally:
        stored.close()


def test_a_deleted_voice_is_unknown(stack: dict[str, RunningProcess]) -> None:
    gateway = stack["gateway"]
    voice_id = _register(gateway, id="to_delete").json()["id"]
    assert _synthesize(gateway, voice_id).status_code == 200

    deleted = httpx.delete(f"{gateway.url}/v1/voices/{voice_id}", timeout=10.0)
    assert deleted.status_code == 204
    assert httpx.get(f"{gateway.url}/v1/voices/{voice_id}", timeout=10.0).status_code == 404
    for text in (TEXT, "Some other words."):  # cached or not, the voice is gone
        refused = _synthesize(gateway, voice_id, text)
        assert refused.status_code == 422
        assert refused.json()["error"]["code"] == "unknown_voice"
    again = httpx.delete(f"{gateway.url}/v1/voices/{voice_id}", timeout=10.0)
    assert again.status_code == 404


def test_a_voice_of_another_model_version_must_be_registered_again(
    stack: dict[str, RunningProcess],
) -> None:
    gateway = stack["gateway"]
    voice_id = _register(gateway, id="old_model").json()["id"]
    stored = redis.Redis(port=stack["redis"].port)
    try:
        stored.hset(f"voice:{voice_id}", "model_version", "0123456789ab")
    finally:
        stored.close()
    refused = _synthesize(gateway, voice_id)
    assert refused.status_code == 422
    assert refused.json()["error"]["code"] == "voice_outdated"


def test_bad_prompts_are_refused_at_registration(stack: dict[str, RunningProcess]) -> None:
    gateway, worker = stack["gateway"], stack["worker"]
    before = _features_computed(worker)
    short = httpx.post(
        f"{gateway.url}/v1/voices",
        files={"prompt_audio": ("p.wav", _prompt_wav(seconds=0.1), "audio/wav")},
        timeout=30.0,
    )
    assert short.status_code == 422
    assert short.json()["error"]["code"] == "prompt_too_short"
    junk = httpx.post(
        f"{gateway.url}/v1/voices",
        files={"prompt_audio": ("p.wav", b"not audio at all" * 64, "audio/wav")},
        timeout=30.0,
    )
    assert junk.status_code == 415
    assert junk.json()["error"]["code"] == "prompt_not_audio"
    assert _features_computed(worker) == before


def test_the_worker_refuses_features_of_another_model_version(
    stack: dict[str, RunningProcess],
) -> None:
    worker = stack["worker"]
    computed = httpx.post(
        f"{worker.url}/v1/voices/features",
        json={"prompt_audio": base64.b64encode(_prompt_wav()).decode()},
        timeout=120.0,
    )
    assert computed.status_code == 200
    assert computed.headers["Content-Type"] == "application/octet-stream"
    assert computed.headers["X-Engine"] == "cosyvoice"
    features = computed.content
    body = {"text": TEXT, "voice": "my_voice", "seed": 1, "format": "pcm_f32le",
            "voice_features": base64.b64encode(features).decode()}
    with httpx.stream("POST", f"{worker.url}/v1/synthesize", json=body, timeout=120.0) as r:
        assert r.status_code == 200
        r.read()
    prompt = VoicePrompt.from_bytes(features)
    # The worker's version is the engine's, plus its loudness level (docs/worker.md).
    assert computed.headers["X-Model-Version"].startswith(prompt.model_version + "+")
    older = replace(prompt, model_version="0123456789ab").to_bytes()
    for blob, code in ((older, "voice_outdated"), (features[:-100], "invalid_request")):
        body["voice_features"] = base64.b64encode(blob).decode()
        refused = httpx.post(f"{worker.url}/v1/synthesize", json=body, timeout=60.0)
        assert refused.status_code == 422
        assert refused.json()["error"]["code"] == code
    unknown = httpx.post(
        f"{worker.url}/v1/synthesize", json={"text": TEXT, "voice": "my_voice"}, timeout=60.0
    )
    assert unknown.status_code == 422
    assert unknown.json()["error"]["code"] == "unknown_voice"
