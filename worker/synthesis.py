"""One synthesis from admission to the last byte: slot, engine stream, encoder, metrics.

`start_synthesis` takes a slot, starts the engine and waits for its first chunk before any
response exists, so that every failure up to the first audio is still a clean JSON error (a text
the engine finds nothing to speak in, such as "...", is 422 `text_empty`). The
returned body generator owns the slot from then on and frees it in its `finally`, whether the
stream completes, fails, times out, or the client disconnects.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass

from contract.audio import stream_headers
from contract.errors import ErrorCode, ServiceError
from worker.admission import Admission
from worker.encoders import StreamEncoder, close_encoder, create_encoder
from worker.engines.base import Audio, Engine
from worker.metrics import WorkerMetrics
from worker.validation import ValidatedRequest

logger = logging.getLogger(__name__)

CLIENT_DISCONNECTED = "client_disconnected"
"""`code` label of a stream the client hung up on (not an error the client can see)."""


@dataclass(frozen=True)
class SynthesisLimits:
    queue_timeout_s: float
    request_deadline_s: float


@dataclass
class StartedSynthesis:
    headers: dict[str, str]
    body: AsyncGenerator[bytes, None]


async def start_synthesis(
    *,
    engine: Engine,
    admission: Admission,
    metrics: WorkerMetrics,
    limits: SynthesisLimits,
    request: ValidatedRequest,
    arrived: float,
) -> StartedSynthesis:
    """Admit, start the engine and get its first chunk; raise ServiceError on any failure.

    `arrived` is the request's `time.monotonic()` arrival: the deadline counts from it.
    """
    deadline = arrived + limits.request_deadline_s
    remaining = deadline - time.monotonic()
    wait = await admission.acquire(max_wait=max(0.0, min(limits.queue_timeout_s, remaining)))
    metrics.queue_wait.observe(wait)
    metrics.active_streams.inc()
    chunks: AsyncIterator[Audio] | None = None
    encoder: StreamEncoder | None = None
    try:
        sample_rate = engine.capabilities().sample_rate
        encoder = create_encoder(request.audio_format, sample_rate)
        chunks = engine.stream(request.engine_request)
        metrics.syntheses_started.inc()
        started = time.monotonic()
        first = await _first_chunk(chunks, deadline)
        metrics.time_to_first_audio.observe(time.monotonic() - arrived)
    except BaseException:
        if chunks is not None:
            await _close(chunks)
        if encoder is not None:
            close_encoder(encoder)
        metrics.active_streams.dec()
        admission.release()
        raise
    body = _body(
        chunks=chunks,
        first=first,
        encoder=encoder,
        sample_rate=sample_rate,
        started=started,
        deadline=deadline,
        admission=admission,
        metrics=metrics,
    )
    return StartedSynthesis(
        headers=stream_headers(request.audio_format, encoder.sample_rate), body=body
    )


async def _first_chunk(chunks: AsyncIterator[Audio], deadline: float) -> Audio:
    try:
        async with asyncio.timeout_at(_loop_time(deadline)):
            return await anext(chunks)
    except StopAsyncIteration:
        raise ServiceError(
            ErrorCode.TEXT_EMPTY, "The text has nothing to speak (no words the voice can read)."
        ) from None
    except TimeoutError as e:
        raise ServiceError(
            ErrorCode.DEADLINE_EXCEEDED, "The synthesis did not start before the deadline."
        ) from e
    except ServiceError:
        raise
    except Exception as e:
        logger.exception("The engine failed before the first audio")
        raise ServiceError(ErrorCode.INTERNAL_ERROR, "The synthesis failed.") from e


async def _body(
    *,
    chunks: AsyncIterator[Audio],
    first: Audio,
    encoder: StreamEncoder,
    sample_rate: int,
    started: float,
    deadline: float,
    admission: Admission,
    metrics: WorkerMetrics,
) -> AsyncGenerator[bytes, None]:
    samples = len(first)
    code = CLIENT_DISCONNECTED
    try:
        yield encoder.encode(first)
        try:
            while (chunk := await _next_chunk(chunks, deadline)) is not None:
                samples += len(chunk)
                data = encoder.encode(chunk)
                if data:
                    yield data
        except TimeoutError:
            code = ErrorCode.DEADLINE_EXCEEDED.value
            logger.warning("Deadline passed mid-stream after %d samples; aborting", samples)
            raise
        except Exception:
            code = ErrorCode.INTERNAL_ERROR.value
            logger.exception("The engine failed mid-stream after %d samples; aborting", samples)
            raise
        yield encoder.finish()
        code = ""
        elapsed = time.monotonic() - started
        if samples:
            metrics.real_time_factor.observe(elapsed / (samples / sample_rate))
    finally:
        metrics.audio_seconds.inc(samples / sample_rate)
        metrics.requests.labels(status="200", code=code).inc()
        logger.info(
            "Stream ended (%s): %.2f s of audio in %.2f s",
            code or "complete",
            samples / sample_rate,
            time.monotonic() - started,
        )
        await _close(chunks)
        if code:
            close_encoder(encoder)
        metrics.active_streams.dec()
        admission.release()


async def _next_chunk(chunks: AsyncIterator[Audio], deadline: float) -> Audio | None:
    """The next chunk, or None at the end; TimeoutError past the deadline.

    The deadline wraps each `anext` only: a timeout scope must not span a `yield`.
    """
    try:
        async with asyncio.timeout_at(_loop_time(deadline)):
            return await anext(chunks)
    except StopAsyncIteration:
        return None


async def _close(chunks: AsyncIterator[Audio]) -> None:
    aclose = getattr(chunks, "aclose", None)
    if aclose is not None:
        await aclose()


def _loop_time(monotonic_deadline: float) -> float:
    """asyncio's clock is time.monotonic() on every loop this worker runs (asyncio, uvloop)."""
    loop = asyncio.get_running_loop()
    return loop.time() + (monotonic_deadline - time.monotonic())
