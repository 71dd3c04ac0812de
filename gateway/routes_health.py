"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from contract.errors import ErrorCode, ServiceError
from gateway.state import gateway_state

router = APIRouter()


@router.get("/healthz")
@router.get("/livez")
async def healthz() -> JSONResponse:
    """The process serves HTTP; says nothing about workers or Redis."""
    return JSONResponse({"status": "ok"})


@router.get("/readyz")
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


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    registry = gateway_state(request).metrics.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
