"""Registered voices in the gateway, in-process: a mocked cloning worker and an in-memory Redis."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import numpy as np
import pytest
import soundfile as sf

from gateway.app import create_app
from gateway.settings import GatewaySettings

INFO: dict[str, Any] = {
    "engine": "clone",
    "model": "clone-model",
    "model_version": "v1",
    "sample_rate": 24000,
    "modes": ["sft", "zero_shot"],
    "languages": ["en"],
    "voices": [{"id": "spk", "name": "Spk", "language": "en", "description": ""}],
    "default_voice": "spk",
    "supports_cloning": True,
    "supports_instructions": True,
    "speed_range": [0.5, 2.0],
}


class HashRedis:
    """Just enough of redis.asyncio.Redis: strings, hashes, sets and transactions."""

    def __init__(self) -> None:
        self.values: dict[str, bytes] = {}
        self.hashes: dict[str, dict[bytes, bytes]] = {}
        self.sets: dict[str, set[bytes]] = {}
        self.feature_reads = 0

    async def get(self, key: str) -> bytes | None:
        return self.values.get(key)

    async def set(self, key: str, value: bytes, ex: int, nx: bool = False) -> bool | None:
        if nx and key in self.values:
            return None
        self.values[key] = value
        return True

    async def hmget(self, key: str, names: list[str]) -> list[bytes | None]:
        fields = self.hashes.get(key, {})
        return [fields.get(name.encode()) for name in names]

    async def hget(self, key: str, name: str) -> bytes | None:
        if name == "features":
            self.feature_reads += 1
        return self.hashes.get(key, {}).get(name.encode())

    async def smembers(self, key: str) -> set[bytes]:
        return set(self.sets.get(key, set()))

    async def scard(self, key: str) -> int:
        return len(self.sets.get(key, set()))

    def pipeline(self, transaction: bool = True) -> Pipeline:
        return Pipeline(self)

    async def aclose(self) -> None:
        return None


class Pipeline:
    def __init__(self, redis: HashRedis) -> None:
        self._redis = redis
        self._ops: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []

    async def __aenter__(self) -> Pipeline:
        return self

    async def __aexit__(self, *_: object) -> None:
        return None

    def __getattr__(self, name: str) -> Any:
        def queue(*args: Any, **kwargs: Any) -> None:
            self._ops.append((name, args, kwargs))

        return queue

    async def execute(self) -> list[int]:
        results = []
        for name, args, kwargs in self._ops:
            results.append(getattr(self, "_" + name)(*args, **kwargs))
        return results

    def _delete(self, key: str) -> int:
        return int(self._redis.hashes.pop(key, None) is not None)

    def _hset(self, key: str, mapping: dict[str, bytes | str | float]) -> int:
        stored = self._redis.hashes.setdefault(key, {})
        for name, value in mapping.items():
            data = value if isinstance(value, bytes) else str(value).encode()
            stored[name.encode()] = data
        return len(mapping)

    def _sadd(self, key: str, member: str) -> int:
        self._redis.sets.setdefault(key, set()).add(member.encode())
        return 1

    def _hmget(self, key: str, names: list[str]) -> list[bytes | None]:
        fields = self._redis.hashes.get(key, {})
        return [fields.get(name.encode()) for name in names]

    def _srem(self, key: str, member: str) -> int:
        members = self._redis.sets.get(key, set())
        present = member.encode() in members
        members.discard(member.encode())
        return int(present)


class CloningWorker:
    """A worker whose engine clones; features are derived from the prompt's bytes."""

    def __init__(self) -> None:
        self.info = dict(INFO)
        self.feature_requests: list[dict[str, Any]] = []
        self.syntheses: list[dict[str, Any]] = []
        self.features_answer: httpx.Response | None = None

    async def handle(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/readyz":
            return httpx.Response(200, json={"status": "ready"})
        if request.url.path == "/v1/info":
            return httpx.Response(200, json=self.info)
        body = json.loads(request.content)
        if request.url.path == "/v1/voices/features":
            self.feature_requests.append(body)
            if self.features_answer is not None:
                return self.features_answer
            prompt = base64.b64decode(body["prompt_audio"])
            return httpx.Response(
                200,
                content=b"FEATURES" + prompt[-16:],
                headers={
                    "Content-Type": "application/octet-stream",
                    "X-Engine": "clone",
                    "X-Model-Version": str(self.info["model_version"]),
                },
            )
        assert request.url.path == "/v1/synthesize"
        self.syntheses.append(body)
        headers = {
            "Content-Type": "application/octet-stream",
            "X-Sample-Rate": "24000",
            "X-Audio-Format": body["format"],
            "X-Audio-Channels": "1",
            "X-Sample-Format": "f32le",
            "X-Model-Version": str(self.info["model_version"]),
        }
        return httpx.Response(200, headers=headers, content=self._audio(body))

    @staticmethod
    async def _audio(body: dict[str, Any]) -> AsyncIterator[bytes]:
        yield json.dumps(body, sort_keys=True).encode()


def wav(seconds: float = 4.0, pitch: float = 200.0) -> bytes:
    t = np.arange(int(seconds * 16000)) / 16000
    buffer = io.BytesIO()
    sf.write(buffer, (0.3 * np.sin(2 * np.pi * pitch * t)).astype(np.float32), 16000,
             format="WAV", subtype="PCM_16")
    return buffer.getvalue()


@pytest.fixture
def worker() -> CloningWorker:
    return CloningWorker()


@pytest.fixture
def redis() -> HashRedis:
    return HashRedis()


@pytest.fixture
async def client(worker: CloningWorker, redis: HashRedis) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(
        GatewaySettings(),
        upstream_transport=httpx.MockTransport(worker.handle),
        redis=redis,  # type: ignore[arg-type]
    )
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://g") as http,
    ):
        yield http


async def register(
    client: httpx.AsyncClient, prompt: bytes | None = None, **fields: str
) -> httpx.Response:
    return await client.post(
        "/v1/voices",
        data={"prompt_text": "A prompt.", **fields},
        files={"prompt_audio": ("p.wav", prompt or wav(), "audio/wav")},
    )


async def speak(client: httpx.AsyncClient, voice: str, text: str = "Hello.") -> httpx.Response:
    return await client.post(
        "/v1/audio/speech", json={"model": "tts-1", "input": text, "voice": voice}
    )


async def test_registration_computes_features_once_and_stores_them(
    client: httpx.AsyncClient, worker: CloningWorker, redis: HashRedis
) -> None:
    prompt = wav()
    response = await register(client, prompt, name="Narrator", id="narrator")
    assert response.status_code == 201, response.text
    voice = response.json()
    assert voice["id"] == "narrator"
    assert voice["model_version"] == "v1"
    assert voice["engine"] == "clone"
    assert len(worker.feature_requests) == 1
    sent = worker.feature_requests[0]
    assert base64.b64decode(sent["prompt_audio"]) == prompt
    assert sent["prompt_text"] == "A prompt."
    stored = redis.hashes["voice:narrator"]
    assert stored[b"features"] == b"FEATURES" + prompt[-16:]
    assert b"prompt_audio" not in stored
    listed = (await client.get("/v1/voices")).json()["data"]
    assert [v["id"] for v in listed] == ["spk", "narrator"]
    assert (await client.get("/v1/voices/narrator")).json() == voice


async def test_requests_carry_the_stored_features_not_the_prompt(
    client: httpx.AsyncClient, worker: CloningWorker, redis: HashRedis
) -> None:
    prompt = wav()
    await register(client, prompt, id="narrator")
    first = await speak(client, "narrator")
    second = await speak(client, "narrator")
    assert first.status_code == 200, first.text
    assert (first.headers["X-Cache"], second.headers["X-Cache"]) == ("MISS", "HIT")
    assert second.content == first.content
    assert len(worker.syntheses) == 1
    sent = worker.syntheses[0]
    assert sent["voice"] == "narrator"
    assert "prompt_audio" not in sent
    assert "prompt_text" not in sent
    assert base64.b64decode(sent["voice_features"]) == b"FEATURES" + prompt[-16:]
    assert len(worker.feature_requests) == 1
    assert redis.feature_reads == 1, "a cache hit read the features"


async def test_the_key_follows_the_voice_id_and_its_recording(
    client: httpx.AsyncClient,
) -> None:
    await register(client, wav(pitch=200.0), id="narrator")
    first = (await speak(client, "narrator")).headers["X-Cache-Key"]
    await register(client, wav(pitch=200.0), id="narrator")
    same = await speak(client, "narrator")
    assert (same.headers["X-Cache-Key"], same.headers["X-Cache"]) == (first, "HIT")
    await register(client, wav(pitch=300.0), id="narrator")
    other = await speak(client, "narrator")
    assert other.headers["X-Cache-Key"] != first
    assert other.headers["X-Cache"] == "MISS"
    await register(client, wav(pitch=200.0), id="narrator_2")
    assert (await speak(client, "narrator_2")).headers["X-Cache-Key"] != first


async def test_a_voice_of_another_model_version_is_outdated(
    client: httpx.AsyncClient, worker: CloningWorker, redis: HashRedis
) -> None:
    await register(client, id="narrator")
    redis.hashes["voice:narrator"][b"model_version"] = b"v0"
    refused = await speak(client, "narrator")
    assert refused.status_code == 422
    assert refused.json()["error"]["code"] == "voice_outdated"
    assert "again" in refused.json()["error"]["message"]
    assert worker.syntheses == []


async def test_a_voice_stored_without_features_is_outdated(
    client: httpx.AsyncClient, worker: CloningWorker, redis: HashRedis
) -> None:
    await register(client, id="narrator")
    del redis.hashes["voice:narrator"][b"features"]
    refused = await speak(client, "narrator")
    assert refused.status_code == 422
    assert refused.json()["error"]["code"] == "voice_outdated"
    assert worker.syntheses == []


async def test_a_deleted_voice_is_unknown_even_when_cached(
    client: httpx.AsyncClient, worker: CloningWorker
) -> None:
    await register(client, id="narrator")
    assert (await speak(client, "narrator")).status_code == 200
    assert (await client.delete("/v1/voices/narrator")).status_code == 204
    refused = await speak(client, "narrator")
    assert refused.status_code == 422
    assert refused.json()["error"]["code"] == "unknown_voice"
    assert (await client.get("/v1/voices/narrator")).status_code == 404
    assert (await client.delete("/v1/voices/narrator")).status_code == 404


@pytest.mark.parametrize(
    ("answer", "status", "code"),
    [
        (httpx.Response(422, json={"error": {"code": "prompt_silent", "message": "m"}}), 422,
         "prompt_silent"),
        (httpx.Response(503, json={"error": {"code": "busy", "message": "m"}},
                        headers={"Retry-After": "2"}), 503, "busy"),
        (httpx.Response(500, json={"error": {"code": "internal_error", "message": "m"}}), 502,
         "upstream_error"),
    ],
    ids=["bad_prompt", "busy", "broken"],
)
async def test_worker_errors_at_registration_store_nothing(
    client: httpx.AsyncClient,
    worker: CloningWorker,
    redis: HashRedis,
    answer: httpx.Response,
    status: int,
    code: str,
) -> None:
    worker.features_answer = answer
    response = await register(client, id="narrator")
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code
    assert redis.hashes == {}


async def test_an_engine_without_cloning_refuses_before_any_worker_call(
    worker: CloningWorker, redis: HashRedis
) -> None:
    worker.info["supports_cloning"] = False
    app = create_app(
        GatewaySettings(),
        upstream_transport=httpx.MockTransport(worker.handle),
        redis=redis,  # type: ignore[arg-type]
    )
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://g") as http,
    ):
        refused = await register(http, id="narrator")
    assert refused.status_code == 422
    assert refused.json()["error"]["code"] == "prompt_unsupported"
    assert worker.feature_requests == []
    assert redis.hashes == {}


def store_voices(redis: HashRedis, count: int) -> list[str]:
    ids = [f"voice-{n:05d}" for n in range(count)]
    for voice_id in ids:
        redis.hashes[f"voice:{voice_id}"] = {
            b"name": voice_id.encode(),
            b"engine": b"clone",
            b"model_version": b"v1",
            b"prompt_sha256": b"0" * 64,
            b"created_at": b"1.0",
            b"features": b"F",
        }
    redis.sets.setdefault("voices", set()).update(voice_id.encode() for voice_id in ids)
    return ids


async def test_voices_are_listed_a_page_at_a_time(
    client: httpx.AsyncClient, redis: HashRedis
) -> None:
    registered = store_voices(redis, 250)
    seen: list[str] = []
    pages = 0
    after: str | None = None
    while True:
        params: dict[str, str | int] = {"limit": 100, **({"after": after} if after else {})}
        page = (await client.get("/v1/voices", params=params)).json()
        pages += 1
        assert len(page["data"]) <= 100
        seen += [voice["id"] for voice in page["data"]]
        if not page["has_more"]:
            break
        after = page["last_id"]
        assert after == seen[-1]
    builtin = [voice["id"] for voice in INFO["voices"]]  # type: ignore[attr-defined]
    assert seen == [*builtin, *registered]
    assert pages == 3
    redis.hashes.pop(f"voice:{registered[10]}")  # deleted after the index was read: skipped
    page = (await client.get("/v1/voices", params={"after": registered[5], "limit": 10})).json()
    assert [voice["id"] for voice in page["data"]] == registered[6:10] + registered[11:16]
    assert page["has_more"], "a page may come short; has_more still says what follows"


@pytest.mark.parametrize("params", [{"limit": 0}, {"limit": 100_000}, {"limit": "x"}])
async def test_a_bad_page_request_is_422_json(
    client: httpx.AsyncClient, params: dict[str, object]
) -> None:
    response = await client.get("/v1/voices", params=params)  # type: ignore[arg-type]
    assert response.status_code == 422
    assert response.json()["error"]["code"]
