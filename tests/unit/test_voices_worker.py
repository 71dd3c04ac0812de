"""Registered voices on the worker: the features route and requests that carry features."""

from __future__ import annotations

import asyncio
import base64
import io
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx
import numpy as np
import pytest
import soundfile as sf
from fastapi import FastAPI

from contract.errors import ErrorCode, ServiceError
from contract.requests import SynthesisRequest
from worker.app import create_app
from worker.engines.base import Audio, Capabilities, EngineRequest, VoiceInfo
from worker.settings import WorkerSettings
from worker.validation import validate

RATE = 16000


def _capabilities(cloning: bool) -> Capabilities:
    return Capabilities(
        engine="fake",
        model="fake",
        model_version="7",
        sample_rate=RATE,
        modes=("sft", "zero_shot"),
        languages=("en",),
        voices=(VoiceInfo(id="v", name="V", language="en"),),
        default_voice="v",
        supports_cloning=cloning,
        supports_instructions=False,
    )


@dataclass
class CloningEngine:
    """Features are the prompt's length and text; `gate` holds compute_voice until set."""

    cloning: bool = True
    gate: threading.Event | None = None
    entered: threading.Event = field(default_factory=threading.Event)
    computed: list[tuple[int, int, str]] = field(default_factory=list)
    requests: list[EngineRequest] = field(default_factory=list)

    def load(self) -> None:
        return None

    def warm_up(self) -> None:
        return None

    def capabilities(self) -> Capabilities:
        return _capabilities(self.cloning)

    def compute_voice(self, audio: Audio, sample_rate: int, text: str) -> bytes:
        if not self.cloning:
            raise ServiceError(ErrorCode.PROMPT_UNSUPPORTED, "no cloning")
        self.entered.set()
        if self.gate is not None:
            self.gate.wait(timeout=10)
        if float(np.max(np.abs(audio))) < 1e-3:
            raise ServiceError(ErrorCode.PROMPT_SILENT, "silent")
        self.computed.append((audio.size, sample_rate, text))
        return f"features:{audio.size}:{sample_rate}:{text}".encode()

    async def stream(self, request: EngineRequest) -> AsyncIterator[Audio]:
        self.requests.append(request)
        yield np.full(RATE // 10, 0.1, dtype=np.float32)


def _wav(seconds: float = 2.5, rate: int = 22050, silent: bool = False) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    wav = np.zeros_like(t) if silent else 0.3 * np.sin(2 * np.pi * 200 * t)
    buffer = io.BytesIO()
    sf.write(buffer, wav.astype(np.float32), rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


async def _app(engine: CloningEngine, **overrides: object) -> FastAPI:
    settings = WorkerSettings.model_validate({"max_concurrency": 1, "max_queue": 0, **overrides})
    app = create_app(settings, engine=engine)
    await app.state.worker.load_engine()
    return app


def _client(app: FastAPI) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://worker")


def _counter(text: str, status: str, code: str) -> float:
    line = f'worker_voice_features_total{{code="{code}",status="{status}"}} '
    for row in text.splitlines():
        if row.startswith(line):
            return float(row[len(line):])
    return 0.0


# -- validation ------------------------------------------------------------------------------


def test_an_unknown_voice_is_accepted_only_with_features() -> None:
    capabilities = _capabilities(cloning=True)
    with pytest.raises(ServiceError) as refused:
        validate(SynthesisRequest(text="Hi.", voice="mine"), capabilities, max_text_chars=100)
    assert refused.value.code is ErrorCode.UNKNOWN_VOICE
    request = SynthesisRequest(text="Hi.", voice="mine", voice_features=_b64(b"blob"))
    validated = validate(request, capabilities, max_text_chars=100)
    assert validated.engine_request.voice == "mine"
    assert validated.engine_request.voice_features == b"blob"
    assert validated.engine_request.prompt_audio is None


@pytest.mark.parametrize(
    ("cloning", "extra", "code"),
    [
        (False, {}, ErrorCode.PROMPT_UNSUPPORTED),
        (True, {"prompt_audio": _b64(_wav())}, ErrorCode.INVALID_REQUEST),
        (True, {"prompt_text": "Words."}, ErrorCode.INVALID_REQUEST),
    ],
    ids=["engine_without_cloning", "with_prompt_audio", "with_prompt_text"],
)
def test_features_are_refused_where_they_cannot_apply(
    cloning: bool, extra: dict[str, str], code: ErrorCode
) -> None:
    request = SynthesisRequest.model_validate(
        {"text": "Hi.", "voice": "mine", "voice_features": _b64(b"blob"), **extra}
    )
    with pytest.raises(ServiceError) as refused:
        validate(request, _capabilities(cloning), max_text_chars=100)
    assert refused.value.code is code


def test_features_change_the_default_seed_only_when_present() -> None:
    from contract.requests import default_seed

    plain = SynthesisRequest(text="Hi.", voice="v")
    assert default_seed(plain) == default_seed(SynthesisRequest(text="Hi.", voice="v"))
    one = SynthesisRequest(text="Hi.", voice="m", voice_features=_b64(b"a"))
    two = SynthesisRequest(text="Hi.", voice="m", voice_features=_b64(b"b"))
    assert default_seed(one) != default_seed(two)


# -- the features route ----------------------------------------------------------------------


async def test_features_are_computed_and_returned_with_their_origin() -> None:
    engine = CloningEngine()
    async with _client(await _app(engine)) as http:
        response = await http.post(
            "/v1/voices/features", json={"prompt_audio": _b64(_wav()), "prompt_text": " Hello. "}
        )
        metrics = (await http.get("/metrics")).text
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/octet-stream"
    assert response.headers["X-Engine"] == "fake"
    assert response.headers["X-Model-Version"] == "7"
    assert response.content == b"features:55125:22050:Hello."
    assert engine.computed == [(55125, 22050, "Hello.")]
    assert _counter(metrics, "200", "") == 1


async def test_a_synthesis_brings_the_features_to_the_engine() -> None:
    engine = CloningEngine()
    async with _client(await _app(engine)) as http:
        body = {"text": "Hi.", "voice": "mine", "voice_features": _b64(b"stored")}
        response = await http.post("/v1/synthesize", json=body)
    assert response.status_code == 200, response.text
    assert engine.requests[0].voice_features == b"stored"
    assert engine.requests[0].voice == "mine"
    assert engine.computed == []


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"prompt_audio": _b64(b"not audio" * 100)}, 415, "prompt_not_audio"),
        ({"prompt_audio": _b64(_wav(silent=True))}, 422, "prompt_silent"),
        ({"prompt_audio": "!!!"}, 415, "prompt_not_audio"),
        ({"prompt_text": "no audio"}, 422, "invalid_request"),
        ({"prompt_audio": _b64(_wav()), "extra": 1}, 422, "invalid_request"),
        ({"prompt_audio": _b64(_wav()), "prompt_text": "bad\x00text"}, 422, "text_invalid"),
    ],
)
async def test_bad_prompts_get_their_codes(body: dict[str, object], status: int, code: str) -> None:
    engine = CloningEngine()
    async with _client(await _app(engine)) as http:
        response = await http.post("/v1/voices/features", json=body)
        metrics = (await http.get("/metrics")).text
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code
    assert _counter(metrics, str(status), code) == 1
    assert _counter(metrics, "200", "") == 0


async def test_media_type_and_json_are_checked() -> None:
    async with _client(await _app(CloningEngine())) as http:
        form = await http.post("/v1/voices/features", data={"prompt_audio": "x"})
        broken = await http.post(
            "/v1/voices/features", content=b"{", headers={"Content-Type": "application/json"}
        )
    assert form.status_code == 415
    assert broken.status_code == 400
    assert broken.json()["error"]["code"] == "invalid_json"


async def test_an_engine_without_cloning_refuses_before_decoding() -> None:
    engine = CloningEngine(cloning=False)
    async with _client(await _app(engine)) as http:
        response = await http.post("/v1/voices/features", json={"prompt_audio": _b64(b"junk")})
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "prompt_unsupported"


async def test_features_take_a_slot_and_a_full_worker_is_busy() -> None:
    gate = threading.Event()
    engine = CloningEngine(gate=gate)
    app = await _app(engine, retry_after_s=3)
    async with _client(app) as http:
        body = {"prompt_audio": _b64(_wav())}
        first = asyncio.create_task(http.post("/v1/voices/features", json=body))
        assert await asyncio.to_thread(engine.entered.wait, 10)
        busy = await http.post("/v1/voices/features", json=body)
        synthesis = await http.post("/v1/synthesize", json={"text": "Hi."})
        gate.set()
        done = await first
    assert busy.status_code == 503
    assert busy.headers["Retry-After"] == "3"
    assert busy.json()["error"]["code"] == "busy"
    assert synthesis.status_code == 503
    assert done.status_code == 200
    assert app.state.worker.admission.active == 0


async def test_not_ready_until_loaded() -> None:
    settings = WorkerSettings.model_validate({})
    app = create_app(settings, engine=CloningEngine())
    async with _client(app) as http:
        response = await http.post("/v1/voices/features", json={"prompt_audio": _b64(_wav())})
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "not_ready"


def test_piper_cannot_compute_voices() -> None:
    from worker.engines.piper import PiperEngine

    with pytest.raises(ServiceError) as refused:
        PiperEngine.compute_voice(
            PiperEngine.__new__(PiperEngine), np.zeros(10, dtype=np.float32), 16000, ""
        )
    assert refused.value.code is ErrorCode.PROMPT_UNSUPPORTED
