"""The worker's HTTP app: synthesis, engine info, health and metrics.

`create_app(settings)` builds everything; nothing happens at import. The engine loads and warms
up in the background after start-up: `/livez` answers at once, `/readyz` turns 200 only once the
warm-up synthesis has run. If loading fails, the app sets `fatal` so that `python -m worker`
exits non-zero and a supervisor restarts it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from contract.errors import ErrorCode, ServiceError, error_body
from contract.info import INFO_PATH, EngineInfo
from contract.requests import (
    ENGINE_HEADER,
    MAX_QUEUE_WAIT_HEADER,
    MODEL_VERSION_HEADER,
    SYNTHESIZE_PATH,
)
from worker.admission import Admission
from worker.body import read_body, require_json
from worker.disconnect import ClientDisconnectedError, unless_disconnected
from worker.engines import create_engine, declares_option
from worker.engines.base import Engine
from worker.loudness import LevelledEngine
from worker.metrics import WorkerMetrics
from worker.request_id import RequestIdMiddleware, install_context_executor
from worker.responses import AudioStreamResponse
from worker.routes_voices import install_voice_routes
from worker.settings import WorkerSettings
from worker.synthesis import CLIENT_DISCONNECTED, Synthesis, SynthesisLimits, start_synthesis
from worker.torch_setup import configure_torch_for_cuda, is_cuda_device
from worker.validation import parse_body, validate

logger = logging.getLogger(__name__)



class WorkerState:
    """Everything the routes share; one per app."""

    def __init__(self, settings: WorkerSettings, engine: Engine) -> None:
        self.settings = settings
        self.engine = engine
        self.metrics = WorkerMetrics()
        self.admission = Admission(
            max_concurrency=settings.max_concurrency,
            max_queue=settings.max_queue,
            retry_after_s=settings.retry_after_s,
        )
        self.metrics.watch_admission(self.admission, settings.max_concurrency)
        self.limits = SynthesisLimits(
            queue_timeout_s=settings.queue_timeout_s,
            request_deadline_s=settings.request_deadline_s,
        )
        self.ready = False
        self.fatal = asyncio.Event()

    async def load_engine(self) -> None:
        """Load and warm up the engine off the event loop; set `fatal` if that fails."""
        try:
            if is_cuda_device(self.settings.device):
                configure_torch_for_cuda()
                self.metrics.watch_gpu(self.settings.device or "cuda")
            started = time.monotonic()
            await asyncio.to_thread(self.engine.load)
            await asyncio.to_thread(self.engine.warm_up)
            engine_streams = self.engine.capabilities().max_streams
            if engine_streams is not None:
                self.admission.limit_to(engine_streams)
                self.metrics.max_concurrency.set(self.admission.max_concurrency)
        except Exception:
            logger.critical("The engine failed to load or warm up", exc_info=True)
            self.fatal.set()
            return
        self.ready = True
        logger.info(
            "Engine %s ready in %.1f s", self.settings.engine, time.monotonic() - started
        )

    def require_ready(self) -> None:
        if not self.ready:
            raise ServiceError(
                ErrorCode.NOT_READY,
                "The engine is still loading.",
                headers={"Retry-After": str(self.settings.retry_after_s)},
            )


def create_app(settings: WorkerSettings, engine: Engine | None = None) -> FastAPI:
    """The worker app; `engine` replaces the configured one (tests)."""
    if engine is None:
        engine = create_engine(settings.engine, **_engine_options(settings))
        if settings.loudness:
            engine = LevelledEngine(
                engine,
                target_lufs=settings.loudness_target_lufs,
                ceiling_dbfs=settings.peak_ceiling_dbfs,
            )
    state = WorkerState(settings, engine)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        install_context_executor()  # engine threads' log lines keep their request id
        loading = asyncio.create_task(state.load_engine())
        try:
            yield
        finally:
            if not loading.done():
                loading.cancel()

    app = FastAPI(title="TTS worker", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.worker = state
    app.add_middleware(RequestIdMiddleware)
    _add_error_handlers(app)

    @app.get("/livez")
    async def livez() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> dict[str, Any]:
        state.require_ready()
        return {
            "status": "ready",
            "engine": settings.engine,
            "active": state.admission.active,
            "waiting": state.admission.waiting,
            "max_concurrency": state.admission.max_concurrency,
            "max_queue": settings.max_queue,
        }

    @app.get(INFO_PATH)
    async def info() -> EngineInfo:
        state.require_ready()
        return state.engine.capabilities()

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.post(SYNTHESIZE_PATH)
    async def synthesize(request: Request) -> Response:
        arrived = time.monotonic()
        try:
            require_json(request)
            body = await read_body(request, settings.max_body_bytes)
            parsed = parse_body(body)
            state.require_ready()
            capabilities = state.engine.capabilities()
            validated = validate(parsed, capabilities, max_text_chars=settings.max_text_chars)
            synthesis = await unless_disconnected(
                start_synthesis(
                    engine=state.engine,
                    admission=state.admission,
                    metrics=state.metrics,
                    limits=state.limits,
                    request=validated,
                    arrived=arrived,
                    max_queue_wait=state.limits.queue_wait(
                        request.headers.get(MAX_QUEUE_WAIT_HEADER)
                    ),
                ),
                request.receive,
                discard=Synthesis.close,
            )
        except ClientDisconnectedError:
            state.metrics.requests.labels(status="499", code=CLIENT_DISCONNECTED).inc()
            logger.info("Client disconnected before the first audio")
            return Response(status_code=499)
        except ServiceError as e:
            state.metrics.requests.labels(status=str(e.status), code=e.code.value).inc()
            raise
        except Exception:
            state.metrics.requests.labels(status="500", code=ErrorCode.INTERNAL_ERROR.value).inc()
            raise
        made_by = {
            ENGINE_HEADER: capabilities.engine,
            MODEL_VERSION_HEADER: capabilities.model_version,
        }
        return AudioStreamResponse(
            synthesis.body(), headers={**synthesis.headers, **made_by}, on_close=synthesis.close
        )

    install_voice_routes(app, state)
    return app


def _engine_options(settings: WorkerSettings) -> dict[str, Any]:
    """The factory's options. `threads` is a hint: it goes only to engines that declare it.

    Launchers set WORKER_THREADS for every worker on a shared host; an engine without a
    thread knob (its own defaults apply) must still start, so the hint is dropped, loudly.
    """
    options = settings.engine_kwargs()
    if "threads" in options and not declares_option(settings.engine, "threads"):
        logger.warning(
            "Engine %s has no threads option; WORKER_THREADS=%s is not applied",
            settings.engine,
            options.pop("threads"),
        )
    return options


def _add_error_handlers(app: FastAPI) -> None:
    """Every error leaves as the contract's JSON body; 5xx bodies never carry exception text."""

    @app.exception_handler(ServiceError)
    async def service_error(_: Request, exc: ServiceError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {
            404: ErrorCode.NOT_FOUND,
            405: ErrorCode.METHOD_NOT_ALLOWED,
        }.get(exc.status_code, ErrorCode.INVALID_REQUEST)
        status = exc.status_code if exc.status_code < 500 else 500
        return JSONResponse(
            error_body(code, str(exc.detail) if status < 500 else "Internal error."),
            status_code=status,
            headers=dict(exc.headers or {}),
        )

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.error("Unhandled error", exc_info=exc)
        return JSONResponse(
            error_body(ErrorCode.INTERNAL_ERROR, "Internal error."), status_code=500
        )
