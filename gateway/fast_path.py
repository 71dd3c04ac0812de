"""Cache hits of POST /v1/audio/speech, answered in plain ASGI before the framework runs.

A hit is the hot path of the whole service, and most of its cost was framework layers
(exception and body-limit middleware, request and response objects). This middleware parses
and keys the request with the same code the route uses (`routes_openai.speech_job`), asks the
cache, and on a hit writes the stored bytes itself (a large entry piece by piece, as it comes
from Redis). Everything else (a miss, a bypass, SSE, a
running synthesis, any invalid request) falls through to the app with the body replayed,
where the route handles it in full and raises its errors; it is told the cache already missed.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from contract.errors import ServiceError
from gateway.middleware import request_id_of
from gateway.routes_openai import CACHE_CHECKED_SCOPE_KEY, create_speech, speech_job
from gateway.state import GatewayState

SPEECH_PATH = "/v1/audio/speech"
MAX_FAST_BODY = 64 * 1024


class SpeechHitFastPath:
    def __init__(self, app: ASGIApp, state: GatewayState) -> None:
        self._app = app
        self._state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != SPEECH_PATH or scope["method"] != "POST":
            await self._app(scope, receive, send)
            return
        content_type, cache_control = _headers(scope)
        if content_type != b"application/json":
            await self._app(scope, receive, send)
            return
        body, complete = await _read_body(receive)
        replay = _replay(body, complete, receive)
        if not complete:
            await self._app(scope, replay, send)
            return
        try:
            parsed, job = await speech_job(
                self._state,
                body,
                cache_control.decode("latin-1") if cache_control else None,
                request_id_of(scope),
            )
        except ServiceError:
            await self._app(scope, replay, send)
            return
        result = None
        if parsed.stream_format == "audio":
            result = await self._state.speech.lookup(job)
            scope[CACHE_CHECKED_SCOPE_KEY] = True
        if result is None:
            await self._app(scope, replay, send)
            return
        scope["endpoint"] = create_speech
        headers = [
            (name.lower().encode("latin-1"), value.encode("latin-1"))
            for name, value in result.response_headers().items()
        ]
        if result.body is not None:
            headers.append((b"content-length", str(len(result.body)).encode()))
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": result.body})
            return
        # A large entry, read from Redis piece by piece as it is sent (gateway.cache).
        assert result.stream is not None
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await _send_pieces(result.stream, receive, send)


async def _send_pieces(stream: AsyncIterator[bytes], receive: Receive, send: Send) -> None:
    """Send every piece, stopping (and closing `stream`) as soon as the client hangs up."""

    async def disconnected() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    listener = asyncio.ensure_future(disconnected())
    try:
        async for piece in stream:
            if listener.done():
                return
            await send({"type": "http.response.body", "body": piece, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
    finally:
        listener.cancel()
        close = getattr(stream, "aclose", None)
        if close is not None:
            await close()


def _headers(scope: Scope) -> tuple[bytes | None, bytes | None]:
    content_type = cache_control = None
    for name, value in scope["headers"]:
        if name == b"content-type":
            content_type = value.split(b";", 1)[0].strip().lower()
        elif name == b"cache-control":
            cache_control = value
    return content_type, cache_control


async def _read_body(receive: Receive) -> tuple[bytes, bool]:
    """The request body, up to MAX_FAST_BODY; `complete` is False when more remains unread."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"".join(chunks), False
        chunk = message.get("body", b"")
        chunks.append(chunk)
        size += len(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks), True
        if size > MAX_FAST_BODY:
            return b"".join(chunks), False


def _replay(body: bytes, complete: bool, receive: Receive) -> Receive:
    """A receive that hands the app what was read here first, then the rest of the stream."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": not complete}
        return await receive()

    return replay
