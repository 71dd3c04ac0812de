"""`create_app(settings)`: the gateway's FastAPI app, its shared objects and its lifespan."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
from fastapi import FastAPI

from gateway import routes_health, routes_openai, routes_synthesize, routes_voices, routes_web
from gateway.auth import ApiKeyMiddleware
from gateway.cache import AudioCache
from gateway.errors import install_error_handlers
from gateway.fast_path import SpeechHitFastPath
from gateway.loop_lag import LoopLagMonitor
from gateway.memory_cap import ByteBudget, ByteCapMiddleware
from gateway.metrics import GatewayMetrics
from gateway.middleware import RequestContextMiddleware
from gateway.openapi import install_openapi
from gateway.redis_client import RedisClient, redis_for, voice_key_prefix
from gateway.request_log import RequestLog
from gateway.service import SpeechService
from gateway.settings import GatewaySettings
from gateway.single_flight import SingleFlight
from gateway.state import GatewayState
from gateway.upstream import Upstream
from gateway.voices import VoiceStore
from gateway.workers import WorkerDirectory

VOICE_STORE_TIMEOUT_S = 2.0


def create_app(
    settings: GatewaySettings,
    *,
    upstream_transport: httpx.AsyncBaseTransport | None = None,
    redis: RedisClient | None = None,
) -> FastAPI:
    """Build the app. `upstream_transport` and `redis` replace the real ones in unit tests."""
    metrics = GatewayMetrics()
    cluster = settings.redis_cluster
    cache_redis = redis or redis_for(settings, settings.cache_budget_s)
    voice_redis = redis or redis_for(settings, VOICE_STORE_TIMEOUT_S)
    upstream = Upstream(settings, metrics, transport=upstream_transport)
    directory = WorkerDirectory(upstream, metrics, settings.info_refresh_s)
    loop_lag = LoopLagMonitor()
    held_audio = ByteBudget(settings.max_held_audio_bytes, registry=metrics.registry)
    cache = AudioCache(
        cache_redis,
        metrics=metrics,
        ttl_s=settings.cache_ttl_s,
        max_entry_bytes=settings.cache_max_entry_bytes,
        budget_s=settings.cache_budget_s,
        retry_after_s=settings.cache_retry_after_s,
        piece_bytes=settings.cache_piece_bytes,
        piece_timeout_s=settings.cache_piece_timeout_s,
        memory=held_audio,
        loop_lag=lambda: loop_lag.lag_s,
    )
    voices = VoiceStore(voice_redis, VOICE_STORE_TIMEOUT_S, key_prefix=voice_key_prefix(cluster))
    flights = SingleFlight(memory=held_audio)
    speech = SpeechService(
        cache=cache,
        flights=flights,
        upstream=upstream,
        directory=directory,
        voices=voices,
        metrics=metrics,
        openai_voices=settings.openai_voices,
        max_text_chars=settings.max_text_chars,
        deadline_s=settings.request_deadline_s,
        request_log=RequestLog(
            enabled=settings.log_requests, redact_text=settings.log_redact_text
        ),
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        directory.start()
        loop_lag.start()
        try:
            yield
        finally:
            await loop_lag.stop()
            await directory.stop()
            await flights.aclose()
            await upstream.aclose()
            await cache_redis.aclose()
            if voice_redis is not cache_redis:
                await voice_redis.aclose()

    app = FastAPI(
        title="cosyvoice-serve gateway",
        # Metrics are Prometheus (gateway.metrics); FastAPI's OpenTelemetry hooks stay off.
        telemetry={"tracing": False, "metrics": False, "logs": False, "operation_spans": False},
        lifespan=lifespan,
        # API docs (Swagger UI) at /docs, rendered from /openapi.json; nginx serves both.
        docs_url="/docs",
        redoc_url=None,
        openapi_url="/openapi.json",
    )
    app.state.gateway = GatewayState(
        settings=settings,
        metrics=metrics,
        cache=cache,
        directory=directory,
        voices=voices,
        speech=speech,
    )
    install_error_handlers(app)
    routes = [
        *routes_openai.ROUTES,
        *routes_synthesize.ROUTES,
        *routes_voices.ROUTES,
        *routes_health.ROUTES,
        *routes_web.ROUTES,
    ]
    # Every endpoint takes the Request and parses its own body (contract error codes, one
    # validation per item of a batch); the schema declares those bodies (gateway.openapi).
    # Cache hits of /v1/audio/speech never reach these routes (gateway.fast_path).
    app.router.routes.extend(routes)
    install_openapi(
        app,
        settings,
        [*routes_openai.BODY_MODELS, *routes_synthesize.BODY_MODELS, *routes_voices.BODY_MODELS],
    )
    app.add_middleware(SpeechHitFastPath, state=app.state.gateway)
    app.add_middleware(ByteCapMiddleware, budget=held_audio)
    if settings.api_keys:
        app.add_middleware(ApiKeyMiddleware, keys=settings.api_keys)
    route_paths = {route.endpoint: route.path for route in routes}
    app.add_middleware(RequestContextMiddleware, metrics=metrics, route_paths=route_paths)
    return app
