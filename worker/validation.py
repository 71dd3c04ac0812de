"""Turn a request body into a validated EngineRequest, or a ServiceError with its own code.

Everything is checked here, before admission and before the first byte: JSON, schema, format,
text, speed, voice, and the instruction and prompt against what the engine supports.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import ValidationError

from contract.audio import AudioFormat
from contract.errors import ErrorCode, ServiceError
from contract.prompt import DEFAULT_PROMPT_RULE, read_prompt
from contract.requests import (
    SynthesisRequest,
    check_cloning,
    check_instruction,
    check_prompt_text,
    check_speed,
    check_text,
    default_seed,
)
from worker.engines.base import Capabilities, EngineRequest


@dataclass(frozen=True)
class ValidatedRequest:
    engine_request: EngineRequest
    audio_format: AudioFormat


def parse_body(body: bytes) -> SynthesisRequest:
    """JSON bytes to a SynthesisRequest.

    Raises 400 invalid_json, 422 unsupported_format (an unknown `format`), 422 invalid_request.
    """
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ServiceError(ErrorCode.INVALID_JSON, f"The body is not valid JSON: {e}") from e
    if isinstance(data, dict) and "format" in data:
        _check_format(data["format"])
    try:
        return SynthesisRequest.model_validate(data)
    except ValidationError as e:
        raise ServiceError(ErrorCode.INVALID_REQUEST, describe_error(e)) from e


def validate(
    request: SynthesisRequest, capabilities: Capabilities, *, max_text_chars: int
) -> ValidatedRequest:
    """Check a parsed request against the engine's capabilities.

    A voice id the engine does not know is accepted only with `voice_features` (a registered
    voice: the engine speaks with the features, the id only names them). A prompt recording
    with no voice named needs none, even from an engine without built-in voices (a CosyVoice3
    directory without spk2info.pt: its default voice is "").
    """
    text = check_text(request.text, max_text_chars)
    low, high = capabilities.speed_range
    speed = check_speed(request.speed, low, high)
    voice = request.voice or capabilities.default_voice
    features = request.voice_features or None
    cloning_only = bool(request.prompt_audio) and not request.voice
    if (features is None and not cloning_only
            and voice not in {known.id for known in capabilities.voices}):
        raise ServiceError(ErrorCode.UNKNOWN_VOICE, f"Unknown voice {voice!r}; see /v1/info.")
    instruction = check_instruction(
        request.instruction,
        supported=capabilities.supports_instructions,
        engine=capabilities.engine,
    )
    has_audio = bool(request.prompt_audio)
    if features is not None and (has_audio or _present(request.prompt_text) is not None):
        raise ServiceError(
            ErrorCode.INVALID_REQUEST,
            "Send either voice_features or a prompt recording, not both.",
        )
    check_cloning(
        has_audio or features is not None,
        supported=capabilities.supports_cloning,
        engine=capabilities.engine,
    )
    prompt_text = check_prompt_text(request.prompt_text, has_prompt_audio=has_audio)
    prompt_audio, prompt_rate = (None, None)
    if request.prompt_audio:
        prompt_audio, prompt_rate = decode_prompt(request.prompt_audio)
    seed = request.seed if request.seed is not None else default_seed(request)
    return ValidatedRequest(
        engine_request=EngineRequest(
            text=text,
            voice=voice,
            speed=speed,
            seed=seed,
            instruction=instruction,
            prompt_audio=prompt_audio,
            prompt_sample_rate=prompt_rate,
            prompt_text=prompt_text,
            voice_features=features,
        ),
        audio_format=request.format,
    )


def decode_prompt(data: bytes) -> tuple[np.ndarray[Any, np.dtype[np.float32]], int]:
    """Decode prompt audio to mono float32 and apply the contract's prompt rule
    (`contract.prompt`): 415 prompt_not_audio, 422 prompt_too_short/too_long/silent."""
    return read_prompt(data, DEFAULT_PROMPT_RULE)


def _check_format(value: Any) -> None:
    if value not in {audio_format.value for audio_format in AudioFormat}:
        known = ", ".join(audio_format.value for audio_format in AudioFormat)
        raise ServiceError(
            ErrorCode.UNSUPPORTED_FORMAT, f"Unsupported format {value!r}; use one of: {known}."
        )


def _present(value: str | None) -> str | None:
    """Blank strings count as absent (forms send empty fields); anything else is used."""
    if value is None or not value.strip():
        return None
    return value.strip()


def describe_error(error: ValidationError) -> str:
    parts = []
    for item in error.errors(include_url=False, include_input=False):
        location = ".".join(str(part) for part in item["loc"]) or "body"
        parts.append(f"{location}: {item['msg']}")
    return "Invalid request: " + "; ".join(parts)
