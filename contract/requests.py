"""The synthesis request a gateway sends a worker, and the checks both sides apply to it."""

from __future__ import annotations

import hashlib
import unicodedata

from pydantic import Base64Bytes, BaseModel, ConfigDict, Field

from contract.audio import AudioFormat
from contract.errors import ErrorCode, ServiceError

DEFAULT_MAX_TEXT_CHARS = 4096
SPEED_MIN = 0.25
SPEED_MAX = 4.0
REQUEST_ID_HEADER = "X-Request-ID"
ENGINE_HEADER = "X-Engine"
MODEL_VERSION_HEADER = "X-Model-Version"
VOICE_FEATURES_PATH = "/v1/voices/features"
SYNTHESIZE_PATH = "/v1/synthesize"
"""The worker's synthesis route (`SynthesisRequest` as JSON in, the audio stream out)."""
MAX_QUEUE_WAIT_HEADER = "X-Max-Queue-Wait"
"""Seconds a worker may keep the request in its queue before refusing it with 503 `busy`
(the gateway's remaining retry budget); the worker's own `queue_timeout_s` still caps it."""


class SynthesisRequest(BaseModel):
    """One utterance to synthesize, as `POST /v1/synthesize` on a worker takes it (JSON)."""

    model_config = ConfigDict(extra="forbid")

    text: str
    voice: str | None = Field(
        default=None, description="Voice id; the engine's default when unset."
    )
    instruction: str | None = Field(default=None, description="Style instruction (instruct mode).")
    prompt_audio: Base64Bytes | None = Field(
        default=None, description="A prompt recording to clone, as the uploaded file's bytes."
    )
    prompt_text: str | None = Field(default=None, description="Transcript of the prompt recording.")
    voice_features: Base64Bytes | None = Field(
        default=None,
        description=(
            "A registered voice's prompt features, as the engine's `POST /v1/voices/features` "
            "returned them; `voice` then names the registered voice."
        ),
    )
    speed: float = 1.0
    format: AudioFormat = AudioFormat.PCM_F32LE
    seed: int | None = Field(
        default=None,
        ge=0,
        lt=2**63,
        description="Sampling seed; derived from the request itself when unset.",
    )


class VoiceFeaturesRequest(BaseModel):
    """A prompt recording to turn into voice features, as `POST /v1/voices/features` takes it.

    The worker answers with the engine's feature blob (application/octet-stream) and names the
    engine and model version that made it in `X-Engine` and `X-Model-Version`.
    """

    model_config = ConfigDict(extra="forbid")

    prompt_audio: Base64Bytes = Field(description="The recording, as the uploaded file's bytes.")
    prompt_text: str | None = Field(default=None, description="Transcript of the recording.")


def normalize_text(text: str) -> str:
    """Unicode NFC, trimmed: the text every check and the cache key see."""
    return unicodedata.normalize("NFC", text).strip()


def check_text(text: str, max_chars: int = DEFAULT_MAX_TEXT_CHARS) -> str:
    """Return the normalized text, or raise for empty or oversized text."""
    normalized = normalize_text(text)
    if not normalized:
        raise ServiceError(ErrorCode.TEXT_EMPTY, "Text is empty or only whitespace.")
    if len(normalized) > max_chars:
        raise ServiceError(
            ErrorCode.TEXT_TOO_LONG,
            f"Text has {len(normalized)} characters; the limit is {max_chars}.",
        )
    if any(_is_control(char) for char in normalized):
        raise ServiceError(
            ErrorCode.TEXT_INVALID,
            "Text contains control characters; only tabs and newlines are allowed.",
        )
    return normalized


def _is_control(char: str) -> bool:
    return unicodedata.category(char) == "Cc" and char not in "\t\n\r"


def check_speed(speed: float, low: float = SPEED_MIN, high: float = SPEED_MAX) -> float:
    if not low <= speed <= high:
        raise ServiceError(
            ErrorCode.SPEED_OUT_OF_RANGE, f"Speed must be between {low} and {high}."
        )
    return speed


def seed_from_digest(hex_digest: str) -> int:
    """A 63-bit sampling seed from a hex digest, so equal requests sample equally everywhere."""
    return int(hex_digest[:16], 16) & (2**63 - 1)


def default_seed(request: SynthesisRequest) -> int:
    """The seed for a request that names none: a digest of everything that shapes the audio."""
    parts = [
        normalize_text(request.text),
        request.voice or "",
        request.instruction or "",
        request.prompt_text or "",
        hashlib.sha256(request.prompt_audio or b"").hexdigest(),
        repr(float(request.speed)),
    ]
    if request.voice_features:
        parts.append(hashlib.sha256(request.voice_features).hexdigest())
    digest = hashlib.sha256("\x1f".join(parts).encode()).hexdigest()
    return seed_from_digest(digest)
