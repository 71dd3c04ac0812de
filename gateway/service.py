"""The synthesis path every audio route shares: cache lookup, single flight, relay.

Jobs are built (checked, keyed, seeded) by `gateway.speech_keys` before any worker is contacted.
`serve` answers a hit from Redis, or joins or starts the one synthesis for its key; it returns
once the worker has accepted (so its errors still reach the client as JSON), with the audio
headers and a stream of the body. The cache is written by the flight's producer only after the
worker's stream ended cleanly, and only when the worker's `X-Model-Version` is the version in
the job's key (during a rolling upgrade another model's audio is served, never stored).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from contract.audio import CONTENT_TYPES, AudioFormat, output_sample_rate, stream_headers
from contract.complete_audio import complete_file
from contract.errors import ErrorCode, ServiceError
from contract.requests import SynthesisRequest, VoiceFeaturesRequest
from gateway.cache import AudioCache, CachedAudio
from gateway.metrics import GatewayMetrics
from gateway.request_log import RequestLog
from gateway.single_flight import Flight, FlightAbortedError, SingleFlight
from gateway.speech_keys import CacheMode, JobBuilder, SpeechInput, SpeechJob, cache_mode
from gateway.upstream import ComputedFeatures, Upstream
from gateway.voices import VoiceStore
from gateway.workers import WorkerDirectory

logger = logging.getLogger(__name__)

CACHE_HEADER = "X-Cache"
CACHE_KEY_HEADER = "X-Cache-Key"
CACHE_LABELS = ("HIT", "MISS", "BYPASS")

__all__ = [
    "AudioResult",
    "CacheMode",
    "SpeechInput",
    "SpeechJob",
    "SpeechService",
    "cache_mode",
]


@dataclass
class AudioResult:
    """Audio ready to send: the whole body (hit) or a stream (miss), and its headers."""

    cache: str
    key: str
    headers: dict[str, str]
    body: bytes | None = None
    stream: AsyncIterator[bytes] | None = None

    def response_headers(self) -> dict[str, str]:
        return {**self.headers, CACHE_HEADER: self.cache, CACHE_KEY_HEADER: self.key}


class SpeechService:
    def __init__(
        self,
        *,
        cache: AudioCache,
        flights: SingleFlight,
        upstream: Upstream,
        directory: WorkerDirectory,
        voices: VoiceStore,
        metrics: GatewayMetrics,
        openai_voices: dict[str, str],
        max_text_chars: int,
        deadline_s: float,
        request_log: RequestLog,
    ) -> None:
        self._cache = cache
        self._flights = flights
        self._upstream = upstream
        self._voices = voices
        self._metrics = metrics
        self._deadline_s = deadline_s
        self._request_log = request_log
        self._completed: dict[str, bytes] = {}
        """Finished syntheses' complete bodies while their cache entry is being written."""
        self._jobs = JobBuilder(
            directory=directory,
            voices=voices,
            openai_voices=openai_voices,
            max_text_chars=max_text_chars,
        )
        lookups, first_byte = metrics.cache_lookups, metrics.time_to_first_byte
        self._lookups = {label: lookups.labels(result=label.lower()) for label in CACHE_LABELS}
        self._first_byte = {label: first_byte.labels(cache=label) for label in CACHE_LABELS}

    async def prepare(self, given: SpeechInput, request_id: str) -> SpeechJob:
        """Check `given` and build its job (`gateway.speech_keys.JobBuilder.prepare`)."""
        return await self._jobs.prepare(given, request_id)

    async def lookup(self, job: SpeechJob) -> AudioResult | None:
        """The cached answer, or None (a miss, a bypass, or a synthesis still running).

        A synthesis that has finished but whose entry is still being written to Redis is a
        hit too, answered from the flight's memory: the bytes are complete.
        """
        if job.cache_mode is not CacheMode.USE:
            return None
        flight = self._flights.get(job.key)
        if flight is not None:
            headers = flight.finished_headers()
            if headers is None:
                return None
            body = self._completed.get(job.key)
            if body is None:
                body = complete_file(flight.body(), job.synthesis.format)
            return self._hit(job, CachedAudio(audio=body, headers=headers))
        hit = await self._cache.get(job.key)
        return None if hit is None else self._hit(job, hit)

    def _hit(self, job: SpeechJob, entry: CachedAudio) -> AudioResult:
        self._lookups["HIT"].inc()
        self._log(job, "HIT")
        self._first_byte["HIT"].observe(time.monotonic() - job.arrived)
        body = entry.audio if entry.stream is None else None  # a large entry streams in pieces
        return AudioResult(
            cache="HIT", key=job.key, headers=entry.headers, body=body, stream=entry.stream
        )

    async def serve(self, job: SpeechJob, *, cache_checked: bool = False) -> AudioResult:
        """A hit, or a miss whose worker has accepted; worker errors are raised from here.

        `cache_checked` says `lookup` already missed for this request (don't ask Redis twice).
        """
        if job.cache_mode is CacheMode.USE:
            if not cache_checked or self._flights.get(job.key) is not None:
                hit = await self.lookup(job)
                if hit is not None:
                    return hit
            flight = self._flights.join(job.key)
            if flight is not None:
                self._metrics.single_flight_joins.inc()
            else:
                flight = self._flights.start(job.key, lambda f: self._produce(job, f))
            label = "MISS"
        else:
            flight = self._flights.start(None, lambda f: self._produce(job, f))
            label = "BYPASS"
        self._lookups[label].inc()
        self._log(job, label)
        try:
            headers = await flight.headers()
        except BaseException:
            flight.unsubscribe()
            raise
        return AudioResult(
            cache=label, key=job.key, headers=headers, stream=self._relay(flight, job, label)
        )

    def _log(self, job: SpeechJob, cache: str) -> None:
        self._request_log.record(
            request_id=job.request_id, cache=cache, key=job.key, synthesis=job.synthesis
        )

    async def collect(self, job: SpeechJob) -> AudioResult:
        """`serve`, with the body read to its end and its header completed (true lengths)."""
        result = await self.serve(job)
        if result.stream is not None:
            result.body = b"".join([chunk async for chunk in result.stream])
            result.stream = None
        if result.body is not None:
            result.body = await _completed_body(result.body, job.synthesis.format)
        return result

    async def _relay(self, flight: Flight, job: SpeechJob, label: str) -> AsyncIterator[bytes]:
        sent = 0
        try:
            async for chunk in flight.chunks():
                if not sent:
                    self._first_byte[label].observe(time.monotonic() - job.arrived)
                sent += len(chunk)
                yield chunk
        except FlightAbortedError as error:
            cause = error.__cause__
            logger.warning(
                "request %s: stream aborted after %d bytes (%s: %s)",
                job.request_id,
                sent,
                type(cause).__name__,
                cause,
            )
            raise
        finally:
            flight.unsubscribe()

    async def _produce(self, job: SpeechJob, flight: Flight) -> None:
        self._metrics.active_flights.inc()
        try:
            async with asyncio.timeout(self._deadline_s):
                synthesis = await self._with_features(job)
                stream = await self._upstream.open_stream(
                    synthesis, job.request_id, deadline=job.arrived + self._deadline_s
                )
                try:
                    headers = _audio_headers(stream.headers, job.synthesis.format)
                    flight.set_headers(headers)
                    async for chunk in stream.chunks():
                        flight.append(chunk)
                finally:
                    await stream.aclose()
        except TimeoutError as error:
            raise ServiceError(
                ErrorCode.DEADLINE_EXCEEDED, "The synthesis ran past the request deadline."
            ) from error
        finally:
            self._metrics.active_flights.dec()
        flight.finish()
        if job.cache_mode is CacheMode.NO_STORE or flight.size == 0:
            return
        if stream.model_version != job.model_version:
            # A worker of another model version answered (a rolling upgrade): its audio is
            # served to this flight's listeners but never stored under this version's key.
            self._metrics.cache_version_mismatch.inc()
            logger.warning(
                "request %s: worker model version %r is not the key's %r; not cached",
                job.request_id,
                stream.model_version,
                job.model_version,
            )
            return
        # The whole body is known now: the entry gets true lengths in its header.
        complete = await _completed_body(flight.body(), job.synthesis.format)
        self._completed[job.key] = complete
        try:
            await self._cache.put(job.key, CachedAudio(audio=complete, headers=headers))
        finally:
            self._completed.pop(job.key, None)

    async def _with_features(self, job: SpeechJob) -> SynthesisRequest:
        """The worker request, with a registered voice's features read from Redis now.

        They are read only here, on a miss, so hits never move them. A voice deleted since
        `prepare` is 422 `unknown_voice`; one stored without features (registered before
        features existed) is 422 `voice_outdated`.
        """
        if job.registered_voice is None:
            return job.synthesis
        features = await self._voices.features(job.registered_voice)
        if features is None:
            if await self._voices.get(job.registered_voice) is None:
                raise ServiceError(
                    ErrorCode.UNKNOWN_VOICE,
                    f"Unknown voice {job.registered_voice!r}; see GET /v1/voices.",
                )
            raise ServiceError(
                ErrorCode.VOICE_OUTDATED,
                f"Voice {job.registered_voice!r} has no stored features; register it again.",
            )
        # model_copy skips validation: the bytes go in as they are and leave as base64.
        return job.synthesis.model_copy(update={"voice_features": features})

    async def voice_features(
        self, request: VoiceFeaturesRequest, request_id: str
    ) -> ComputedFeatures:
        """A prompt's features, computed once by a worker, for registering a voice."""
        return await self._upstream.voice_features(request, request_id)


async def _completed_body(body: bytes, audio_format: AudioFormat) -> bytes:
    """`complete_file`: a WAV header is patched in place at once; a FLAC is re-encoded in a
    thread (a few milliseconds per ten seconds of audio), off the event loop."""
    if audio_format is AudioFormat.FLAC:
        return await asyncio.to_thread(complete_file, body, audio_format)
    return complete_file(body, audio_format)


def _audio_headers(worker_headers: dict[str, str], audio_format: AudioFormat) -> dict[str, str]:
    """The worker's audio headers, completed from the contract where the worker left one out."""
    if "X-Sample-Rate" in worker_headers:
        rate = int(worker_headers["X-Sample-Rate"])
    else:
        rate = output_sample_rate(audio_format, 0)
    headers = stream_headers(audio_format, rate)
    headers.update(worker_headers)
    headers.setdefault("Content-Type", CONTENT_TYPES[audio_format])
    return headers
