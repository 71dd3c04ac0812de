"""Building a synthesis job: every check, the cache key, the worker request and its seed.

Everything a request can get wrong is checked here, with the contract's checks
(`contract.requests`), before any worker is contacted; relaying the audio is `gateway.service`.
"""

from __future__ import annotations

import base64
import time
from dataclasses import dataclass, field, replace
from enum import Enum

from contract.audio import AudioFormat
from contract.cache_key import CanonicalRequest
from contract.info import EngineInfo
from contract.requests import (
    SynthesisRequest,
    check_cloning,
    check_instruction,
    check_prompt_text,
    check_speed,
    check_text,
    request_seed,
)
from gateway.prompt import PromptAudio
from gateway.voices import VoiceStore, resolve_voice
from gateway.workers import WorkerDirectory

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
    model_version: str = ""
    """The model version in `key`: only audio a worker of this version made may be stored."""
    arrived: float = field(default_factory=time.monotonic)
    registered_voice: str | None = None
    """A registered voice whose stored features go to the worker with `synthesis`."""


@dataclass(frozen=True)
class _Prepared:
    info: EngineInfo
    key: str
    synthesis: SynthesisRequest


class JobBuilder:
    """Turns a `SpeechInput` into a `SpeechJob` against the workers' current capabilities."""

    def __init__(
        self,
        *,
        directory: WorkerDirectory,
        voices: VoiceStore,
        openai_voices: dict[str, str],
        max_text_chars: int,
    ) -> None:
        self._directory = directory
        self._voices = voices
        self._openai_voices = openai_voices
        self._max_text_chars = max_text_chars
        self._prepared: dict[SpeechInput, _Prepared] = {}

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
        if remembered is not None and remembered.info is info:
            key, synthesis = remembered.key, remembered.synthesis
        else:
            key, synthesis, registered, reusable = await self._key_and_request(given, info)
            if reusable and registered is None:
                if len(self._prepared) >= PREPARED_MEMO_SIZE:
                    self._prepared.clear()
                self._prepared[given] = _Prepared(info=info, key=key, synthesis=synthesis)
        return SpeechJob(
            key=key,
            synthesis=synthesis,
            cache_mode=given.cache_mode,
            request_id=request_id,
            model_version=info.model_version,
            registered_voice=registered,
        )

    async def _key_and_request(
        self, given: SpeechInput, info: EngineInfo
    ) -> tuple[str, SynthesisRequest, str | None, bool]:
        """The cache key, the worker request, the registered voice whose features it needs, and
        whether the first two may be reused for `given` (never for a registered voice)."""
        text = check_text(given.text, self._max_text_chars)
        speed = check_speed(given.speed, *info.speed_range)
        instruction = check_instruction(
            given.instruction, supported=info.supports_instructions, engine=info.engine
        )
        check_cloning(
            given.prompt is not None, supported=info.supports_cloning, engine=info.engine
        )
        prompt_text = check_prompt_text(
            given.prompt_text, has_prompt_audio=given.prompt is not None
        )
        voice = await resolve_voice(given.voice, info, self._voices, self._openai_voices)
        registered = voice.registered if given.prompt is None else None
        worker_voice = None if given.prompt and voice.registered else voice.worker_voice
        prompt_audio = given.prompt.data if given.prompt is not None else None
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
        synthesis = SynthesisRequest(
            text=text,
            voice=worker_voice,
            instruction=instruction,
            # Base64Bytes validates base64 text into bytes: hand it the encoded upload.
            prompt_audio=base64.b64encode(prompt_audio) if prompt_audio else None,
            prompt_text=prompt_text,
            speed=speed,
            format=given.format,
            seed=request_seed(
                text=text,
                voice=canonical.voice,
                instruction=instruction,
                prompt_text=canonical.prompt_text,
                prompt_sha256=canonical.prompt_audio_sha256,
                speed=speed,
            ),
        )
        # Registered voices live in Redis and may change; only built-in voices are reusable.
        registered_id = registered.id if registered is not None else None
        return canonical.cache_key(), synthesis, registered_id, prompt_audio is None
