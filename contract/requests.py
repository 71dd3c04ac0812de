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
    if not any(_is_speakable(char) for char in normalized):
        raise ServiceError(
            ErrorCode.TEXT_EMPTY,
            "The text has nothing to speak (no letters, digits or symbols, only punctuation).",
        )
    return normalized


def _is_speakable(char: str) -> bool:
    """Letters, digits and symbols (`%`, `$`) are read aloud; punctuation alone is not."""
    return unicodedata.category(char)[0] in "LNS"


def _is_control(char: str) -> bool:
    return unicodedata.category(char) == "Cc" and char not in "\t\n\r"


def check_speed(speed: float, low: float = SPEED_MIN, high: float = SPEED_MAX) -> float:
    if not low <= speed <= high:
        raise ServiceError(
            ErrorCode.SPEED_OUT_OF_RANGE, f"Speed must be between {low} and {high}."
        )
    return speed


def check_instruction(instruction: str | None, *, supported: bool, engine: str) -> str | None:
    """The trimmed instruction (None when blank); 422 `instruction_unsupported` on an engine
    that takes none."""
    present = _present(instruction)
    if present is not None and not supported:
        raise ServiceError(
            ErrorCode.INSTRUCTION_UNSUPPORTED, f"The {engine} engine does not take instructions."
        )
    return present


def check_prompt_text(prompt_text: str | None, *, has_prompt_audio: bool) -> str | None:
    """The trimmed transcript (None when blank); 422 `prompt_text_without_audio` when it comes
    without the recording it transcribes (it would otherwise be silently dropped)."""
    present = _present(prompt_text)
    if present is not None and not has_prompt_audio:
        raise ServiceError(
            ErrorCode.PROMPT_TEXT_WITHOUT_AUDIO,
            "prompt_text is the transcript of prompt_audio: send the recording with it, "
            "or leave prompt_text out.",
        )
    return present


def check_cloning(has_prompt: bool, *, supported: bool, engine: str) -> None:
    """422 `prompt_unsupported` for a prompt recording on an engine that cannot clone."""
    if has_prompt and not supported:
        raise ServiceError(
            ErrorCode.PROMPT_UNSUPPORTED,
            f"The {engine} engine cannot clone a voice from a prompt recording.",
        )


def _present(value: str | None) -> str | None:
    """Blank strings count as absent (forms send empty fields); anything else is trimmed."""
    if value is None or not value.strip():
        return None
    return value.strip()


# The seed rule. Sampling is seeded from what shapes the speech (not the output format, so a
# WAV and an MP3 of one request say the same thing), and the same on every worker.

SEED_MODULUS = 2**63
PIECE_SEED_STRIDE = 7919
"""Piece `i` of an utterance (a sentence an engine synthesizes on its own) samples with
`piece_seed(seed, i)`, so that pieces differ yet follow from the request's seed."""


def seed_from_digest(hex_digest: str) -> int:
    """A 63-bit sampling seed from a hex digest, so equal requests sample equally everywhere."""
    return int(hex_digest[:16], 16) & (SEED_MODULUS - 1)


def request_seed(
    *,
    text: str,
    voice: str | None,
    instruction: str | None,
    prompt_text: str | None,
    prompt_sha256: str | None,
    speed: float,
) -> int:
    """The seed of a request: a digest of its normalized text, voice, instruction, prompt
    (transcript and the recording's SHA-256) and speed. The gateway sends it with every
    synthesis; a worker computes it the same way for a request that names none."""
    parts = [
        normalize_text(text),
        voice or "",
        normalize_text(instruction or ""),
        normalize_text(prompt_text or ""),
        prompt_sha256 or "",
        repr(round(float(speed), 4)),
    ]
    digest = hashlib.sha256("\x1f".join(parts).encode()).hexdigest()
    return seed_from_digest(digest)


def default_seed(request: SynthesisRequest) -> int:
    """The seed for a request that names none (`request_seed` of its fields; a registered
    voice's features stand for its recording)."""
    recording = request.prompt_audio or request.voice_features
    return request_seed(
        text=request.text,
        voice=request.voice,
        instruction=request.instruction,
        prompt_text=request.prompt_text,
        prompt_sha256=hashlib.sha256(recording).hexdigest() if recording else None,
        speed=request.speed,
    )


def piece_seed(seed: int, index: int) -> int:
    """The sampling seed of an utterance's piece `index` (0 for the first)."""
    return (seed + index * PIECE_SEED_STRIDE) % SEED_MODULUS
