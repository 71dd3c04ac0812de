"""The worker app around a fake engine: errors before and after the first byte, readiness."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx
import numpy as np
import pytest
from fastapi import FastAPI
from hypercorn.asyncio import serve
from hypercorn.config import Config

from tests.support.processes import free_port
from worker.app import create_app
from worker.engines import ENGINES
from worker.engines.base import Audio, Capabilities, EngineRequest, VoiceInfo
from worker.settings import WorkerSettings

RATE = 16000


@dataclass
class FakeEngine:
    """Yields `chunks` chunks of 0.1 s; fails at chunk `fail_at` when set."""

    chunks: int = 3
    fail_at: int | None = None
    fail_load: bool = False
    delay: float = 0.0
    started: asyncio.Event = field(default_factory=asyncio.Event)
    closed: int = 0

    def load(self) -> None:
        if self.fail_load:
            raise RuntimeError("no model here")

    def warm_up(self) -> None:
        return None

    def capabilities(self) -> Capabilities:
        return Capabilities(
            engine="fake",
            model="fake",
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
        self.started.set()
        try:
            for index in range(self.chunks):
                if index == self.fail_at:
                    raise RuntimeError("secret engine detail")
                await asyncio.sleep(self.delay)
                yield np.full(RATE // 10, 0.1, dtype=np.float32)
        finally:
            self.closed += 1


def settings(**overrides: object) -> WorkerSettings:
    return WorkerSettings.model_validate({"max_concurrency": 1, "max_queue": 0, **overrides})


async def ready_app(engine: FakeEngine, **overrides: object) -> FastAPI:
    app = create_app(settings(**overrides), engine=engine)
    await app.state.worker.load_engine()
    return app


def client(app: FastAPI) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://worker")


async def test_streams_audio_with_headers() -> None:
    engine = FakeEngine()
    async with client(await ready_app(engine)) as c:
        response = await c.post("/v1/synthesize", json={"text": "Hi.", "format": "pcm_f32le"})
    assert response.status_code == 200
    assert response.headers["x-sample-rate"] == str(RATE)
    assert response.headers["x-sample-format"] == "f32le"
    assert len(response.content) == 3 * (RATE // 10) * 4
    assert engine.closed == 1


async def test_not_ready_until_loaded() -> None:
    app = create_app(settings(), engine=FakeEngine())
    async with client(app) as c:
        assert (await c.get("/livez")).status_code == 200
        for path in ("/readyz", "/v1/info"):
            response = await c.get(path)
            assert response.status_code == 503
            assert response.json()["error"]["code"] == "not_ready"
            assert "retry-after" in response.headers
        refused = await c.post("/v1/synthesize", json={"text": "Hi."})
        assert refused.json()["error"]["code"] == "not_ready"
        await app.state.worker.load_engine()
        assert (await c.get("/readyz")).status_code == 200
        assert (await c.get("/v1/info")).json()["engine"] == "fake"


async def test_failed_load_is_fatal_and_never_ready() -> None:
    app = create_app(settings(), engine=FakeEngine(fail_load=True))
    await app.state.worker.load_engine()
    assert app.state.worker.fatal.is_set()
    async with client(app) as c:
        assert (await c.get("/readyz")).status_code == 503


async def test_engine_failure_before_audio_is_clean_json_500() -> None:
    engine = FakeEngine(fail_at=0)
    app = await ready_app(engine)
    async with client(app) as c:
        response = await c.post("/v1/synthesize", json={"text": "Hi."})
        assert response.status_code == 500
        assert response.json() == {
            "error": {"code": "internal_error", "message": "The synthesis failed."}
        }
        assert "secret" not in response.text
        assert (await c.get("/readyz")).json()["active"] == 0
        metrics = (await c.get("/metrics")).text
    assert 'worker_requests_total{code="internal_error",status="500"} 1.0' in metrics


async def test_deadline_before_first_audio_is_504() -> None:
    app = await ready_app(FakeEngine(delay=2.0), request_deadline_s=0.05)
    async with client(app) as c:
        response = await c.post("/v1/synthesize", json={"text": "Hi."})
        assert response.status_code == 504
        assert response.json()["error"]["code"] == "deadline_exceeded"
        assert (await c.get("/readyz")).json()["active"] == 0


async def test_body_limit_is_413() -> None:
    app = await ready_app(FakeEngine(), max_body_bytes=1024)
    async with client(app) as c:
        response = await c.post("/v1/synthesize", json={"text": "x" * 2000})
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"


async def test_busy_worker_refuses_with_retry_after() -> None:
    engine = FakeEngine(chunks=50, delay=0.02)
    app = await ready_app(engine, retry_after_s=4)
    async with client(app) as c:
        first = asyncio.create_task(c.post("/v1/synthesize", json={"text": "Hi."}))
        await engine.started.wait()
        refused = await c.post("/v1/synthesize", json={"text": "Hi."})
        assert refused.status_code == 503
        assert refused.headers["retry-after"] == "4"
        assert refused.json()["error"]["code"] == "busy"
        assert (await first).status_code == 200


@dataclass
class OneStreamEngine(FakeEngine):
    """An engine that says it holds one stream at a time."""

    def capabilities(self) -> Capabilities:
        return super().capabilities().model_copy(update={"max_streams": 1})


async def test_admission_never_exceeds_what_the_engine_holds() -> None:
    engine = OneStreamEngine(chunks=50, delay=0.02)
    app = await ready_app(engine, max_concurrency=8)
    async with client(app) as c:
        assert (await c.get("/readyz")).json()["max_concurrency"] == 1
        first = asyncio.create_task(c.post("/v1/synthesize", json={"text": "Hi."}))
        await engine.started.wait()
        refused = await c.post("/v1/synthesize", json={"text": "Hi."})
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "busy"
        assert (await first).status_code == 200


@pytest.fixture
async def hypercorn_worker() -> AsyncIterator[tuple[str, FakeEngine]]:
    """The app under a real (in-process) Hypercorn, to see what a client sees on the wire."""
    engine = FakeEngine(chunks=5, fail_at=2)
    app = create_app(settings(), engine=engine)
    port = free_port()
    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    stop = asyncio.Event()
    server = asyncio.create_task(serve(app, config, shutdown_trigger=stop.wait))  # type: ignore[arg-type]
    url = f"http://127.0.0.1:{port}"
    async with httpx.AsyncClient(base_url=url) as c:
        for _ in range(500):
            try:
                if (await c.get("/readyz")).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.01)
    yield url, engine
    stop.set()
    await server


async def test_error_after_first_byte_aborts_the_stream(
    hypercorn_worker: tuple[str, FakeEngine],
) -> None:
    url, engine = hypercorn_worker
    received = bytearray()

    async def read_stream(c: httpx.AsyncClient) -> None:
        async with c.stream("POST", "/v1/synthesize", json={"text": "Hi."}) as response:
            assert response.status_code == 200
            async for chunk in response.aiter_raw():
                received.extend(chunk)

    async with httpx.AsyncClient(base_url=url) as c:
        with pytest.raises(httpx.RemoteProtocolError):
            await read_stream(c)
        assert 0 < len(received) < 5 * (RATE // 10) * 4
        assert (await c.get("/readyz")).json()["active"] == 0
        metrics = (await c.get("/metrics")).text
    assert 'worker_requests_total{code="internal_error",status="200"} 1.0' in metrics
    assert engine.closed == 1


async def test_engine_with_nothing_to_say_is_text_empty() -> None:
    engine = FakeEngine(chunks=0)
    async with client(await ready_app(engine)) as c:
        response = await c.post("/v1/synthesize", json={"text": "..."})
        assert response.status_code == 422
        assert response.json()["error"]["code"] == "text_empty"
        assert (await c.get("/readyz")).json()["active"] == 0


def factory_without_threads(**options: object) -> FakeEngine:
    assert "threads" not in options
    return FakeEngine()


def factory_with_threads(*, threads: int | None = None) -> FakeEngine:
    assert threads == 3
    return FakeEngine()


@pytest.mark.parametrize("factory", ["factory_without_threads", "factory_with_threads"])
def test_threads_hint_reaches_only_engines_that_declare_it(
    monkeypatch: pytest.MonkeyPatch, factory: str
) -> None:
    monkeypatch.setitem(ENGINES, "fake", f"tests.unit.test_worker_app:{factory}")
    app = create_app(settings(engine="fake", threads=3, loudness=False))
    assert isinstance(app.state.worker.engine, FakeEngine)


def test_options_an_engine_does_not_take_fail_loudly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(ENGINES, "fake", "tests.unit.test_worker_app:factory_with_threads")
    with pytest.raises(ValueError, match="no option model_dir"):
        create_app(settings(engine="fake", model_dir="/models"))
