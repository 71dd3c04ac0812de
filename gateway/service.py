"""The synthesis path every audio route shares: validate, key, cache lookup, single flight, relay.

Everything a request can get wrong is checked in `prepare`, before any worker is contacted.
`serve` answers a hit from Redis, or joins or starts the one synthesis for its key; it returns
once the worker has accepted (so its errors still reach the client as JSON), with the audio
headers and a stream of the body. The cache is written by the flight's producer only after the
worker's stream ended cleanly.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from enum import Enum

from contract.audio import CONTENT_TYPES, AudioFormat, output_sample_rate, stream_headers
from contract.cache_key import CACHE_KEY_PREFIX, CanonicalRequest
from contract.errors import ErrorCode, ServiceError
from contract.requests import (
    SynthesisRequest,
    VoiceFeaturesRequest,
    check_speed,
    check_text,
    seed_from_digest,
)
from gateway.cache import AudioCache, CachedAudio
from gateway.metrics import GatewayMetrics
from gateway.prompt import PromptAudio
from gateway.request_log import RequestLog
from gateway.single_flight import Flight, FlightAbortedError, SingleFlight
from gateway.upstream import ComputedFeatures, Upstream
from gateway.voices import VoiceStore, resolve_voice
from gateway.workers import EngineInfo, WorkerDirectory

logger = logging.getLogger(__name__)

CACHE_HEADER = "X-Cache"
CACHE_KEY_HEADER = "X-Cache-Key"
CACHE_LABELS = ("HIT", "MISS", "BYPASS")
PREPARED_MEMO_SIZE = 4096


class CacheMode(Enum):
    USE = "use"  # read the cache, write it after a miss
    REFRESH = "refresh"  # Cache-Control: no-cache -> synthesize afresh, store the result
    NO_STORE = "no_store"  # Cache-Control: no-store -> neither read nor write


def cache_mode(cache_control: str | None) -> CacheMode:
    """The cache mode a request's Cache-Control header asks for."""
    if not cache_control:
        return CacheMode.USE
    directives = {part.split("=")[0].strip().lower() for part in cache_control.split(",")}
    if "no-store" in directives:
        return CacheMode.NO_STORE
    if "no-cache" in directives:
        return CacheMode.REFRESH
    return CacheMode.USE


@dataclass(frozen=True)
class SpeechInput:
    """One utterance as a public route parsed it (strings not yet checked)."""

    text: str
    format: AudioFormat
    voice: str | None = None
    instruction: str | None = None
    prompt: PromptAudio | None = None
    prompt_text: str | None = None
    speed: float = 1.0
    cache_mode: CacheMode = CacheMode.USE


@dataclass(frozen=True)
class SpeechJob:
    key: str
    synthesis: SynthesisRequest
    cache_mode: CacheMode
    request_id: str
    arrived: float = field(default_factory=time.monotonic)
    registered_voice: str | None = None
    """A registered voice whose stored features go to the worker with `synthesis`."""


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
        self._directory = directory
        self._voices = voices
        self._metrics = metrics
        self._openai_voices = openai_voices
        self._max_text_chars = max_text_chars
        self._deadline_s = deadline_s
        self._request_log = request_log
        self._prepared: dict[SpeechInput, tuple[EngineInfo, str, SynthesisRequest]] = {}
        lookups, first_byte = metrics.cache_lookups, metrics.time_to_first_byte
        self._lookups = {label: lookups.labels(result=label.lower()) for label in CACHE_LABELS}
        self._first_byte = {label: first_byte.labels(cache=label) for label in CACHE_LABELS}

    async def prepare(self, given: SpeechInput, request_id: str) -> SpeechJob:
        """Validate against the engine's capabilities and compute the cache key and seed.

        The outcome for a request without a prompt depends only on the request and the
        engine's capabilities, so it is remembered (per `EngineInfo` object, which the
        directory replaces when the workers change): a repeated request, the common case on
        the hit path, skips re-validation and re-hashing.
        """
        info = await self._directory.current()
        remembered = self._prepared.get(given) if given.prompt is None else None
        registered: str | None = None
        if remembered is not None and remembered[0] is info:
            _, key, synthesis = remembered
        else:
            key, synthesis, registered, reusable = await self._key_and_request(given, info)
            if reusable and registered is None:
                if len(self._prepared) >= PREPARED_MEMO_SIZE:
                    self._prepared.clear()
                self._prepared[given] = (info, key, synthesis)
        return SpeechJob(
            key=key,
            synthesis=synthesis,
            cache_mode=given.cache_mode,
            request_id=request_id,
            registered_voice=registered,
        )

    async def _key_and_request(
        self, given: SpeechInput, info: EngineInfo
    ) -> tuple[str, SynthesisRequest, str | None, bool]:
        """The cache key, the worker request, the registered voice whose features it needs, and
        whether the first two may be reused for `given` (never for a registered voice)."""
        text = check_text(given.text, self._max_text_chars)
        speed = check_speed(given.speed, *info.speed_range)
        instruction = given.instruction.strip() if given.instruction else None
        if instruction and not info.supports_instructions:
            raise ServiceError(
                ErrorCode.INSTRUCTION_UNSUPPORTED,
                f"Engine {info.engine!r} does not take instructions.",
            )
        if given.prompt is not None and not info.supports_cloning:
            raise ServiceError(
                ErrorCode.PROMPT_UNSUPPORTED,
                f"Engine {info.engine!r} cannot clone a voice from a prompt recording.",
            )
        voice = await resolve_voice(given.voice, info, self._voices, self._openai_voices)
        registered = voice.registered if given.prompt is None else None
        worker_voice = None if given.prompt and voice.registered else voice.worker_voice
        prompt_audio = given.prompt.data if given.prompt is not None else None
        prompt_text = given.prompt_text if given.prompt is not None else None
        canonical = CanonicalRequest.build(
            text=text,
            instruction=instruction,
            voice=voice.key_voice,
            prompt_audio=prompt_audio,
            prompt_text=prompt_text,
            speed=speed,
            format=given.format.value,
            engine=info.engine,
            model_version=info.model_version,
        )
        if registered is not None:
            # The voice id plus its recording's digest: re-registering an id with another
            # recording must not hand out the old voice's audio.
            canonical = replace(
                canonical,
                prompt_audio_sha256=registered.prompt_sha256,
                prompt_text=registered.prompt_text,
            )
        digest = canonical.digest()
        synthesis = SynthesisRequest(
            text=text,
            voice=worker_voice,
            instruction=instruction,
            # Base64Bytes validates base64 text into bytes: hand it the encoded upload.
            prompt_audio=base64.b64encode(prompt_audio) if prompt_audio else None,
            prompt_text=prompt_text or None,
            speed=speed,
            format=given.format,
            seed=seed_from_digest(digest),
        )
        # Registered voices live in Redis and may change; only built-in voices are reusable.
        registered_id = registered.id if registered is not None else None
        return CACHE_KEY_PREFIX + digest, synthesis, registered_id, prompt_audio is None

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
            return self._hit(job, CachedAudio(audio=flight.body(), headers=headers))
        hit = await self._cache.get(job.key)
        return None if hit is None else self._hit(job, hit)

    def _hit(self, job: SpeechJob, entry: CachedAudio) -> AudioResult:
        self._lookups["HIT"].inc()
        self._log(job, "HIT")
        self._first_byte["HIT"].observe(time.monotonic() - job.arrived)
        return AudioResult(cache="HIT", key=job.key, headers=entry.headers, body=entry.audio)

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
        """`serve`, with a miss read to its end: the whole body in memory."""
        result = await self.serve(job)
        if result.stream is not None:
            result.body = b"".join([chunk async for chunk in result.stream])
            result.stream = None
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
                stream = await self._upstream.open_stream(synthesis, job.request_id)
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
        if job.cache_mode is not CacheMode.NO_STORE and flight.size > 0:
            await self._cache.put(job.key, CachedAudio(audio=flight.body(), headers=headers))


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
