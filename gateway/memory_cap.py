"""A cap on the audio bytes one gateway holds, for hits and misses together.

Every byte of audio the gateway keeps in memory is counted here: a miss's flight holds its
whole body (for late joiners and the cache entry) until its producer and last reader are done;
a hit holds the piece it is sending. While the count is at or above the cap, new synthesis
requests are refused at once with 503 `busy` and `Retry-After` (`ByteCapMiddleware`), so a
burst of slow readers costs the gateway a bounded amount of memory instead of taking it down.
Work already admitted goes on: a hit waits for room before it reads its next piece (so hits
alone never pass the cap), and a running miss keeps what its worker sends.
"""

from __future__ import annotations

import asyncio
import json

from prometheus_client import CollectorRegistry, Counter, Gauge
from starlette.types import ASGIApp, Receive, Scope, Send

from contract.errors import ErrorCode, error_body
from gateway.errors import ERROR_CODE_SCOPE_KEY

ADMITTED_PATHS = frozenset({"/v1/audio/speech", "/synthesize", "/synthesize_batch"})
RETRY_AFTER_S = 1


class ByteBudget:
    """Bytes held against `cap_bytes`; `held` may pass the cap only through running misses.

    With a `registry`, it exports `gateway_audio_bytes_held` and
    `gateway_byte_cap_refusals_total`.
    """

    def __init__(self, cap_bytes: int, registry: CollectorRegistry | None = None) -> None:
        if cap_bytes <= 0:
            raise ValueError("the byte cap must be positive")
        self.cap_bytes = cap_bytes
        self.held = 0
        self.peak = 0
        self._released = asyncio.Event()
        self.refusals = Counter(
            "gateway_byte_cap_refusals",
            "Requests refused with 503 busy because the gateway held its cap of audio bytes.",
            registry=registry,
        )
        if registry is not None:
            held = Gauge(
                "gateway_audio_bytes_held",
                "Audio bytes the gateway holds now (miss bodies and hit pieces).",
                registry=registry,
            )
            held.set_function(lambda: self.held)

    def full(self) -> bool:
        return self.held >= self.cap_bytes

    def add(self, size: int) -> None:
        """Count `size` bytes at once (a miss's chunk, already in memory)."""
        self.held += size
        self.peak = max(self.peak, self.held)

    async def reserve(self, size: int) -> None:
        """Wait until `size` more bytes fit under the cap (one piece always fits when idle)."""
        while self.held + size > self.cap_bytes and self.held > 0:
            await self._released.wait()
        self.add(size)

    def release(self, size: int) -> None:
        self.held -= size
        self._released.set()
        self._released = asyncio.Event()


class ByteCapMiddleware:
    """Refuses new audio requests with 503 `busy` while the budget is full (plain ASGI)."""

    def __init__(self, app: ASGIApp, budget: ByteBudget) -> None:
        self._app = app
        self._budget = budget
        self._body = json.dumps(
            error_body(
                ErrorCode.BUSY,
                "The gateway holds as much audio as it may; retry shortly.",
            )
        ).encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] != "POST"
            or scope["path"] not in ADMITTED_PATHS
            or not self._budget.full()
        ):
            await self._app(scope, receive, send)
            return
        self._budget.refusals.inc()
        scope[ERROR_CODE_SCOPE_KEY] = ErrorCode.BUSY.value
        await send(
            {
                "type": "http.response.start",
                "status": 503,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(self._body)).encode()),
                    (b"retry-after", str(RETRY_AFTER_S).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": self._body})
