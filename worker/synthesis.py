"""One synthesis from admission to the last byte: slot, engine stream, encoder, metrics.

`start_synthesis` takes a slot, starts the engine and waits for its first chunk before any
response exists, so that every failure up to the first audio is still a clean JSON error (a text
the engine finds nothing to speak in, such as "...", is 422 `text_empty`). The returned
`Synthesis` owns the slot from then on. Its `close()` frees everything and is idempotent; the
body calls it when it ends, and whoever holds a `Synthesis` must call it too (in a `finally`),
because a body generator that never started cannot run its own clean-up.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, replace

from contract.audio import stream_headers
from contract.errors import ErrorCode, ServiceError
from contract.playback import PlaybackClock
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

    def queue_wait(self, asked: str | None) -> float:
        """The longest queue wait for a request whose caller asked for `asked` seconds at most
        (`X-Max-Queue-Wait`, e.g. the gateway's remaining retry budget); never more than
        `queue_timeout_s`. An unreadable or absent value leaves `queue_timeout_s`."""
        try:
            wanted = float(asked) if asked is not None else self.queue_timeout_s
        except ValueError:
            return self.queue_timeout_s
        if not math.isfinite(wanted):
            return self.queue_timeout_s
        return max(0.0, min(self.queue_timeout_s, wanted))


async def start_synthesis(
    *,
    engine: Engine,
    admission: Admission,
    metrics: WorkerMetrics,
    limits: SynthesisLimits,
    request: ValidatedRequest,
    arrived: float,
    max_queue_wait: float | None = None,
) -> Synthesis:
    """Admit, start the engine and get its first chunk; raise ServiceError on any failure.

    `arrived` is the request's `time.monotonic()` arrival: the deadline counts from it.
    `max_queue_wait` (at most `limits.queue_timeout_s`) shortens the queue wait.
    """
    deadline = arrived + limits.request_deadline_s
    remaining = deadline - time.monotonic()
    queue_wait = limits.queue_timeout_s if max_queue_wait is None else max_queue_wait
    wait = await admission.acquire(max_wait=max(0.0, min(queue_wait, remaining)))
    metrics.queue_wait.observe(wait)
    metrics.active_streams.inc()
    chunks: AsyncIterator[Audio] | None = None
    encoder: StreamEncoder | None = None
    try:
        sample_rate = engine.capabilities().sample_rate
        encoder = create_encoder(request.audio_format, sample_rate)
        chunks = engine.stream(replace(request.engine_request, deadline=deadline))
        metrics.syntheses_started.inc()
        started = time.monotonic()
        first = await _first_chunk(chunks, deadline)
        metrics.time_to_first_audio.observe(time.monotonic() - arrived)
    except BaseException:
        metrics.active_streams.dec()
        admission.release()
        if encoder is not None:
            close_encoder(encoder)
        if chunks is not None:
            await _close(chunks)
        raise
    return Synthesis(
        chunks=chunks,
        first=first,
        encoder=encoder,
        headers=stream_headers(request.audio_format, encoder.sample_rate),
        sample_rate=sample_rate,
        started=started,
        deadline=deadline,
        admission=admission,
        metrics=metrics,
    )


class Synthesis:
    """An admitted synthesis whose first audio is ready; stream it with `body()`."""

    def __init__(
        self,
        *,
        chunks: AsyncIterator[Audio],
        first: Audio,
        encoder: StreamEncoder,
        headers: dict[str, str],
        sample_rate: int,
        started: float,
        deadline: float,
        admission: Admission,
        metrics: WorkerMetrics,
    ) -> None:
        self.headers = headers
        self._chunks = chunks
        self._first = first
        self._encoder = encoder
        self._sample_rate = sample_rate
        self._started = started
        self._deadline = deadline
        self._admission = admission
        self._metrics = metrics
        self._samples = 0
        self._playback = PlaybackClock()
        self._code = CLIENT_DISCONNECTED
        self._closed = False

    async def body(self) -> AsyncGenerator[bytes, None]:
        """The encoded stream. Raises (after logging) on engine failure or the deadline."""
        try:
            self._samples = len(self._first)
            self._sent(self._first)
            yield self._encoder.encode(self._first)
            try:
                while (chunk := await _next_chunk(self._chunks, self._deadline)) is not None:
                    self._samples += len(chunk)
                    self._sent(chunk)
                    data = self._encoder.encode(chunk)
                    if data:
                        yield data
            except TimeoutError:
                self._code = ErrorCode.DEADLINE_EXCEEDED.value
                logger.warning("Deadline passed mid-stream; aborting")
                raise
            except Exception:
                self._code = ErrorCode.INTERNAL_ERROR.value
                logger.exception("The engine failed mid-stream; aborting")
                raise
            yield self._encoder.finish()
            self._code = ""
            elapsed = time.monotonic() - self._started
            if self._samples:
                self._metrics.real_time_factor.observe(elapsed / self.audio_seconds)
        finally:
            await self.close()

    @property
    def audio_seconds(self) -> float:
        return self._samples / self._sample_rate

    def _sent(self, chunk: Audio) -> None:
        """Follow the listener's playback: this chunk leaves now (encoded right after)."""
        self._playback.chunk(time.monotonic(), len(chunk) / self._sample_rate)

    async def close(self) -> None:
        """Free the slot and the encoder, stop the engine, count the request; once only."""
        if self._closed:
            return
        self._closed = True
        self._metrics.active_streams.dec()
        self._admission.release()
        self._metrics.audio_seconds.inc(self.audio_seconds)
        self._metrics.requests.labels(status="200", code=self._code).inc()
        if self._playback.audio_s > 0:
            self._metrics.stream_worst_gap.observe(self._playback.worst_gap_s)
            if not self._playback.underrun:
                self._metrics.streams_without_underrun.inc()
        logger.info(
            "Stream ended (%s): %.2f s of audio in %.2f s",
            self._code or "complete",
            self.audio_seconds,
            time.monotonic() - self._started,
        )
        if self._code:
            close_encoder(self._encoder)
        await _close(self._chunks)


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
