"""One measured request: stream the response, time its first audio byte, count its audio.

For uncompressed formats (`pcm`, `pcm_f32le`, `wav`) it also follows a listener's playback
(contract.playback) from the bytes as they arrive: a constant number of bytes per second of
audio maps each arrival to its audio (to within a WAV header's 44 bytes). Compressed formats
have no such mapping while streaming, so their gap is not measured.
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx

from contract.playback import PlaybackClock
from loadtest.runner.audio import RAW_DTYPES, AudioDecodeError, audio_stats
from loadtest.runner.stats import Sample
from loadtest.runner.targets import Target

ERROR_BODY_LIMIT = 64 * 1024
SILENCE_PEAK = 1e-3
CONSTANT_RATE_FORMATS = frozenset({*RAW_DTYPES, "wav"})


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
    arrivals: list[float] = []
    status = 0
    headers: dict[str, str] = {}
    try:
        async with client.stream("POST", **kwargs) as response:
            status = response.status_code
            headers = {k.lower(): v for k, v in response.headers.items()}
            async for chunk in response.aiter_bytes():
                now = time.perf_counter()
                if chunk and first is None:
                    first = now
                chunks.append(chunk)
                arrivals.append(now)
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
        worst_gap_s=_worst_gap(target.format, chunks, arrivals, audio.seconds),
    )


def _worst_gap(
    audio_format: str, chunks: list[bytes], arrivals: list[float], audio_s: float
) -> float | None:
    """The stream's longest wait behind playback, from each chunk's arrival and size."""
    if audio_format not in CONSTANT_RATE_FORMATS:
        return None
    seconds_per_byte = audio_s / sum(map(len, chunks))
    clock = PlaybackClock()
    for chunk, arrived in zip(chunks, arrivals, strict=True):
        clock.chunk(arrived, len(chunk) * seconds_per_byte)
    return clock.worst_gap_s


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
