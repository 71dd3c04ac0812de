"""Pydantic models of what the public routes send back, and of the form bodies they read.

The routes build their JSON answers from these models, so the OpenAPI schema (gateway.openapi)
describes exactly what goes out. The form models describe the multipart fields the routes
parse by hand (a prompt upload is checked in full before anything else is read from it).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import SkipJsonSchema

from contract.audio import AudioFormat
from contract.info import EngineInfo

VOICE_ID_REGEX = r"^[A-Za-z0-9_-]{1,64}$"
OPENAI_FORMATS = ("mp3", "opus", "flac", "wav", "pcm")
ALL_FORMATS = tuple(item.value for item in AudioFormat)


def _form_schema(schema: dict[str, Any]) -> None:
    """Form fields are absent or text: drop the `null` defaults of optional fields."""
    for field in schema.get("properties", {}).values():
        if field.get("default", "") is None:
            del field["default"]


FORM_CONFIG = ConfigDict(json_schema_extra=_form_schema)


class ErrorDetail(BaseModel):
    code: str = Field(description="Stable error code (contract/errors.py).")
    message: str = Field(description="What went wrong, written for the client.")


class ErrorBody(BaseModel):
    """Every error the service answers: `{"error": {"code", "message"}}`."""

    error: ErrorDetail


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    status: Literal["ready"]
    engine: str | None
    model_version: str | None
    cache: Literal["up", "down"] = Field(description="Whether Redis answers; not required.")


class ModelObject(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "cosyvoice-serve"
    capabilities: EngineInfo = Field(
        description="The engine behind the name, as the workers report it."
    )


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelObject]


class BuiltinVoiceOut(BaseModel):
    id: str
    name: str
    type: Literal["builtin"] = "builtin"
    engine: str
    language: str
    description: str
    default: bool


class RegisteredVoiceOut(BaseModel):
    """A voice registered from a prompt recording; its features are stored, not the recording."""

    id: str
    name: str
    type: Literal["registered"] = "registered"
    engine: str
    model_version: str = Field(
        description=(
            "Model version that computed the stored features; once the workers run another, "
            "requests naming the voice get 422 `voice_outdated` until it is registered again."
        )
    )
    prompt_text: str | None
    prompt_sha256: str = Field(description="SHA-256 of the uploaded recording.")
    created_at: int = Field(description="Registration time, Unix seconds.")


class VoiceList(BaseModel):
    object: Literal["list"] = "list"
    data: list[BuiltinVoiceOut | RegisteredVoiceOut]
    openai_aliases: dict[str, str] = Field(description="OpenAI voice name -> engine voice id.")
    has_more: bool = Field(default=False, description="Whether a next page exists.")
    last_id: str | None = Field(
        default=None, description="The last voice of this page: the next page's `after`."
    )


class BatchSuccess(BaseModel):
    index: int
    status: Literal[200] = 200
    cache: Literal["HIT", "MISS", "BYPASS"]
    cache_key: str
    content_type: str | None
    format: str | None
    sample_rate: int
    audio: str = Field(description="Base64 of the whole audio response body.")


class BatchFailure(BaseModel):
    index: int
    status: int = Field(ge=400, le=599)
    error: ErrorDetail


class BatchResponse(BaseModel):
    object: Literal["list"] = "list"
    results: list[BatchSuccess | BatchFailure] = Field(description="One result per item, in order.")


class SpeechUsage(BaseModel):
    input_tokens: int = Field(description="Input characters.")
    output_tokens: int
    total_tokens: int


class SpeechAudioDelta(BaseModel):
    """The JSON `data` of one SSE event carrying audio."""

    type: Literal["speech.audio.delta"]
    audio: str = Field(description="Base64 of the next audio bytes.")


class SpeechAudioDone(BaseModel):
    """The JSON `data` of the last SSE event."""

    type: Literal["speech.audio.done"]
    usage: SpeechUsage


class SynthesizeForm(BaseModel):
    """POST /synthesize form fields; every field but `text` may be left out."""

    model_config = FORM_CONFIG

    text: str = Field(min_length=1, description="Text to speak (NFC-normalized and trimmed).")
    instruction: str | SkipJsonSchema[None] = None
    voice: str | SkipJsonSchema[None] = Field(
        default=None, description="A built-in voice, an OpenAI voice name or a registered id."
    )
    format: Literal[ALL_FORMATS] = AudioFormat.PCM_F32LE.value  # type: ignore[valid-type]
    speed: float = Field(default=1.0, ge=0.25, le=4.0)
    prompt_text: str | SkipJsonSchema[None] = None
    prompt_audio: bytes | SkipJsonSchema[None] = Field(
        default=None, description="A prompt recording to clone (WAV, FLAC, MP3 or Ogg)."
    )


class SynthesizeUrlencodedForm(BaseModel):
    """POST /synthesize as an urlencoded form: the same fields, without a prompt upload."""

    model_config = FORM_CONFIG

    text: str = Field(min_length=1)
    instruction: str | SkipJsonSchema[None] = None
    voice: str | SkipJsonSchema[None] = None
    format: Literal[ALL_FORMATS] = AudioFormat.PCM_F32LE.value  # type: ignore[valid-type]
    speed: float = Field(default=1.0, ge=0.25, le=4.0)
    prompt_text: str | SkipJsonSchema[None] = None


class VoiceForm(BaseModel):
    """POST /v1/voices form fields."""

    model_config = FORM_CONFIG

    prompt_audio: bytes = Field(description="The prompt recording (WAV, FLAC, MP3 or Ogg).")
    prompt_text: str | SkipJsonSchema[None] = Field(
        default=None, description="Transcript of the recording."
    )
    name: str | SkipJsonSchema[None] = None
    id: str | SkipJsonSchema[None] = Field(
        default=None, json_schema_extra={"pattern": VOICE_ID_REGEX}
    )
