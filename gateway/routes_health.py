"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi.routing import APIRoute
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from contract.errors import ErrorCode, ServiceError
from gateway.openapi import errors
from gateway.schemas import Health, Readiness
from gateway.state import gateway_state


async def healthz(_: Request) -> JSONResponse:
    """The process serves HTTP; says nothing about workers or Redis."""
    return JSONResponse({"status": "ok"})


async def livez(_: Request) -> JSONResponse:
    """The same answer as /healthz, under the name Kubernetes probes use."""
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> JSONResponse:
    """200 while at least one worker behind the upstream URL is ready. Redis is not required:
    without it requests are served uncached, so the body only reports whether it answers."""
    state = gateway_state(request)
    ready = state.directory.ready or await state.directory.refresh()
    if not ready:
        raise ServiceError(ErrorCode.NOT_READY, "No worker is ready.", headers={"Retry-After": "1"})
    info = state.directory.info
    readiness = Readiness(
        status="ready",
        engine=info.engine if info else None,
        model_version=info.model_version if info else None,
        cache="up" if state.cache.available() else "down",
    )
    return JSONResponse(readiness.model_dump(mode="json"))


async def metrics(request: Request) -> Response:
    registry = gateway_state(request).metrics.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


ROUTES = [
    APIRoute("/healthz", healthz, methods=["GET"], summary="Liveness", response_model=Health),
    APIRoute("/livez", livez, methods=["GET"], summary="Liveness", response_model=Health),
    APIRoute(
        "/readyz",
        readyz,
        methods=["GET"],
        summary="Readiness: a worker is ready",
        response_model=Readiness,
        responses=errors(503),
    ),
    APIRoute("/metrics", metrics, methods=["GET"], include_in_schema=False),
]
