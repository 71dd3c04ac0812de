"""Plain ASGI middleware for every request: the request id, and the request counter.

The id arrives in `X-Request-ID` (nginx sets it) or is made here; it is echoed on the
response and forwarded to the worker.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from prometheus_client import Counter
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from contract.requests import REQUEST_ID_HEADER
from gateway.errors import ERROR_CODE_SCOPE_KEY
from gateway.metrics import GatewayMetrics

REQUEST_ID_SCOPE_KEY = "gateway.request_id"
_REQUEST_ID_HEADER = REQUEST_ID_HEADER.lower().encode()
_MAX_REQUEST_ID = 128


def request_id_of(scope: Scope) -> str:
    value = scope.get(REQUEST_ID_SCOPE_KEY)
    return value if isinstance(value, str) else ""


class RequestContextMiddleware:
    def __init__(
        self, app: ASGIApp, metrics: GatewayMetrics, route_paths: dict[Callable[..., Any], str]
    ) -> None:
        self._app = app
        self._metrics = metrics
        self._route_paths = route_paths
        self._counters: dict[tuple[str, int, str], Counter] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        request_id = _incoming_id(scope) or os.urandom(16).hex()
        scope[REQUEST_ID_SCOPE_KEY] = request_id
        echoed = (_REQUEST_ID_HEADER, request_id.encode())
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), echoed]
            await send(message)

        try:
            await self._app(scope, receive, send_with_id)
        finally:
            path = self._route_paths.get(scope.get("endpoint"), "unmatched")  # type: ignore[arg-type]
            code = scope.get(ERROR_CODE_SCOPE_KEY, "") if status >= 400 else ""
            self._counter(path, status, code).inc()

    def _counter(self, path: str, status: int, code: str) -> Counter:
        key = (path, status, code)
        counter = self._counters.get(key)
        if counter is None:
            counter = self._metrics.requests.labels(route=path, status=str(status), code=code)
            self._counters[key] = counter
        return counter


def _incoming_id(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == _REQUEST_ID_HEADER:
            text: str = value.decode("latin-1")
            if 0 < len(text) <= _MAX_REQUEST_ID and text.isprintable():
                return text
            return None
    return None
