"""Audio results as HTTP responses: whole bodies for hits, streams for misses, or SSE events."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator

from starlette.responses import Response, StreamingResponse

from gateway.service import AudioResult

SSE_CHUNK_BYTES = 32 * 1024


def audio_response(result: AudioResult) -> Response:
    """A hit goes out in one piece with its length; a miss streams as the worker produces it."""
    headers = result.response_headers()
    if result.body is not None:
        return Response(content=result.body, headers=headers)
    assert result.stream is not None
    return StreamingResponse(result.stream, headers=headers)


def sse_response(result: AudioResult, input_chars: int) -> StreamingResponse:
    """OpenAI's `stream_format=sse`: `speech.audio.delta` events with base64 audio, then one
    `speech.audio.done` (its usage counts input characters; audio has no token count here)."""
    headers = result.response_headers()
    headers["Content-Type"] = "text/event-stream"
    headers["Cache-Control"] = "no-cache"
    return StreamingResponse(_events(result, input_chars), headers=headers)


async def _events(result: AudioResult, input_chars: int) -> AsyncIterator[bytes]:
    async for chunk in _chunks(result):
        yield _event({"type": "speech.audio.delta", "audio": base64.b64encode(chunk).decode()})
    usage = {"input_tokens": input_chars, "output_tokens": 0, "total_tokens": input_chars}
    yield _event({"type": "speech.audio.done", "usage": usage})


async def _chunks(result: AudioResult) -> AsyncIterator[bytes]:
    if result.body is not None:
        for start in range(0, len(result.body), SSE_CHUNK_BYTES):
            yield result.body[start : start + SSE_CHUNK_BYTES]
        return
    assert result.stream is not None
    async for chunk in result.stream:
        yield chunk


def _event(payload: dict[str, object]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"
