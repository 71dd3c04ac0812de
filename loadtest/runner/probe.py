"""One measured request: stream the response, time its first audio byte, count its audio."""

from __future__ import annotations

import asyncio
import json
import time

import httpx

from loadtest.runner.audio import AudioDecodeError, audio_stats
from loadtest.runner.stats import Sample
from loadtest.runner.targets import Target

ERROR_BODY_LIMIT = 64 * 1024
SILENCE_PEAK = 1e-3


async def measure(
    client: httpx.AsyncClient, target: Target, text: str, api_key: str | None
) -> Sample:
    """Send one request for `text` to `target` and return what the client saw.

    Never raises for transport faults or bad responses: they become a Sample with an `error`
    (a contract error code for JSON error bodies, else the fault's name), so a sweep keeps
    going and counts them. A 200 whose body is not audio of the asked format, or is silent,
    is an error too: a fast server of silence must not look good.
    """
    kwargs = target.request_kwargs(text, api_key)
    started = time.perf_counter()
    first: float | None = None
    chunks: list[bytes] = []
    status = 0
    headers: dict[str, str] = {}
    try:
        async with client.stream("POST", **kwargs) as response:
            status = response.status_code
            headers = {k.lower(): v for k, v in response.headers.items()}
            async for chunk in response.aiter_bytes():
                if chunk and first is None:
                    first = time.perf_counter()
                chunks.append(chunk)
                if not response.is_success and sum(map(len, chunks)) > ERROR_BODY_LIMIT:
                    break
    except httpx.TimeoutException as e:
        return _failed(status, started, headers, f"timeout:{type(e).__name__}")
    except httpx.HTTPError as e:
        return _failed(status, started, headers, f"transport:{type(e).__name__}")
    finished = time.perf_counter()
    body = b"".join(chunks)
    if not 200 <= status < 300:
        return _failed(status, started, headers, _error_code(body), finished=finished)
    try:
        # Decoding runs off the event loop, so it never delays another request's timings.
        audio = await asyncio.to_thread(audio_stats, body, target.format, headers)
    except AudioDecodeError:
        return _failed(status, started, headers, "bad_audio", finished=finished)
    if audio.seconds <= 0:
        return _failed(status, started, headers, "empty_audio", finished=finished)
    if audio.peak < SILENCE_PEAK:
        return _failed(status, started, headers, "silent_audio", finished=finished)
    return Sample(
        status=status,
        latency_s=finished - started,
        ttfa_s=(first - started) if first is not None else None,
        audio_s=audio.seconds,
        cache=headers.get("x-cache"),
    )


def _failed(
    status: int,
    started: float,
    headers: dict[str, str],
    error: str,
    *,
    finished: float | None = None,
) -> Sample:
    end = finished if finished is not None else time.perf_counter()
    return Sample(status=status, latency_s=end - started, cache=headers.get("x-cache"), error=error)


def _error_code(body: bytes) -> str:
    """The contract's `error.code` from a JSON error body, or "non_json" when there is none."""
    try:
        code = json.loads(body)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return "non_json"
    return str(code)
