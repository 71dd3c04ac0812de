"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from contract.errors import ErrorCode, ServiceError
from gateway.state import gateway_state


async def healthz(_: Request) -> JSONResponse:
    """The process serves HTTP; says nothing about workers or Redis."""
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> JSONResponse:
    """200 while at least one worker behind the upstream URL is ready. Redis is not required:
    without it requests are served uncached, so the body only reports whether it answers."""
    state = gateway_state(request)
    ready = state.directory.ready or await state.directory.refresh()
    if not ready:
        raise ServiceError(ErrorCode.NOT_READY, "No worker is ready.", headers={"Retry-After": "1"})
    info = state.directory.info
    return JSONResponse(
        {
            "status": "ready",
            "engine": info.engine if info else None,
            "model_version": info.model_version if info else None,
            "cache": "up" if state.cache.available() else "down",
        }
    )


async def metrics(request: Request) -> Response:
    registry = gateway_state(request).metrics.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


ROUTES = [
    Route("/healthz", healthz, methods=["GET"]),
    Route("/livez", healthz, methods=["GET"]),
    Route("/readyz", readyz, methods=["GET"]),
    Route("/metrics", metrics, methods=["GET"]),
]
