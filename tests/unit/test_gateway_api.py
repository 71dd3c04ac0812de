"""The gateway's public API in-process: a mocked worker (httpx.MockTransport) and a fake Redis."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import numpy as np
import pytest
import soundfile as sf
from redis.exceptions import ConnectionError as RedisConnectionError

from gateway.app import create_app
from gateway.settings import GatewaySettings

INFO: dict[str, Any] = {
    "engine": "mock",
    "model": "mock-model",
    "model_version": "1",
    "sample_rate": 22050,
    "modes": ["sft", "instruct"],
    "languages": ["en"],
    "voices": [
        {"id": "joe", "name": "Joe", "language": "en", "description": ""},
        {"id": "amy", "name": "Amy", "language": "en", "description": ""},
    ],
    "default_voice": "joe",
    "supports_cloning": False,
    "supports_instructions": True,
    "speed_range": [0.25, 4.0],
}


class FakeRedis:
    def __init__(self) -> None:
        self.values: dict[str, bytes] = {}
        self.down = False
        self.gets = 0
        self.set_gate: asyncio.Event | None = None

    def _check(self) -> None:
        if self.down:
            raise RedisConnectionError("refused")

    async def get(self, key: str) -> bytes | None:
        self.gets += 1
        self._check()
        return self.values.get(key)

    async def set(self, key: str, value: bytes, ex: int, nx: bool = False) -> bool | None:
        self._check()
        if self.set_gate is not None:
            await self.set_gate.wait()
        assert ex > 0
        if nx and key in self.values:
            return None
        self.values[key] = value
        return True

    async def smembers(self, key: str) -> frozenset[bytes]:
        self._check()
        return frozenset()

    async def hgetall(self, key: str) -> dict[bytes, bytes]:
        self._check()
        return {}

    async def hmget(self, key: str, names: list[str]) -> list[bytes | None]:
        self._check()
        return [None] * len(names)

    async def hget(self, key: str, name: str) -> bytes | None:
        self._check()
        return None

    async def aclose(self) -> None:
        return None


class MockWorker:
    """Answers like a worker; `behaviour` switches it to busy, broken or aborting streams."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.behaviour = "ok"
        self.gate: asyncio.Event | None = None
        self.busy_answers = 0
        self.request_ids: list[str] = []
        self.model_version: str | None = None
        """The X-Model-Version it answers with; INFO's when None."""
        self.queue_waits: list[float] = []

    def audio_for(self, body: dict[str, Any]) -> bytes:
        return json.dumps(body, sort_keys=True).encode() * 50

    async def handle(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/readyz":
            return httpx.Response(200, json={"status": "ready"})
        if request.url.path == "/v1/info":
            return httpx.Response(200, json=INFO)
        assert request.url.path == "/v1/synthesize"
        body = json.loads(request.content)
        self.requests.append(body)
        self.request_ids.append(request.headers.get("X-Request-ID", ""))
        self.queue_waits.append(float(request.headers["X-Max-Queue-Wait"]))
        if self.behaviour == "connect_error":
            raise httpx.ConnectError("refused", request=request)
        if self.behaviour == "timeout":
            raise httpx.ReadTimeout("slow", request=request)
        if self.behaviour == "busy" or (self.behaviour == "busy_once" and self.busy_answers == 0):
            self.busy_answers += 1
            return httpx.Response(
                503,
                json={"error": {"code": "busy", "message": "full"}},
                headers={"Retry-After": "2"},
            )
        if self.behaviour == "nginx_502_once" and self.busy_answers == 0:
            self.busy_answers += 1
            return httpx.Response(
                502, json={"error": {"code": "upstream_unavailable", "message": "none"}}
            )
        if self.behaviour == "nginx_502":
            return httpx.Response(502, text="bad gateway")
        if self.behaviour == "nginx_504":
            return httpx.Response(504, text="gateway timeout")
        if self.behaviour == "reject":
            return httpx.Response(422, json={"error": {"code": "unknown_voice", "message": "x"}})
        audio = self.audio_for(body)
        headers = {
            "Content-Type": "audio/wav" if body["format"] == "wav" else "application/octet-stream",
            "X-Sample-Rate": "22050",
            "X-Audio-Format": body["format"],
            "X-Audio-Channels": "1",
            "X-Sample-Format": "s16le",
            "X-Model-Version": self.model_version or str(INFO["model_version"]),
        }
        return httpx.Response(200, headers=headers, content=self._stream(audio, request))

    async def _stream(self, audio: bytes, request: httpx.Request) -> AsyncIterator[bytes]:
        half = len(audio) // 2
        yield audio[:half]
        if self.gate is not None:
            await self.gate.wait()
        if self.behaviour == "abort":
            raise httpx.RemoteProtocolError("peer closed", request=request)
        yield audio[half:]


@pytest.fixture
def worker() -> MockWorker:
    return MockWorker()


@pytest.fixture
def redis() -> FakeRedis:
    return FakeRedis()


@pytest.fixture
def settings() -> GatewaySettings:
    return GatewaySettings(upstream_busy_backoff_s=0.001, cache_retry_after_s=0.0)


@pytest.fixture
async def client(
    worker: MockWorker, redis: FakeRedis, settings: GatewaySettings
) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(
        settings,
        upstream_transport=httpx.MockTransport(worker.handle),
        redis=redis,  # type: ignore[arg-type]
    )
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as http:
        yield http
    await app.state.gateway.speech._upstream.aclose()


def speech(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": "tts-1",
        "input": "Hello world.",
        "voice": "alloy",
        "response_format": "wav",
    }
    body.update(overrides)
    return body


async def test_hit_after_miss_returns_identical_bytes(
    client: httpx.AsyncClient, worker: MockWorker
) -> None:
    first = await client.post("/v1/audio/speech", json=speech())
    assert first.status_code == 200, first.text
    assert first.headers["X-Cache"] == "MISS"
    assert first.headers["X-Sample-Rate"] == "22050"
    assert first.headers["X-Request-ID"]
    second = await client.post("/v1/audio/speech", json=speech())
    assert second.headers["X-Cache"] == "HIT"
    assert second.content == first.content
    assert second.headers["Content-Type"] == first.headers["Content-Type"]
    assert second.headers["X-Cache-Key"] == first.headers["X-Cache-Key"]
    assert len(worker.requests) == 1
    sent = worker.requests[0]
    assert sent["voice"] == "joe"
    assert sent["text"] == "Hello world."
    assert sent["seed"] >= 0


@pytest.mark.parametrize(
    "change",
    [{"voice": "amy"}, {"response_format": "flac"}, {"speed": 1.5}, {"instructions": "Calm."}],
)
async def test_what_changes_the_audio_changes_the_key(
    client: httpx.AsyncClient, change: dict[str, Any]
) -> None:
    base = await client.post("/v1/audio/speech", json=speech())
    other = await client.post("/v1/audio/speech", json=speech(**change))
    assert other.status_code == 200, other.text
    assert other.headers["X-Cache"] == "MISS"
    assert other.headers["X-Cache-Key"] != base.headers["X-Cache-Key"]


async def test_openai_alias_and_engine_voice_share_a_key(client: httpx.AsyncClient) -> None:
    alias = await client.post("/v1/audio/speech", json=speech(voice="alloy"))
    direct = await client.post("/v1/audio/speech", json=speech(voice="joe"))
    assert direct.headers["X-Cache"] == "HIT"
    assert direct.headers["X-Cache-Key"] == alias.headers["X-Cache-Key"]


async def test_seed_collision_of_text_plus_instruction_misses(client: httpx.AsyncClient) -> None:
    first = await client.post(
        "/v1/audio/speech", json=speech(input="Hello wor", instructions="ld. Calm")
    )
    second = await client.post(
        "/v1/audio/speech", json=speech(input="Hello world.", instructions="Calm")
    )
    assert second.headers["X-Cache"] == "MISS"
    assert second.headers["X-Cache-Key"] != first.headers["X-Cache-Key"]
    assert second.content != first.content


async def test_concurrent_identical_misses_share_one_synthesis(
    client: httpx.AsyncClient, worker: MockWorker
) -> None:
    worker.gate = asyncio.Event()
    tasks = [asyncio.create_task(client.post("/v1/audio/speech", json=speech())) for _ in range(8)]
    metrics = client._transport.app.state.gateway.metrics  # type: ignore[attr-defined]
    for _ in range(500):
        joins = metrics.registry.get_sample_value("gateway_single_flight_joins_total") or 0
        if joins == 7:
            break
        await asyncio.sleep(0.01)
    worker.gate.set()
    responses = await asyncio.gather(*tasks)
    assert len(worker.requests) == 1
    bodies = {response.content for response in responses}
    assert len(bodies) == 1
    assert all(r.headers["X-Cache"] == "MISS" for r in responses)


@pytest.mark.parametrize(("directive", "stored"), [("no-cache", True), ("no-store", False)])
async def test_cache_control_bypasses(
    client: httpx.AsyncClient, redis: FakeRedis, directive: str, stored: bool
) -> None:
    first = await client.post(
        "/v1/audio/speech", json=speech(), headers={"Cache-Control": directive}
    )
    assert first.headers["X-Cache"] == "BYPASS"
    assert (first.headers["X-Cache-Key"] in redis.values) is stored


async def test_redis_down_serves_uncached(
    client: httpx.AsyncClient, redis: FakeRedis, worker: MockWorker
) -> None:
    redis.down = True
    for _ in range(2):
        response = await client.post("/v1/audio/speech", json=speech())
        assert response.status_code == 200
        assert response.headers["X-Cache"] == "MISS"
    assert len(worker.requests) == 2
    assert (await client.get("/readyz")).status_code == 200
    metrics = (await client.get("/metrics")).text
    assert 'gateway_cache_errors_total{operation="get"}' in metrics
    redis.down = False
    await client.post("/v1/audio/speech", json=speech())
    assert (await client.post("/v1/audio/speech", json=speech())).headers["X-Cache"] == "HIT"


async def test_aborted_stream_is_not_cached(
    client: httpx.AsyncClient, redis: FakeRedis, worker: MockWorker
) -> None:
    worker.behaviour = "abort"
    with pytest.raises(Exception):  # noqa: B017, PT011 - the transport re-raises the abort
        await client.post("/v1/audio/speech", json=speech())
    assert redis.values == {}


@pytest.mark.parametrize("behaviour", ["busy_once", "nginx_502_once"])
async def test_refusals_before_audio_are_retried(
    client: httpx.AsyncClient, worker: MockWorker, behaviour: str
) -> None:
    worker.behaviour = behaviour
    response = await client.post("/v1/audio/speech", json=speech())
    assert response.status_code == 200
    assert len(worker.requests) == 2


async def test_busy_everywhere_passes_503_with_retry_after(
    client: httpx.AsyncClient, worker: MockWorker, settings: GatewaySettings
) -> None:
    worker.behaviour = "busy"
    response = await client.post("/v1/audio/speech", json=speech())
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "2"
    assert response.json()["error"]["code"] == "busy"
    assert len(worker.requests) == settings.upstream_busy_retries + 1


@pytest.mark.parametrize(
    ("behaviour", "status", "code"),
    [
        ("connect_error", 502, "upstream_unavailable"),
        ("nginx_502", 502, "upstream_unavailable"),
        ("nginx_504", 504, "upstream_timeout"),
        ("timeout", 504, "upstream_timeout"),
        ("reject", 422, "unknown_voice"),
    ],
)
async def test_upstream_faults_map_to_contract_errors(
    client: httpx.AsyncClient, worker: MockWorker, behaviour: str, status: int, code: str
) -> None:
    worker.behaviour = behaviour
    response = await client.post("/v1/audio/speech", json=speech())
    assert response.status_code == status
    assert response.json()["error"]["code"] == code


@pytest.mark.parametrize(
    ("kwargs", "status", "code"),
    [
        (
            {"content": b"{not json", "headers": {"Content-Type": "application/json"}},
            400,
            "invalid_json",
        ),
        (
            {"content": b"input=hi", "headers": {"Content-Type": "text/plain"}},
            415,
            "unsupported_media_type",
        ),
        ({"json": {"model": "tts-1", "voice": "alloy"}}, 422, "invalid_request"),
        ({"json": speech(input="x" * 4097)}, 422, "text_too_long"),
        ({"json": speech(input="   ")}, 422, "text_empty"),
        ({"json": speech(response_format="aac")}, 422, "unsupported_format"),
        ({"json": speech(speed=5)}, 422, "speed_out_of_range"),
        ({"json": speech(model="whisper-1")}, 422, "invalid_request"),
        ({"json": speech(voice="nobody")}, 422, "unknown_voice"),
    ],
)
async def test_bad_input_is_refused_before_any_worker(
    client: httpx.AsyncClient, worker: MockWorker, kwargs: dict[str, Any], status: int, code: str
) -> None:
    response = await client.post("/v1/audio/speech", **kwargs)
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code
    assert worker.requests == []


async def test_unknown_route_and_method_are_json(client: httpx.AsyncClient) -> None:
    missing = await client.get("/nope")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "not_found"
    wrong = await client.get("/v1/audio/speech")
    assert wrong.status_code == 405
    assert wrong.json()["error"]["code"] == "method_not_allowed"


async def test_sse_stream_format(client: httpx.AsyncClient) -> None:
    plain = await client.post("/v1/audio/speech", json=speech())
    events = await client.post("/v1/audio/speech", json=speech(stream_format="sse"))
    assert events.headers["Content-Type"].startswith("text/event-stream")
    payloads = [
        json.loads(line[6:]) for line in events.text.splitlines() if line.startswith("data: ")
    ]
    assert payloads[-1]["type"] == "speech.audio.done"
    assert {p["type"] for p in payloads[:-1]} == {"speech.audio.delta"}
    audio = b"".join(base64.b64decode(p["audio"]) for p in payloads[:-1])
    assert audio == plain.content


def wav_bytes(seconds: float, amplitude: float = 0.3, rate: int = 16000) -> bytes:
    buffer = io.BytesIO()
    t = np.arange(int(seconds * rate)) / rate
    sf.write(
        buffer, (amplitude * np.sin(2 * np.pi * 220 * t)).astype(np.float32), rate, format="WAV"
    )
    return buffer.getvalue()


async def test_synthesize_multipart_defaults_to_float32(
    client: httpx.AsyncClient, worker: MockWorker
) -> None:
    response = await client.post("/synthesize", data={"text": "Hi there."})
    assert response.status_code == 200, response.text
    assert worker.requests[0]["format"] == "pcm_f32le"
    assert response.headers["X-Audio-Format"] == "pcm_f32le"


@pytest.mark.parametrize(
    ("upload", "status", "code"),
    [
        (b"this is not audio at all", 415, "prompt_not_audio"),
        (wav_bytes(1.0), 422, "prompt_too_short"),
        (wav_bytes(31.0, rate=8000), 422, "prompt_too_long"),
        (wav_bytes(4.0, amplitude=0.0), 422, "prompt_silent"),
        (wav_bytes(4.0), 422, "prompt_unsupported"),
    ],
)
async def test_prompt_uploads_are_checked(
    client: httpx.AsyncClient, worker: MockWorker, upload: bytes, status: int, code: str
) -> None:
    response = await client.post(
        "/synthesize",
        data={"text": "Hi.", "prompt_text": "hello"},
        files={"prompt_audio": ("p.wav", upload, "audio/wav")},
    )
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code
    assert worker.requests == []


async def test_oversized_prompt_is_413(worker: MockWorker, redis: FakeRedis) -> None:
    settings = GatewaySettings(prompt_max_bytes=1000)
    app = create_app(settings, upstream_transport=httpx.MockTransport(worker.handle), redis=redis)  # type: ignore[arg-type]
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://g"
    ) as http:
        response = await http.post(
            "/synthesize", data={"text": "Hi."}, files={"prompt_audio": ("p.wav", wav_bytes(4.0))}
        )
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "prompt_too_large"


async def test_batch_items_succeed_or_fail_alone(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/synthesize_batch",
        json={
            "items": [
                {"text": "One.", "format": "wav"},
                {"text": ""},
                {"text": "Two.", "format": "aac"},
                {"text": "One.", "format": "wav"},
            ]
        },
    )
    assert response.status_code == 200
    results = response.json()["results"]
    assert [r["status"] for r in results] == [200, 422, 422, 200]
    assert results[1]["error"]["code"] == "text_empty"
    assert results[2]["error"]["code"] == "unsupported_format"
    assert base64.b64decode(results[0]["audio"]) == base64.b64decode(results[3]["audio"])
    assert results[0]["sample_rate"] == 22050


async def test_models_and_voices(client: httpx.AsyncClient) -> None:
    models = (await client.get("/v1/models")).json()
    assert {"tts-1", "mock-model"} <= {m["id"] for m in models["data"]}
    assert models["data"][0]["capabilities"]["sample_rate"] == 22050
    voices = (await client.get("/v1/voices")).json()
    assert [v["id"] for v in voices["data"]] == ["joe", "amy"]
    assert voices["openai_aliases"]["alloy"] == "joe"
    assert (await client.get("/v1/voices/amy")).json()["name"] == "Amy"
    assert (await client.get("/v1/voices/zed")).status_code == 404
    refused = await client.post(
        "/v1/voices", data={"prompt_text": "hi"}, files={"prompt_audio": ("p.wav", wav_bytes(4.0))}
    )
    assert refused.status_code == 422
    assert refused.json()["error"]["code"] == "prompt_unsupported"


async def test_api_keys(worker: MockWorker, redis: FakeRedis) -> None:
    settings = GatewaySettings(api_keys=["secret"])
    app = create_app(settings, upstream_transport=httpx.MockTransport(worker.handle), redis=redis)  # type: ignore[arg-type]
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://g"
    ) as http:
        missing = await http.post("/v1/audio/speech", json=speech())
        wrong = await http.post(
            "/v1/audio/speech", json=speech(), headers={"Authorization": "Bearer x"}
        )
        good = await http.post(
            "/v1/audio/speech", json=speech(), headers={"Authorization": "Bearer secret"}
        )
        health = await http.get("/healthz")
    assert missing.status_code == wrong.status_code == 401
    assert missing.json()["error"]["code"] == "unauthorized"
    assert good.status_code == 200
    assert health.status_code == 200


async def test_request_id_is_forwarded_and_echoed(
    client: httpx.AsyncClient, worker: MockWorker
) -> None:
    response = await client.post(
        "/v1/audio/speech", json=speech(), headers={"X-Request-ID": "abc-1"}
    )
    assert response.headers["X-Request-ID"] == "abc-1"
    assert worker.request_ids == ["abc-1"]


async def test_hits_skip_the_framework_and_misses_ask_redis_once(
    client: httpx.AsyncClient, redis: FakeRedis
) -> None:
    miss = await client.post("/v1/audio/speech", json=speech())
    assert miss.headers["X-Cache"] == "MISS"
    assert redis.gets == 1
    hit = await client.post("/v1/audio/speech", json=speech())
    assert hit.headers["X-Cache"] == "HIT"
    assert hit.headers["Content-Length"] == str(len(miss.content))
    assert redis.gets == 2
    metrics = (await client.get("/metrics")).text
    assert 'gateway_requests_total{code="",route="/v1/audio/speech",status="200"} 2.0' in metrics


async def test_new_model_version_changes_every_key(
    client: httpx.AsyncClient, worker: MockWorker, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = await client.post("/v1/audio/speech", json=speech())
    again = await client.post("/v1/audio/speech", json=speech())
    assert again.headers["X-Cache"] == "HIT"
    monkeypatch.setitem(INFO, "model_version", "2")
    directory = client._transport.app.state.gateway.directory  # type: ignore[attr-defined]
    assert await directory.refresh()
    upgraded = await client.post("/v1/audio/speech", json=speech())
    assert upgraded.headers["X-Cache"] == "MISS"
    assert upgraded.headers["X-Cache-Key"] != first.headers["X-Cache-Key"]


async def test_finished_synthesis_is_a_hit_while_its_entry_is_written(
    client: httpx.AsyncClient, redis: FakeRedis, worker: MockWorker
) -> None:
    redis.set_gate = asyncio.Event()
    first = await client.post("/v1/audio/speech", json=speech())
    assert redis.values == {}, "the entry is still being written"
    second = await client.post("/v1/audio/speech", json=speech())
    assert second.headers["X-Cache"] == "HIT"
    assert second.content == first.content
    assert len(worker.requests) == 1
    redis.set_gate.set()


async def test_prompt_reaches_a_cloning_engine_and_changes_the_key(
    client: httpx.AsyncClient, worker: MockWorker, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(INFO, "supports_cloning", True)
    upload = wav_bytes(4.0)
    plain = await client.post("/synthesize", data={"text": "Hi."})
    cloned = await client.post(
        "/synthesize",
        data={"text": "Hi.", "prompt_text": "hello there"},
        files={"prompt_audio": ("p.wav", upload, "audio/wav")},
    )
    assert cloned.status_code == 200, cloned.text
    assert cloned.headers["X-Cache-Key"] != plain.headers["X-Cache-Key"]
    sent = worker.requests[-1]
    assert base64.b64decode(sent["prompt_audio"]) == upload
    assert sent["prompt_text"] == "hello there"


async def test_audio_of_another_model_version_is_served_but_not_cached(
    client: httpx.AsyncClient, worker: MockWorker, redis: FakeRedis
) -> None:
    worker.model_version = "2"  # a worker already upgraded, behind a key made for version 1
    first = await client.post("/v1/audio/speech", json=speech())
    assert first.status_code == 200
    assert first.headers["X-Cache"] == "MISS"
    assert redis.values == {}
    metrics = (await client.get("/metrics")).text
    assert "gateway_cache_version_mismatch_total 1.0" in metrics
    worker.model_version = None
    second = await client.post("/v1/audio/speech", json=speech())
    assert second.headers["X-Cache"] == "MISS"
    assert len(redis.values) == 1


async def test_refusals_stop_within_the_retry_budget(
    worker: MockWorker, redis: FakeRedis
) -> None:
    settings = GatewaySettings(
        upstream_busy_retries=100, upstream_busy_backoff_s=0.05, upstream_retry_budget_s=0.3
    )
    app = create_app(settings, upstream_transport=httpx.MockTransport(worker.handle), redis=redis)  # type: ignore[arg-type]
    worker.behaviour = "busy"
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://g"
    ) as http:
        started = time.monotonic()
        response = await http.post("/v1/audio/speech", json=speech())
        elapsed = time.monotonic() - started
    await app.state.gateway.speech._upstream.aclose()
    assert response.status_code == 503
    assert elapsed < 0.3 + 0.2
    assert 2 <= len(worker.requests) < 100
    # Each attempt lets the worker queue it only for what is left of the budget.
    assert worker.queue_waits[0] <= 0.3
    assert worker.queue_waits == sorted(worker.queue_waits, reverse=True)


@pytest.mark.parametrize(
    ("path", "kwargs"),
    [
        ("/synthesize", {"data": {"text": "Hi.", "prompt_text": "hello"}}),
        ("/v1/audio/speech", {"json": {**speech(), "prompt_text": "hello"}}),
        (
            "/synthesize_batch",
            {"json": {"items": [{"text": "Hi.", "prompt_text": "hello"}]}},
        ),
    ],
    ids=["synthesize", "speech", "batch_item"],
)
async def test_prompt_text_without_a_recording_is_refused(
    client: httpx.AsyncClient, worker: MockWorker, path: str, kwargs: dict[str, Any]
) -> None:
    response = await client.post(path, **kwargs)
    if path == "/synthesize_batch":
        assert response.status_code == 200
        error = response.json()["results"][0]
        assert error["status"] == 422
        assert error["error"]["code"] == "prompt_text_without_audio"
    else:
        assert response.status_code == 422, response.text
        assert response.json()["error"]["code"] == "prompt_text_without_audio"
    assert worker.requests == []


@pytest.mark.parametrize("text", ["...", " ?! ", "\u2026"])
async def test_text_with_nothing_to_speak_is_422(
    client: httpx.AsyncClient, worker: MockWorker, text: str
) -> None:
    response = await client.post("/v1/audio/speech", json=speech(input=text))
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "text_empty"
    assert worker.requests == []
